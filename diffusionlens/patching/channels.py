"""The three channels information can take into a denoising step, each patchable on its own.

- "tokens": the canvas tokens carried from one step to the next (`sampler.hook_canvas_next`);
- "self_cond": the previous step's logits fed back through self-conditioning
  (`decoder.self_cond.hook_logits_in`);
- "prompt": what the decoder reads from the prompt, the encoder's keys and values
  (`encoder.blocks.*.attn.hook_rot_k` and `hook_v`).

Patching one channel from a clean run while the others stay corrupted splits what flows through
discrete tokens from what flows through the continuous self-conditioning signal.
"""

from __future__ import annotations

from diffusionlens.cache.selectors import Selector
from diffusionlens.patching.spec import Patch, Source

CHANNELS = {
    "tokens": ["sampler.hook_canvas_next"],
    "self_cond": ["decoder.self_cond.hook_logits_in"],
    "prompt": ["encoder.blocks.*.attn.hook_rot_k", "encoder.blocks.*.attn.hook_v"],
}


def channel_patches(channel: str, source: Source, steps: Selector = "all", positions: Selector = "all") -> list[Patch]:
    """Patches that carry one channel from `source` (the clean run's cache).

    For "tokens", step s's patched canvas is the one step s + 1 reads; for "self_cond", step s's patch
    replaces the logits step s reads (written by step s - 1). Record the channel's hooks in the clean run.
    """
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}; choose one of {', '.join(CHANNELS)}")
    return [Patch(hook, source, steps=steps, positions=positions) for hook in CHANNELS[channel]]
