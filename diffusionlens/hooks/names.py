"""TransformerLens-style short names for hook points, and how a cache key becomes a hook name.

`get_act_name("resid_post", 3)` is `"decoder.blocks.3.hook_resid_post"`: TransformerLens's names with
a stack. Caches resolve tuple keys through it, so `cache["resid_post", 3]` and
`cache["resid_post", 3, "encoder"]` read the decoder's and the encoder's block 3.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Container
from typing import Any

from diffusionlens.cache.selectors import STACKS, check_stack, resolve_layer
from diffusionlens.components.block import NORMS, SCALED_NORMS

__all__ = ["get_act_name", "resolve_act_key"]

# Short name → path inside a block. Names are TransformerLens's where the hook means the same thing.
_BLOCK_ACTS = {
    **{name: f"hook_{name}" for name in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")},
    # DiffusionGemma's FFN is a dense MLP plus a mixture of experts, summed into ffn_out.
    **{name: f"hook_{name}" for name in ("moe_out", "ffn_out")},
    **{name: f"attn.hook_{name}" for name in ("q", "k", "v", "z", "rot_q", "rot_k", "pattern", "attn_scores")},
    **{name: f"mlp.hook_{name}" for name in ("pre", "pre_linear", "post")},
    **{name: f"moe.hook_{name}" for name in ("router_logits", "expert_weights", "expert_indices")},
    **{norm: f"{norm}.hook_normalized" for norm in NORMS},
}
# Names that live once per stack, outside the blocks.
_STACK_ACTS = {"embed": "hook_embed", "normalized": "ln_final.hook_normalized", "ln_final": "ln_final.hook_normalized"}
_DECODER_ONLY = {"logits": "hook_logits"}
# The causal twin's logits hook sits on the model, not on its stack.
_ROOT_LOGITS = {"causal": "hook_logits"}
# TransformerLens's aliases (utils.get_act_name), where DiffusionGemma has the hook they name.
_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_post": "post",
    "final_ln": "ln_final",
}
# TransformerLens's layer_type: it only prefixes names that are unambiguous here anyway, except for
# "normalized", where it picks the norm (ln1, ln2, …).
_LAYER_TYPES = {"a", "attn", "attention", "m", "mlp", "b", "block", "blocks", "moe", *NORMS}
_KNOWN = sorted({*_BLOCK_ACTS, *_STACK_ACTS, *_DECODER_ONLY, *_ALIASES})
# TransformerLens's shorthands: a name, a layer and maybe a layer type in one word ("k6", "pre5",
# "scale4ln1_post", "normalized3ln2").
_SHORTHAND = re.compile(r"(?P<name>[a-z_]+?)(?P<layer>\d+)(?P<layer_type>[a-z][a-z0-9_]*)?")


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None, stack: str = "decoder") -> str:
    """The full hook name for a TransformerLens short name.

    `get_act_name("resid_post", 3)` → `"decoder.blocks.3.hook_resid_post"`;
    `get_act_name("pattern", 0, stack="encoder")` → `"encoder.blocks.0.attn.hook_pattern"`;
    `get_act_name("normalized", 2, "ln1")` (or `get_act_name("ln1", 2)`) → `"decoder.blocks.2.ln1.hook_normalized"`;
    `get_act_name("embed")`, `get_act_name("logits")`, `get_act_name("normalized")` (the final norm) name the
    stack's own hooks. As in TransformerLens, a full name (one with a dot) comes back unchanged, and
    the third positional argument is TL's `layer_type`; a stack name there ("encoder") is taken as `stack`.
    TL's shorthands work too: `get_act_name("k6")`, `get_act_name("pre5")`, `get_act_name("scale4ln1_post")`.
    `get_act_name("scale")` is the final norm's `hook_scale`; inside a block, `get_act_name("scale", 2,
    "ln1_post")` names a norm whose output joins the residual (the pre-norms have no scale hook).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str such as 'resid_post', got {type(name).__name__}")
    if layer_type in STACKS:
        layer_type, stack = None, layer_type
    check_stack(stack)
    if "." in name and layer is None and layer_type is None:
        return name
    shorthand = _SHORTHAND.fullmatch(name) if layer is None and layer_type is None else None
    if shorthand is not None and shorthand["name"] in {*_KNOWN, "scale"}:
        name, layer, layer_type = shorthand["name"], int(shorthand["layer"]), shorthand["layer_type"]
    layer = resolve_layer(layer, None, what="layer", kind="block")
    if layer_type is not None and layer_type not in _LAYER_TYPES:
        raise ValueError(f"layer_type must be one of {sorted(_LAYER_TYPES)} or None, got {layer_type!r}")
    short = _ALIASES.get(name.removeprefix("hook_"), name.removeprefix("hook_"))
    if short == "normalized" and layer is not None:
        if layer_type not in NORMS:
            raise ValueError(f"'normalized' inside a block needs layer_type, one of {list(NORMS)} (e.g. 'ln1')")
        short = layer_type
    if short == "scale":
        return _scale_name(stack, layer, layer_type)
    if short in _BLOCK_ACTS:
        if layer is None:
            raise ValueError(f"{name!r} is a per-block hook: pass layer=, e.g. get_act_name({name!r}, 0)")
        return f"{stack}.blocks.{layer}.{_BLOCK_ACTS[short]}"
    stack_acts = {**_STACK_ACTS, **(_DECODER_ONLY if stack == "decoder" else {})}
    if short in stack_acts:
        if layer is not None:
            raise ValueError(f"{name!r} is one hook per stack, not per block: drop layer={layer}")
        return f"{stack}.{stack_acts[short]}"
    if short in _DECODER_ONLY and stack in _ROOT_LOGITS:
        if layer is not None:
            raise ValueError(f"{name!r} is one hook per model, not per block: drop layer={layer}")
        return _ROOT_LOGITS[stack]
    if short in _DECODER_ONLY:
        raise KeyError(f"the {stack} has no {name!r} hook; only the decoder produces logits")
    nearest = difflib.get_close_matches(short, _KNOWN, n=5, cutoff=0.4)
    hint = f" Nearest names: {', '.join(nearest)}." if nearest else f" Known names: {', '.join(_KNOWN)}."
    raise KeyError(f"unknown activation name {name!r}.{hint}")


def _scale_name(stack: str, layer: int | None, layer_type: str | None) -> str:
    if layer is None:
        return f"{stack}.ln_final.hook_scale"
    if layer_type not in SCALED_NORMS:
        raise ValueError(
            f"'scale' inside a block needs layer_type, one of {list(SCALED_NORMS)}: the norms whose output joins "
            "the residual stream have a hook_scale; the pre-norms (ln1, ln2, ln2_moe) do not"
        )
    return f"{stack}.blocks.{layer}.{layer_type}.hook_scale"


def resolve_act_key(key: str | tuple, model: Any = None, stored: Container[str] = ()) -> str:
    """A cache key as a full hook name, as both caches read them: a full name (or a name in `stored`) as
    given; a short name, or a TransformerLens tuple `(name, layer[, layer_type][, stack])`, through
    `get_act_name`. The layer is a block index: negatives count back from the model's layer count (a
    cache without a model refuses them). A layer out of range is a missing key: a KeyError naming the
    valid range."""
    if isinstance(key, str):
        # "embed", "logits": the decoder's own hooks
        return key if "." in key or key in stored else get_act_name(key)
    if not isinstance(key, tuple) or not key or not isinstance(key[0], str):
        raise KeyError(f"a cache key is a hook name or a tuple (name, layer[, layer_type][, stack]), got {key!r}")
    name, *rest = key
    stack = "decoder"
    if rest and isinstance(rest[-1], str) and rest[-1] in STACKS:
        stack, rest = rest[-1], rest[:-1]
    if len(rest) > 2:
        raise KeyError(f"too many parts in {key!r}: use (name, layer[, layer_type][, {' | '.join(map(repr, STACKS))}])")
    layer = rest[0] if rest else None
    layer_type = rest[1] if len(rest) > 1 else None
    try:
        n_layers = None if model is None else model.cfg.num_hidden_layers
        layer = resolve_layer(layer, n_layers, what=f"{key!r}: layer", kind="block")
    except ValueError as error:
        raise KeyError(str(error)) from None
    return get_act_name(name, layer, layer_type, stack=stack)
