"""One recorded trajectory, frozen: everything the replacement model holds fixed at every denoising step.

`record_trajectory` generates (with the `noise=` and settings `generate` takes, so the run replays exactly),
then re-runs each recorded decoder pass of one canvas with hooks and keeps, per step: the canvas tokens'
embeddings, the self-conditioning point it linearises around, and per decoder layer the attention pattern
and the 1/rms scale of every norm on the path (ln1, the per-head value norm, ln1_post, ln2, ln_final, the
self-conditioning norms), plus the feed-forward block's true output, from which the error nodes follow.
The encoder's prompt keys and values are frozen as well: the prompt is a constant the decoder reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from diffusionlens.sampling.recorded import encode_prompt, rerun_recorded_pass
from diffusionlens.sampling.sampler import temperature
from diffusionlens.sampling.settings import merge_settings

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma


def rms_scale(x: Float[torch.Tensor, "... d"], eps: float) -> Float[torch.Tensor, "... 1"]:
    """1/rms(x) in x's dtype, the factor an RMS norm multiplies by (frozen, it makes the norm linear)."""
    return torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)


@dataclass
class FrozenLayer:
    """One decoder layer at one step: the attention pattern over [kept prompt keys ; canvas]
    `[head, query, key]`, the prompt's frozen values `[kv_head, kept, d_head]`, the norm scales `[pos, 1]`
    (value norm: `[pos, kv_head, 1]`), the transcoder input (ln2's output) and the block's true output."""

    pattern: Float[torch.Tensor, "head pos key"]
    prompt_values: Float[torch.Tensor, "kv_head kept d_head"]
    ln1_scale: Float[torch.Tensor, "pos 1"]
    value_scale: Float[torch.Tensor, "pos kv_head 1"]
    ln1_post_scale: Float[torch.Tensor, "pos 1"]
    ln2_scale: Float[torch.Tensor, "pos 1"]
    transcoder_input: Float[torch.Tensor, "pos d_model"]
    ffn_out: Float[torch.Tensor, "pos d_model"]


def _moved(obj, device):
    """A copy of a dataclass of tensors (and lists of them) with every tensor on `device`."""
    values = {}
    for name in obj.__dataclass_fields__:
        value = getattr(obj, name)
        if isinstance(value, torch.Tensor):
            value = value.to(device)
        elif isinstance(value, list):
            value = [_moved(item, device) for item in value]
        values[name] = value
    return type(obj)(**values)


@dataclass
class FrozenStep:
    """One denoising step: its canvas, the token embeddings, the self-conditioning point (probabilities of
    the previous step's logits, the MLP's gate and up pre-activations, its output, the two norms' scales;
    None at step 0 where there is no self-conditioning), the layers, the final norm's scale, the
    pre-soft-cap logits and the temperature that turns this step's logits into the next step's input."""

    canvas: Int[torch.Tensor, " pos"]
    token_embed: Float[torch.Tensor, "pos d_model"]
    post_norm_scale: Float[torch.Tensor, "pos 1"]
    self_cond_probs: Float[torch.Tensor, "pos vocab"] | None
    self_cond_pre_scale: Float[torch.Tensor, "pos 1"] | None
    self_cond_gate: Float[torch.Tensor, "pos d_mlp"] | None
    self_cond_up: Float[torch.Tensor, "pos d_mlp"] | None
    self_cond_out: Float[torch.Tensor, "pos d_model"]
    layers: list[FrozenLayer]
    final_scale: Float[torch.Tensor, "pos 1"]
    pre_logits: Float[torch.Tensor, "pos vocab"]
    logits: Float[torch.Tensor, "pos vocab"]
    temperature: float

    def to(self, device: torch.device | str) -> FrozenStep:
        return _moved(self, device)


@dataclass
class Trajectory:
    """A recorded trajectory of one canvas, frozen step by step (`steps[s]` is step s). `prompt_ids`: the
    tokens whose keys and values the decoder reads, the prompt and (for a later canvas) the canvases before."""

    input_ids: Int[torch.Tensor, "1 prompt"]
    canvas_index: int
    prompt_length: int
    steps: list[FrozenStep]
    prompt_ids: Int[torch.Tensor, " context"] | None = None

    @property
    def n_steps(self) -> int:
        return len(self.steps)


def _capture_names(n_layers: int) -> list[str]:
    names = ["decoder.hook_embed", "decoder.self_cond.hook_soft_embed", "decoder.self_cond.hook_out"]
    names += [
        "decoder.self_cond.post_norm.hook_scale",
        "decoder.ln_final.hook_scale",
        "decoder.ln_final.hook_normalized",
    ]
    for layer in range(n_layers):
        block = f"decoder.blocks.{layer}"
        names += [f"{block}.hook_resid_pre", f"{block}.hook_resid_mid", f"{block}.attn.hook_attn_scores"]
        names += [f"{block}.ln1_post.hook_scale", f"{block}.ln2.hook_normalized", f"{block}.hook_ffn_out"]
    return names


