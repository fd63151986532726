"""Sparse autoencoders on a denoising model, with SAELens 6 doing the SAE work.

Training uses SAELens's own `SAETrainer` and training SAEs (standard, top-k, JumpReLU, batch top-k), fed by
an `ActivationStore` (the trainer takes any iterator of `[batch, d_in]` tensors). Splicing works with anything
that has SAELens's `encode`/`decode` interface, on hooks with a head axis (`hook_z`) too, flattened to
`[..., heads × d_head]` as SAELens does; the hooks can be limited to chosen denoising steps, and the
feature activations of every step are recorded into a `DenoisingCache` under
`<hook>.hook_sae_acts_post`. SAELens is an optional extra, imported on first use.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from diffusionlens.cache.denoising import DenoisingCache
from diffusionlens.hooks.shapes import SAE_ACTS_SUFFIX, hook_specs
from diffusionlens.sampling.settings import settings_of

if TYPE_CHECKING:
    from diffusionlens.features.store import ActivationStore
    from diffusionlens.model import HookedDiffusionGemma
    from diffusionlens.sampling.generate import GenerationResult

FeatureEdit = Callable[[torch.Tensor, Any], torch.Tensor]


def require_sae_lens() -> Any:
    """Import SAELens, or say which extra installs it."""
    try:
        import sae_lens
    except ModuleNotFoundError as error:  # pragma: no cover - the dev extras install it
        if error.name != "sae_lens":
            raise  # SAELens is there but one of its own imports failed: show that error, not ours
        raise ImportError(
            "SAE support needs SAELens 6: pip install 'diffusionlens[sae]' (or pip install 'sae-lens>=6.54')"
        ) from error
    return sae_lens


@contextmanager
def quiet_trainer(progress: bool):
    """SAETrainer.fit and its norm estimate open tqdm bars with no switch; swap in disabled ones when
    progress is off (restored on exit)."""
    from sae_lens.training import activation_scaler, sae_trainer

    modules = (sae_trainer, activation_scaler)
    originals = [module.tqdm for module in modules]
    if not progress:
        for module in modules:
            module.tqdm = partial(tqdm, disable=True)
    try:
        yield
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.tqdm = original


ARCHITECTURES = ("standard", "topk", "jumprelu", "batchtopk")
"""The SAELens training architectures `train_sae` takes (SAELens's registry names)."""

# SAETrainerConfig fields train_sae sets from its own keywords; the rest may come through `trainer`.
_TRAINER_KEYWORDS = {"total_training_samples": "training_samples", "train_batch_size_samples": "batch_size", "lr": "lr"}


def train_sae(
    store: ActivationStore,
    hook_name: str,
    *,
    d_sae: int,
    architecture: str = "standard",
    training_samples: int = 200_000,
    batch_size: int = 1024,
    lr: float = 3e-4,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    trainer: dict[str, Any] | None = None,
    **config: Any,
) -> Any:
    """Train a SAELens SAE of `architecture` ("standard", "topk", "jumprelu" or "batchtopk") on `hook_name`
    rows of `store` with SAELens's `SAETrainer`.

    `config` goes to the architecture's SAELens training config (`StandardTrainingSAEConfig`: `l1_coefficient`,
    default 1.0 here; `TopKTrainingSAEConfig` / `BatchTopKTrainingSAEConfig`: `k`, `aux_loss_coefficient`;
    `JumpReLUTrainingSAEConfig`: `l0_coefficient`, `jumprelu_init_threshold`, ...). `trainer` goes to
    `SAETrainerConfig` (`adam_beta1`, `lr_scheduler_name`, `n_checkpoints`, `checkpoint_path`, ...) over the
    schedule set here; the sample count, batch size and rate come from `training_samples`, `batch_size`, `lr`.
    Unknown names are refused, naming the fields. Rows of a hook with a head axis (`hook_z`) are flattened
    to `[heads × d_head]` by the store, as SAELens flattens them.

    Activations are normalised by SAELens's `expected_average_only_in` scaling (folded into the
    weights at the end). The result is saved in SAELens's inference format under `out` (a temporary
    directory if None) and loaded back with `SAE.load_from_disk`, so what is returned is exactly what
    SAELens alone reads from disk.
    """
    require_sae_lens()
    from sae_lens import SAE, SAETrainer
    from sae_lens.saes.sae import SAEMetadata

    from diffusionlens.features.store import config_hash

    if hook_name not in store.widths:
        raise KeyError(f"{hook_name!r} is not in this store; it holds {store.hooks}")
    sae_class, sae_config_class = _training_classes(architecture)
    if architecture == "standard":
        config.setdefault("l1_coefficient", 1.0)
    config.setdefault("normalize_activations", "expected_average_only_in")
    _check_fields(sae_config_class, config, f"architecture {architecture!r}", reserved={"d_in", "d_sae", "metadata"})
    metadata = SAEMetadata(model_name=f"diffusionlens:{config_hash(store.model)}", hook_name=hook_name)
    sae_config = sae_config_class(d_in=store.widths[hook_name], d_sae=d_sae, metadata=metadata, **config)
    schedule = trainer_config(training_samples, batch_size, lr, trainer or {})
    # SAELens initialises with torch's global RNG; fork it so training is seeded and leaves it as it was.
    with torch.random.fork_rng(), quiet_trainer(progress):
        torch.manual_seed(seed)
        sae = sae_class(sae_config)
        data = store.batches(hook_name, batch_size, seed=seed, epochs=None)
        SAETrainer(schedule, sae, data_provider=data).fit()
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="diffusionlens_sae_"))
    sae.save_inference_model(out)
    return SAE.load_from_disk(out)


