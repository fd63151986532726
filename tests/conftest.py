"""Test-run settings shared by every test file.

jaxtyping's import hook wraps every function and dataclass in `diffusionlens` with a beartype check of
its annotations, shapes included, so a wrong shape annotation fails a test instead of misleading a
reader. It must be installed before anything imports `diffusionlens`, which is why it lives here.
"""

from __future__ import annotations

from jaxtyping import install_import_hook

install_import_hook("diffusionlens", "beartype.beartype")