def record_trajectory(
    model: HookedDiffusionGemma,
    input_ids: Int[torch.Tensor, "1 prompt"],
    *,
    noise: Any = None,
    canvas: int = 0,
    store_on: torch.device | str | None = None,
    **generate_options: Any,
) -> Trajectory:
    """Generate from `input_ids` (one prompt) with `noise` and `generate_options` as `generate` takes them,
    then freeze every step of canvas `canvas` (see the module docstring). `store_on`: where the frozen steps
    live (default: the model's device); "cpu" keeps a long trajectory in host memory, and attribution brings
    one step at a time to the model's device."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"attribution graphs take one prompt: input_ids of shape [1, pos], got {tuple(input_ids.shape)}"
        )
    unsupported = [k for k in ("bottleneck", "self_cond_transform", "resume") if generate_options.get(k) is not None]
    if unsupported:
        raise ValueError(
            f"attribution graphs linearise the model's own self-conditioning from step 0; {unsupported} change "
            "what a step hands the next: generate without them"
        )
    input_ids = input_ids.to(model.device)
    attention_mask = generate_options.pop("attention_mask", None)
    options = {"progress": False, **generate_options}
    result = model.generate(input_ids, noise=noise, attention_mask=attention_mask, **options)
    if not 0 <= canvas < len(result.trace):
        raise ValueError(f"canvas {canvas} is outside the run's canvases 0..{len(result.trace) - 1}")
    keywords = {
        k: v for k, v in generate_options.items() if k not in ("settings", "progress", "fwd_hooks", "bwd_hooks")
    }
    settings = merge_settings(generate_options.get("settings"), **keywords)
    record = result.trace[canvas]
    ctx = model.hook_ctx
    steps: list[FrozenStep] = []
    try:
        with torch.no_grad():
            state = encode_prompt(model, input_ids, attention_mask, result.sequences, canvas)
            self_cond = None
            store: dict[str, torch.Tensor] = {}

            def keep(value: torch.Tensor, point) -> None:
                store[point.name] = value.detach()[0]

            hooks = [(name, keep) for name in _capture_names(model.cfg.num_hidden_layers)]
            for step in range(result.trace.steps(canvas)):
                store.clear()
                with model.hooks_for_run(fwd_hooks=hooks):
                    raw = rerun_recorded_pass(model, result.trace, state, self_cond, canvas=canvas, step=step)
                temp = temperature(int(record.t[step]), settings, raw.device)
                frozen = _freeze_step(model, dict(store), state, raw[0], self_cond, temp, record.input_canvas[step][0])
                steps.append(frozen if store_on is None else frozen.to(store_on))
                self_cond = raw / temp
    finally:
        ctx.reset()
    context = result.sequences[0, : int(state.length)].detach().cpu()
    return Trajectory(input_ids.detach().cpu(), canvas, int(state.length), steps, context)


def _freeze_step(
    model: HookedDiffusionGemma,
    store: dict[str, torch.Tensor],
    state: Any,
    raw: torch.Tensor,
    self_cond: torch.Tensor | None,
    temp: torch.Tensor,
    canvas: torch.Tensor,
) -> FrozenStep:
    cfg, decoder = model.cfg, model.decoder
    eps, dtype = cfg.rms_norm_eps, model.dtype
    layers = []
    for layer in range(cfg.num_hidden_layers):
        block, name = decoder.blocks[layer], f"decoder.blocks.{layer}"
        resid_pre = store[f"{name}.hook_resid_pre"]
        ln1_scale = rms_scale(resid_pre, eps)
        attn = block.attn
        x = resid_pre * ln1_scale * block.ln1.weight
        projection = attn.k_proj if attn.v_proj is None else attn.v_proj
        v_raw = projection(x).unflatten(-1, (attn.n_kv_heads, attn.d_head))
        layers.append(
            FrozenLayer(
                # The pattern from the scores in the model's dtype: the pattern hook's value is rounded
                # through float32, where the fused kernel it stands for is not.
                pattern=torch.softmax(store[f"{name}.attn.hook_attn_scores"], dim=-1),
                prompt_values=state.values[layer][0].detach(),
                ln1_scale=ln1_scale,
                value_scale=rms_scale(v_raw, eps),
                ln1_post_scale=store[f"{name}.ln1_post.hook_scale"].to(dtype),
                ln2_scale=rms_scale(store[f"{name}.hook_resid_mid"], eps),
                transcoder_input=store[f"{name}.ln2.hook_normalized"],
                ffn_out=store[f"{name}.hook_ffn_out"],
            )
        )
    sc = decoder.self_cond
    probs = pre_scale = gate = up = None
    if self_cond is not None:
        probs = torch.softmax(self_cond[0], dim=-1, dtype=torch.float32).to(dtype)
        soft = store["decoder.self_cond.hook_soft_embed"]
        pre_scale = rms_scale(soft, eps)
        x = soft * pre_scale * sc.pre_norm.weight
        gate, up = sc.mlp.gate_proj(x), sc.mlp.up_proj(x)
    final_scale = store["decoder.ln_final.hook_scale"].to(dtype)
    return FrozenStep(
        canvas=canvas.detach().cpu(),
        token_embed=store["decoder.hook_embed"],
        post_norm_scale=store["decoder.self_cond.post_norm.hook_scale"].to(dtype),
        self_cond_probs=probs,
        self_cond_pre_scale=pre_scale,
        self_cond_gate=gate,
        self_cond_up=up,
        self_cond_out=store["decoder.self_cond.hook_out"],
        layers=layers,
        final_scale=final_scale,
        pre_logits=store["decoder.ln_final.hook_normalized"] @ decoder.embed.W_E.T,
        logits=raw,
        temperature=float(temp),
    )
