"""The runtime type checker the tests wrap `diffusionlens` in (see conftest.py).

PEP 484's numeric tower is on, so an `int` passes where a `float` is annotated, as a static type
checker allows; everything else, tensor shapes included, is checked exactly.
"""

from beartype import BeartypeConf, beartype

pep484_beartype = beartype(conf=BeartypeConf(is_pep484_tower=True))
