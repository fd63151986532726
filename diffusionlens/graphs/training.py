"""Training transcoders with SAELens, on activations harvested across every denoising step.

`harvest_pairs` records each decoder layer's feed-forward input (`ln2.hook_normalized`) and output
(`hook_ffn_out`) at every step of every (prompt, seed) into an `ActivationStore`, so one row holds a matched
(input, output) pair. `train_transcoder` fits one layer's JumpReLU transcoder with SAELens's `SAETrainer`.

SAELens 6.54 ships transcoders for inference only (`JumpReLUTranscoder`: encode the input hook, decode to
the output hook); its trainer and training SAEs fit an SAE to its own input. So training uses SAELens's
`JumpReLUTrainingSAE` (its JumpReLU, straight-through estimators, sparsity losses, initialisation) with one
change: the trainer is fed `[input | output]` rows and the training SAE encodes the input half and takes its
MSE against the output half (the feed-forward block maps `d_model` to `d_model`, so the training SAE's shapes
are the transcoder's). Inputs and outputs are each scaled to a mean squared norm of `d_model` for training (as
SAELens's `expected_average_only_in`) and the scales are folded into the weights afterwards. The result is
SAELens's own `JumpReLUTranscoder`, converted exactly into our `Transcoder` (`transcoder_from_sae_lens`).

    python -m diffusionlens.graphs.training --model toy \
        --out diffusionlens/graphs/checkpoint/toy-transcoders.safetensors

trains the toy's set reproducibly (seeded), measures its quality per step and writes both into the file.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from diffusionlens.features.sae import quiet_trainer, require_sae_lens, trainer_config
from diffusionlens.features.store import ActivationStore
from diffusionlens.graphs.transcoders import (
    Transcoder,
    TranscoderSet,
    model_config_summary,
    transcoder_input_hook,
    transcoder_output_hook,
    transcoder_pair_hooks,
)
from diffusionlens.weights.fingerprint import model_fingerprint

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma


def harvest_pairs(
    model: HookedDiffusionGemma,
    prompts: Sequence[str],
    path: str | Path,
    *,
    seeds: Sequence[int] = (0,),
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    max_bytes: int = 512 * 2**20,
    progress: bool = True,
    **generate_kwargs: Any,
) -> ActivationStore:
    """(input, output) pairs of every layer's feed-forward block (or `layers`'), at every denoising step and
    canvas position of every (prompt, seed), in an `ActivationStore` at `path` (resumed if it is there).
    `max_bytes` bounds the rows held in memory before a shard is written (the store refuses a bound below
    one batch at the most steps a run may take)."""
    layers = list(range(model.cfg.num_hidden_layers)) if layers is None else list(layers)
    store = ActivationStore(
        path,
        model,
        transcoder_pair_hooks(layers),
        prompts=prompts,
        seeds=seeds,
        batch_size=batch_size,
        max_bytes=max_bytes,
        **generate_kwargs,
    )
    store.harvest(progress=progress)
    return store


def paired_rows(
    inputs: Float[torch.Tensor, "rows d_in"],
    outputs: Float[torch.Tensor, "rows d_out"],
    batch_size: int,
    *,
    seed: int = 0,
) -> Iterator[Float[torch.Tensor, "batch d_in_plus_d_out"]]:
    """`[input | output]` rows in seeded random order, epoch after epoch, forever (the trainer's data)."""
    if inputs.shape[0] != outputs.shape[0]:
        raise ValueError(f"{inputs.shape[0]} input rows but {outputs.shape[0]} output rows; they must pair up")
    if inputs.shape[0] < batch_size:
        raise ValueError(f"only {inputs.shape[0]} rows for batches of {batch_size}; harvest more or lower batch_size")
    rows = torch.cat([inputs, outputs], dim=-1)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows.shape[0], generator=generator)
        for start in range(0, rows.shape[0] - batch_size + 1, batch_size):
            yield rows[order[start : start + batch_size]]


