"""The benchmark cases. Each returns rows: {case, ours, reference, unit, ratio, target, met, note}."""

from __future__ import annotations

import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from benchmarks.models import Pair
from benchmarks.timing import Timer
from diffusionlens import ReplayNoise
from diffusionlens.patching import LogitDiff, Patch, patch_sweep, record_run, run_patched

RESID_POST = "*.hook_resid_post"
ENTROPY_BOUND = 0.1


def row(case: str, ours: float, ref: float | None, target: float | None, note: str = "", unit: str = "s") -> dict:
    """`ours` and `ref` are the two measured quantities (seconds unless `unit` says bytes); ratio = ours / ref."""
    ratio = ours / ref if ref else None
    met = None if target is None or ratio is None else bool(ratio <= target)
    return dict(case=case, ours=ours, reference=ref, unit=unit, ratio=ratio, target=target, met=met, note=note)


# --------------------------------------------------------------------------- 1, 2: one decoder pass
def _decoder_inputs(pair: Pair):
    """Both models' prompt caches for the same prompt, one canvas and self-conditioning logits, and a
    transformers decoder call with its attention masks prepared once, as its `generate` does."""
    ours, ref, cfg = pair.ours, pair.reference, pair.ours.cfg
    ids = pair.prompt(0)
    g = torch.Generator().manual_seed(1)
    canvas = torch.randint(0, cfg.vocab_size, (pair.batch, cfg.canvas_length), generator=g).to(ours.device)
    self_cond = (3 * torch.randn(pair.batch, cfg.canvas_length, cfg.vocab_size, generator=g)).to(
        ours.device, ours.dtype
    )
    state = ours.encode(ids)
    pkv = ref(input_ids=ids, decoder_input_ids=canvas).past_key_values
    n = ids.shape[1]
    visible = torch.ones(pair.batch, n + cfg.canvas_length, dtype=torch.bool, device=ids.device)
    masks = ref.model.decoder.create_diffusion_decoder_attention_mask(
        config=ref.config, inputs_embeds=canvas.unsqueeze(-1), past_key_values=pkv, decoder_attention_mask=visible
    )
    positions = torch.arange(n, n + cfg.canvas_length, dtype=torch.int32, device=ids.device)[None]

    def ours_pass():
        return ours.denoise(canvas, state, self_cond)

    def ref_pass():
        return ref(
            decoder_input_ids=canvas,
            self_conditioning_logits=self_cond,
            decoder_attention_mask=masks,
            past_key_values=pkv,
            decoder_position_ids=positions,
        ).logits

    return ours_pass, ref_pass


def decoder_pass(pair: Pair, timer: Timer) -> list[dict]:
    ours_pass, ref_pass = _decoder_inputs(pair)
    diff = float((ours_pass() - ref_pass()).abs().max())
    t = timer.measure({"ours": ours_pass, "transformers": ref_pass})
    return [row("1 decoder pass", t["ours"], t["transformers"], 1.05, f"max |logit diff| {diff:.2g}")]


def decoder_pass_hooked(pair: Pair, timer: Timer) -> list[dict]:
    ours_pass, ref_pass = _decoder_inputs(pair)
    ours, ref = pair.ours, pair.reference
    store: dict[str, object] = {}

    def identity(x, hook):
        return x

    def capture(name):
        def fn(module, args, output):
            store[name] = output

        return fn

    handles = [m.register_forward_hook(capture(n)) for n, m in ref.named_modules() if n]
    try:
        # every point that fires: a hook on a switched-off one (attn.hook_result, moe.hook_expert_out) is refused
        with ours.hooks(fwd_hooks=[(lambda name: ours.switch_needed(name) is None, identity)]):
            t = timer.measure({"ours": ours_pass, "transformers": lambda: (store.clear(), ref_pass())})
    finally:
        for h in handles:
            h.remove()
    note = f"ours {len(ours.hook_dict)} hook points; transformers {len(handles)} module hooks"
    return [row("2 decoder pass, all hooks", t["ours"], t["transformers"], 1.05, note)]


# --------------------------------------------------------------------------- 3, 4, 5: generation and caches
def _gen_kwargs(pair: Pair) -> dict:
    canvases = 2 if pair.name == "toy" else 1
    return dict(
        max_new_tokens=pair.ours.cfg.canvas_length * canvases,
        max_denoising_steps=pair.steps,
        pad_token_id=0,
        eos_token_id=None,
    )


def _passes(result) -> int:
    return sum(c.n_steps for c in result.trace.canvases)


