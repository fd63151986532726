"""Opaque serial depth of the toy model's passes and of a whole generation, with and without the
token bottleneck (the same report on the real 26B config: `diffusionlens depth --config real`).

    python examples/depth.py
"""

from diffusionlens.serial_depth import report
from diffusionlens.toy.train import toy_config

result = report(toy_config().to_hf(), prompt_len=17, steps=48, readout_k=8)  # the toy vocabulary has 44 tokens
print(result)