def _training_classes(architecture: str) -> tuple[type, type]:
    from sae_lens.registry import get_sae_training_class

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    return get_sae_training_class(architecture)


def _check_fields(config_class: type, given: dict[str, Any], what: str, reserved: set[str]) -> None:
    names = {f.name for f in fields(config_class)} - reserved
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"{unknown} are not settings of {what} ({config_class.__name__}); it takes {sorted(names)}")


def trainer_config(training_samples: int, batch_size: int, lr: float, trainer: dict[str, Any]) -> Any:
    """SAELens's `SAETrainerConfig`: a cosine schedule scaled to the run, then `trainer`'s settings over it."""
    from sae_lens.config import SAETrainerConfig

    clashing = sorted(set(trainer) & set(_TRAINER_KEYWORDS))
    if clashing:
        fixes = ", ".join(f"{_TRAINER_KEYWORDS[name]}=" for name in clashing)
        raise ValueError(f"trainer sets {clashing}, which train_sae takes as {fixes}; pass them there")
    _check_fields(SAETrainerConfig, trainer, "the trainer", reserved=set(_TRAINER_KEYWORDS))
    batches = training_samples // batch_size
    schedule = {
        "lr_end": lr / 10,
        "lr_scheduler_name": "cosineannealing",
        "lr_warm_up_steps": max(1, batches // 20),
        "n_batches_for_norm_estimate": 20,
        "dead_feature_window": max(1, batches // 4),
        "feature_sampling_window": max(1, batches // 2),
    }
    return SAETrainerConfig(
        total_training_samples=training_samples, train_batch_size_samples=batch_size, lr=lr, **{**schedule, **trainer}
    )


def sae_width(model: HookedDiffusionGemma, hook_name: str) -> int:
    """The `d_in` an SAE on `hook_name` reads: the last axis, or `heads × d_head` for a hook whose value is
    `[batch, pos, head, d_head]` (`hook_z`, `hook_q`, ...), flattened as SAELens flattens them."""
    spec = hook_specs(model.cfg)[hook_name]
    return spec.shape[-2] * spec.shape[-1] if _has_head_axis(spec.shape, spec.pos_axis) else spec.shape[-1]


def _has_head_axis(shape: tuple[int, ...], pos_axis: int | None) -> bool:
    # [batch, pos, head, d]; attention patterns are [batch, head, query, key] (their pos_axis is 2)
    return len(shape) == 4 and pos_axis == 1


def check_sae(model: HookedDiffusionGemma, sae: Any, hook_name: str) -> None:
    """Refuse an SAE whose `d_in` or recorded hook does not fit `hook_name` of `model`."""
    if hook_name not in model.hook_dict:
        raise KeyError(model.unknown_hook_message(hook_name))
    spec = hook_specs(model.cfg)[hook_name]
    if len(spec.shape) == 4 and spec.pos_axis != 1:
        raise ValueError(f"{hook_name} is [batch, head, query, key]: SAEs splice on [batch, pos, ...] values")
    width = sae_width(model, hook_name)
    d_in = getattr(getattr(sae, "cfg", None), "d_in", None)
    if d_in is not None and d_in != width:
        raise ValueError(f"the SAE reads d_in={d_in} values but {hook_name} has {width} per position")
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    trained_on = getattr(metadata, "hook_name", None) if metadata is not None else None
    if trained_on is not None and trained_on != hook_name:
        raise ValueError(f"the SAE was trained on {trained_on!r}, not {hook_name!r}; pass hook_name={trained_on!r}")


def sae_hooks(
    sae: Any,
    hook_name: str,
    *,
    steps: Iterable[int] | None = None,
    use_error_term: bool | None = None,
    feature_edit: FeatureEdit | None = None,
    on_feature_acts: Callable[[torch.Tensor, Any], None] | None = None,
    model: HookedDiffusionGemma | None = None,
) -> list[tuple[str, Callable]]:
    """`fwd_hooks` that splice `sae` into `hook_name` at `steps` (None: every step).

    Without the error term the site's value becomes the reconstruction `decode(encode(x))`. With
    it, the value is `x + decode(edited) - decode(acts)`: the reconstruction plus the SAE's error,
    written so that without a `feature_edit` it is `x` bit for bit. `use_error_term=None` (the default)
    takes the SAE's own `sae.use_error_term` (SAELens's switch; False for an SAE without one).
    `feature_edit(acts, hook)` may change the feature activations (ablate, clamp, add);
    `on_feature_acts(acts, hook)` sees them (`[batch, pos, d_sae]`).

    A value with a head axis (`hook_z`: `[batch, pos, head, d_head]`) is flattened to `[batch, pos, head ×
    d_head]` for the SAE and its reconstruction unflattened, as SAELens does; an SAE whose own hook_z
    reshaping is on (`sae.hook_z_reshaping_mode`) is given the value unflattened and reshapes it itself.
    Pass `model` to have the SAE checked against the hook before anything runs.
    """
    if model is not None:
        check_sae(model, sae, hook_name)
    wanted = None if steps is None else set(steps)
    d_in = getattr(getattr(sae, "cfg", None), "d_in", None)
    error_term = bool(getattr(sae, "use_error_term", False)) if use_error_term is None else use_error_term

    def splice(x: torch.Tensor, hook: Any) -> torch.Tensor:
        if wanted is not None and hook.ctx.step not in wanted:
            return x
        flatten = x.dim() == 4 and not getattr(sae, "hook_z_reshaping_mode", False)
        site = x.flatten(-2) if flatten else x
        width = x.shape[-2] * x.shape[-1] if x.dim() == 4 else x.shape[-1]
        if d_in is not None and width != d_in:
            raise ValueError(f"the SAE reads d_in={d_in} values but {hook.name} has {width} per position")
        acts = sae.encode(site)
        if on_feature_acts is not None:
            on_feature_acts(acts, hook)
        edited = feature_edit(acts, hook) if feature_edit is not None else acts
        if error_term and feature_edit is None:
            return x
        out = sae.decode(edited)
        if error_term:
            out = site + (out - sae.decode(acts))
        return (out.unflatten(-1, x.shape[-2:]) if flatten else out).to(x.dtype)

    return [(hook_name, splice)]


def generate_with_sae(
    model: HookedDiffusionGemma,
    input_ids: Int[torch.Tensor, "batch pos"],
    sae: Any,
    hook_name: str,
    *,
    steps: Iterable[int] | None = None,
    use_error_term: bool | None = None,
    feature_edit: FeatureEdit | None = None,
    positions: Any = None,
    names_filter: Any = (),
    **generate_kwargs: Any,
) -> tuple[GenerationResult, DenoisingCache, DenoisingCache]:
    """`generate_with_cache` with `sae` spliced in; returns (result, cache of `names_filter`,
    feature cache) where `feature_cache[hook_name + ".hook_sae_acts_post"]` is `[step, batch, pos, d_sae]`.

    The SAE is checked against the model before generation starts; `use_error_term=None` takes the SAE's
    own (see `sae_hooks`).
    """
    check_sae(model, sae, hook_name)
    acts_name = hook_name + SAE_ACTS_SUFFIX
    settings = settings_of(generate_kwargs)
    feature_cache = DenoisingCache(
        [acts_name],
        positions=positions,
        storage="cpu",
        max_steps=settings.max_denoising_steps,
        max_canvases=-(-settings.max_new_tokens // model.cfg.canvas_length),
        canvas_length=model.cfg.canvas_length,
        pos_axes={acts_name: 1},
    )
    record = feature_cache.recording_hooks(model)[0][1]
    last: list[tuple[int, int]] = []

    def keep(acts: torch.Tensor, hook: Any) -> None:
        key = (hook.ctx.canvas, hook.ctx.step)
        if last and last[0] != key:
            feature_cache.end_step(*last.pop())  # the previous step is complete
        if not last:
            last.append(key)
        record(acts, SimpleNamespace(name=acts_name, ctx=hook.ctx))

    hooks = sae_hooks(
        sae, hook_name, steps=steps, use_error_term=use_error_term, feature_edit=feature_edit, on_feature_acts=keep
    )
    extra = list(generate_kwargs.pop("fwd_hooks", ()))
    result, cache = model.generate_with_cache(
        input_ids, names_filter=names_filter, positions=positions, fwd_hooks=hooks + extra, **generate_kwargs
    )
    if last:
        feature_cache.end_step(*last.pop())
    feature_cache.finish()
    return result, cache, feature_cache


@torch.no_grad()
def sae_metrics(sae: Any, store: ActivationStore, hook_name: str, *, batch_size: int = 4096) -> dict[str, float]:
    """Over every row of the store: explained variance of the reconstruction, mean L0 (features
    active per row), and the share of dead features (never active on any row)."""
    total_sq_err, total_sq, total_sum, total_l0, rows = 0.0, 0.0, None, 0.0, 0
    fired = None
    for x in store.batches(hook_name, batch_size, shuffle=False):
        acts = sae.encode(x)
        recon = sae.decode(acts)
        total_sq_err += float((x - recon).pow(2).sum())
        total_sq += float(x.pow(2).sum())
        total_sum = x.sum(0) if total_sum is None else total_sum + x.sum(0)
        total_l0 += float((acts > 0).sum())
        fired = (acts > 0).any(0) if fired is None else fired | (acts > 0).any(0)
        rows += x.shape[0]
    variance = total_sq - float(total_sum.pow(2).sum()) / rows  # sum of squared deviations from the mean
    return {
        "explained_variance": 1 - total_sq_err / variance,
        "l0": total_l0 / rows,
        "dead_share": float((~fired).float().mean()),
        "rows": rows,
    }


@dataclass
class FeatureExamples:
    """Top-activating rows per feature and activation per denoising step.

    `values`, `rows` `[feature, k]` (row indices into the store, -1 where fewer than k rows fired);
    `labels[field]` `[feature, k]` gathered from the store's labels; `mean_by_step`, `fire_rate_by_step`
    `[feature, step]` over every row of each step. `context["input_token"]` and `context["final_token"]`
    `[feature, k, 2w + 1]` are the tokens read and finally written at positions `position - w …
    position + w` of the same (prompt, seed, canvas, step), -1 where the store holds no row there
    (outside the canvas, or a position the store's filter left out).
    """

    features: list[int]
    values: Float[torch.Tensor, "feature k"]
    rows: Int[torch.Tensor, "feature k"]
    labels: dict[str, Int[torch.Tensor, "feature k"]]
    mean_by_step: Float[torch.Tensor, "feature step"]
    fire_rate_by_step: Float[torch.Tensor, "feature step"]
    hook_name: str | None = None
    context: dict[str, Int[torch.Tensor, "feature k window"]] = field(default_factory=dict)

    @property
    def context_width(self) -> int:
        """w: the context holds w positions on each side of the example's position (0 without context)."""
        return (next(iter(self.context.values())).shape[-1] - 1) // 2 if self.context else 0

    def describe(self, feature: int, prompts: list[str], to_str: Callable[[int], str] | None = None) -> str:
        """A few lines: the activation across steps, then each top example."""
        i = self.features.index(feature)
        steps = ", ".join(f"{v:.2f}" for v in self.mean_by_step[i].tolist())
        rates = ", ".join(f"{100 * v:.0f}%" for v in self.fire_rate_by_step[i].tolist())
        lines = [f"feature {feature}: mean activation by step [{steps}], fires on [{rates}] of rows"]
        show = to_str or str
        for j in range(self.values.shape[1]):
            if int(self.rows[i, j]) < 0:
                break
            lab = {k: int(v[i, j]) for k, v in self.labels.items()}
            lines.append(
                f"  {float(self.values[i, j]):6.2f}  {prompts[lab['prompt_id']]!r} seed {lab['seed']} "
                f"step {lab['step']} "
                f"pos {lab['position']}: reads {show(lab['input_token'])!r}, final {show(lab['final_token'])!r}"
            )
        return "\n".join(lines)


@torch.no_grad()
def top_activations(
    sae: Any,
    store: ActivationStore,
    hook_name: str,
    *,
    k: int = 8,
    features: list[int] | None = None,
    context: int = 3,
    batch_size: int = 4096,
    progress: bool = True,
) -> FeatureExamples:
    """Stream the store once through the SAE, keeping each feature's top `k` rows and per-step statistics,
    with the tokens `context` positions either side of each example (see `FeatureExamples`)."""
    if context < 0:
        raise ValueError(f"context must be >= 0 positions either side, got {context}")
    labels_all = store.labels()
    if not labels_all:
        raise ValueError(f"{store.path} holds no rows yet; run harvest() first")
    d_sae = sae.cfg.d_sae
    bad = [f for f in features or () if not 0 <= int(f) < d_sae]
    if bad:
        raise IndexError(f"features {bad} out of range: the SAE has d_sae={d_sae} features")
    n_steps = int(labels_all["step"].max()) + 1
    chosen = list(range(d_sae)) if features is None else [int(f) for f in features]
    index = torch.tensor(chosen)
    best_values = torch.full((len(chosen), k), -float("inf"))
    best_rows = torch.full((len(chosen), k), -1, dtype=torch.long)
    step_sum = torch.zeros(len(chosen), n_steps)
    step_fired = torch.zeros(len(chosen), n_steps)
    step_rows = torch.zeros(n_steps)
    offset = 0
    total = -(-len(store) // batch_size)
    for x, labels in tqdm(
        store.batches(hook_name, batch_size, shuffle=False, with_labels=True), total=total, disable=not progress
    ):
        acts = sae.encode(x)[:, index]  # [rows, feature]
        row_ids = torch.arange(offset, offset + x.shape[0])
        pool_values = torch.cat([best_values, acts.T], dim=1)
        pool_rows = torch.cat([best_rows, row_ids.expand(len(chosen), -1)], dim=1)
        top = pool_values.topk(k, dim=1)
        best_values, best_rows = top.values, pool_rows.gather(1, top.indices)
        one_hot = torch.nn.functional.one_hot(labels["step"], n_steps).float()  # [rows, step]
        step_sum += acts.T @ one_hot
        step_fired += (acts > 0).float().T @ one_hot
        step_rows += one_hot.sum(0)
        offset += x.shape[0]
    best_rows = torch.where(best_values > 0, best_rows, torch.full_like(best_rows, -1))
    safe = best_rows.clamp(min=0)
    gathered = {f: v[safe] for f, v in labels_all.items()}
    denominator = step_rows.clamp(min=1)
    return FeatureExamples(
        chosen,
        best_values.clamp(min=0),
        best_rows,
        gathered,
        step_sum / denominator,
        step_fired / denominator,
        hook_name=hook_name,
        context=_contexts(labels_all, best_rows, context),
    )


def _contexts(
    labels: dict[str, torch.Tensor], rows: Int[torch.Tensor, "feature k"], width: int
) -> dict[str, Int[torch.Tensor, "feature k window"]]:
    """The input and final tokens at positions `position - width … position + width` of each row's
    (prompt, seed, canvas, step), looked up among the store's rows; -1 where there is none."""
    keys = torch.stack([labels[f] for f in ("prompt_id", "seed", "canvas", "step")], dim=1)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    n_groups, length = int(group.max()) + 1, int(labels["position"].max()) + 1
    safe = rows.clamp(min=0)
    at = labels["position"][safe][..., None] + torch.arange(2 * width + 1)  # padded index of p - w … p + w
    out = {}
    for name in ("input_token", "final_token"):
        table = torch.full((n_groups, length + 2 * width), -1, dtype=torch.long)
        table[group, labels["position"] + width] = labels[name]
        window = table[group[safe][..., None], at]
        out[name] = torch.where(rows[..., None] >= 0, window, torch.full_like(window, -1))
    return out
