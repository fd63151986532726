"""Transcoders: one per decoder layer, standing in for the layer's feed-forward block (dense MLP and MoE together).

A transcoder reads the block's normalised input (`decoder.blocks.{l}.ln2.hook_normalized`) and predicts the
block's output (`decoder.blocks.{l}.hook_ffn_out`) through sparse features:
`acts = jumprelu(x @ W_enc + b_enc, threshold)`, `out = acts @ W_dec + b_dec`. With every threshold 0 the
activation is a plain ReLU. A `TranscoderSet` holds one per layer, saved as one safetensors file whose
metadata records the width and the model it was trained for, so a set for another model is refused on load.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import nn

from diffusionlens.weights.fingerprint import fingerprint_mismatch, model_fingerprint
from diffusionlens.weights.tensor_file import load_tensor_file, save_tensor_file

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

FORMAT_VERSION = "diffusionlens-transcoders-1"

#: Transcoder sets shipped inside the package, by short name (`load_transcoders("toy")`).
SHIPPED_TRANSCODERS = {"toy": Path(__file__).parent / "checkpoint" / "toy-transcoders.safetensors"}


def transcoder_input_hook(layer: int) -> str:
    """The hook a layer's transcoder reads: the feed-forward block's input after its norm."""
    return f"decoder.blocks.{layer}.ln2.hook_normalized"


def transcoder_output_hook(layer: int) -> str:
    """The hook a layer's transcoder predicts: the feed-forward block's output (dense MLP + MoE, post-norm)."""
    return f"decoder.blocks.{layer}.hook_ffn_out"


def transcoder_pair_hooks(layers: Iterable[int]) -> list[str]:
    """The hooks holding the (input, output) pairs of `layers`' transcoders: each layer's input, then output."""
    return [name for layer in layers for name in (transcoder_input_hook(layer), transcoder_output_hook(layer))]


class Transcoder(nn.Module):
    """One layer's transcoder: `W_enc [d_model, d_transcoder]`, `b_enc`, `threshold [d_transcoder]`,
    `W_dec [d_transcoder, d_model]`, `b_dec [d_model]`."""

    def __init__(
        self,
        W_enc: Float[torch.Tensor, "d_model d_transcoder"],
        b_enc: Float[torch.Tensor, " d_transcoder"],
        W_dec: Float[torch.Tensor, "d_transcoder d_model"],
        b_dec: Float[torch.Tensor, " d_model"],
        threshold: Float[torch.Tensor, " d_transcoder"] | None = None,
    ) -> None:
        super().__init__()
        d_model, width = W_enc.shape
        expected = {
            "b_enc": (b_enc, (width,)),
            "W_dec": (W_dec, (width, d_model)),
            "b_dec": (b_dec, (d_model,)),
            "threshold": (threshold if threshold is not None else torch.zeros(width), (width,)),
        }
        wrong = [
            f"{name} {tuple(t.shape)} (expected {shape})" for name, (t, shape) in expected.items() if t.shape != shape
        ]
        if wrong:
            raise ValueError(f"transcoder tensors disagree with W_enc {tuple(W_enc.shape)}: " + ", ".join(wrong))
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(b_enc)
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(b_dec)
        self.threshold = nn.Parameter(expected["threshold"][0].to(W_enc), requires_grad=False)

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_transcoder(self) -> int:
        return self.W_enc.shape[1]

    def pre_activation(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_transcoder"]:
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: Float[torch.Tensor, "... d_transcoder"]) -> Float[torch.Tensor, "... d_transcoder"]:
        """JumpReLU: `pre` where it exceeds the threshold (and 0), else 0."""
        return pre * ((pre > self.threshold) & (pre > 0)).to(pre.dtype)

    def encode(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_transcoder"]:
        return self.activation(self.pre_activation(x))

    def decode(self, acts: Float[torch.Tensor, "... d_transcoder"]) -> Float[torch.Tensor, "... d_model"]:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_model"]:
        return self.decode(self.encode(x))


class TranscoderSet(nn.Module):
    """One `Transcoder` per decoder layer, in layer order, with the model they were trained for.

    `model_config` is the model's config as a dict (`model.cfg.to_dict()`-like, as `check` compares it);
    `metadata` holds anything else worth keeping (training settings, quality figures)."""

    def __init__(self, transcoders: list[Transcoder], model_config: dict, metadata: dict | None = None) -> None:
        super().__init__()
        if not transcoders:
            raise ValueError("a TranscoderSet needs one transcoder per decoder layer; got none")
        widths = {t.d_model for t in transcoders}
        if len(widths) != 1:
            raise ValueError(f"transcoders read different widths {sorted(widths)}; one set serves one model")
        self.transcoders = nn.ModuleList(transcoders)
        self.model_config = dict(model_config)
        self.metadata = dict(metadata or {})

    def __getitem__(self, layer: int) -> Transcoder:
        return self.transcoders[layer]

    def __len__(self) -> int:
        return len(self.transcoders)

    @property
    def d_model(self) -> int:
        return self.transcoders[0].d_model

    def check(self, model: HookedDiffusionGemma, *, fingerprint: bool = True) -> None:
        """Refuse a set that does not fit `model`, naming the mismatch (layers, width, or config fields).

        A set trained by `diffusionlens.graphs.training` records the fingerprint of the model it was trained
        on (`metadata["model_fingerprint"]`, see `diffusionlens.weights.fingerprint`); with `fingerprint`
        (the default) a model whose config, weights or dtype differ from it is refused too: transcoders
        fitted to a checkpoint say nothing about a retrained one of the same shape."""
        problems = []
        layers = model.cfg.num_hidden_layers
        if len(self) != layers:
            problems.append(f"the set has {len(self)} transcoders but the model has {layers} decoder layers")
        if self.d_model != model.cfg.hidden_size:
            problems.append(
                f"the transcoders read width {self.d_model} but the model's hidden_size is {model.cfg.hidden_size}"
            )
        recorded = {k: v for k, v in self.model_config.items() if k in _COMPARED_CONFIG_FIELDS}
        for field, value in recorded.items():
            actual = _jsonable(getattr(model.cfg, field, None))
            if actual != value:
                problems.append(f"config {field}: trained for {value!r}, model has {actual!r}")
        recorded_fingerprint = self.metadata.get("model_fingerprint")
        if fingerprint and recorded_fingerprint is not None and not problems:
            mismatch = fingerprint_mismatch(recorded_fingerprint, model)
            if mismatch is not None:
                problems.append(
                    f"the set was trained on another model: {mismatch} (trained on fingerprint "
                    f"{recorded_fingerprint}, this model's is {model_fingerprint(model)}); retrain the set on this "
                    "model (python -m diffusionlens.graphs.training), or load the checkpoint and dtype it was "
                    "trained on"
                )
        if problems:
            raise ValueError("these transcoders do not fit this model: " + "; ".join(problems))

    def save(self, path: str | Path) -> Path:
        """One safetensors file: `{layer}.{W_enc,b_enc,W_dec,b_dec,threshold}`, the config and metadata as JSON."""
        tensors = {
            f"{layer}.{name}": tensor.detach().contiguous().cpu()
            for layer, transcoder in enumerate(self.transcoders)
            for name, tensor in transcoder.state_dict().items()
        }
        fields = {"model_config": self.model_config, "metadata": self.metadata}
        return save_tensor_file(path, tensors, FORMAT_VERSION, fields)

    @classmethod
    def load(
        cls, path: str | Path, model: HookedDiffusionGemma | None = None, *, fingerprint: bool = True
    ) -> TranscoderSet:
        """Read a set written by `save`; with `model`, refuse it unless it fits (see `check`)."""
        header, tensors = load_tensor_file(path, FORMAT_VERSION, "transcoder file")
        layers = sorted({int(key.split(".", 1)[0]) for key in tensors})
        if layers != list(range(len(layers))):
            raise ValueError(f"{path} holds transcoders for layers {layers}; expected 0..{len(layers) - 1}")
        transcoders = [
            Transcoder(
                **{name: tensors[f"{layer}.{name}"] for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
            )
            for layer in layers
        ]
        result = cls(transcoders, header["model_config"], header["metadata"])
        if model is not None:
            result.check(model, fingerprint=fingerprint)
        return result


def load_transcoders(
    source: str | Path, model: HookedDiffusionGemma | None = None, *, fingerprint: bool = True
) -> TranscoderSet:
    """A transcoder set by shipped name (`"toy"`: the toy model's, see `SHIPPED_TRANSCODERS`) or by the path
    of a file `TranscoderSet.save` wrote. With `model`, the set is refused unless it fits it: its layers, width,
    config and (with `fingerprint`) the weights it was trained on, each mismatch named."""
    if isinstance(source, str) and source in SHIPPED_TRANSCODERS:
        path = SHIPPED_TRANSCODERS[source]
        if not path.is_file():
            raise FileNotFoundError(
                f"the shipped transcoders {source!r} are missing from {path}; reinstall diffusionlens, or retrain "
                f"them: python -m diffusionlens.graphs.training --model {source} --out {path}"
            )
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"no transcoder file at {path}; pass a path written by TranscoderSet.save or a shipped name, "
                f"one of {sorted(SHIPPED_TRANSCODERS)}"
            )
    return TranscoderSet.load(path, model, fingerprint=fingerprint)


def random_transcoders(
    model: HookedDiffusionGemma, d_transcoder: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> TranscoderSet:
    """A set of random transcoders for `model` (tests and smoke runs; thresholds random and positive)."""
    generator = torch.Generator().manual_seed(seed)
    d_model = model.cfg.hidden_size

    def draw(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    transcoders = [
        Transcoder(
            W_enc=draw(d_model, d_transcoder, scale=d_model**-0.5),
            b_enc=draw(d_transcoder, scale=0.1),
            W_dec=draw(d_transcoder, d_model, scale=d_transcoder**-0.5),
            b_dec=draw(d_model, scale=0.1),
            threshold=draw(d_transcoder, scale=0.05).abs(),
        )
        for _ in range(model.cfg.num_hidden_layers)
    ]
    return TranscoderSet(transcoders, model_config_summary(model), {"kind": "random", "seed": seed})


_COMPARED_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size", "layer_types", "intermediate_size")


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def model_config_summary(model: HookedDiffusionGemma) -> dict:
    """The config fields a transcoder set records and `check` compares."""
    return {field: _jsonable(getattr(model.cfg, field, None)) for field in _COMPARED_CONFIG_FIELDS}
