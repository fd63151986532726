"""DenoisingTrace: what the sampler saw and decided at every step of every canvas."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file

TRACE_FORMAT_VERSION = 1

#: The canvases of token ids a CanvasTrace holds per step (`[step, batch, canvas]`), each with the
#: words figures and the viewer label it by. `next_canvas` is what `sampler.hook_canvas_next` saw: the
#: trace keeps the spelling its saved files have always used, and `SAMPLER_HOOK_OF_FIELD` ties each
#: field to the hook that carries the same tensor.
TOKEN_FIELDS = {
    "argmax": "draft (argmax)",
    "sampled": "sampled",
    "input_canvas": "canvas read by the decoder",
    "next_canvas": "canvas after the step",
}
#: Every `[step, batch, …]` field, in the order `tensors()` and saved files list them.
STEP_FIELDS = ("input_canvas", "sampled", "argmax", "entropy", "accepted", "next_canvas", "finished")
#: Recorded only with `record_top_k`.
OPTIONAL_STEP_FIELDS = ("top_k_tokens", "top_k_probs")
#: The sampler hook whose value at step s is a field's row s (input_canvas and finished have no hook).
SAMPLER_HOOK_OF_FIELD = {
    "sampled": "sampler.hook_sampled",
    "argmax": "sampler.hook_argmax",
    "entropy": "sampler.hook_entropy",
    "accepted": "sampler.hook_accepted",
    "next_canvas": "sampler.hook_canvas_next",
}


@dataclass
class CanvasTrace:
    """One canvas. Step-indexed tensors are `[step, batch, canvas]` (top-k: `[step, batch, canvas, k]`).

    input_canvas: the canvas the decoder read; sampled: tokens drawn; argmax: the draft answer (held
    fixed for rows that had already stopped, as the reference does); entropy: per position, of the
    temperature-scaled logits; accepted: positions accepted this step; next_canvas: after renoising;
    finished: rows stopped after this step. temperature: `[step]`.
    """

    input_canvas: Int[torch.Tensor, "step batch canvas"]
    sampled: Int[torch.Tensor, "step batch canvas"]
    argmax: Int[torch.Tensor, "step batch canvas"]
    entropy: Float[torch.Tensor, "step batch canvas"]
    accepted: Bool[torch.Tensor, "step batch canvas"]
    next_canvas: Int[torch.Tensor, "step batch canvas"]
    finished: Bool[torch.Tensor, "step batch"]
    temperature: Float[torch.Tensor, " step"]
    t: Int[torch.Tensor, " step"]
    top_k_tokens: Int[torch.Tensor, "step batch canvas k"] | None = None
    top_k_probs: Float[torch.Tensor, "step batch canvas k"] | None = None

    @property
    def n_steps(self) -> int:
        return self.input_canvas.shape[0]

    @property
    def final(self) -> Int[torch.Tensor, "batch canvas"]:
        """The canvas appended to the sequence (before eos padding): the last step's argmax."""
        return self.argmax[-1]

    def stop_step(self) -> Int[torch.Tensor, " batch"]:
        """Per row, the 0-based step after which it stopped (the last step if it never did)."""
        finished = self.finished.int()
        first = torch.where(finished.any(0), finished.argmax(0), torch.full_like(finished[0], self.n_steps - 1))
        return first

    def commit_step(self) -> Int[torch.Tensor, "batch canvas"]:
        """Per position, the step after which its argmax never changes again."""
        changed = torch.zeros_like(self.argmax, dtype=torch.bool)
        changed[1:] = self.argmax[1:] != self.argmax[:-1]
        steps = torch.arange(self.n_steps).view(-1, 1, 1).expand_as(changed)
        return torch.where(changed, steps, torch.zeros_like(steps)).amax(0)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {name: getattr(self, name) for name in (*STEP_FIELDS, "temperature", "t")}
        out.update({n: getattr(self, n) for n in OPTIONAL_STEP_FIELDS if getattr(self, n) is not None})
        return out


