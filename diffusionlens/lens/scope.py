"""Canvas-scope: Patchscopes for a diffusion model. Write a latent into another run's canvas and let the
denoiser say what it holds.

A latent taken from (step, layer, position) of one run is placed at a canvas position of a target run (a
prompt that does not hold the answer; by default the bare `<bos>`), by one of two routes:

- "resid": it replaces that position's `decoder.blocks.{layer}.hook_resid_post` in every pass of the target
  run, so the blocks above `layer` read it as their own;
- "self_cond": it replaces that position's self-conditioning input (`decoder.self_cond.hook_soft_embed`, what
  the previous step's logits become before the self-conditioning MLP) in every pass; the MLP's pre-norm makes
  its scale irrelevant.

The target run then denoises for `write_steps` steps (`RowReplayNoise(seed)` per row, so a row's reading does
not depend on its batch) and its final canvas is the reading. No training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from diffusionlens.lens.harvest import resid_hook
from diffusionlens.sampling.noise import RowReplayNoise

if TYPE_CHECKING:
    from diffusionlens.hooks.points import HookPoint
    from diffusionlens.model import HookedDiffusionGemma

ROUTES = ("resid", "self_cond")
SELF_COND_INPUT = "decoder.self_cond.hook_soft_embed"


def scope_hook_name(route: str, layer: int | None, n_layers: int) -> str:
    """The hook a route writes the latent into."""
    if route == "resid":
        if layer is None or not -n_layers <= layer < n_layers:
            raise ValueError(f"route='resid' needs layer= in 0 … {n_layers - 1} (got {layer!r})")
        return resid_hook(layer % n_layers)
    if route == "self_cond":
        if layer is not None:
            raise ValueError("route='self_cond' writes the latent into the decoder's input; pass layer=None")
        return SELF_COND_INPUT
    raise ValueError(f"route must be one of {ROUTES}, got {route!r}")


def checked_latents(
    model: HookedDiffusionGemma,
    latent: torch.Tensor,
    reader: str = "canvas-scope",
    source: str = "this model",
) -> Float[torch.Tensor, "batch d_model"]:
    """`latent` as `[batch, d_model]` in the model's dtype, refusing another width (the message names the
    `reader` and the model the latent must come from, `source`)."""
    d_model = model.cfg.hidden_size
    if latent.ndim not in (1, 2) or latent.shape[-1] != d_model:
        raise ValueError(
            f"latent has shape {tuple(latent.shape)}; {reader} expects [{d_model}] or [batch, {d_model}] "
            f"(a residual-stream vector of {source}, d_model={d_model})"
        )
    return latent.reshape(-1, d_model).to(device=model.device, dtype=model.dtype)


def latent_writer(
    latents: Float[torch.Tensor, "batch d_model"], positions: Int[torch.Tensor, " batch"]
) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """A forward hook writing row i's latent at canvas position `positions[i]` (the residual-route write)."""
    rows = torch.arange(latents.shape[0])

    def write(value: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        value = value.clone()
        value[rows.to(value.device), positions.to(value.device)] = latents.to(value.dtype)
        return value

    return write


def target_batch(
    model: HookedDiffusionGemma, target: str | Sequence[str] | Int[torch.Tensor, "batch pos"], batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids and mask of the target run(s), one per latent (a single target is repeated)."""
    if isinstance(target, torch.Tensor):
        ids = model.check_tokens(target, "target")
        mask = torch.ones_like(ids)
    else:
        ids, mask = model.to_tokens_and_mask([target] if isinstance(target, str) else list(target))
    if ids.shape[0] == 1:
        ids, mask = ids.expand(batch, -1), mask.expand(batch, -1)
    if ids.shape[0] != batch:
        raise ValueError(f"{ids.shape[0]} targets for {batch} latents; give one target, or one per latent")
    return ids, mask


def canvas_scope_tokens(
    model: HookedDiffusionGemma,
    latent: Float[torch.Tensor, "batch d_model"] | Float[torch.Tensor, " d_model"],
    *,
    layer: int | None,
    position: int | Sequence[int] | Int[torch.Tensor, " batch"] = 0,
    target: str | Sequence[str] | Int[torch.Tensor, "batch pos"] = "",
    route: str = "resid",
    write_steps: int = 3,
    seed: int = 0,
    **generate_kwargs: Any,
) -> Int[torch.Tensor, "batch canvas"]:
    """The final canvas of the target run(s) with `latent` written at `position` (one per latent, or one for
    all) through `route` in every pass; see the module docstring. `generate_kwargs`: other generation settings
    (`entropy_bound=`, …). Returns `[batch, canvas_length]` tokens (the last step's draft)."""
    latents = checked_latents(model, latent)
    batch, length = latents.shape[0], model.cfg.canvas_length
    positions = torch.as_tensor(position, dtype=torch.long).reshape(-1).expand(batch).clone()
    if ((positions < -length) | (positions >= length)).any():
        raise ValueError(f"position {positions.tolist()} out of range: the canvas has {length} positions")
    positions = positions % length
    name = scope_hook_name(route, layer, model.cfg.num_hidden_layers)
    ids, mask = target_batch(model, target, batch)
    result = model.generate(
        ids,
        attention_mask=mask,
        noise=RowReplayNoise([seed] * batch),
        fwd_hooks=[(name, latent_writer(latents, positions))],
        max_new_tokens=length,
        max_denoising_steps=write_steps,
        progress=False,
        **generate_kwargs,
    )
    return result.trace[0].final


def canvas_scope(
    model: HookedDiffusionGemma,
    latent: Float[torch.Tensor, "batch d_model"] | Float[torch.Tensor, " d_model"],
    **scope_options: Any,
) -> str | list[str]:
    """The text the denoiser writes with `latent` placed into the target run's canvas: the canvas of
    `canvas_scope_tokens(model, latent, **scope_options)` (`layer=` and the optional `position=`, `target=`,
    `route=`, `write_steps=`, `seed=` and generation settings), cut at the first eos, special tokens dropped.
    One latent `[d_model]` gives a string, a batch `[batch, d_model]` a list."""
    texts = [decode_until_eos(model, row) for row in canvas_scope_tokens(model, latent, **scope_options)]
    return texts[0] if latent.ndim == 1 else texts


def decode_until_eos(model: HookedDiffusionGemma, tokens: Int[torch.Tensor, " canvas"]) -> str:
    """A canvas as text: up to its first eos, special tokens dropped."""
    eos_ids = set(model.cfg.eos_token_ids)
    ids = tokens.tolist()
    cut = next((i for i, token in enumerate(ids) if token in eos_ids), len(ids))
    return model.to_string(ids[:cut], skip_special_tokens=True)
