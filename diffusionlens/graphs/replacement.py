"""The replacement model of one recorded trajectory: affine in its sources, with the transposes attribution needs.

Frozen at the recorded run (`Trajectory`): every attention pattern, the 1/rms scale of every norm (so each
norm is a diagonal linear map), the soft-cap's slope, the softmax's Jacobian and the self-conditioning MLP's
Jacobian (each linearised at the recorded point; what the linearisation leaves constant is a bias). Each
decoder layer's feed-forward block is its transcoder's decoder reading the feature activations, plus an error
vector. The sources are then the only inputs: feature activations, error vectors, each step's canvas-token
embeddings and the prompt (its frozen keys and values, one coefficient per prompt position).

`forward` runs the whole trajectory from given sources (at the recorded sources it reproduces the real
model's pre-soft-cap logits; with every source zero it gives each node's bias). The `*_transpose` functions
push cotangents `[rows, pos, d_model]` backwards through one piece, for attribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch.nn import functional as F

from diffusionlens.graphs.trajectory import FrozenLayer, FrozenStep, Trajectory

if TYPE_CHECKING:
    from diffusionlens.graphs.transcoders import TranscoderSet
    from diffusionlens.model import HookedDiffusionGemma

Cotangent = Float[torch.Tensor, "rows pos d_model"]


@dataclass
class Sources:
    """The replacement model's inputs, per step: `acts[s][l]` `[pos, d_transcoder]`, `errors[s][l]`
    `[pos, d_model]`, `token_embed[s]` `[pos, d_model]`, and `prompt` `[prompt_length]` (1: the prompt's
    frozen keys and values as recorded, 0: absent)."""

    acts: list[list[torch.Tensor]]
    errors: list[list[torch.Tensor]]
    token_embed: list[torch.Tensor]
    prompt: torch.Tensor


@dataclass
class ReplacementOutput:
    """What `forward` computes: `pre_acts[s][l]` `[pos, d_transcoder]` (every feature's pre-activation) and
    `pre_logits[s]` `[pos, vocab]` (the logits before the soft-cap)."""

    pre_acts: list[list[torch.Tensor]]
    pre_logits: list[torch.Tensor]


def recorded_sources(trajectory: Trajectory, transcoders: TranscoderSet) -> Sources:
    """The sources of the recorded run: each feature's activation on the recorded transcoder input, and the
    error each transcoder leaves (the block's true output minus the transcoder's)."""
    acts, errors = [], []
    device = transcoders[0].W_enc.device
    for step in trajectory.steps:
        step_acts, step_errors = [], []
        for layer, frozen in enumerate(step.layers):
            transcoder, stored_on = transcoders[layer], frozen.transcoder_input.device
            x, ffn_out = frozen.transcoder_input.to(device), frozen.ffn_out.to(device)
            a = transcoder.encode(x.to(transcoder.W_enc.dtype)).detach()
            step_acts.append(a.to(stored_on))
            step_errors.append((ffn_out - transcoder.decode(a).to(ffn_out.dtype)).detach().to(stored_on))
        acts.append(step_acts)
        errors.append(step_errors)
    token_embed = [step.token_embed for step in trajectory.steps]
    prompt = torch.ones(trajectory.prompt_length, dtype=trajectory.steps[0].token_embed.dtype)
    return Sources(acts, errors, token_embed, prompt.to(token_embed[0].device))


class ReplacementModel:
    """The frozen, affine replacement of `model` on `trajectory` with `transcoders` (see the module docstring)."""

    def __init__(self, model: HookedDiffusionGemma, transcoders: TranscoderSet, trajectory: Trajectory) -> None:
        self.model, self.transcoders, self.trajectory = model, transcoders, trajectory
        self.cfg = model.cfg
        self._act_slopes: dict[int, torch.Tensor] = {}
        self._on_device: dict[int, FrozenStep] = {}

    def frozen(self, step: int) -> FrozenStep:
        """Step `step` of the trajectory on the model's device. A trajectory stored elsewhere (the host) comes
        over one step at a time; the two most recent stay (the self-conditioning transpose reads two)."""
        if step not in self._on_device:
            if len(self._on_device) >= 2:
                self._on_device.pop(next(iter(self._on_device)))
            self._on_device[step] = self.trajectory.steps[step].to(self.model.device)
        return self._on_device[step]

    # ------------------------------------------------------------------ pieces, forward
    def attention(self, layer: int, frozen: FrozenLayer, resid: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Attention's output (after ln1_post) with pattern and scales frozen: affine in `resid` `[pos, d]`
        and in the prompt coefficients."""
        block = self.model.decoder.blocks[layer]
        attn = block.attn
        x = resid * frozen.ln1_scale * block.ln1.weight
        projection = attn.k_proj if attn.v_proj is None else attn.v_proj
        v = F.linear(x, projection.weight, projection.bias).unflatten(-1, (attn.n_kv_heads, attn.d_head))
        v = v * frozen.value_scale
        kept = frozen.prompt_values.shape[1]
        coef = prompt[prompt.shape[0] - kept :] if kept else prompt[:0]
        prompt_v = (frozen.prompt_values * coef[None, :, None]).transpose(0, 1)
        values = torch.cat((prompt_v, v), dim=0)  # [key, kv_head, d_head]
        per_head = values.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
        z = torch.einsum("hqk,khd->qhd", frozen.pattern, per_head)
        out = F.linear(z.flatten(-2), attn.o_proj.weight, attn.o_proj.bias)
        return out * frozen.ln1_post_scale * block.ln1_post.weight

    def act_slope(self, step: int) -> torch.Tensor:
        """The self-conditioning MLP's activation derivative at the recorded gate pre-activations of `step`."""
        if step not in self._act_slopes:
            act = self.model.decoder.self_cond.mlp.act
            gate = self.frozen(step).self_cond_gate.detach()
            with torch.enable_grad():
                g = gate.clone().requires_grad_(True)
                (slope,) = torch.autograd.grad(act(g).sum(), g)
            self._act_slopes[step] = slope.detach()
        return self._act_slopes[step]

    def softcap_slope(self, step: FrozenStep) -> torch.Tensor:
        cap = self.cfg.final_logit_softcapping
        if cap is None:
            return torch.ones_like(step.pre_logits)
        return 1 - torch.tanh(step.pre_logits / cap) ** 2

    def self_conditioning(self, step: int, previous_pre_logits: torch.Tensor | None) -> torch.Tensor:
        """The self-conditioning signal of `step` (hook_out), linearised around the recorded point in the
        previous step's pre-soft-cap logits; a constant at step 0."""
        frozen = self.frozen(step)
        if step == 0:
            return frozen.self_cond_out
        before = self.frozen(step - 1)
        delta = (previous_pre_logits - before.pre_logits) * self.softcap_slope(before) / before.temperature
        return frozen.self_cond_out + self.self_cond_jvp(step, delta)

    def self_cond_jvp(self, step: int, dlogits: torch.Tensor) -> torch.Tensor:
        """d(hook_out) for a change `dlogits` of the temperature-scaled logits fed back, `[..., pos, vocab]`."""
        frozen, sc, embed = self.frozen(step), self.model.decoder.self_cond, self.model.decoder.embed
        p = frozen.self_cond_probs
        dp = p * (dlogits - (p * dlogits).sum(-1, keepdim=True))
        dx = (dp @ embed.W_E) * embed.embed_scale.to(dp.dtype) * frozen.self_cond_pre_scale * sc.pre_norm.weight
        act = sc.mlp.act(frozen.self_cond_gate)
        dh = self.act_slope(step) * (dx @ sc.mlp.gate_proj.weight.T) * frozen.self_cond_up
        dh = dh + act * (dx @ sc.mlp.up_proj.weight.T)
        return dh @ sc.mlp.down_proj.weight.T

    @torch.no_grad()
    def forward(
        self, sources: Sources | None, n_steps: int | None = None, keep_on: torch.device | str | None = None
    ) -> ReplacementOutput:
        """Run steps 0 .. n_steps-1 of the replacement model from `sources` (None: every source zero, which
        gives each node's bias). `keep_on`: where the outputs are kept (default: the model's device)."""
        n_steps = self.trajectory.n_steps if n_steps is None else n_steps
        decoder = self.model.decoder
        pre_acts, pre_logits = [], []
        previous = None
        for s in range(n_steps):
            frozen = self.frozen(s)
            device = frozen.post_norm_scale.device
            token_embed = 0 if sources is None else sources.token_embed[s].to(device)
            prompt = torch.zeros(self.trajectory.prompt_length, dtype=frozen.token_embed.dtype, device=device)
            prompt = prompt if sources is None else sources.prompt.to(device)
            resid = (token_embed + self.self_conditioning(s, previous)) * frozen.post_norm_scale
            step_pre = []
            for layer, fl in enumerate(frozen.layers):
                block, transcoder = decoder.blocks[layer], self.transcoders[layer]
                resid = resid + self.attention(layer, fl, resid, prompt)
                step_pre.append(transcoder.pre_activation(resid * fl.ln2_scale * block.ln2.weight).to(keep_on))
                if sources is None:
                    ffn = transcoder.b_dec.to(resid.dtype)
                else:
                    ffn = transcoder.decode(sources.acts[s][layer].to(device)) + sources.errors[s][layer].to(device)
                resid = (resid + ffn) * block.layer_scalar
            pre_acts.append(step_pre)
            previous = (resid * frozen.final_scale * decoder.ln_final.weight) @ decoder.embed.W_E.T
            pre_logits.append(previous.to(keep_on))
        return ReplacementOutput(pre_acts, pre_logits)

    # ------------------------------------------------------------------ transposes
    def attention_transpose(
        self, layer: int, frozen: FrozenLayer, cot: Cotangent
    ) -> tuple[Cotangent, Float[torch.Tensor, "rows kept"]]:
        """Cotangent of attention's output → cotangent of its residual input (linear part), and the
        direct effect of each kept prompt key's frozen value (per unit prompt coefficient)."""
        block = self.model.decoder.blocks[layer]
        attn = block.attn
        c = cot * (frozen.ln1_post_scale * block.ln1_post.weight)  # one pass over the rows, not two
        cz = (c @ attn.o_proj.weight).unflatten(-1, (attn.n_heads, attn.d_head))
        c_values = torch.einsum("hqk,rqhd->rkhd", frozen.pattern, cz)
        group = attn.n_heads // attn.n_kv_heads
        c_values = c_values.unflatten(2, (attn.n_kv_heads, group)).sum(3)  # [rows, key, kv_head, d_head]
        kept = frozen.prompt_values.shape[1]
        prompt_effect = torch.einsum("rkhd,hkd->rk", c_values[:, :kept], frozen.prompt_values)
        c_v = (c_values[:, kept:] * frozen.value_scale).flatten(-2)
        projection = attn.k_proj if attn.v_proj is None else attn.v_proj
        c_x = c_v @ projection.weight
        return c_x * (frozen.ln1_scale * block.ln1.weight), prompt_effect

    def self_cond_transpose(self, step: int, cot_resid0: Cotangent, row_chunk: int = 64) -> Cotangent:
        """Cotangent of `step`'s block-0 input → cotangent of step-1's final residual (before ln_final),
        through the frozen post-norm, the linearised MLP, pre-norm, softmax, temperature and soft-cap.
        Rows go `row_chunk` at a time: in between they are `[rows, pos, vocab]`."""
        # In between, a row is `[pos, vocab]`: bound a chunk's temporaries to about 2**26 elements as well.
        per_row = self.cfg.canvas_length * self.cfg.vocab_size
        row_chunk = max(1, min(row_chunk, 2**26 // per_row))
        return torch.cat([self._self_cond_transpose(step, chunk) for chunk in cot_resid0.split(row_chunk)])

    def _self_cond_transpose(self, step: int, cot_resid0: Cotangent) -> Cotangent:
        frozen, before = self.frozen(step), self.frozen(step - 1)
        decoder = self.model.decoder
        sc, embed = decoder.self_cond, decoder.embed
        c_signal = cot_resid0 * frozen.post_norm_scale
        c_h = c_signal @ sc.mlp.down_proj.weight
        act = sc.mlp.act(frozen.self_cond_gate)
        c_x = (c_h * self.act_slope(step) * frozen.self_cond_up) @ sc.mlp.gate_proj.weight
        c_x = c_x + (c_h * act) @ sc.mlp.up_proj.weight
        c_soft = c_x * frozen.self_cond_pre_scale * sc.pre_norm.weight
        c_p = (c_soft @ embed.W_E.T) * embed.embed_scale.to(c_soft.dtype)
        p = frozen.self_cond_probs
        c_logits = p * (c_p - (p * c_p).sum(-1, keepdim=True))
        c_pre = c_logits * self.softcap_slope(before) / before.temperature
        return self.logit_transpose(step - 1, c_pre)

    def logit_transpose(self, step: int, cot_pre_logits: Float[torch.Tensor, "rows pos vocab"]) -> Cotangent:
        """Cotangent of `step`'s pre-soft-cap logits → cotangent of its final residual."""
        frozen, decoder = self.frozen(step), self.model.decoder
        return (cot_pre_logits @ decoder.embed.W_E) * frozen.final_scale * decoder.ln_final.weight

    def feature_seed(self, step: int, layer: int, positions: torch.Tensor, features: torch.Tensor) -> Cotangent:
        """Cotangents at `layer`'s resid_mid whose pairing with it gives each feature's pre-activation
        (one row per (position, feature) pair, bias aside)."""
        frozen, block = self.frozen(step).layers[layer], self.model.decoder.blocks[layer]
        w = self.transcoders[layer].W_enc[:, features].T.to(frozen.ln2_scale.dtype)  # [rows, d]
        rows = w * frozen.ln2_scale[positions] * block.ln2.weight
        seed = torch.zeros(len(features), self.cfg.canvas_length, self.cfg.hidden_size, dtype=rows.dtype)
        seed[torch.arange(len(features)), positions] = rows
        return seed.to(rows.device)
