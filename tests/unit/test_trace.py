"""The trace's field list: one spelling, tied to the sampler hooks that carry the same tensors."""

from __future__ import annotations

import torch

from diffusionlens import HookedDiffusionGemma
from diffusionlens.sampling.trace import SAMPLER_HOOK_OF_FIELD, STEP_FIELDS, TOKEN_FIELDS


def test_every_trace_field_is_what_its_sampler_hook_saw():
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    seen: dict[str, list[torch.Tensor]] = {hook: [] for hook in SAMPLER_HOOK_OF_FIELD.values()}
    hooks = [(hook, lambda value, hook: seen[hook.name].append(value.clone())) for hook in seen]
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    result = model.generate(ids, max_new_tokens=model.cfg.canvas_length, fwd_hooks=hooks, progress=False)
    trace = result.trace[0]
    # A row that stopped keeps its argmax and canvas in the trace, as the reference does, while the
    # hooks still see that step's raw decision: compare only rows still running at each step.
    running = torch.ones_like(trace.finished)
    running[1:] = ~trace.finished[:-1]
    assert set(SAMPLER_HOOK_OF_FIELD) <= set(STEP_FIELDS) and set(TOKEN_FIELDS) <= set(STEP_FIELDS)
    for field, hook in SAMPLER_HOOK_OF_FIELD.items():
        hooked = torch.stack(seen[hook])
        recorded = getattr(trace, field)
        assert hooked.shape == recorded.shape, field
        assert torch.equal(hooked[running], recorded[running]), field