@functools.cache
def paired_training_class() -> type:
    """SAELens's `JumpReLUTrainingSAE`, fed `[input | output]` rows: it encodes the input half and its
    reconstruction loss is taken against the output half. Everything else (the JumpReLU and its
    straight-through estimators, the sparsity and pre-activation losses, the threshold's projection to >= 0) is
    SAELens's own. Built on first use, since SAELens is an optional extra."""
    require_sae_lens()
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE
    from sae_lens.saes.sae import TrainStepOutput

    class JumpReLUTrainingTranscoder(JumpReLUTrainingSAE):
        def training_forward_pass(self, step_input: Any) -> Any:
            with torch.no_grad():
                self.threshold.data.clamp_(min=0.0)  # as JumpReLUTrainingSAE.training_forward_pass
            d_in = self.cfg.d_in
            x, target = step_input.sae_in[..., :d_in], step_input.sae_in[..., d_in:]
            feature_acts, hidden_pre = self.encode_with_hidden_pre(x)
            out = self.decode(feature_acts)
            mse_loss = self.mse_loss_fn(out, target).sum(dim=-1).mean()
            aux = self.calculate_aux_loss(
                step_input=step_input, feature_acts=feature_acts, hidden_pre=hidden_pre, sae_out=out
            )
            # `sae_in` is what the trainer's logging compares `sae_out` with: the target here
            return TrainStepOutput(
                sae_in=target,
                sae_out=out,
                feature_acts=feature_acts,
                hidden_pre=hidden_pre,
                loss=mse_loss + sum(aux.values()),
                losses={"mse_loss": mse_loss, **aux},
            )

    return JumpReLUTrainingTranscoder


def norm_scale(rows: Float[torch.Tensor, "rows d"]) -> float:
    """The factor that gives `rows` a mean squared norm of `d` (SAELens's `expected_average_only_in`)."""
    return float((rows.shape[-1] / rows.double().pow(2).sum(-1).mean()).sqrt())


