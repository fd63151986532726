"""How much of the final answer each model's hidden states show, per unit of compute.

Readers (a linear probe, the logit lens, the model's own output) give a verdict per row: does it read the
final answer's token there? These functions turn the verdicts into the share of each run's final answer
(eos included) readable once a fraction of the run's compute is spent, with the same convention as
`diffusionlens.toy.monitor`: after u = floor(f × units) units (0: nothing computed, nothing read).

- Diffusion toy (`ActivationStore` rows, one per prompt × step × canvas position): after u steps the reader
  sees the hidden state of step u - 1 at every position; the share is the mean verdict over the answer's
  positions.
- Twin (`CausalRows`, one per prompt × pass k × lookahead d): after u passes, tokens 0 … u - 2 are written,
  and pass k = u - 1's state is read for token k + d (d = 0: the token it writes); the share counts the
  written tokens as read, and each later token as its verdict (0 where no row covers it: d > max_lookahead).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int

from diffusionlens.toy.tokenizer import EOS_ID


def diffusion_answer_lengths(
    labels: dict[str, torch.Tensor], eos_token_id: int = EOS_ID
) -> Int[torch.Tensor, " prompt"]:
    """Per prompt of an `ActivationStore` (seed 0 rows), the final answer's length in tokens, eos included
    (the first position whose final token is eos, + 1; the positions recorded if none is)."""
    n = int(labels["prompt_id"].max()) + 1
    lengths = torch.full((n,), int(labels["position"].max()) + 1)
    at_eos = labels["final_token"] == eos_token_id
    for p, pos in zip(labels["prompt_id"][at_eos].tolist(), labels["position"][at_eos].tolist(), strict=True):
        lengths[p] = min(int(lengths[p]), pos + 1)
    return lengths


def diffusion_answer_rows(labels: dict[str, torch.Tensor], eos_token_id: int = EOS_ID) -> Bool[torch.Tensor, " rows"]:
    """Rows of an `ActivationStore` at a position inside the final answer (eos included)."""
    lengths = diffusion_answer_lengths(labels, eos_token_id)
    return labels["position"] < lengths[labels["prompt_id"]]


def diffusion_readable_share(
    labels: dict[str, torch.Tensor],
    read: Float[torch.Tensor, " rows"],
    fractions: Sequence[float],
    *,
    eos_token_id: int = EOS_ID,
) -> Float[torch.Tensor, "fraction prompt"]:
    """Share of each prompt's final answer read after each fraction of its denoising steps.

    `read`: per store row 1 / 0 (the reader gets the final token there), NaN where it was not scored
    (e.g. a probe's training prompts). Prompts with no scored row are NaN. The store must hold one seed
    (its steps run to each unit's stop step, so the last step of a prompt's rows is its run's last)."""
    if len(torch.unique(labels["seed"])) > 1:
        raise ValueError("diffusion_readable_share reads a store of one seed per prompt; harvest with seeds=[s]")
    answer = diffusion_answer_rows(labels, eos_token_id)
    prompt, step = labels["prompt_id"], labels["step"]
    n_prompts = int(prompt.max()) + 1
    n_steps = torch.zeros(n_prompts, dtype=torch.long).scatter_reduce(0, prompt, step + 1, reduce="amax")
    out = torch.full((len(fractions), n_prompts), float("nan"), dtype=torch.double)
    scored = answer & ~torch.isnan(read)
    for p in torch.unique(prompt[scored]).tolist():
        mine = scored & (prompt == p)
        for row, f in enumerate(fractions):
            u = int(f * int(n_steps[p]) + 1e-9)
            if u == 0:
                out[row, p] = 0.0
                continue
            at = mine & (step == u - 1)
            out[row, p] = float(read[at].double().mean()) if at.any() else float("nan")
    return out


def twin_readable_share(
    labels: dict[str, torch.Tensor], read: Float[torch.Tensor, " rows"], fractions: Sequence[float]
) -> Float[torch.Tensor, "fraction prompt"]:
    """Share of each prompt's final answer read after each fraction of its passes (`CausalRows` labels).

    After u passes, the u - 1 tokens before the last pass's are written (read), and each token from the
    last pass's on counts as its `read` verdict at lookahead d (0 where no row covers it). NaN for prompts
    whose rows were not scored."""
    prompt, step, length = labels["prompt_id"], labels["step"], labels["length"]
    n_prompts = int(prompt.max()) + 1
    out = torch.full((len(fractions), n_prompts), float("nan"), dtype=torch.double)
    scored = ~torch.isnan(read)
    for p in torch.unique(prompt[scored]).tolist():
        mine = scored & (prompt == p)
        total = int(length[mine][0])
        for row, f in enumerate(fractions):
            u = int(f * total + 1e-9)
            if u == 0:
                out[row, p] = 0.0
                continue
            at = mine & (step == u - 1)
            # one row per lookahead d: each token from u - 1 on counts once
            out[row, p] = ((u - 1) + float(read[at].double().sum())) / total
    return out
