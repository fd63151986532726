"""DiffusionGemma's weights in TransformerLens' shapes: `W_Q [head, d_model, d_head]`, `W_in [d_model, d_mlp]`, …

Layers differ (sliding layers use `head_dim` and `num_key_value_heads`, full layers `global_head_dim`,
`num_global_key_value_heads` and k = v), so weights come per block, not stacked over layers:

    bw = block_weights(model, layer=1)           # BlockWeights for decoder block 1
    bw.W_Q, bw.W_K, bw.QK[h].svd()
    mw = model_weights(model)                    # W_E, W_U and every block

What is not a plain matrix product in this model, and so is NOT in these matrices (see docs/weights.md):

- q_norm / k_norm: RMS norms per head on the projected queries and keys, with gains. The attention score
  is `(g_q ⊙ x W_Q / rms(x W_Q)) · (g_k ⊙ y W_K / rms(y W_K))` (then RoPE), so QK is bilinear in the
  normalised residual only up to the two per-token, per-head factors 1/rms. `BlockWeights.QK_with_norm_gains`
  includes the gains; the 1/rms factors cannot be folded into any matrix.
- v_norm: a scale-free RMS norm per KV head on the values, so OV is linear only up to a per-token,
  per-KV-head factor 1/rms(x W_V).
- The post-norms (`ln1_post`, `ln2_post_mlp`, `ln2_post_moe`, `ln2_post`) act on sums over heads or
  branches, `per_expert_scale` multiplies each expert's routed weight (as `hook_expert_weights` shows),
  `layer_scalar` multiplies the whole residual (skip connection included), the embedding is multiplied by
  √d_model, and the logits are soft-capped with tanh. None of these is folded.

`fold_norm_gains=True` folds, exactly, the gains of the norms that feed a matrix directly (as
TransformerLens' `fold_ln` does for RMSNorm): `ln1` into W_Q/W_K/W_V, `ln2` into W_in/W_gate, `ln2_moe`
into the experts' W_in/W_gate, `router_scale · d_model^-1/2` into W_router and (in `model_weights`)
`ln_final` into W_U. The inputs those matrices then read are the scale-free RMS-normalised residuals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float

from diffusionlens.cache.selectors import check_stack, resolve_layer
from diffusionlens.components.block import NORMS
from diffusionlens.weights.factored_matrix import FactoredMatrix

# Norms whose gain feeds a weight matrix directly, and so folds exactly into it.
FOLDABLE_NORMS = ("ln1", "ln2", "ln2_moe")


@dataclass(frozen=True)
class BlockWeights:
    """One block's weights in TransformerLens' shapes (detached; unfolded ones may share storage with the
    model, so clone before editing).

    Attention: `W_Q [head, d_model, d_head]`, `W_O [head, d_head, d_model]`, `_W_K`/`_W_V`
    `[kv_head, d_model, d_head]` as stored, and the `W_K`/`W_V` properties expanding them to one per query
    head as TransformerLens does (`repeat_interleave` over heads: query head h reads KV head
    `h // (n_heads // n_kv_heads)`). On full layers `_W_V is _W_K` (values are the key projection, before
    k_norm, under the scale-free v_norm). Biases are None unless `attention_bias`.

    Dense MLP: `out = (act(x W_gate) * (x W_in)) W_out`. Experts: the same per expert,
    `W_gate_experts`/`W_in_experts` `[expert, d_model, d_expert]`, `W_out_experts [expert, d_expert, d_model]`;
    router logits are `(rms_normalize(resid) * router_scale * d_model**-0.5) @ W_router` (the scale factor
    is already in W_router when `folded`).
    """

    layer: int
    stack: str
    sliding: bool
    folded: bool
    n_heads: int
    n_kv_heads: int
    d_head: int
    W_Q: Float[torch.Tensor, "head d_model d_head"]
    _W_K: Float[torch.Tensor, "kv_head d_model d_head"]
    _W_V: Float[torch.Tensor, "kv_head d_model d_head"]
    W_O: Float[torch.Tensor, "head d_head d_model"]
    b_Q: Float[torch.Tensor, "head d_head"] | None
    _b_K: Float[torch.Tensor, "kv_head d_head"] | None
    _b_V: Float[torch.Tensor, "kv_head d_head"] | None
    b_O: Float[torch.Tensor, " d_model"] | None
    q_norm_gain: Float[torch.Tensor, " d_head"]
    k_norm_gain: Float[torch.Tensor, " d_head"]
    W_in: Float[torch.Tensor, "d_model d_mlp"]
    W_gate: Float[torch.Tensor, "d_model d_mlp"]
    W_out: Float[torch.Tensor, "d_mlp d_model"]
    W_in_experts: Float[torch.Tensor, "expert d_model d_expert"]
    W_gate_experts: Float[torch.Tensor, "expert d_model d_expert"]
    W_out_experts: Float[torch.Tensor, "expert d_expert d_model"]
    W_router: Float[torch.Tensor, "d_model expert"]
    router_scale: Float[torch.Tensor, " d_model"]
    per_expert_scale: Float[torch.Tensor, " expert"]
    norm_gains: dict[str, Float[torch.Tensor, " d_model"]] = field(repr=False)
    layer_scalar: float = 1.0

    # ------------------------------------------------------------------ grouped heads, TL style
    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def _expand(self, per_kv_head: torch.Tensor | None) -> torch.Tensor | None:
        if per_kv_head is None:
            return None
        return torch.repeat_interleave(per_kv_head, self.group_size, dim=0)

    @property
    def W_K(self) -> Float[torch.Tensor, "head d_model d_head"]:
        return self._expand(self._W_K)

    @property
    def W_V(self) -> Float[torch.Tensor, "head d_model d_head"]:
        return self._expand(self._W_V)

    @property
    def b_K(self) -> Float[torch.Tensor, "head d_head"] | None:
        return self._expand(self._b_K)

    @property
    def b_V(self) -> Float[torch.Tensor, "head d_head"] | None:
        return self._expand(self._b_V)

    # ------------------------------------------------------------------ circuits
    @property
    def QK(self) -> FactoredMatrix:
        """`W_Q[h] @ W_K[h]ᵀ` per head, `[head, d_model, d_model]`. Not the attention score: q_norm, k_norm
        and RoPE sit between (see the module docstring)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def QK_with_norm_gains(self) -> FactoredMatrix:
        """`W_Q[h] diag(g_q ⊙ g_k) W_K[h]ᵀ`: the score between un-rotated positions is
        `x̂ QK_with_norm_gains ŷᵀ / (rms(x̂ W_Q[h]) · rms(ŷ W_K[h]))` (biases aside), x̂, ŷ the ln1 outputs
        (or their scale-free versions when folded)."""
        return FactoredMatrix(self.W_Q * self.q_norm_gain, (self.W_K * self.k_norm_gain).transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """`W_V[h] @ W_O[h]` per head, `[head, d_model, d_model]`; the scale-free v_norm (a per-token,
        per-KV-head factor) and ln1_post sit between it and the residual."""
        return FactoredMatrix(self.W_V, self.W_O)


@dataclass(frozen=True)
class ModelWeights:
    """Embedding, unembedding and every block of one stack.

    The embedding is `W_E[token] * embed_scale` (√d_model rounded to the model's dtype); logits are
    `softcap * tanh((ln_final(resid) @ W_U) / softcap)`. W_U is `W_Eᵀ` (tied) unless `folded`, where it
    is `diag(ln_final gain) W_Eᵀ` and reads the scale-free normalised residual.
    """

    stack: str
    folded: bool
    W_E: Float[torch.Tensor, "vocab d_model"]
    W_U: Float[torch.Tensor, "d_model vocab"]
    ln_final_gain: Float[torch.Tensor, " d_model"]
    embed_scale: float
    softcap: float
    blocks: list[BlockWeights] = field(repr=False)


def _per_head(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """nn.Linear weight `[n_heads * d_head, d_model]` → `[head, d_model, d_head]`."""
    return weight.detach().unflatten(0, (n_heads, -1)).transpose(-2, -1)


def block_weights(model, layer: int, stack: str = "decoder", *, fold_norm_gains: bool = False) -> BlockWeights:
    """Weights of block `layer` of `stack` ('encoder' or 'decoder') in TransformerLens' shapes.

    The stacks share every parameter; only `layer_scalar` differs. With `fold_norm_gains`, the ln1 gain is
    folded into W_Q/W_K/W_V, ln2's into W_in/W_gate, ln2_moe's into the experts' W_in/W_gate and
    `router_scale · d_model^-1/2` into W_router (all exact in real arithmetic); nothing else is folded.
    """
    check_stack(stack, model)
    layer = resolve_layer(layer, model.cfg.num_hidden_layers, kind="block")
    if layer is None:
        raise TypeError("layer must be an int (a block index), got None")
    block = getattr(model, stack).blocks[layer]
    attn, mlp, moe = block.attn, block.mlp, block.moe
    gains = {name: getattr(block, name).weight.detach() for name in NORMS}
    n_heads, n_kv = attn.n_heads, attn.n_kv_heads

    W_Q = _per_head(attn.q_proj.weight, n_heads)
    W_K = _per_head(attn.k_proj.weight, n_kv)
    W_V = W_K if attn.v_proj is None else _per_head(attn.v_proj.weight, n_kv)
    # o_proj reads z flattened as (head, d_head), so its input columns split per head the same way.
    W_O = attn.o_proj.weight.detach().T.unflatten(0, (n_heads, -1))

    def bias(linear, heads: int | None) -> torch.Tensor | None:
        if linear is None or linear.bias is None:
            return None
        b = linear.bias.detach()
        return b if heads is None else b.unflatten(0, (heads, -1))

    b_K = bias(attn.k_proj, n_kv)
    b_V = b_K if attn.v_proj is None else bias(attn.v_proj, n_kv)

    d_expert = moe.gate_up_proj.shape[1] // 2
    gate_up = moe.gate_up_proj.detach().transpose(-2, -1)  # [expert, d_model, 2 * d_expert]
    # The experts split their fused projection with .chunk(2): the first half is the gate, the second up.
    W_gate_experts, W_in_experts = gate_up[..., :d_expert], gate_up[..., d_expert:]
    W_in, W_gate = mlp.up_proj.weight.detach().T, mlp.gate_proj.weight.detach().T
    W_router = moe.router_proj.weight.detach().T
    router_scale = moe.router_scale.detach()

    if fold_norm_gains:
        g1 = gains["ln1"][:, None]
        W_Q, W_K = g1 * W_Q, g1 * W_K
        W_V = W_K if attn.v_proj is None else g1 * W_V
        W_in, W_gate = gains["ln2"][:, None] * W_in, gains["ln2"][:, None] * W_gate
        g_moe = gains["ln2_moe"][:, None]
        W_in_experts, W_gate_experts = g_moe * W_in_experts, g_moe * W_gate_experts
        W_router = (router_scale * W_router.shape[0] ** -0.5)[:, None] * W_router

    return BlockWeights(
        layer=layer,
        stack=stack,
        sliding=attn.sliding,
        folded=fold_norm_gains,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=attn.d_head,
        W_Q=W_Q,
        _W_K=W_K,
        _W_V=W_V,
        W_O=W_O,
        b_Q=bias(attn.q_proj, n_heads),
        _b_K=b_K,
        _b_V=b_V,
        b_O=bias(attn.o_proj, None),
        q_norm_gain=attn.q_norm.weight.detach(),
        k_norm_gain=attn.k_norm.weight.detach(),
        W_in=W_in,
        W_gate=W_gate,
        W_out=mlp.down_proj.weight.detach().T,
        W_in_experts=W_in_experts,
        W_gate_experts=W_gate_experts,
        W_out_experts=moe.down_proj.detach().transpose(-2, -1),
        W_router=W_router,
        router_scale=router_scale,
        per_expert_scale=moe.per_expert_scale.detach(),
        norm_gains=gains,
        layer_scalar=float(block.layer_scalar),
    )


def model_weights(model, stack: str = "decoder", *, fold_norm_gains: bool = False) -> ModelWeights:
    """`W_E [vocab, d_model]`, `W_U [d_model, vocab]` and `block_weights` for every layer of `stack`.

    With `fold_norm_gains`, the blocks are folded as in `block_weights` and the ln_final gain is folded
    into W_U (so W_U is no longer W_Eᵀ).
    """
    home = getattr(model, check_stack(stack, model))  # the stacks share (tie) the embedding and final norm
    W_E = home.embed.W_E.detach()
    ln_final_gain = home.ln_final.weight.detach()
    W_U = W_E.T * ln_final_gain[:, None] if fold_norm_gains else W_E.T
    blocks = [
        block_weights(model, layer, stack, fold_norm_gains=fold_norm_gains)
        for layer in range(model.cfg.num_hidden_layers)
    ]
    return ModelWeights(
        stack=stack,
        folded=fold_norm_gains,
        W_E=W_E,
        W_U=W_U,
        ln_final_gain=ln_final_gain,
        embed_scale=float(home.embed.embed_scale.to(W_E.dtype)),
        softcap=model.cfg.final_logit_softcapping,
        blocks=blocks,
    )


def _padded(tensor: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """`tensor` zero-padded along `axis` to `size` (an inner dimension: the product is unchanged)."""
    missing = size - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat((tensor, tensor.new_zeros(shape)), dim=axis)


class StackedWeights:
    """TransformerLens's model-level weights, stacked over layers (`model.W_Q [layer, head, d_model,
    d_head]`, …) from the decoder stack (the encoder shares every matrix).

    The rule where layers differ: DiffusionGemma's full-attention layers may use another head size
    (`global_head_dim`) than its sliding ones. Attention matrices that hold `d_head` (W_Q … b_V) stack only
    when every layer agrees, and otherwise raise, naming the per-layer form
    (`block_weights(model, l).W_Q`). `QK` and `OV` are `[layer, head, d_model, d_model]` whatever the head
    sizes: their factors are zero-padded along the inner dimension to the largest `d_head`, which leaves
    every product exactly as it is. Missing biases read as zeros, as TransformerLens's are.
    """

    def _blocks(self) -> list[BlockWeights]:
        return model_weights(self).blocks

    def _stacked(self, what: str, per_block: list[torch.Tensor]) -> torch.Tensor:
        shapes = [tuple(t.shape) for t in per_block]
        if len(set(shapes)) > 1:
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for layer, shape in enumerate(shapes):
                by_shape.setdefault(shape, []).append(layer)
            described = "; ".join(f"layers {layers}: {list(shape)}" for shape, layers in by_shape.items())
            raise ValueError(
                f"model.{what} cannot stack over layers: their shapes differ ({described}), as sliding and "
                f"full-attention layers have different head sizes. Read one layer with "
                f"block_weights(model, layer).{what} (or model.weights().blocks[layer].{what})"
            )
        return torch.stack(per_block)

    def _attention(self, what: str) -> torch.Tensor:
        blocks = self._blocks()
        values = []
        for block in blocks:
            value = getattr(block, what)
            if value is None:  # no attention bias: zeros, as TransformerLens's unused biases are
                width = block.W_O.shape[-1] if what == "b_O" else block.d_head
                shape = (width,) if what == "b_O" else (block.n_heads, width)
                value = block.W_Q.new_zeros(shape)
            values.append(value)
        return self._stacked(what, values)

    W_Q = property(lambda self: self._attention("W_Q"), doc="`[layer, head, d_model, d_head]`")
    W_K = property(lambda self: self._attention("W_K"), doc="`[layer, head, d_model, d_head]`, one per query head")
    W_V = property(lambda self: self._attention("W_V"), doc="`[layer, head, d_model, d_head]`, one per query head")
    W_O = property(lambda self: self._attention("W_O"), doc="`[layer, head, d_head, d_model]`")
    b_Q = property(lambda self: self._attention("b_Q"), doc="`[layer, head, d_head]` (zeros without biases)")
    b_K = property(lambda self: self._attention("b_K"), doc="`[layer, head, d_head]` (zeros without biases)")
    b_V = property(lambda self: self._attention("b_V"), doc="`[layer, head, d_head]` (zeros without biases)")
    b_O = property(lambda self: self._attention("b_O"), doc="`[layer, d_model]` (zeros without biases)")
    W_in = property(
        lambda self: self._stacked("W_in", [b.W_in for b in self._blocks()]), doc="`[layer, d_model, d_mlp]`"
    )
    W_gate = property(
        lambda self: self._stacked("W_gate", [b.W_gate for b in self._blocks()]), doc="`[layer, d_model, d_mlp]`"
    )
    W_out = property(
        lambda self: self._stacked("W_out", [b.W_out for b in self._blocks()]), doc="`[layer, d_mlp, d_model]`"
    )
    b_in = property(
        lambda self: self._stacked("b_in", [b.W_in.new_zeros(b.W_in.shape[-1]) for b in self._blocks()]),
        doc="`[layer, d_mlp]`: zeros (the MLPs have no biases)",
    )
    b_out = property(
        lambda self: self._stacked("b_out", [b.W_out.new_zeros(b.W_out.shape[-1]) for b in self._blocks()]),
        doc="`[layer, d_model]`: zeros (the MLPs have no biases)",
    )

    @property
    def W_E(self) -> Float[torch.Tensor, "vocab d_model"]:
        """The token embedding `[vocab, d_model]`, before the √d_model multiplier the model applies."""
        return self.decoder.embed.W_E.detach()  # type: ignore[attr-defined]

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model vocab"]:
        """The unembedding `[d_model, vocab]`: `W_Eᵀ` (tied), before the soft-cap."""
        return self.W_E.T

    @property
    def b_U(self) -> Float[torch.Tensor, " vocab"]:
        """Zeros `[vocab]`: the unembedding has no bias."""
        return self.W_E.new_zeros(self.W_E.shape[0])

    def _circuit(self, left: str, right: str) -> FactoredMatrix:
        blocks = self._blocks()
        inner = max(b.d_head for b in blocks)
        if left == "W_Q":
            factors = [(b.W_Q, b.W_K.transpose(-2, -1)) for b in blocks]
        else:
            factors = [(b.W_V, b.W_O) for b in blocks]
        A = torch.stack([_padded(a, -1, inner) for a, _ in factors])
        B = torch.stack([_padded(b, -2, inner) for _, b in factors])
        return FactoredMatrix(A, B)

    @property
    def QK(self) -> FactoredMatrix:
        """`W_Q W_Kᵀ` per layer and head, `[layer, head, d_model, d_model]` (inner dimension zero-padded to the
        largest head size). Not the attention score: q_norm, k_norm and RoPE sit between."""
        return self._circuit("W_Q", "W_K")

    @property
    def OV(self) -> FactoredMatrix:
        """`W_V W_O` per layer and head, `[layer, head, d_model, d_model]` (inner dimension zero-padded to the
        largest head size); v_norm and ln1_post sit between it and the residual."""
        return self._circuit("W_V", "W_O")