@dataclass
class DenoisingTrace:
    """Per-canvas traces of one `generate` call plus the settings that produced them.

    model_fingerprint: digests of the config and weights of the model that generated it, and its dtype
    (`diffusionlens.weights.fingerprint`); `replay_step` refuses a trace whose fingerprint is not the model's.
    None for a trace built by hand or saved before fingerprints were recorded."""

    canvases: list[CanvasTrace]
    prompt_length: int
    settings: dict = field(default_factory=dict)
    model_fingerprint: dict[str, str] | None = None

    def __getitem__(self, canvas: int) -> CanvasTrace:
        return self.canvases[canvas]

    def __len__(self) -> int:
        return len(self.canvases)

    def steps(self, canvas: int = 0) -> int:
        return self.canvases[canvas].n_steps

    def pass_index(self, canvas: int, step: int) -> int:
        """Which decoder pass of the generation ran (canvas, step), counting from 0 across canvases:
        the call index of a decoder hook point or module, as nnsight's `tracer.iter[i]` counts them.
        Canvases run one after another, each for `steps(canvas)` passes, so the index is the steps of
        the earlier canvases plus `step`. (Not for a generation started with `resume=`, whose first
        canvas runs only the steps after the fork.)"""
        if not 0 <= canvas < len(self.canvases):
            raise IndexError(f"canvas {canvas} is out of range: this generation ran {len(self.canvases)} canvases")
        if not 0 <= step < self.steps(canvas):
            raise IndexError(f"step {step} is out of range: canvas {canvas} ran {self.steps(canvas)} steps")
        return sum(self.steps(earlier) for earlier in range(canvas)) + step

    def summary(self, canvas: int = 0, row: int = 0) -> str:
        """A short text summary: steps, tokens accepted per step, commit order."""
        trace = self.canvases[canvas]
        accepted = trace.accepted[:, row].sum(-1).tolist()
        commits = trace.commit_step()[row]
        order = torch.argsort(commits, stable=True).tolist()
        return (
            f"canvas {canvas}, row {row}: {trace.n_steps} steps, stopped after step {int(trace.stop_step()[row])}\n"
            f"accepted per step: {accepted}\n"
            f"commit step per position: {commits.tolist()}\n"
            f"positions in commit order: {order}"
        )

    def save(self, path: str | Path) -> None:
        """Write `trace.safetensors` and `trace.json` into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{c}/{name}": t.contiguous().cpu()
            for c, tr in enumerate(self.canvases)
            for name, t in tr.tensors().items()
        }
        save_file(tensors, str(path / "trace.safetensors"))
        meta = {
            "format_version": TRACE_FORMAT_VERSION,
            "n_canvases": len(self.canvases),
            "prompt_length": self.prompt_length,
            "settings": self.settings,
            "model_fingerprint": self.model_fingerprint,
        }
        (path / "trace.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> DenoisingTrace:
        path = Path(path)
        meta = json.loads((path / "trace.json").read_text())
        if meta.get("format_version", 0) > TRACE_FORMAT_VERSION:
            raise ValueError(
                f"{path} was written by a newer diffusionlens (trace format {meta['format_version']} > "
                f"{TRACE_FORMAT_VERSION}); upgrade diffusionlens to read it"
            )
        tensors = load_file(str(path / "trace.safetensors"))
        canvases = []
        for c in range(meta["n_canvases"]):
            fields_ = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == str(c)}
            canvases.append(CanvasTrace(**fields_))
        fingerprint = meta.get("model_fingerprint")
        if fingerprint is not None and not (
            isinstance(fingerprint, dict) and all(isinstance(v, str) for v in fingerprint.values())
        ):
            raise ValueError(f"{path / 'trace.json'}: model_fingerprint must map names to digests, got {fingerprint!r}")
        return cls(canvases, meta["prompt_length"], meta.get("settings", {}), fingerprint)
