"""The residual stream of a cached pass, as TransformerLens's cache reads it: by layer (`accumulated_resid`,
`logit_lens`), by block output (`decompose_resid`) and exactly by head, neuron and expert (`stack_*`).

`ActivationCache` inherits these helpers (TransformerLens' names and arguments), so every
`DenoisingCache.step_cache(s)` has them too. Pick the stack with `stack="decoder"` (default) or
`stack="encoder"` (the prompt).

Why the sums are exact. A DiffusionGemma block computes

    resid_mid  = resid_pre + ln1_post(attn)                  attn = Σ_h result_h (+ b_O)
    ffn_out    = ln2_post(ln2_post_mlp(mlp) + ln2_post_moe(moe))
    resid_post = (resid_mid + ffn_out) · layer_scalar        mlp = Σ_n post_n W_out[n],  moe = Σ_k expert_out_k

and every RMSNorm is `norm(x) = x · scale · gain` with `scale = 1/rms(x)` per position. With the scale
read from the cache (`….hook_scale`) a norm is a linear map, so a sum pushed through it splits term by
term. A component of block l therefore reaches the residual before block `layer` as

    head h:     result_h · (scale·gain)_ln1_post · Π_{l ≤ j < layer} layer_scalar_j
    neuron n:   post_n W_out[n] · (scale·gain)_ln2_post_mlp · (scale·gain)_ln2_post · Π …
    expert e:   expert_out_e · (scale·gain)_ln2_post_moe · (scale·gain)_ln2_post · Π …

and the decoder's block-0 input, `self_cond.post_norm(embed + self_cond)` (a gain-free norm), splits into
`embed · scale` and `self_cond · scale`. The final norm and the tied unembedding are linear again given
`ln_final.hook_scale`, so logits before the soft-cap split the same way (`apply_ln_to_stack`,
`logit_attrs`). The products are computed in the norms' compute dtype (fp32, or the hooks' dtype if wider).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from jaxtyping import Float, Int

from diffusionlens.cache.selectors import (
    Selector,
    axis_keeping,
    check_selector,
    check_stack,
    index_axis,
    model_stacks,
    resolve_layer,
)
from diffusionlens.components.unembed import unembed
from diffusionlens.hooks.shapes import position_axis

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

#: What the decomposition helpers return: `[component, batch, pos, d_model]`, with the labels if asked.
# `*pos`: an int `pos_slice` drops the position axis, as TransformerLens's stack helpers do.
ResidComponents = Float[torch.Tensor, "component batch *pos d_model"] | tuple[torch.Tensor, list[str]]

#: What accumulated_resid and decompose_resid return: the stacked residual parts, with labels if asked.
ResidStack = (
    Float[torch.Tensor, "component *batch_and_pos d_model"]
    | tuple[Float[torch.Tensor, "component *batch_and_pos d_model"], list[str]]
)

SWITCHES = {
    "attn.hook_result": "model.set_use_attn_result(True)",
    "moe.hook_expert_out": "model.set_use_expert_outputs(True)",
}


def head_results(
    z: Float[torch.Tensor, "batch pos head d_head"], W_O: Float[torch.Tensor, "head d_head d_model"]
) -> Float[torch.Tensor, "batch pos head d_model"]:
    """Each head's output through its slice of o_proj (without the bias): what `attn.hook_result` holds."""
    return torch.einsum("bphd,hdm->bphm", z, W_O.detach().to(z.device, z.dtype))


def _joined(
    components: Iterable[tuple[list[torch.Tensor], list[str]]],
) -> tuple[list[torch.Tensor], list[str]]:
    """Several (parts, labels) lists as one, in order."""
    parts: list[torch.Tensor] = []
    labels: list[str] = []
    for more_parts, more_labels in components:
        parts += more_parts
        labels += more_labels
    return parts, labels


