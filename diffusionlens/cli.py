"""The `diffusionlens` command.

diffusionlens demo [--prompt "squares 400 800:"]   watch the shipped toy model denoise an answer
diffusionlens train-toy --out runs/toy              train (or resume) the toy model
diffusionlens evaluate --model toy --n 200          exact match per task on held-out problems
diffusionlens depth --config real --steps 48        opaque serial depth: DiffusionGemma vs AR Gemma 4
"""

from __future__ import annotations

import argparse
import sys


def _canvas_text(tokenizer, ids: list[int]) -> str:
    """One character per position; eos as '|', pad as '.', so columns line up with positions."""
    special = {tokenizer.eos_token_id: "|", tokenizer.pad_token_id: ".", tokenizer.bos_token_id: "^"}
    return "".join(special.get(i) or tokenizer.decode([i]) or "?" for i in ids)


def demo(argv: list[str]) -> None:
    from diffusionlens import HookedDiffusionGemma, ReplayNoise
    from diffusionlens.toy import decode_canvas

    parser = argparse.ArgumentParser(prog="diffusionlens demo", description=demo.__doc__)
    parser.add_argument("--prompt", default="squares 400 800:")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = HookedDiffusionGemma.from_pretrained(args.model, progress=False)
    tokenizer = model.tokenizer
    ids = model.to_tokens(args.prompt)
    result, cache = model.generate_with_cache(
        ids,
        names_filter="decoder.blocks.*.hook_resid_post",
        max_new_tokens=model.cfg.canvas_length,
        noise=ReplayNoise(args.seed),
        progress=False,
    )
    trace = result.trace[0]
    print(f"prompt: {args.prompt!r}   ('|' = eos, '.' = pad, '*' marks positions accepted at that step)")
    for step in range(trace.n_steps):
        text = _canvas_text(tokenizer, trace.argmax[step, 0].tolist())
        marks = "".join("*" if a else " " for a in trace.accepted[step, 0].tolist())
        print(f"step {step:2d} T={float(trace.temperature[step]):.2f}  {text}\n{'':16}{marks}")
    answer = decode_canvas(tokenizer, result.sequences[0, ids.shape[1] :].tolist())
    print(f"answer after {trace.n_steps} steps: {answer!r}")
    commits = trace.commit_step()[0]
    print("commit step per position:", commits.tolist()[: len(answer) + 1])
    resid = cache["decoder.blocks.0.hook_resid_post"]
    print(f"cache: {cache} — e.g. decoder.blocks.0.hook_resid_post is {tuple(resid.shape)} [step, batch, pos, d_model]")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": demo, "train-toy": _train_toy, "evaluate": _evaluate, "depth": _depth}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"unknown command {argv[0]!r}; choose one of {', '.join(commands)}")
        return
    commands[argv[0]](argv[1:])


def _train_toy(argv: list[str]) -> None:
    from diffusionlens.toy.train import main as train_main

    train_main(argv)


def _evaluate(argv: list[str]) -> None:
    from diffusionlens.toy.evaluate import main as evaluate_main

    evaluate_main(argv)


def _depth(argv: list[str]) -> None:
    """Opaque serial depth of DiffusionGemma (naive self-conditioning, token bottleneck) vs AR Gemma 4."""
    parser = argparse.ArgumentParser(prog="diffusionlens depth", description=_depth.__doc__)
    parser.add_argument(
        "--config", default="real", help="'real' (the shipped DiffusionGemma 26B-A4B config) or a config.json path"
    )
    parser.add_argument("--steps", type=int, default=48, help="denoising steps per canvas (largest row shown)")
    parser.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens in the encoder's KV cache")
    parser.add_argument(
        "--toy-mean-steps", type=float, default=None, help="mean denoising steps measured on the toy model"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.prompt_len < 1:
        parser.error("--steps and --prompt-len must be >= 1")
    from diffusionlens.serial_depth import depth_table, format_depth_table

    config = None if args.config == "real" else args.config
    table = depth_table(config, steps=args.steps, prompt_len=args.prompt_len, toy_mean_steps=args.toy_mean_steps)
    print(format_depth_table(table))


if __name__ == "__main__":
    main()
