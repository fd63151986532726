"""An activation oracle for the toy: a fine-tuned copy of the model answers questions about a latent written
into its canvas.

The latent of (step, layer, position) of one run is written, by canvas-scope's residual route
(`lens.scope.canvas_scope_tokens`, `route="resid"` at the latent's own layer), into canvas position 0 of a run
whose prompt is a question in the toy's own characters, and the oracle's token at that position is the answer:

- "oracle:" — which token will this position finally hold (the reading task of `lens.reading`);
- "oracle steps:" — how many steps until the position commits (`commit_step - step`, capped at 9, as a digit).

Training: a copy of the model (all parameters, or only the blocks from `first_trained_layer` on) is fitted by
AdamW on one decoder pass per example: a uniformly random canvas (the sampler's step-0 canvas), no
self-conditioning, the latent written at position 0 of `decoder.blocks.{layer}.hook_resid_post`, cross-entropy
of position 0's logits against the answer. Reading runs canvas-scope itself with one write-out step, so what is
trained is the path that is read.

    python -m diffusionlens.lens.oracle --model toy --json docs/figures/reading_latents/oracle.json

trains it on the reading rows of train-split runs and scores it against linear probes on the same rows of
held-out runs, by layer and step.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from diffusionlens.features.probes import fit_logistic_probe
from diffusionlens.lens.harvest import StepResiduals, harvest_residuals
from diffusionlens.lens.reading import reading_rows
from diffusionlens.lens.scope import canvas_scope_tokens, checked_latents, latent_writer, scope_hook_name

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

QUESTIONS = {"token": "oracle:", "steps": "oracle steps:"}
ORACLE_POSITION = 0
MAX_STEPS_ANSWER = 9


def question_prompt(question: str) -> str:
    """The prompt that asks `question` (a QUESTIONS key); any other is refused, naming the questions."""
    if question not in QUESTIONS:
        raise ValueError(f"unknown question {question!r}; the oracle is asked {sorted(QUESTIONS)}")
    return QUESTIONS[question]


@dataclass
class OracleExamples:
    """Questions about latents: `latent [n, d_model]` from `layer [n]`, asked `question` (a QUESTIONS key per
    row), with the answer token `answer [n]`; `step [n]` is the denoising step the latent was read at."""

    latent: Float[torch.Tensor, "n d_model"]
    layer: Int[torch.Tensor, " n"]
    step: Int[torch.Tensor, " n"]
    answer: Int[torch.Tensor, " n"]
    question: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.latent.shape[0]

    def subset(self, rows: Int[torch.Tensor, " k"]) -> OracleExamples:
        return OracleExamples(
            self.latent[rows],
            self.layer[rows],
            self.step[rows],
            self.answer[rows],
            [self.question[i] for i in rows.tolist()],
        )


def oracle_examples(
    model: HookedDiffusionGemma,
    data: StepResiduals,
    rows: Int[torch.Tensor, " n"],
    questions: Sequence[str] = ("token", "steps"),
    layers: Sequence[int] | None = None,
) -> OracleExamples:
    """Every (row, layer, question) of `data`'s `rows` as an example: the row's residual at that layer, the
    answer token from the run itself (its final token, or its steps to commit as a digit)."""
    unknown = [q for q in questions if q not in QUESTIONS]
    if unknown:
        raise ValueError(f"unknown questions {unknown}; the oracle is asked {sorted(QUESTIONS)}")
    if model.tokenizer is None:
        raise ValueError("the oracle's questions and answers are text: load the model with its tokenizer")
    layers = list(range(data.n_layers)) if layers is None else list(layers)
    sub = data.subset(rows)
    to_go = (sub.commit_step - sub.step).clamp(0, MAX_STEPS_ANSWER)
    digits = torch.tensor(model.tokenizer.convert_tokens_to_ids([str(d) for d in range(10)]))
    answers = {"token": sub.final_token, "steps": digits[to_go]}
    parts = [(q, layer) for q in questions for layer in layers]
    return OracleExamples(
        latent=torch.cat([sub.resid[:, layer] for _, layer in parts]),
        layer=torch.cat([torch.full((len(sub),), layer) for _, layer in parts]),
        step=torch.cat([sub.step for _ in parts]),
        answer=torch.cat([answers[q] for q, _ in parts]),
        question=[q for q, _ in parts for _ in range(len(sub))],
    )


class ActivationOracle:
    """A fine-tuned copy of a model that answers QUESTIONS about a latent written into its canvas."""

    def __init__(self, model: HookedDiffusionGemma, first_trained_layer: int = 0):
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        n_layers = self.model.cfg.num_hidden_layers
        if not 0 <= first_trained_layer < n_layers:
            raise ValueError(f"first_trained_layer must be in 0 … {n_layers - 1}, got {first_trained_layer}")
        self.first_trained_layer = first_trained_layer
        self.losses: list[float] = []

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """The decoder blocks from `first_trained_layer` on, or every parameter (the blocks share the encoder's
        weights, and the head is tied to the embedding, so layer 0 means all of them)."""
        if self.first_trained_layer == 0:
            return list(self.model.parameters())
        blocks = self.model.decoder.blocks[self.first_trained_layer :]
        return [p for block in blocks for p in block.parameters()]

    def check(self, latent: torch.Tensor, layer: int) -> Float[torch.Tensor, "batch d_model"]:
        scope_hook_name("resid", layer, self.model.cfg.num_hidden_layers)
        return checked_latents(self.model, latent, "the oracle", "the model it was fine-tuned from")

    def logits(
        self,
        latent: Float[torch.Tensor, "batch d_model"],
        layer: int,
        question: str,
        canvas: Int[torch.Tensor, "batch canvas"],
    ) -> Float[torch.Tensor, "batch canvas vocab"]:
        """One decoder pass of the oracle over `canvas` (no self-conditioning) with the question as prompt and
        each latent written at position 0 of `decoder.blocks.{layer}.hook_resid_post`: canvas-scope's
        residual-route write (`scope_hook_name("resid", layer)`) in the pass it runs first."""
        prompt = question_prompt(question)
        latents = self.check(latent, layer)
        ids, mask = self.model.to_tokens_and_mask([prompt] * latents.shape[0])
        positions = torch.full((latents.shape[0],), ORACLE_POSITION, dtype=torch.long)
        name = scope_hook_name("resid", layer, self.model.cfg.num_hidden_layers)
        with self.model.hooks(fwd_hooks=[(name, latent_writer(latents, positions))]):
            return self.model(ids, canvas.to(self.model.device), attention_mask=mask)

    def loss(self, batch: OracleExamples, generator: torch.Generator) -> torch.Tensor:
        """Cross-entropy of the oracle's answers to `batch` (examples of one layer and question, as `grouped`
        gives them) at the latent's position, one pass over a uniformly random canvas (the sampler's step-0
        canvas) drawn from `generator`."""
        groups = list(grouped(batch))
        if len(groups) != 1:
            raise ValueError(f"a batch asks one question at one layer, not {groups}: split it with grouped()")
        ((layer, question),) = groups
        cfg = self.model.cfg
        canvas = torch.randint(0, cfg.vocab_size, (len(batch), cfg.canvas_length), generator=generator)
        logits = self.logits(batch.latent, layer, question, canvas)
        return torch.nn.functional.cross_entropy(logits[:, ORACLE_POSITION].float(), batch.answer.to(logits.device))

    def train(
        self,
        examples: OracleExamples,
        *,
        steps: int = 300,
        batch_size: int = 64,
        lr: float = 3e-4,
        seed: int = 0,
        progress: bool = False,
    ) -> list[float]:
        """AdamW on batches of one (layer, question) group at a time, drawn with `seed`; returns the losses."""
        if len(examples) == 0:
            raise ValueError("no examples to train the oracle on")
        generator = torch.Generator().manual_seed(seed)
        groups = grouped(examples)
        keys = sorted(groups)
        parameters = self.trained_parameters()
        for p in parameters:
            p.requires_grad_(True)
        optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
        try:
            with torch.enable_grad():
                for step in range(steps):
                    layer, question = keys[int(torch.randint(len(keys), (), generator=generator))]
                    pool = groups[(layer, question)]
                    rows = pool[torch.randint(len(pool), (min(batch_size, len(pool)),), generator=generator)]
                    loss = self.loss(examples.subset(rows), generator)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    self.losses.append(float(loss.detach()))
                    if progress and step % 50 == 0:
                        print(f"oracle step {step}: loss {float(loss):.3f}", flush=True)
        finally:
            self.model.requires_grad_(False)
        return self.losses

    def answer_tokens(
        self,
        latent: Float[torch.Tensor, "batch d_model"] | Float[torch.Tensor, " d_model"],
        *,
        layer: int,
        question: str = "token",
        seed: int = 0,
    ) -> Int[torch.Tensor, " batch"]:
        """The oracle's answer token for each latent: canvas-scope on the oracle model (residual route at
        `layer`, the question as target, one write-out step), read at the latent's position."""
        prompt = question_prompt(question)
        latents = self.check(latent, layer)
        with torch.no_grad():
            tokens = canvas_scope_tokens(
                self.model,
                latents,
                layer=layer,
                position=ORACLE_POSITION,
                target=prompt,
                route="resid",
                write_steps=1,
                seed=seed,
            )
        return tokens[:, ORACLE_POSITION].cpu()

    def score(self, examples: OracleExamples, batch_size: int = 256) -> Int[torch.Tensor, " n"]:
        """Per example, whether the oracle's answer is right (1) or not (0)."""
        right = torch.zeros(len(examples), dtype=torch.long)
        for (layer, question), index in grouped(examples).items():
            for start in range(0, len(index), batch_size):
                rows = index[start : start + batch_size]
                answers = self.answer_tokens(examples.latent[rows], layer=layer, question=question)
                right[rows] = (answers == examples.answer[rows]).long()
        return right