def train_transcoder(
    inputs: Float[torch.Tensor, "rows d_model"],
    outputs: Float[torch.Tensor, "rows d_model"],
    *,
    d_transcoder: int,
    training_samples: int = 1_000_000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    target_l0: float = 16.0,
    seed: int = 0,
    progress: bool = True,
    trainer: dict[str, Any] | None = None,
    hook_name: str | None = None,
    **config: Any,
) -> Any:
    """Fit a JumpReLU transcoder `inputs -> outputs` with SAELens's `SAETrainer`; returns SAELens's
    `JumpReLUTranscoder` with the training scales folded in (it reads and writes unscaled activations).

    The sparsity loss defaults to Gemma Scope 2's quadratic penalty around `target_l0` active features;
    `config` goes to `JumpReLUTrainingSAEConfig` (`l0_coefficient`, `jumprelu_sparsity_loss_mode`,
    `pre_act_loss_coefficient`, ...), `trainer` to `SAETrainerConfig` (as `features.sae.train_sae`).
    Training is seeded and leaves torch's global RNG as it was.
    """
    require_sae_lens()
    from sae_lens import JumpReLUTranscoder, JumpReLUTranscoderConfig, SAETrainer
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d_model = inputs.shape[-1]
    if outputs.shape[-1] != d_model:
        raise ValueError(f"inputs are {d_model} wide but outputs {outputs.shape[-1]}: a feed-forward block keeps width")
    config = {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": target_l0, **config}
    reserved = {"d_in", "d_sae", "metadata", "normalize_activations", "apply_b_dec_to_input"}
    clashing = sorted(set(config) & reserved)
    if clashing:
        raise ValueError(f"{clashing} are set by train_transcoder itself; leave them out")
    in_scale, out_scale = norm_scale(inputs), norm_scale(outputs)
    metadata = SAEMetadata(hook_name=hook_name)
    training_config = JumpReLUTrainingSAEConfig(
        d_in=d_model, d_sae=d_transcoder, apply_b_dec_to_input=False, metadata=metadata, **config
    )
    schedule = trainer_config(training_samples, batch_size, lr, trainer or {})
    with torch.random.fork_rng(), quiet_trainer(progress):
        torch.manual_seed(seed)
        sae = paired_training_class()(training_config)
        data = paired_rows(inputs * in_scale, outputs * out_scale, batch_size, seed=seed)
        SAETrainer(schedule, sae, data_provider=data).fit()
    sae.eval()
    result = JumpReLUTranscoder(
        JumpReLUTranscoderConfig(
            d_in=d_model, d_sae=d_transcoder, d_out=d_model, apply_b_dec_to_input=False, metadata=metadata
        )
    )
    with torch.no_grad():
        # trained on (a x, b y): y = (jumprelu(x (a W_enc) + b_enc) W_dec + b_dec) / b
        result.W_enc.copy_(sae.W_enc * in_scale)
        result.b_enc.copy_(sae.b_enc)
        result.threshold.copy_(sae.threshold.clamp(min=0.0))
        result.W_dec.copy_(sae.W_dec / out_scale)
        result.b_dec.copy_(sae.b_dec / out_scale)
    return result.eval()


def transcoder_from_sae_lens(transcoder: Any) -> Transcoder:
    """Our `Transcoder` with the weights of a SAELens `Transcoder` or `JumpReLUTranscoder`, computing the
    same function bit for bit (a plain `Transcoder`'s ReLU is a threshold of 0). Refused: skip transcoders
    (a term ours lacks), run-time normalisation, and an output width other than the input's."""
    require_sae_lens()
    from sae_lens import JumpReLUTranscoder, SkipTranscoder
    from sae_lens import Transcoder as SAELensTranscoder

    if not isinstance(transcoder, SAELensTranscoder):
        raise TypeError(f"expected a SAELens Transcoder or JumpReLUTranscoder, got {type(transcoder).__name__}")
    cfg = transcoder.cfg
    if isinstance(transcoder, SkipTranscoder):
        raise ValueError("a SAELens SkipTranscoder adds W_skip @ x, which our Transcoder has no term for")
    if cfg.normalize_activations != "none":
        raise ValueError(
            f"the transcoder normalises its input at run time ({cfg.normalize_activations!r}); fold the "
            "normalisation into its weights first (normalize_activations='none')"
        )
    if cfg.d_out != cfg.d_in:
        raise ValueError(f"the transcoder maps {cfg.d_in} to {cfg.d_out} values; a feed-forward block keeps width")
    weights = {name: getattr(transcoder, name).detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if isinstance(transcoder, JumpReLUTranscoder):
        weights["threshold"] = transcoder.threshold.detach().clone()
    return Transcoder(**weights)


def toy_prompts(n: int, seed: int) -> list[str]:
    """`n` training-split prompts of every toy task, deterministic in `seed`."""
    from diffusionlens.toy.tasks import make_dataset

    return [example.prompt for example in make_dataset(None, n, seed=seed, split="train").examples]


def train_transcoder_set(
    model: HookedDiffusionGemma,
    store: ActivationStore,
    *,
    d_transcoder: int,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = True,
    **train_kwargs: Any,
) -> TranscoderSet:
    """One transcoder per decoder layer from the pairs in `store` (see `harvest_pairs`), as a `TranscoderSet`
    recording the model's config and weights fingerprint (so it is refused by a retrained model)."""
    layers = list(range(model.cfg.num_hidden_layers)) if layers is None else list(layers)
    if layers != list(range(model.cfg.num_hidden_layers)):
        raise ValueError(f"a TranscoderSet holds every layer 0..{model.cfg.num_hidden_layers - 1}; got {layers}")
    missing = [name for name in transcoder_pair_hooks(layers) if name not in store.widths]
    if missing:
        raise KeyError(
            f"the store lacks {missing}; harvest it with harvest_pairs (hooks {transcoder_pair_hooks(layers)})"
        )
    transcoders, seconds = [], []
    for layer in layers:
        start = time.perf_counter()
        inputs = store.activations(transcoder_input_hook(layer))
        outputs = store.activations(transcoder_output_hook(layer))
        trained = train_transcoder(
            inputs,
            outputs,
            d_transcoder=d_transcoder,
            seed=seed + layer,
            progress=progress,
            hook_name=transcoder_input_hook(layer),
            **train_kwargs,
        )
        transcoders.append(transcoder_from_sae_lens(trained))
        seconds.append(round(time.perf_counter() - start, 1))
    metadata = {
        "kind": "trained",
        "model_fingerprint": model_fingerprint(model),
        "training": {
            "rows": len(store),
            "units": len(store.completed),
            "d_transcoder": d_transcoder,
            "seed": seed,
            "seconds_per_layer": seconds,
            **{k: v for k, v in train_kwargs.items() if isinstance(v, (int, float, str, bool))},
        },
    }
    return TranscoderSet(transcoders, model_config_summary(model), metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diffusionlens.graphs.training",
        description="Train one transcoder per decoder layer on pairs harvested at every denoising step, "
        "measure their quality per step, and save the set.",
    )
    parser.add_argument("--model", default="toy", help="a shipped checkpoint name or a checkpoint directory")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--prompts", type=int, default=512, help="training prompts (toy tasks, train split)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds per prompt")
    parser.add_argument("--width", type=int, default=None, help="features per layer (default 4 x d_model)")
    parser.add_argument("--training-samples", type=int, default=2_000_000, help="rows seen per layer")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--target-l0", type=float, default=16.0, help="the sparsity penalty's target L0")
    parser.add_argument("--init-threshold", type=float, default=0.1, help="JumpReLU threshold at the start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts for the quality table")
    parser.add_argument("--store", default=None, help="keep the harvested store here (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the result depends on it bitwise)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with torch.random.fork_rng():
            ship(args)
    finally:
        torch.set_num_threads(threads)


def ship(args: argparse.Namespace) -> None:
    """The command's work: harvest, train, measure, save (see `main` for the arguments)."""
    from diffusionlens.graphs.quality import format_quality, toy_quality
    from diffusionlens.model import HookedDiffusionGemma

    progress = not args.no_progress
    torch.manual_seed(args.seed)
    model = HookedDiffusionGemma.from_pretrained(args.model, progress=progress)
    width = args.width or 4 * model.cfg.hidden_size
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diffusionlens_transcoders_") as scratch:
        store_path = Path(args.store) if args.store else Path(scratch) / "store"
        store = harvest_pairs(
            model, toy_prompts(args.prompts, args.seed), store_path, seeds=args.seeds, progress=progress
        )
        harvested = time.perf_counter() - start
        transcoders = train_transcoder_set(
            model,
            store,
            d_transcoder=width,
            seed=args.seed,
            progress=progress,
            training_samples=args.training_samples,
            batch_size=args.batch_size,
            lr=args.lr,
            target_l0=args.target_l0,
            jumprelu_init_threshold=args.init_threshold,
        )
    trained = time.perf_counter() - start - harvested
    quality_start = time.perf_counter()
    quality = toy_quality(model, transcoders, n=args.eval_prompts, progress=progress)
    timing = {"harvest_seconds": round(harvested, 1), "training_seconds": round(trained, 1)}
    timing["quality_seconds"] = round(time.perf_counter() - quality_start, 1)
    transcoders.metadata["training"].update(
        {"prompts": args.prompts, "seeds": args.seeds, "threads": args.threads, **timing}
    )
    transcoders.metadata["quality"] = quality.to_dict()
    transcoders.save(args.out)
    print(
        f"harvested {len(store)} rows in {harvested:.0f} s; trained {len(transcoders)} layers in {trained:.0f} s; "
        f"measured quality in {timing['quality_seconds']:.0f} s"
    )
    print(format_quality(quality))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
