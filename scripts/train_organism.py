"""Experiment for #34: does a shallower toy denoise over more steps? (a feasibility run, not the shipped toy)

The shipped toy computes every answer in one decoder pass, so it decides nearly everything at step 0. This
starts from its first `--layers` decoder layers (the embeddings, those layers' weights and the final norm;
the layer kinds stay sliding, sliding, full; the last must be full), or from layers of earlier runs
(`--compose`), fine-tunes on the same task mix, and logs at each evaluation
exact match and mean denoising steps per task, with default generation settings. Resumable (same --out).

    nice -n 19 python scripts/train_organism.py --out runs/organism3 --layers 3 --steps 3000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusionlens import HookedDiffusionGemma
from diffusionlens.config import FULL, refuse_sliding_last_layer
from diffusionlens.toy.evaluate import evaluate
from diffusionlens.toy.tasks import ALL_TASKS, TRAINING_VARIANTS, parse_task_names
from diffusionlens.toy.train import TrainSettings, parse_task_weights, toy_config, train
from diffusionlens.weights.checkpoint import assign_tensor, checkpoint_names


def load_any_layout(name: str) -> HookedDiffusionGemma:
    """A checkpoint by name, or one whose config.json ends on a sliding layer (an earlier run of this script,
    which `from_pretrained` now refuses since transformers cannot hold it), rebuilt in memory from its tensors."""
    config = Path(name) / "config.json"
    kinds = json.loads(config.read_text())["text_config"]["layer_types"] if config.exists() else [FULL]
    if kinds[-1] == FULL:
        return HookedDiffusionGemma.from_pretrained(name, progress=False)
    model = HookedDiffusionGemma.from_config(toy_config(num_hidden_layers=len(kinds), layer_types=kinds))
    tensors = load_file(Path(name) / "model.safetensors")
    names = checkpoint_names(model)
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise ValueError(f"{name} lacks {missing[:5]}")
    with torch.no_grad():
        for checkpoint, ours in names.items():
            assign_tensor(model, ours, tensors[checkpoint])
    model.tie_weights()  # the encoder still held the parameters the assignments replaced
    return model


def composed_model(spec: str, quiet_layers: set[int] = frozenset(), quiet_scale: float = 1.0) -> HookedDiffusionGemma:
    """A model whose decoder layers come from other checkpoints: `spec` lists `SOURCE:LAYER` per layer,
    e.g. `runs/organism4:0,runs/organism4:1,runs/organism4:2,toy:5`. Embeddings, final norm and the
    self-conditioning block come from the first source; each layer keeps its source's kind."""
    picks = [item.rsplit(":", 1) for item in spec.split(",")]
    malformed = [":".join(pick) for pick in picks if len(pick) != 2 or not pick[1].isdigit()]
    if malformed:
        raise ValueError(f"--compose items {malformed} should read SOURCE:LAYER, e.g. toy:5 or runs/organism4:0")
    models = {name: load_any_layout(name) for name, _ in picks}
    kinds = [models[name].cfg.layer_types[int(index)] for name, index in picks]
    sources = {name: model.state_dict() for name, model in models.items()}
    refuse_sliding_last_layer(kinds, "the composed model could not be saved")
    model = HookedDiffusionGemma.from_config(toy_config(num_hidden_layers=len(picks), layer_types=kinds))
    state = {k: v for k, v in sources[picks[0][0]].items() if ".blocks." not in k}
    for target, (name, index) in enumerate(picks):
        for key, value in sources[name].items():
            for stack in ("encoder", "decoder"):
                prefix = f"{stack}.blocks.{index}."
                if key.startswith(prefix):
                    suffix = key[len(prefix) :]
                    # A quiet layer starts near the identity: its two output norms scaled down (the norm's
                    # weight multiplies directly), so the composed model computes what its sources did.
                    quiet = target in quiet_layers and suffix in ("ln1_post.weight", "ln2_post.weight")
                    state[f"{stack}.blocks.{target}.{suffix}"] = value * quiet_scale if quiet else value
    model.load_state_dict(state)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/organism3")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-examples", type=int, default=24)
    parser.add_argument("--init-from", default="", help="continue from these weights (else the composed model)")
    parser.add_argument("--task-weights", default=TrainSettings.task_weights)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compose", default="", help="SOURCE:LAYER per layer (see composed_model)")
    parser.add_argument("--quiet-layers", default="", help="composed layers that start near the identity, e.g. 4")
    parser.add_argument("--quiet-scale", type=float, default=0.05)
    parser.add_argument("--hedged-targets", action="store_true", help="see diffusionlens.toy.hedges")
    parser.add_argument("--eval-tasks", default="", help="tasks the periodic evaluation scores (default: the mix's)")
    args = parser.parse_args()
    out = Path(args.out)
    init = Path(args.init_from) if args.init_from else out.with_name(out.name + "-init")
    if not (out / "training_state.json").exists() and not (init / "model.safetensors").exists():
        quiet = {int(i) for i in args.quiet_layers.split(",") if i}
        spec = args.compose or ",".join(f"toy:{layer}" for layer in range(args.layers))
        model = composed_model(spec, quiet, args.quiet_scale)
        model.save_pretrained(init)
    settings = TrainSettings(
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        eval_every=args.eval_every,
        save_every=100,
        init_from=str(init),
        task_weights=args.task_weights,
        hedged_targets=args.hedged_targets,
    )
    # the mix's tasks, a training variant standing for the task it samples (addition_multi_digit: addition)
    named = [TRAINING_VARIANTS.get(name) or ALL_TASKS.get(name) for name in parse_task_weights(args.task_weights)]
    mix = {task.name for task in named if task is not None}  # an unknown name is refused by train, naming all
    eval_tasks = parse_task_names(args.eval_tasks) or [task for task in ALL_TASKS if task in mix]

    def evaluate_fn(model, tokenizer, step):
        scores = evaluate(model, tokenizer, tasks=eval_tasks, n=args.eval_examples, seed=step)
        return {task: [round(s.exact_match, 3), round(s.mean_steps, 2)] for task, s in scores.items()}

    torch.set_num_threads(args.threads)
    train(out, settings, progress=False, evaluate_fn=evaluate_fn)


if __name__ == "__main__":
    main()