def generation(pair: Pair, timer: Timer) -> list[dict]:
    ours, ref, ids, kw = pair.ours, pair.reference, pair.prompt(2), _gen_kwargs(pair)
    sampler = EntropyBoundSamplerConfig(entropy_bound=ENTROPY_BOUND)
    out: dict[str, object] = {}

    def run_ours():
        torch.manual_seed(0)
        out["ours"] = ours.generate(ids, entropy_bound=ENTROPY_BOUND, progress=False, **kw)

    def run_ref():
        torch.manual_seed(0)
        out["ref"] = ref.generate(ids, sampler_config=sampler, **kw).sequences

    def run_replay():
        out["replay"] = ours.generate(ids, entropy_bound=ENTROPY_BOUND, noise=ReplayNoise(0), progress=False, **kw)

    def run_cached():
        torch.manual_seed(0)
        out["cached"] = ours.generate_with_cache(
            ids, names_filter=RESID_POST, entropy_bound=ENTROPY_BOUND, progress=False, **kw
        )

    t = timer.measure({"ours": run_ours, "transformers": run_ref, "replay": run_replay, "cached": run_cached})
    same = bool(torch.equal(out["ours"].sequences, out["ref"]))
    cached_result, cache = out["cached"]
    same_cached = bool(torch.equal(cached_result.sequences, out["ref"]))
    passes, replay_passes = _passes(out["ours"]), _passes(out["replay"])
    print(f"    [{pair.name}] generate: tokens identical to transformers: {same} ({passes} decoder passes)")
    # Per decoder pass, because ReplayNoise's draws may stop a trained model at another step.
    per_ref = t["transformers"] / passes
    rows = [
        row(
            "3 generate (TorchRNGNoise)",
            t["ours"],
            t["transformers"],
            1.0,
            f"tokens identical: {same}; {passes} passes",
        ),
        row(
            "3 generate (ReplayNoise), per pass",
            t["replay"] / replay_passes,
            per_ref,
            0.8,
            f"{replay_passes} passes (transformers {passes})",
        ),
        row(
            "4 generate_with_cache resid_post vs (3)",
            t["cached"],
            t["ours"],
            None,
            f"overhead {100 * (t['cached'] / t['ours'] - 1):+.1f}%; tokens identical: {same_cached}",
        ),
    ]
    return rows + cache_memory(pair, cache, cached_result, ids)


def _requested_bytes(pair: Pair, result, n_positions: int | None) -> int:
    """What the recorded values must occupy: d_model values per layer, row and position, for every
    encoder call and every decoder step the run made."""
    cfg, batch = pair.ours.cfg, pair.batch
    per_value = cfg.hidden_size * torch.empty((), dtype=pair.ours.dtype).element_size() * cfg.num_hidden_layers * batch
    total = 0
    for c, canvas_trace in enumerate(result.trace.canvases):
        encoded = pair.prompt_len if c == 0 else cfg.canvas_length
        total += per_value * encoded
        total += per_value * canvas_trace.n_steps * (n_positions or cfg.canvas_length)
    return total


def cache_memory(pair: Pair, cache, result, ids) -> list[dict]:
    rows = [row("5 cache bytes / requested", cache.nbytes(), _requested_bytes(pair, result, None), 1.0, unit="B")]
    kw = _gen_kwargs(pair)
    positions = [0, 1, 2]
    result_p, cache_p = pair.ours.generate_with_cache(
        ids, names_filter=RESID_POST, positions=positions, noise=ReplayNoise(0), progress=False, **kw
    )
    requested = _requested_bytes(pair, result_p, len(positions))
    rows.append(row("5 cache bytes / requested, 3 positions", cache_p.nbytes(), requested, 1.0, unit="B"))
    return rows


# --------------------------------------------------------------------------- 6: patching
def patching(pair: Pair, timer: Timer, quick: bool) -> list[dict]:
    ours, cfg = pair.ours, pair.ours.cfg
    kw = dict(max_new_tokens=cfg.canvas_length, max_denoising_steps=pair.steps, eos_token_id=None, pad_token_id=0)
    hook = "decoder.blocks.{layer}.hook_resid_post"
    names = [hook.format(layer=i) for i in range(cfg.num_hidden_layers)]
    clean = record_run(ours, pair.prompt(3), names_filter=names, **kw)
    corrupted = record_run(ours, pair.prompt(4), names_filter=names, **kw)
    metric = LogitDiff(position=0, good=3, bad=4)
    positions = list(range(2 if quick else 4))
    layers = list(range(cfg.num_hidden_layers))
    cells = len(positions) * len(layers)
    last = corrupted.trace.steps(0) - 1
    base = corrupted.trace[0]
    self_cond = corrupted.cache.get("decoder.self_cond.hook_logits_in", canvas=0, step=last) if last > 0 else None

    def sweep():
        patch_sweep(
            ours,
            clean,
            corrupted,
            hook,
            ("layer", "position"),
            metric,
            positions=positions,
            path="reference",
            progress=False,
        )

    def plain_frozen():
        # What one frozen cell computes, with no patching machinery: encode, one decoder pass, the metric.
        with torch.inference_mode():
            state = ours.encode(corrupted.input_ids)
            logits = ours.denoise(base.input_canvas[last], state, self_cond)
        return float(metric.on_logits(logits))

    t = timer.measure({"sweep": sweep, "plain": lambda: [plain_frozen() for _ in range(cells)]}, repeats=3)
    rows = [
        row("6 frozen patch sweep, per cell / plain", t["sweep"] / cells, t["plain"] / cells, 1.1, f"{cells} cells")
    ]

    patch = Patch(hook.format(layer=0), clean.cache, positions=0)

    patched_runs = []

    def patched_free():
        patched_runs[:] = [run_patched(ours, corrupted, patch, mode="free")]

    def plain_free():
        ours.generate(corrupted.input_ids, noise=ReplayNoise(0), progress=False, **kw)

    t = timer.measure({"patched": patched_free, "plain": plain_free}, repeats=3)
    # A patch may change how many steps the free run takes before it stops: compare per decoder pass.
    # (ReplayNoise makes every timed run identical, so the last one's trace stands for all.)
    patched_passes = sum(c.n_steps for c in patched_runs[0].trace.canvases)
    plain_passes = sum(c.n_steps for c in corrupted.trace.canvases)
    rows.append(
        row(
            "6 free-running patched run / plain generate, per pass",
            t["patched"] / patched_passes,
            t["plain"] / plain_passes,
            1.1,
            f"{patched_passes} vs {plain_passes} passes",
        )
    )
    return rows