def grouped(examples: OracleExamples) -> dict[tuple[int, str], Int[torch.Tensor, " k"]]:
    """Example indices by (layer, question)."""
    out: dict[tuple[int, str], list[int]] = {}
    for index, key in enumerate(zip(examples.layer.tolist(), examples.question, strict=True)):
        out.setdefault(key, []).append(index)
    return {key: torch.tensor(rows) for key, rows in out.items()}


def compare_with_probes(
    oracle: ActivationOracle, train: OracleExamples, test: OracleExamples, l2: float = 1e-3
) -> dict[str, Any]:
    """Accuracy by (question, layer, step) of the oracle and of a logistic probe per (question, layer)
    trained on `train`'s latents, both on `test`."""
    right = oracle.score(test)
    train_groups = grouped(train)
    out: dict[str, Any] = {}
    for (layer, question), rows in sorted(grouped(test).items()):
        fit = train_groups[(layer, question)]
        predicted = fit_logistic_probe(train.latent[fit], train.answer[fit], test.latent[rows], l2=l2)
        probe_right = (predicted == test.answer[rows]).long()
        steps = test.step[rows]
        cell = out.setdefault(question, {}).setdefault(str(layer), {})
        for step in sorted(set(steps.tolist())):
            at = steps == step
            cell[str(step)] = {
                "n": int(at.sum()),
                "oracle": float(right[rows][at].float().mean()),
                "probe": float(probe_right[at].float().mean()),
            }
        cell["all"] = {
            "n": len(rows),
            "oracle": float(right[rows].float().mean()),
            "probe": float(probe_right.float().mean()),
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from diffusionlens.lens.train_tuned import digit_tokens, start_experiment, toy_prompt_splits

    model = start_experiment(args)
    prompts = toy_prompt_splits(args.train_prompts, 1, args.test_prompts, args.seed)
    data = {split: harvest_residuals(model, prompts[split], progress=False) for split in ("train", "test")}
    eos = [model.cfg.eos_token_id]
    digits = digit_tokens(model)
    rows = {
        "train": reading_rows(data["train"], eos, digits, None, args.seed),
        "test": reading_rows(data["test"], eos, digits, args.max_rows_per_step, args.seed),
    }
    examples = {split: oracle_examples(model, data[split], rows[split]) for split in rows}
    oracle = ActivationOracle(model, first_trained_layer=args.first_trained_layer)
    losses = oracle.train(examples["train"], steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    report = {
        "command": args.command_line,
        "train_examples": len(examples["train"]),
        "test_examples": len(examples["test"]),
        "loss_first_last_20": [sum(losses[:20]) / 20, sum(losses[-20:]) / 20],
        "accuracy": compare_with_probes(oracle, examples["train"], examples["test"]),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    from diffusionlens.lens.train_tuned import experiment_parser, parse_experiment_args

    parser = experiment_parser("python -m diffusionlens.lens.oracle", __doc__)
    parser.add_argument("--json", default=None, help="where to write the accuracy table")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--first-trained-layer", type=int, default=0)
    args = parse_experiment_args(parser, argv)
    report = run(args)
    for question, layers in report["accuracy"].items():
        for layer, cells in layers.items():
            print(
                question,
                "layer",
                layer,
                "oracle / probe",
                f"{cells['all']['oracle']:.2f} / {cells['all']['probe']:.2f}",
            )


if __name__ == "__main__":
    main()