class ResidDecompositionMixin:
    """The residual-stream helpers of a cache of one forward pass (mixed into `ActivationCache`)."""

    model: HookedDiffusionGemma | None

    # ------------------------------------------------------------------ lookups
    def _model(self) -> HookedDiffusionGemma:
        if self.model is None:
            raise ValueError("This cache has no model attached; build it with model.run_with_cache")
        return self.model

    def _hook(self, name: str, pos_slice: Selector = None) -> torch.Tensor:
        """A cached hook (its positions indexed by `pos_slice`), or a KeyError naming what to record
        (and the switch that makes it fire)."""
        if name in self:  # type: ignore[operator]
            value = self[name]  # type: ignore[index]
            if pos_slice is None:
                return value
            axis = position_axis(name) - (0 if self.has_batch_dim else 1)  # type: ignore[attr-defined]
            return index_axis(value, pos_slice, axis, "pos_slice", "positions")
        switch = next((s for suffix, s in SWITCHES.items() if name.endswith(suffix)), None)
        how = f"switch it on with {switch} and record it" if switch else "record it"
        raise KeyError(f"'{name}' is not in this cache: {how} (names_filter must match it).")

    def _resid_layer(self, layer: int | None) -> int:
        """The block whose input the residual is: 0 .. n_layers (None, -1 or n_layers: after the last
        block; other negatives count back from there, -2 being the input of the last block)."""
        return resolve_layer(layer, self._model().cfg.num_hidden_layers, kind="residual")

    def _module(self, stack: str, path: str) -> torch.nn.Module:
        return self._model().get_submodule(f"{stack}.{path}")

    def _scalar_product(self, stack: str, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
        """Π layer_scalar over blocks start .. stop-1: what multiplies block `start`'s output (and
        everything already in its residual) on the way to block `stop`."""
        product = torch.ones((), dtype=like.dtype, device=like.device)
        for layer in range(start, stop):
            product = product * self._module(stack, f"blocks.{layer}").layer_scalar.to(like.device, like.dtype)[0]
        return product

    def _norm_map(
        self, norm_path: str, like: torch.Tensor, pos_slice: Selector = None
    ) -> Float[torch.Tensor, "batch *pos d_model"]:
        """scale · gain of a norm (its `hook_scale` from the cache, at `pos_slice`), in the wider of fp32
        and `like`'s dtype."""
        scale = self._hook(f"{norm_path}.hook_scale", pos_slice)
        dtype = torch.promote_types(scale.dtype, like.dtype)
        stack, _, module_path = norm_path.partition(".")
        gain = self._module(stack, module_path).weight
        gain = None if gain is None else gain.detach()
        out = scale.to(like.device, dtype)
        return out if gain is None else out * gain.to(like.device, dtype)

    def _resid_at(self, stack: str, layer: int, pos_slice: Selector = None) -> Float[torch.Tensor, "batch pos d_model"]:
        n = self._model().cfg.num_hidden_layers
        if layer < n:
            return self._hook(f"{stack}.blocks.{layer}.hook_resid_pre", pos_slice)
        return self._hook(f"{stack}.blocks.{n - 1}.hook_resid_post", pos_slice)

    # ------------------------------------------------------------------ per-layer components
    def compute_head_results(self, stack: str | None = None) -> None:
        """Add `attn.hook_result` (each head's output through its slice of o_proj, `[batch, pos, head,
        d_model]`) for every layer whose `attn.hook_z` is cached, as TransformerLens does. Recording it
        with `model.set_use_attn_result(True)` gives the same values (up to summation order)."""
        for name in model_stacks(self._model()) if stack is None else (check_stack(stack, self._model()),):
            for layer in range(self._model().cfg.num_hidden_layers):
                prefix = f"{name}.blocks.{layer}.attn"
                if f"{prefix}.hook_z" in self and f"{prefix}.hook_result" not in self:  # type: ignore[operator]
                    W_O = self._module(name, f"blocks.{layer}.attn").W_O
                    self._store[f"{prefix}.hook_result"] = head_results(self[f"{prefix}.hook_z"], W_O)  # type: ignore[attr-defined,index]

    def _head_results(
        self, stack: str, block: int, pos_slice: Selector
    ) -> Float[torch.Tensor, "batch pos head d_model"]:
        """A block's `attn.hook_result` at `pos_slice`: the cached one, else computed on demand from the
        cached `attn.hook_z` (as TransformerLens's cache does), for these positions only."""
        prefix = f"{stack}.blocks.{block}.attn"
        if f"{prefix}.hook_result" in self:  # type: ignore[operator]
            return self._hook(f"{prefix}.hook_result", pos_slice)
        if f"{prefix}.hook_z" not in self:  # type: ignore[operator]
            raise KeyError(
                f"Neither '{prefix}.hook_z' nor '{prefix}.hook_result' is in this cache: record hook_z (head "
                "results are computed from it), or hook_result after model.set_use_attn_result(True)."
            )
        return head_results(self._hook(f"{prefix}.hook_z", pos_slice), self._module(stack, f"blocks.{block}.attn").W_O)

    def _heads(self, stack: str, block: int, layer: int, pos_slice: Selector) -> tuple[list[torch.Tensor], list[str]]:
        prefix = f"{stack}.blocks.{block}"
        result = self._head_results(stack, block, pos_slice)
        factor = self._norm_map(f"{prefix}.ln1_post", result, pos_slice) * self._scalar_product(
            stack, block, layer, result
        )
        heads = rearrange(result, "b p h d -> h b p d") * factor
        labels = [f"L{block}H{h}" for h in range(heads.shape[0])]
        bias = self._module(stack, f"blocks.{block}.attn").o_proj.bias
        if bias is None:
            return [heads], labels
        return [heads, (bias.detach().to(factor.device, factor.dtype) * factor)[None]], [*labels, f"L{block}_attn_bias"]

    def _ffn_map(
        self, stack: str, block: int, layer: int, branch_norm: str | None, like: torch.Tensor, pos_slice: Selector
    ) -> torch.Tensor:
        """What multiplies an FFN branch's raw output (or, with branch_norm None, its post-normed
        output) on the way to the residual before block `layer`, at `pos_slice`."""
        prefix = f"{stack}.blocks.{block}"
        factor = self._norm_map(f"{prefix}.ln2_post", like, pos_slice) * self._scalar_product(stack, block, layer, like)
        return factor if branch_norm is None else factor * self._norm_map(f"{prefix}.{branch_norm}", like, pos_slice)

    def _neurons(
        self, stack: str, block: int, layer: int, pos_slice: Selector, neuron_slice: Selector = None
    ) -> tuple[list[torch.Tensor], list[str]]:
        post = self._hook(f"{stack}.blocks.{block}.mlp.hook_post", pos_slice)
        W_out = self._module(stack, f"blocks.{block}.mlp").down_proj.weight.detach().T
        ids = torch.arange(post.shape[-1])
        post, W_out, ids = (
            index_axis(x, neuron_slice, axis, "neuron_slice", "neurons")
            for x, axis in ((post, -1), (W_out, 0), (ids, 0))
        )
        if ids.ndim == 0:  # one neuron, chosen by an int
            post, W_out, ids = post[..., None], W_out[None], ids[None]
        factor = self._ffn_map(stack, block, layer, "ln2_post_mlp", post, pos_slice)
        neurons = torch.einsum("bpn,nd->nbpd", post.to(factor.dtype), W_out.to(factor.device, factor.dtype))
        return [neurons * factor], [f"L{block}N{int(n)}" for n in ids]

    def _expert_outputs(
        self, stack: str, block: int, pos_slice: Selector
    ) -> Float[torch.Tensor, "batch pos k d_model"]:
        """A block's `moe.hook_expert_out` at `pos_slice`: the cached one, else recomputed from what the MoE
        read (the cached `ln2_moe` output, routing weights and chosen experts) for these positions only."""
        prefix = f"{stack}.blocks.{block}"
        if f"{prefix}.moe.hook_expert_out" in self:  # type: ignore[operator]
            return self._hook(f"{prefix}.moe.hook_expert_out", pos_slice)
        inputs = [f"{prefix}.ln2_moe.hook_normalized", f"{prefix}.moe.hook_expert_weights"]
        inputs.append(f"{prefix}.moe.hook_expert_indices")
        if not all(name in self for name in inputs):  # type: ignore[operator]
            raise KeyError(
                f"'{prefix}.moe.hook_expert_out' is not in this cache: record it after "
                f"model.set_use_expert_outputs(True), or record {', '.join(inputs)} to compute it from them."
            )
        x, weights, indices = (self._hook(name, pos_slice) for name in inputs)
        moe = self._module(stack, f"blocks.{block}.moe")
        with torch.no_grad():
            return moe.apply_experts(x, weights, indices, per_slot=True)[1]

    def _experts(
        self, stack: str, block: int, layer: int, pos_slice: Selector, by: str
    ) -> tuple[list[torch.Tensor], list[str]]:
        prefix = f"{stack}.blocks.{block}.moe"
        per_slot = self._expert_outputs(stack, block, pos_slice)
        factor = self._ffn_map(stack, block, layer, "ln2_post_moe", per_slot, pos_slice)
        per_slot = rearrange(per_slot, "b p k d -> k b p d").to(factor.dtype)
        if by == "slot":
            return [per_slot * factor], [f"L{block}_slot{k}" for k in range(per_slot.shape[0])]
        if by != "expert":
            raise ValueError(f"by must be 'expert' or 'slot', not {by!r}")
        # Each token's slot k holds expert indices[b, p, k]: scatter the slots onto expert rows (an
        # expert a token did not choose contributes zero there).
        indices = rearrange(self._hook(f"{prefix}.hook_expert_indices", pos_slice), "b p k -> k b p").to(
            per_slot.device
        )
        n_experts = self._model().cfg.num_experts
        experts = per_slot.new_zeros(n_experts, *per_slot.shape[1:])
        experts.scatter_add_(0, indices[..., None].expand_as(per_slot), per_slot)
        return [experts * factor], [f"L{block}E{e}" for e in range(n_experts)]

    def _embedding(self, stack: str, layer: int, pos_slice: Selector) -> tuple[list[torch.Tensor], list[str]]:
        embed = self._hook(f"{stack}.hook_embed", pos_slice)
        if stack != "decoder":  # the encoder (and a causal twin's stack) read the bare embedding
            return [(embed * self._scalar_product(stack, 0, layer, embed))[None]], ["embed"]
        # Block 0 reads self_cond.post_norm(embed + self_cond signal), a gain-free norm.
        signal = self._hook("decoder.self_cond.hook_out", pos_slice)
        factor = self._norm_map("decoder.self_cond.post_norm", embed, pos_slice) * self._scalar_product(
            stack, 0, layer, embed
        )
        return [(embed * factor)[None], (signal * factor)[None]], ["embed", "self_cond"]

    # ------------------------------------------------------------------ the residual stream by layer
    def _final_norm(self, resid: Float[torch.Tensor, "... d_model"], stack: str) -> Float[torch.Tensor, "... d_model"]:
        # A bf16/fp16 cache meets float32 weights here: compute in the model's dtype.
        norm = self.model.get_submodule(f"{stack}.ln_final")
        return norm(resid.to(self.model.dtype))

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: Selector = None,
        return_labels: bool = False,
        *,
        stack: str = "decoder",
    ) -> ResidStack:
        """The residual stream up to the input of block `layer`, as TransformerLens: `resid_pre` of
        blocks 0 … layer (with `incl_mid`, each earlier block's `resid_mid` after its `resid_pre`);
        `layer=None` (or -1): every block and the final `resid_post`, `[n_layers + 1, batch, pos, d_model]`;
        `layer=0`: just block 0's input; other negatives count back (-2: up to the last block's input).

        Unlike GPT-2, block 0's `resid_pre` in the decoder is the self-conditioned input (embedding
        plus the self-conditioning MLP), not the bare embedding. `apply_ln` recomputes the stack's
        final RMSNorm on every entry (what a logit lens reads; TL reuses a cached LayerNorm scale).
        `pos_slice` indexes positions (an int drops the axis); `return_labels` adds labels
        ("0_pre", "0_mid", …, "final_post"). `stack="encoder"` reads the encoder.
        """
        stack = check_stack(stack, self.model)
        check_selector(pos_slice, "pos_slice")
        n, upto = self._model().cfg.num_hidden_layers, self._resid_layer(layer)
        parts, labels = [], []
        for i in range(upto + 1):
            if i == n:
                parts.append(self[f"{stack}.blocks.{n - 1}.hook_resid_post"])
                labels.append("final_post")
                continue
            parts.append(self[f"{stack}.blocks.{i}.hook_resid_pre"])
            labels.append(f"{i}_pre")
            if incl_mid and i < upto:
                parts.append(self[f"{stack}.blocks.{i}.hook_resid_mid"])
                labels.append(f"{i}_mid")
        resid = torch.stack([index_axis(p, pos_slice, -2, "pos_slice", "positions") for p in parts])
        if apply_ln:
            resid = self._final_norm(resid, stack)
        return (resid, labels) if return_labels else resid

    def decompose_resid(
        self,
        layer: int | None = None,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: Selector = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
        *,
        stack: str = "decoder",
    ) -> ResidStack:
        """The residual at the input of block `layer` (None or -1: after the last block) split into its
        inputs, as TransformerLens: the embedding path ("embed": block 0's input, in the decoder the
        self-conditioned embedding), then each earlier block's "{i}_attn_out" and "{i}_ffn_out"
        (`mode` "attn" / "mlp" keeps one kind). DiffusionGemma multiplies each block's output by
        `layer_scalar`, so earlier terms are rescaled by the product of later scalars; with every
        component the parts sum to the residual exactly. `apply_ln` (final residual only) applies the final
        norm with its cached scale (`ln_final.hook_scale`), as TransformerLens: a linear map, so the parts
        then sum to `ln_final`'s output; `return_labels` adds the labels."""
        stack = check_stack(stack, self.model)
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        check_selector(pos_slice, "pos_slice")
        upto = self._resid_layer(layer)
        scalars = [float(self.model.get_submodule(f"{stack}.blocks.{i}").layer_scalar) for i in range(upto)]

        def later(i: int) -> float:
            out = 1.0
            for s in scalars[i:]:
                out *= s
            return out

        parts, labels = [], []
        if incl_embeds:
            parts.append(self[f"{stack}.blocks.0.hook_resid_pre"] * later(0))
            labels.append("embed")
        for i in range(upto):
            for kind, hook in (("attn", "attn_out"), ("mlp", "ffn_out")):
                if mode in ("all", kind):
                    parts.append(self[f"{stack}.blocks.{i}.hook_{hook}"] * later(i))
                    labels.append(f"{i}_{hook}")
        if not parts:
            raise ValueError("decompose_resid(layer=0, incl_embeds=False) has no components; pass incl_embeds=True")
        resid = torch.stack([index_axis(p, pos_slice, -2, "pos_slice", "positions") for p in parts])
        if apply_ln:
            if upto != self._model().cfg.num_hidden_layers:
                raise ValueError(
                    "decompose_resid(apply_ln=True) applies the final norm with its cached scale, so that the "
                    f"parts sum to ln_final's output; it needs the final residual (layer=None), not layer={layer}"
                )
            resid = self.apply_ln_to_stack(resid, None, pos_slice=pos_slice, stack=stack)
        return (resid, labels) if return_labels else resid

    def logit_lens(
        self, layer: int | None = None, pos_slice: Selector = None, *, stack: str = "decoder"
    ) -> Float[torch.Tensor, "component *batch_and_pos vocab"]:
        """Logits read off `accumulated_resid(layer, apply_ln=True, pos_slice=...)` through the
        soft-capped tied head: `[layers + 1, batch, pos, vocab]` for layer None. Computed in the model's
        dtype, so a bf16 cache works with float32 weights."""
        resid = self.accumulated_resid(layer, apply_ln=True, pos_slice=pos_slice, stack=stack)
        W_E = self.model.get_submodule(stack).embed.W_E  # tied head; a causal twin has its own stack
        return unembed(resid, W_E, self.model.cfg.final_logit_softcapping)

    # ------------------------------------------------------------------ TransformerLens-named helpers
    def stack_head_results(
        self,
        layer: int | None = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: Selector = None,
        apply_ln: bool = False,
        *,
        stack: str = "decoder",
    ) -> ResidComponents:
        """Every head's contribution to the residual before block `layer` (default: after the last),
        from blocks 0 .. layer-1: `[heads · layers (+ o_proj biases), batch, pos, d_model]`, labels `L{l}H{h}`.

        Each head's `attn.hook_result` (recorded after `model.set_use_attn_result(True)`, else computed
        on demand from the cached `attn.hook_z` for the positions kept) is multiplied by the cached `ln1_post`
        scale and gain and the `layer_scalar`s of blocks l .. layer-1. `incl_remainder` appends the
        rest of the residual; `apply_ln` applies the cached final norm (only for the final residual).
        """
        return self._stack_blocks(self._heads, layer, stack, incl_remainder, apply_ln, pos_slice, return_labels)

    def stack_neuron_results(
        self,
        layer: int | None = -1,
        neuron_slice: Selector = None,
        pos_slice: Selector = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        *,
        stack: str = "decoder",
    ) -> ResidComponents:
        """Every dense-MLP neuron's contribution to the residual before block `layer`, labels `L{l}N{n}`:
        `mlp.hook_post[..., n] · W_out[n]` through the cached `ln2_post_mlp` and `ln2_post` maps and the
        later `layer_scalar`s. Memory: `d_mlp · layers · batch · pos · d_model`; `neuron_slice` keeps fewer."""
        neurons = partial(self._neurons, neuron_slice=neuron_slice)
        return self._stack_blocks(neurons, layer, stack, incl_remainder, apply_ln, pos_slice, return_labels)

    def stack_expert_results(
        self,
        layer: int | None = -1,
        by: str = "expert",
        pos_slice: Selector = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        *,
        stack: str = "decoder",
    ) -> ResidComponents:
        """Every expert's contribution to the residual before block `layer`: `moe.hook_expert_out`
        (recorded after `model.set_use_expert_outputs(True)`, else recomputed from the cached `ln2_moe`
        output, `moe.hook_expert_weights` and `moe.hook_expert_indices` for the positions kept) through the
        cached `ln2_post_moe` and `ln2_post` maps and the later `layer_scalar`s.

        by="expert": one component per expert, `L{l}E{e}` (zero where a token did not route to e);
        by="slot": one per routing slot, `L{l}_slot{k}`, as `hook_expert_indices` orders them.
        """
        experts = partial(self._experts, by=by)
        return self._stack_blocks(experts, layer, stack, incl_remainder, apply_ln, pos_slice, return_labels)

    def _stack_blocks(
        self,
        per_block: Callable[[str, int, int, Selector], tuple[list[torch.Tensor], list[str]]],
        layer: int | None,
        stack: str,
        incl_remainder: bool,
        apply_ln: bool,
        pos_slice: Selector,
        return_labels: bool,
        with_embedding: bool = False,
    ) -> ResidComponents:
        """The components `per_block(stack, block, layer, pos_slice)` gives for every block before `layer`
        (after the embedding's with `with_embedding`), stacked and finished as every public helper returns
        them: the remainder appended, the final norm applied, labels returned if asked. Every cached value
        is sliced to `pos_slice` before anything is built from it, so memory grows with the positions kept."""
        check_stack(stack, self._model())
        layer = self._resid_layer(layer)
        kept, drops_axis = axis_keeping(pos_slice)
        embedding = [self._embedding(stack, layer, kept)] if with_embedding else []
        parts, labels = _joined([*embedding, *(per_block(stack, block, layer, kept) for block in range(layer))])
        components = torch.cat(parts) if parts else torch.zeros(0, *self._resid_at(stack, layer, kept).shape)
        if incl_remainder:
            resid = self._resid_at(stack, layer, kept)
            remainder = resid.to(components.dtype) - components.sum(0)
            components = torch.cat((components, remainder[None]))
            labels = [*labels, "remainder"]
        if apply_ln:
            components = self.apply_ln_to_stack(components, layer, pos_slice=kept, stack=stack)
        if drops_axis:
            components = components.squeeze(-2)
        return (components, labels) if return_labels else components

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        expand_neurons: bool = False,
        expand_experts: bool = True,
        apply_ln: bool = False,
        pos_slice: Selector = None,
        return_labels: bool = False,
        *,
        stack: str = "decoder",
    ) -> ResidComponents:
        """The residual before block `layer` (default: after the last) as an exact sum of components:
        `embed` (and `self_cond` in the decoder), then per block every head `L{l}H{h}` (and
        `L{l}_attn_bias` with attention biases), the dense MLP `L{l}_mlp` (or its neurons `L{l}N{n}`
        with `expand_neurons`) and every expert `L{l}E{e}` (or the whole MoE `L{l}_moe` without
        `expand_experts`), each carrying its norms' cached maps and the later `layer_scalar`s.
        `apply_ln` applies the final norm, so the components then sum to what the unembedding reads.
        """

        mlp = self._neurons if expand_neurons else partial(self._branch, branch="mlp")
        moe = partial(self._experts, by="expert") if expand_experts else partial(self._branch, branch="moe")

        def block_components(
            stack: str, block: int, layer: int, pos_slice: Selector
        ) -> tuple[list[torch.Tensor], list[str]]:
            return _joined(branch(stack, block, layer, pos_slice) for branch in (self._heads, mlp, moe))

        return self._stack_blocks(
            block_components, layer, stack, False, apply_ln, pos_slice, return_labels, with_embedding=True
        )

    def _branch(
        self, stack: str, block: int, layer: int, pos_slice: Selector, branch: str
    ) -> tuple[list[torch.Tensor], list[str]]:
        """A whole FFN branch (`hook_mlp_out` / `hook_moe_out`, already past its own post-norm)."""
        out = self._hook(f"{stack}.blocks.{block}.hook_{branch}_out", pos_slice)
        factor = self._ffn_map(stack, block, layer, None, out, pos_slice)
        return [(out.to(factor.dtype) * factor)[None]], [f"L{block}_{branch}"]

    def apply_ln_to_stack(
        self,
        residual_stack: Float[torch.Tensor, "... d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: Selector = None,
        batch_slice: Selector = None,
        has_batch_dim: bool = True,
        *,
        stack: str = "decoder",
    ) -> Float[torch.Tensor, "... d_model"]:  # `[..., batch, pos, d_model]`, less any axis an int slice drops
        """Push each component of a residual stack through the final norm with the cached scale
        (`ln_final.hook_scale`), which makes the norm linear: the results sum to `ln_final(resid)`.

        As TransformerLens: `pos_slice` says how the stack was sliced from the full residual (the scale
        is sliced the same way); `batch_slice` slices the stack's batch axis (axis 1, after the
        components) and the scale alike, so each row meets its own scale. `has_batch_dim=False`: a
        stack of one batch item, `batch_slice` picks its row of the scale (needed unless the batch has
        one row). Only the final norm has a cached scale, so `layer` must be the last (None, -1 or
        n_layers) and `mlp_input` False.
        """
        check_stack(stack, self._model())
        if mlp_input or self._resid_layer(layer) != self._model().cfg.num_hidden_layers:
            raise ValueError(
                "apply_ln_to_stack applies the final norm only (the one norm a residual stack meets "
                "whose scale is cached): pass layer=None and mlp_input=False"
            )
        factor = self._norm_map(f"{stack}.ln_final", residual_stack, pos_slice)
        cache_has_batch = self.has_batch_dim  # type: ignore[attr-defined]
        if has_batch_dim:
            if residual_stack.ndim < 3:
                raise ValueError(
                    f"a residual stack with a batch axis is [component, batch, (pos,) d_model], got shape "
                    f"{tuple(residual_stack.shape)}; pass has_batch_dim=False for one batch item's stack"
                )
            if batch_slice is not None and cache_has_batch and residual_stack.shape[1] != factor.shape[0]:
                raise ValueError(
                    f"batch_slice slices the stack's batch axis (as TransformerLens), so the stack must hold "
                    f"every one of the cache's {factor.shape[0]} rows, not {residual_stack.shape[1]}: pass the "
                    "unsliced stack (or a one-row stack with has_batch_dim=False)"
                )
            residual_stack = index_axis(residual_stack, batch_slice, 1, "batch_slice", "batch rows")
        elif cache_has_batch and batch_slice is None:
            if factor.shape[0] != 1:
                raise ValueError(
                    f"has_batch_dim=False: say which of the cache's {factor.shape[0]} batch rows the stack "
                    "belongs to with batch_slice=<row>"
                )
            batch_slice = 0
        if cache_has_batch:
            factor = index_axis(factor, batch_slice, 0, "batch_slice", "batch rows")
        elif batch_slice is not None:
            raise ValueError("this cache has no batch axis (remove_batch_dim); drop batch_slice")
        return residual_stack * factor

    def logit_attrs(
        self,
        residual_stack: Float[torch.Tensor, "*components d_model"],
        tokens: str | int | Int[torch.Tensor, ""] | Int[torch.Tensor, " batch"] | Int[torch.Tensor, "batch pos"],
        incorrect_tokens: str
        | int
        | Int[torch.Tensor, ""]
        | Int[torch.Tensor, " batch"]
        | Int[torch.Tensor, "batch pos"]
        | None = None,
        pos_slice: Selector = None,
        batch_slice: Selector = None,
        has_batch_dim: bool = True,
        *,
        stack: str = "decoder",
    ) -> Float[torch.Tensor, "..."]:  # the stack's leading axes, less any an int slice drops
        """Each component's share of a token's logit before the soft-cap (or of the difference
        `tokens − incorrect_tokens`): the final norm with its cached scale (`apply_ln_to_stack`), then
        a dot product with the token's unembedding direction. Summed over an exact decomposition
        (`get_full_resid_decomposition()`), it gives the pre-soft-cap logit (difference).

        `tokens`: one id or string for every position, `[batch, pos]` per position, or `[batch]`
        with a `pos_slice` that picks one position (as TransformerLens).
        """
        model = self._model()
        directions = model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            incorrect = model.tokens_to_residual_directions(incorrect_tokens)
            if incorrect.shape != directions.shape:
                raise ValueError(
                    f"tokens and incorrect_tokens must have the same shape, not {tuple(directions.shape[:-1])} "
                    f"and {tuple(incorrect.shape[:-1])}"
                )
            directions = directions - incorrect
        scaled = self.apply_ln_to_stack(
            residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim, stack=stack
        )
        return (scaled * directions.to(scaled.device, scaled.dtype)).sum(-1)
