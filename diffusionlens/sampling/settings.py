"""GenerationSettings: every number the block-diffusion sampler reads, with its default, in one place.

Other modules take their defaults from this class (`GenerationSettings.max_denoising_steps`), so a
default changes here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Final, no_type_check

if TYPE_CHECKING:
    from diffusionlens.config import DiffusionGemmaConfig

FROM_CONFIG: Final = "from_config"
"""The default of `eos_token_id` and `pad_token_id`: take the id(s) from the model's config."""

#: The six numbers the denoising loop itself reads: GenerationSettings' first six fields, in order.
SAMPLER_FIELDS = (
    "max_denoising_steps",
    "entropy_bound",
    "t_min",
    "t_max",
    "stability_threshold",
    "confidence_threshold",
)


# Validated in __post_init__ with messages that name the fix; no_type_check keeps a runtime type
# checker (the tests run one) from pre-empting them with a bare type error.
@no_type_check
@dataclass(frozen=True)
class GenerationSettings:
    """The sampler's settings, validated on construction (the errors name the fix).

    The first six fields keep `SamplerSettings`' positional order. Derive variants with
    `settings.replace(max_denoising_steps=6)`.
    """

    max_denoising_steps: int = 48
    """The most steps one canvas is denoised for (a row can stop earlier: `stability_threshold`)."""
    entropy_bound: float = 0.1
    """A step accepts its lowest-entropy positions while their entropies, less the largest, sum to at most this."""
    t_min: float = 0.4
    """The temperature the linear schedule approaches at the last step."""
    t_max: float = 0.8
    """The temperature of the first step."""
    stability_threshold: int = 1
    """A row stops once its argmax canvas held for this many steps and it is confident; 0 never stops early."""
    confidence_threshold: float = 0.005
    """A row is confident when the mean entropy of its temperature-scaled logits is below this."""
    max_new_tokens: int = 256
    """How many tokens to generate: `ceil(max_new_tokens / canvas_length)` canvases."""
    eos_token_id: int | tuple[int, ...] | None | str = FROM_CONFIG
    """The id(s) that end a row: by default the model config's (`FROM_CONFIG`); None never stops at eos."""
    pad_token_id: int | None | str = FROM_CONFIG
    """The id written after a row stops: by default the model config's (`FROM_CONFIG`); None writes no padding."""
    record_top_k: int = 0
    """How many top tokens per position the trace keeps at each step (0: none)."""

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, Iterable) and not isinstance(self.eos_token_id, str):
            # A list would make the frozen object unhashable and compare unequal to the same tuple.
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        problems = [p for p in self._problems() if p]
        if problems:
            raise ValueError("Invalid generation settings: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        def positive_int(name: str) -> str:
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            return "" if ok else f"{name} must be a positive int (got {value!r})"

        problems = [positive_int("max_denoising_steps"), positive_int("max_new_tokens")]
        if self.entropy_bound < 0:
            problems.append(f"entropy_bound must be >= 0 (got {self.entropy_bound})")
        if self.t_min < 0 or self.t_max < 0:
            problems.append(f"temperatures must be >= 0 (got t_min={self.t_min}, t_max={self.t_max})")
        if self.t_min > self.t_max:
            problems.append(f"t_min={self.t_min} > t_max={self.t_max}; the schedule runs from t_max down to t_min")
        if not isinstance(self.stability_threshold, int) or self.stability_threshold < 0:
            problems.append(f"stability_threshold must be an int >= 0 (got {self.stability_threshold!r})")
        if self.confidence_threshold <= 0:
            problems.append(f"confidence_threshold must be > 0 (got {self.confidence_threshold})")
        if not isinstance(self.record_top_k, int) or self.record_top_k < 0:
            problems.append(f"record_top_k must be >= 0 (got {self.record_top_k!r})")
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, tuple) else (value,)
            if isinstance(value, str) and value != FROM_CONFIG:
                problems.append(f"{name} must be a token id, None or {FROM_CONFIG!r} (got {value!r})")
            elif not isinstance(value, str) and not all(i is None or isinstance(i, int) for i in ids):
                problems.append(f"{name} must be int token id(s) or None (got {value!r})")
        return problems

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with `changes` applied (and validated); unknown names raise a TypeError listing the fields."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(
                f"GenerationSettings has no field(s) {sorted(unknown)}; fields: {[f.name for f in fields(self)]}"
            )
        return replace(self, **changes)

    def eos_ids(self, cfg: DiffusionGemmaConfig) -> tuple[int, ...]:
        """The eos ids the run stops on (empty: never stop on eos)."""
        if self.eos_token_id == FROM_CONFIG:
            return tuple(cfg.eos_token_ids)
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def pad_id(self, cfg: DiffusionGemmaConfig) -> int | None:
        return cfg.pad_token_id if self.pad_token_id == FROM_CONFIG else self.pad_token_id

    def sampler_dict(self) -> dict[str, Any]:
        """The six sampler fields (what a trace records as its settings, with noise and eos/pad)."""
        return {name: getattr(self, name) for name in SAMPLER_FIELDS}


def merge_settings(settings: GenerationSettings | None, **overrides: Any) -> GenerationSettings:
    """`settings` (default: `GenerationSettings()`) with every override that was given applied.

    The settings keywords of `generate` (and of every helper that takes them as sugar) override the
    fields of `settings=`: a number left at None keeps the settings' value; `eos_token_id=None` /
    `pad_token_id=None` given explicitly disable eos stopping / padding. An unknown name raises a
    TypeError listing the fields.
    """
    if settings is not None and not isinstance(settings, GenerationSettings):
        raise TypeError(f"settings must be a GenerationSettings, got {type(settings).__name__}")
    names = [f.name for f in fields(GenerationSettings)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"unknown generation setting(s) {unknown}; GenerationSettings fields: {names}")
    disabling = ("eos_token_id", "pad_token_id")
    given = {k: v for k, v in overrides.items() if v is not None or k in disabling}
    return (settings or GenerationSettings()).replace(**given)


def settings_of(generate_kwargs: Mapping[str, Any]) -> GenerationSettings:
    """The settings a call of `generate(**generate_kwargs)` runs with: its `settings=` object with the
    settings keywords among `generate_kwargs` applied. Every helper that reads a recorded run's step
    budget or canvas count resolves it here, so `settings=` and the keywords mean the same."""
    names = {f.name for f in fields(GenerationSettings)}
    return merge_settings(generate_kwargs.get("settings"), **{k: v for k, v in generate_kwargs.items() if k in names})
