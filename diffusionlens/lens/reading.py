"""Readers measured against each other: what a canvas position will finally hold, read from its latents before
the token is in the canvas.

A reading row is (run, step, position) of a held-out run where the position lies in the answer, its final token
is one of `read_tokens` (default: any but eos) and the canvas the step's pass read does not hold that token yet
(masked, or another token): the latent was computed without the answer in its input. Each reader reads the
residual `decoder.blocks.{l}.hook_resid_post` of that row at every layer l and is right when its token is the
final one:

- "logit lens": the argmax of the final norm and head on the residual;
- "tuned lens": the argmax of a `TunedLens` at the row's layer and step;
- "linear probe": a multinomial logistic probe per layer (`features.probes.fit_logistic_probe`) trained on the
  reading rows of other runs (`probe_data`, prompts disjoint from the test runs', all steps pooled) to predict
  the final token from the residual;
- "canvas-scope (resid)" / "canvas-scope (self_cond)": the token `canvas_scope_tokens` writes at the position
  when the latent is placed into the target run (default `<bos>` alone) by that route;
- "target alone": the token the target run writes there with no latent (a control: what canvas-scope reads
  without being told anything).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from diffusionlens.analysis.logit_lens import logit_lens_logits
from diffusionlens.features.probes import fit_logistic_probe
from diffusionlens.lens.harvest import StepResiduals
from diffusionlens.lens.scope import canvas_scope_tokens, target_batch
from diffusionlens.sampling.noise import RowReplayNoise

if TYPE_CHECKING:
    from diffusionlens.lens.tuned import TunedLens
    from diffusionlens.model import HookedDiffusionGemma

CONTROL = "target alone"


@dataclass
class ReadingTable:
    """Accuracy of each reader by (layer, step): `accuracy[reader]` is `[layer, step]`; `counts [step]` rows.
    The control row ("target alone") does not depend on the layer (its rows repeat one value)."""

    readers: list[str]
    steps: list[int]
    accuracy: dict[str, Float[torch.Tensor, "layer step"]]
    counts: Int[torch.Tensor, " step"]

    def pooled(self, reader: str) -> Float[torch.Tensor, " layer"]:
        """Per layer, accuracy over all rows (steps weighted by their counts)."""
        weights = self.counts.float() / self.counts.sum()
        return (self.accuracy[reader] * weights).sum(-1)

    def to_dict(self) -> dict:
        return {
            "readers": self.readers,
            "steps": self.steps,
            "counts": self.counts.tolist(),
            "accuracy": {name: values.tolist() for name, values in self.accuracy.items()},
        }


def reading_rows(
    data: StepResiduals,
    eos_ids: Sequence[int],
    read_tokens: Sequence[int] | None = None,
    max_rows_per_step: int | None = 200,
    seed: int = 0,
) -> Int[torch.Tensor, " n"]:
    """Indices of the reading rows of `data` (see the module docstring), at most `max_rows_per_step` per step
    (drawn with `seed`)."""
    eligible = data.in_answer & (data.input_token != data.final_token)
    eligible &= ~torch.isin(data.final_token, torch.tensor(list(eos_ids), dtype=torch.long))
    if read_tokens is not None:
        eligible &= torch.isin(data.final_token, torch.tensor(list(read_tokens), dtype=torch.long))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for step in data.steps():
        rows = (eligible & (data.step == step)).nonzero().flatten()
        if max_rows_per_step is not None and len(rows) > max_rows_per_step:
            rows = rows[torch.randperm(len(rows), generator=generator)[:max_rows_per_step]].sort().values
        chosen.append(rows)
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)


def compare_readers(
    model: HookedDiffusionGemma,
    data: StepResiduals,
    *,
    lens: TunedLens | None = None,
    probe_data: StepResiduals | None = None,
    routes: Sequence[str] = ("resid", "self_cond"),
    read_tokens: Sequence[int] | None = None,
    max_rows_per_step: int | None = 200,
    target: str = "",
    write_steps: int = 3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> ReadingTable:
    """Accuracy of the logit lens, `lens` (if given), linear probes trained on `probe_data`'s reading rows (if
    given; its prompts must be disjoint from `data`'s), canvas-scope by each of `routes` and the control, on
    the reading rows of `data` (from `harvest_residuals` on held-out prompts), by layer and step."""
    eos_ids = model.cfg.eos_token_ids
    rows = reading_rows(data, eos_ids, read_tokens, max_rows_per_step, seed)
    if len(rows) == 0:
        raise ValueError("no reading rows: no answer position was read before its token was in the canvas")
    sub = data.subset(rows)
    n_layers = sub.n_layers
    probe_rows = None
    if probe_data is not None:
        shared = set(probe_data.prompts) & set(data.prompts)
        if shared:
            raise ValueError(
                f"probe_data shares {len(shared)} prompts with data (e.g. {sorted(shared)[0]!r}): train the probes "
                "on runs of other prompts"
            )
        probe_rows = reading_rows(probe_data, eos_ids, read_tokens, None, seed)
        if len(probe_rows) == 0:
            raise ValueError("probe_data has no reading rows to train the probes on")
    correct: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        correct["logit lens"] = torch.stack(
            [
                logit_lens_logits(model, sub.resid[:, layer]).argmax(-1).cpu() == sub.final_token
                for layer in range(n_layers)
            ]
        )
        if lens is not None:
            correct["tuned lens"] = torch.stack(
                [
                    lens(sub.resid[:, layer], layer=layer, step=sub.step).argmax(-1).cpu() == sub.final_token
                    for layer in range(n_layers)
                ]
            )
    if probe_data is not None and probe_rows is not None:
        correct["linear probe"] = probe_reads(probe_data.subset(probe_rows), sub) == sub.final_token
    target_run = {"target": target, "write_steps": write_steps, "seed": seed}  # canvas-scope's and the control's
    bar = tqdm(total=len(routes) * n_layers * len(sub), desc="canvas-scope", disable=not progress)
    try:
        for route in routes:  # the latent of every layer; route "self_cond" writes it into the input
            placed = {"route": route, **target_run}
            reads = [
                scope_reads(model, sub, layer, bar, batch_size, layer=None if route == "self_cond" else layer, **placed)
                for layer in range(n_layers)
            ]
            correct[f"canvas-scope ({route})"] = torch.stack(reads) == sub.final_token
        correct[CONTROL] = (control_reads(model, sub, **target_run) == sub.final_token).expand(n_layers, -1)
    finally:
        bar.close()
    steps = sub.steps()
    counts = torch.tensor([int((sub.step == s).sum()) for s in steps])
    accuracy = {
        name: torch.stack([hits[:, sub.step == s].float().mean(-1) for s in steps], dim=-1)
        for name, hits in correct.items()
    }
    return ReadingTable(list(correct), steps, accuracy, counts)


def probe_reads(train: StepResiduals, sub: StepResiduals, l2: float = 1e-3) -> Int[torch.Tensor, "layer rows"]:
    """Per layer, the final token a logistic probe fitted on `train`'s rows (residual -> final token) predicts
    for each row of `sub`."""
    if train.n_layers != sub.n_layers or train.resid.shape[-1] != sub.resid.shape[-1]:
        raise ValueError(
            f"probe rows have {train.n_layers} layers of width {train.resid.shape[-1]}, the rows to read "
            f"{sub.n_layers} of width {sub.resid.shape[-1]}: harvest both from the same model"
        )
    return torch.stack(
        [
            fit_logistic_probe(train.resid[:, layer], train.final_token, sub.resid[:, layer], l2=l2)
            for layer in range(sub.n_layers)
        ]
    )


def scope_reads(
    model: HookedDiffusionGemma,
    sub: StepResiduals,
    read_layer: int,
    bar: tqdm,
    batch_size: int,
    **scope_options: Any,
) -> Int[torch.Tensor, " rows"]:
    """The token canvas-scope writes at each row's position from the row's latent at `read_layer`, placed as
    `scope_options` say (`canvas_scope_tokens`' keywords but `position`: `route=`, `layer=`, `target=`, …),
    `batch_size` rows at a time."""
    out = []
    for start in range(0, len(sub), batch_size):
        rows = slice(start, start + batch_size)
        positions = sub.position[rows]
        tokens = canvas_scope_tokens(model, sub.resid[rows, read_layer], position=positions, **scope_options)
        out.append(tokens.cpu().gather(1, positions[:, None]).squeeze(1))
        bar.update(len(positions))
    return torch.cat(out)


def control_reads(
    model: HookedDiffusionGemma, sub: StepResiduals, target: str, write_steps: int, seed: int
) -> Int[torch.Tensor, " rows"]:
    """The token the target run writes at each row's position with no latent placed."""
    ids, mask = target_batch(model, target, 1)
    result = model.generate(
        ids,
        attention_mask=mask,
        noise=RowReplayNoise([seed]),
        max_new_tokens=model.cfg.canvas_length,
        max_denoising_steps=write_steps,
        progress=False,
    )
    return result.trace[0].final[0].cpu()[sub.position]
