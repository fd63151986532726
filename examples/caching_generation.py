"""Record a generation of the toy model with filters, on disk, and read it back lazily.

python examples/caching_generation.py
"""

import tempfile

from diffusionlens import DenoisingCache, GenerationSettings, HookedDiffusionGemma, ReplayNoise, estimate_cache_bytes

model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
ids = model.to_tokens("squares 400 800:")
names = ["decoder.blocks.*.hook_resid_pre", "decoder.blocks.5.hook_resid_post", "sampler.hook_entropy"]
print(
    "estimate:",
    estimate_cache_bytes(
        model.cfg,
        model.resolve_hook_names(names),
        prompt_len=ids.shape[1],
        steps=GenerationSettings.max_denoising_steps,
        dtype=model.dtype,
    ),
    "bytes at most",
)
with tempfile.TemporaryDirectory() as path:
    result, cache = model.generate_with_cache(
        ids, names_filter=names, storage="disk", path=path, max_new_tokens=48, noise=ReplayNoise(0), progress=False
    )
    reopened = DenoisingCache.load(path, model=model)  # lazy: tensors are read when asked for
    print("steps recorded:", reopened.steps(0))
    print("entropy per step, first 6 positions:\n", reopened["sampler.hook_entropy"][:, 0, :6])
    view = reopened.step_cache(step=0)
    lens = view.logit_lens()  # [layers + 1, batch, pos, vocab] at step 0
    tok = model.tokenizer
    print(
        "logit lens at step 0, position 0 (the count), top token per layer:",
        [tok.decode([int(t)]) for t in lens[:, 0, 0].argmax(-1)],
    )
