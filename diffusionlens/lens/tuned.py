"""TunedLens: what each decoder layer would predict at each denoising step, through a learned translator.

`lens(resid, layer=l, step=s)` reads `decoder.blocks.{l}.hook_resid_post` at step s: the layer's translator
for that step (`diffusionlens.lens.translators`), then the logit lens's path (the final norm and the
soft-capped tied head, `analysis.logit_lens.logit_lens_logits`). Untrained, the translators are the identity
and the tuned lens is the logit lens. `TunedLens.train` harvests residuals from the model's own runs and fits
the translators to the model's output distribution at the same step (KL).

A lens is one safetensors file: the translators' tensors, and as metadata the kind, the steps it covers, the
config summary and weight fingerprint of the model it was trained for, and training notes. A lens is refused
for another model (config, width, layers or weights), naming what differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from diffusionlens.analysis.logit_lens import logit_lens_logits
from diffusionlens.lens.fit import fit_translators
from diffusionlens.lens.harvest import StepResiduals, harvest_residuals
from diffusionlens.lens.translators import ROWS_PER_DIMENSION, StepTranslators, fitted_bucket_starts
from diffusionlens.sampling.settings import settings_of
from diffusionlens.weights.fingerprint import fingerprint_mismatch, model_fingerprint
from diffusionlens.weights.tensor_file import load_tensor_file, save_tensor_file

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

FORMAT_VERSION = "diffusionlens-tuned-lens-1"
#: Where the shipped lenses live (package data), by name.
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
SHIPPED_LENSES = {"toy": SHIPPED_DIR / "toy_tuned_lens.safetensors"}
#: Config fields a lens records and compares with the model it is used on.
COMPARED_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size", "layer_types", "canvas_length")
RETRAIN = "train one for this model (python -m diffusionlens.lens.train_tuned --model ... --out ...)"


def config_summary(model: HookedDiffusionGemma) -> dict[str, Any]:
    """The config fields a lens records (and `TunedLens.check` compares)."""
    return {name: _jsonable(getattr(model.cfg, name, None)) for name in COMPARED_CONFIG_FIELDS}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class TunedLens:
    """Translators for every decoder layer and step, and the model they were trained for.

    Build an untrained (identity) lens with `TunedLens.for_model`, a trained one with `TunedLens.train`, or
    read one with `TunedLens.load(path or "toy", model=)`. A lens reads through its attached model's final
    norm and head (`attach`); `load("toy")` attaches the shipped toy. The trainable part is `translators` (an
    `nn.Module`); the lens itself is a plain object, so `TunedLens.train` is free to build a trained lens."""

    def __init__(
        self,
        translators: StepTranslators,
        model_config: dict[str, Any],
        model_fingerprint: dict[str, str],
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.translators = translators
        self.model_config = dict(model_config)
        self.model_fingerprint = dict(model_fingerprint)
        self.metadata = dict(metadata or {})
        self._model: list[HookedDiffusionGemma] = []

    @classmethod
    def for_model(
        cls, model: HookedDiffusionGemma, kind: str = "step_embedding", max_steps: int | None = None
    ) -> TunedLens:
        """An identity lens for `model` (equal to the logit lens) covering steps 0 … max_steps-1 (default:
        `GenerationSettings().max_denoising_steps`)."""
        max_steps = settings_of({}).max_denoising_steps if max_steps is None else max_steps
        cfg = model.cfg
        translators = StepTranslators.of_kind(kind, cfg.num_hidden_layers, cfg.hidden_size, max_steps)
        translators.to(device=model.device, dtype=model.dtype)
        lens = cls(translators, config_summary(model), model_fingerprint(model))
        return lens.attach(model)

    @property
    def kind(self) -> str:
        return self.translators.kind

    @property
    def model(self) -> HookedDiffusionGemma:
        if not self._model:
            raise ValueError(
                "this lens has no model attached; use TunedLens.load(path, model=model) or lens.attach(model)"
            )
        return self._model[0]

    def attach(self, model: HookedDiffusionGemma) -> TunedLens:
        """Read through `model` from now on, after checking the lens was trained for it (see `check`)."""
        self.check(model)
        self._model[:] = [model]
        self.translators.to(device=model.device)
        return self

    def check(self, model: HookedDiffusionGemma) -> None:
        """Refuse a model this lens was not trained for, naming the mismatch (width, layers, config, weights)."""
        problems = []
        cfg, translators = model.cfg, self.translators
        if translators.d_model != cfg.hidden_size:
            problems.append(
                f"the lens reads width {translators.d_model} but the model's hidden_size is {cfg.hidden_size}"
            )
        if translators.n_layers != cfg.num_hidden_layers:
            problems.append(f"the lens has {translators.n_layers} layers but the model has {cfg.num_hidden_layers}")
        current = config_summary(model)
        for name, value in self.model_config.items():
            if name in current and current[name] != value and name not in ("hidden_size", "num_hidden_layers"):
                problems.append(f"config {name}: trained for {value!r}, the model has {current[name]!r}")
        if not problems:
            mismatch = fingerprint_mismatch(self.model_fingerprint, model)
            if mismatch is not None:
                problems.append(f"the model is not the one the lens was trained for: {mismatch}")
        if problems:
            raise ValueError("this tuned lens does not fit this model: " + "; ".join(problems) + f"; {RETRAIN}")

    def __call__(
        self,
        resid: Float[torch.Tensor, "*rows d_model"],
        *,
        layer: int,
        step: int | Int[torch.Tensor, "*rows"],
    ) -> Float[torch.Tensor, "*rows vocab"]:
        """Logits read from `decoder.blocks.{layer}.hook_resid_post` at denoising step `step` (an int, or one
        step per row), through the translator and the model's final norm and soft-capped head (fp32)."""
        model = self.model
        if resid.shape[-1] != self.translators.d_model:
            raise ValueError(
                f"resid has width {resid.shape[-1]} but this lens reads d_model={self.translators.d_model} "
                f"(decoder.blocks.{{layer}}.hook_resid_post, shape [..., {self.translators.d_model}])"
            )
        if resid.is_inference():  # read from a cache recorded in inference mode: autograd may not save it
            resid = resid.clone()
        layer = layer + self.translators.n_layers if layer < 0 else layer
        steps = torch.as_tensor(step, dtype=torch.long)
        translated = self.translators(resid.to(device=model.device, dtype=model.dtype), layer, steps)
        return logit_lens_logits(model, translated)

    # ---------------------------------------------------------------- training
    @classmethod
    def train(
        cls,
        model: HookedDiffusionGemma,
        prompts: Sequence[str],
        *,
        kind: str = "step_embedding",
        seeds: Sequence[int] | None = None,
        epochs: int = 20,
        lr: float = 3e-3,
        batch_size: int = 2048,
        seed: int = 0,
        harvest_batch_size: int = 32,
        progress: bool = True,
        **generate_kwargs: Any,
    ) -> TunedLens:
        """A lens of `kind` ("step_embedding" or "step_buckets") for `model`, trained on the residuals of its
        own runs on `prompts` (one run per prompt, `RowReplayNoise(seeds[i])`, default seeds 0, 1, …, with
        `generate_kwargs` as generation settings) to match its output distribution at each step (KL; see
        `diffusionlens.lens.fit`). `seed` orders the training rows; `progress` shows tqdm bars."""
        data = harvest_residuals(
            model, prompts, seeds=seeds, batch_size=harvest_batch_size, progress=progress, **generate_kwargs
        )
        lens = cls.from_residuals(
            model,
            data,
            kind=kind,
            max_steps=settings_of(generate_kwargs).max_denoising_steps,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
        settings = {k: v for k, v in generate_kwargs.items() if isinstance(v, int | float | str)}
        lens.metadata.update({"prompts": len(prompts), "generate_kwargs": settings})
        return lens

    @classmethod
    def from_residuals(
        cls,
        model: HookedDiffusionGemma,
        data: StepResiduals,
        *,
        kind: str = "step_embedding",
        max_steps: int | None = None,
        epochs: int = 20,
        lr: float = 3e-3,
        batch_size: int = 2048,
        seed: int = 0,
        progress: bool = True,
    ) -> TunedLens:
        """A lens of `kind` trained on residuals already harvested (`harvest_residuals`); see `train`."""
        lens = cls.for_model(model, kind, max_steps)
        if kind == "step_buckets":  # buckets only where there are rows enough to fit a full affine map
            cfg = model.cfg
            starts = fitted_bucket_starts(data.step, ROWS_PER_DIMENSION * cfg.hidden_size)
            max_steps = lens.translators.max_steps
            translators = StepTranslators(cfg.num_hidden_layers, cfg.hidden_size, max_steps, starts, False)
            lens.translators = translators.to(model.device)
        lens.translators.float()
        losses = fit_translators(
            model, lens.translators, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress
        )
        lens.translators.to(model.dtype)
        lens.metadata.update(
            {
                "rows": len(data),
                "epochs": epochs,
                "lr": lr,
                "batch_size": batch_size,
                "seed": seed,
                "train_losses": losses,
            }
        )
        return lens

    # ---------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write the lens to one safetensors file (tensors, plus kind, steps, model config summary, model
        fingerprint and metadata as JSON in the header)."""
        translators = self.translators
        fields = {
            "bucket_starts": translators.bucket_starts,
            "step_tables": translators.step_tables,
            "max_steps": translators.max_steps,
            "model_config": self.model_config,
            "model_fingerprint": self.model_fingerprint,
            "metadata": self.metadata,
        }
        return save_tensor_file(path, translators.tensors(), FORMAT_VERSION, fields)

    @classmethod
    def load(cls, path: str | Path, model: HookedDiffusionGemma | None = None) -> TunedLens:
        """Read a lens written by `save`, or a shipped one by name ("toy"). With `model`, attach it (refused,
        naming the mismatch, if the lens was trained for another model); "toy" without a model attaches the
        shipped toy."""
        name = str(path)
        if name in SHIPPED_LENSES:
            path = SHIPPED_LENSES[name]
            if model is None:
                from diffusionlens.model import HookedDiffusionGemma

                model = HookedDiffusionGemma.from_pretrained(name, progress=False)
        shipped = f" (shipped lenses: {sorted(SHIPPED_LENSES)})"
        header, tensors = load_tensor_file(path, FORMAT_VERSION, "tuned lens file", missing_hint=shipped)
        n_layers, _, d_model, _ = tensors["matrix"].shape
        translators = StepTranslators(
            n_layers, d_model, header["max_steps"], header["bucket_starts"], header["step_tables"]
        )
        translators.to(tensors["matrix"].dtype)
        translators.load_state_dict(tensors)
        lens = cls(translators, header["model_config"], header["model_fingerprint"], header["metadata"])
        return lens if model is None else lens.attach(model)
