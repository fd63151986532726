"""The `diffusionlens` command. Every command takes --help; --model defaults to the shipped toy model.

diffusionlens demo [--prompt "squares 400 800:"]          watch the toy model denoise an answer
diffusionlens generate --prompt "347+589=" [--prompt ...]  print generated answers
diffusionlens trace --prompt ... --out runs/trace [--cache "decoder.blocks.*.hook_resid_post"]
                                                           save the trace (and a disk cache) of a generation
diffusionlens view --prompt ... --out viewer.html          write the HTML trajectory viewer (or --trace DIR)
diffusionlens patch spec.yaml --out runs/sweep             run a patch sweep described in a JSON/YAML file
diffusionlens depth --config real --steps 48               opaque serial depth: DiffusionGemma vs AR Gemma 4
diffusionlens train-toy --out runs/toy                     train (or resume) the toy model
diffusionlens evaluate --model toy --n 200                 exact match per task on held-out problems
diffusionlens graph --prompt "squares 400 800:" --out graph.json [--html graph.html]
                                                           attribution graph of a logit across denoising steps
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffusionlens.sampling.settings import GenerationSettings

DEFAULTS = GenerationSettings()


def _canvas_text(tokenizer, ids: list[int]) -> str:
    """One character per position; eos as '|', pad as '.', so columns line up with positions."""
    special = {tokenizer.eos_token_id: "|", tokenizer.pad_token_id: ".", tokenizer.bos_token_id: "^"}
    return "".join(special.get(i) or tokenizer.decode([i]) or "?" for i in ids)


def _parser(command: str, description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"diffusionlens {command}", description=description)
    parser.add_argument("--model", default="toy", help="'toy' (shipped) or a checkpoint directory (default: toy)")
    return parser


def _add_generation_args(parser: argparse.ArgumentParser, prompt_required: bool = True) -> None:
    parser.add_argument("--prompt", action="append", required=prompt_required, help="prompt text; repeat for a batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--noise",
        choices=("replay", "torch"),
        default="replay",
        help="replay: ReplayNoise(seed), reproducible per step; torch: the global RNG as transformers uses it",
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: one canvas")
    parser.add_argument(
        "--max-steps", type=int, default=DEFAULTS.max_denoising_steps, help="denoising steps per canvas at most"
    )
    parser.add_argument("--entropy-bound", type=float, default=DEFAULTS.entropy_bound)
    parser.add_argument("--t-min", type=float, default=DEFAULTS.t_min)
    parser.add_argument("--t-max", type=float, default=DEFAULTS.t_max)
    parser.add_argument("--bottleneck-top-k", type=int, default=None, help="pass self-conditioning through top-k")
    parser.add_argument("--bottleneck-top-p", type=float, default=None, help="... and/or a top-p nucleus")
    parser.add_argument("--record-top-k", type=int, default=5, help="top-k tokens per position kept in the trace")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _generation_inputs(model, args) -> tuple:
    """(input_ids, generate kwargs) from the shared generation flags; bad settings exit naming the flag's field."""
    import torch

    from diffusionlens import ReplayNoise, TokenBottleneck, TorchRNGNoise

    try:
        settings = GenerationSettings(
            max_new_tokens=args.max_new_tokens or model.cfg.canvas_length,
            max_denoising_steps=args.max_steps,
            entropy_bound=args.entropy_bound,
            t_min=args.t_min,
            t_max=args.t_max,
            record_top_k=args.record_top_k,
        )
    except ValueError as error:
        raise SystemExit(f"diffusionlens: {error}") from None
    input_ids, attention_mask = model.to_tokens_and_mask(args.prompt)
    if args.noise == "torch":
        torch.manual_seed(args.seed)
    kwargs = dict(
        settings=settings,
        attention_mask=attention_mask,
        noise=ReplayNoise(args.seed) if args.noise == "replay" else TorchRNGNoise(),
        progress=not args.no_progress,
    )
    if args.bottleneck_top_k is not None or args.bottleneck_top_p is not None:
        kwargs["bottleneck"] = TokenBottleneck(top_k=args.bottleneck_top_k, top_p=args.bottleneck_top_p)
    return input_ids, kwargs


def _load(model: str, progress: bool):
    from diffusionlens import HookedDiffusionGemma

    return HookedDiffusionGemma.from_pretrained(model, progress=progress)


def _answers(model, result) -> list[str]:
    tokenizer = model.need_tokenizer()
    return [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in result.new_tokens()]


def demo(argv: list[str]) -> None:
    """Generate the answer to a prompt with the shipped toy model, caching the residual stream, and show
    how the canvas evolved over the denoising steps."""
    from diffusionlens import ReplayNoise
    from diffusionlens.toy import decode_canvas

    parser = _parser("demo", demo.__doc__)
    parser.add_argument("--prompt", default="squares 400 800:")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = _load(args.model, progress=False)
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


def _generate(argv: list[str]) -> None:
    """Generate answers and print them, one line per prompt, with the denoising steps each canvas used."""
    parser = _parser("generate", _generate.__doc__)
    _add_generation_args(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text lines")
    args = parser.parse_args(argv)
    model = _load(args.model, progress=not args.no_progress)
    input_ids, kwargs = _generation_inputs(model, args)
    result = model.generate(input_ids, **kwargs)
    steps = [[int(s) + 1 for s in canvas.stop_step().tolist()] for canvas in result.trace.canvases]
    answers = _answers(model, result)
    if args.json:
        rows = [
            {"prompt": p, "answer": a, "steps_per_canvas": [s[i] for s in steps]}
            for i, (p, a) in enumerate(zip(args.prompt, answers, strict=True))
        ]
        print(json.dumps(rows, indent=1))
        return
    for i, (prompt, answer) in enumerate(zip(args.prompt, answers, strict=True)):
        print(f"{prompt}\t{answer}\t(steps: {', '.join(str(s[i]) for s in steps)})")


def _trace(argv: list[str]) -> None:
    """Generate and save the denoising trace (trace.safetensors + trace.json) and, with --cache, a disk
    DenoisingCache of the matching hooks (written step by step, so an interrupted run keeps its steps)."""
    parser = _parser("trace", _trace.__doc__)
    _add_generation_args(parser)
    parser.add_argument("--out", required=True, help="directory to write into")
    parser.add_argument("--cache", action="append", default=[], help="hook names or globs to cache; repeatable")
    parser.add_argument("--cache-steps", default=None, help="comma-separated steps to cache (default: all)")
    parser.add_argument("--max-cache-gb", type=float, default=None, help="refuse before running if larger")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache already in OUT/cache")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.cache:
        from diffusionlens.cache.storage import check_target

        try:
            check_target(out / "cache", args.overwrite)  # before the model loads
        except FileExistsError as error:
            raise SystemExit(f"diffusionlens trace: {error} (--overwrite)") from None
    model = _load(args.model, progress=not args.no_progress)
    input_ids, kwargs = _generation_inputs(model, args)
    out.mkdir(parents=True, exist_ok=True)
    if args.cache:
        steps = [int(s) for s in args.cache_steps.split(",")] if args.cache_steps else None
        max_bytes = int(args.max_cache_gb * 2**30) if args.max_cache_gb else None
        try:
            model.resolve_hook_names(args.cache)  # a typo exits here, before the output directory fills
        except KeyError as error:
            raise SystemExit(f"diffusionlens trace --cache: {error.args[0]}") from None
        result, cache = model.generate_with_cache(
            input_ids,
            names_filter=args.cache,
            steps=steps,
            storage="disk",
            path=out / "cache",
            overwrite=args.overwrite,
            max_bytes=max_bytes,
            **kwargs,
        )
        print(f"cache: {cache}")
    else:
        result = model.generate(input_ids, **kwargs)
    result.trace.save(out)
    run = {"model": args.model, "prompts": args.prompt, "answers": _answers(model, result), "seed": args.seed}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    for prompt, answer in zip(args.prompt, run["answers"], strict=True):
        print(f"{prompt}\t{answer}")
    print(f"trace written to {out}" + (f" (cache in {out / 'cache'})" if args.cache else ""))


def _view(argv: list[str]) -> None:
    """Write the self-contained HTML trajectory viewer (step slider, entropy colours, top-k on hover) for
    a trace saved by `diffusionlens trace --out DIR` (--trace DIR) or for a fresh generation (--prompt)."""
    parser = _parser("view", _view.__doc__)
    _add_generation_args(parser, prompt_required=False)
    parser.add_argument("--trace", default=None, help="a directory written by `diffusionlens trace`")
    parser.add_argument("--out", default="viewer.html")
    parser.add_argument("--row", type=int, default=0, help="which prompt of the batch to show")
    parser.add_argument("--canvas", type=int, default=0, help="which canvas to show")
    args = parser.parse_args(argv)
    if (args.trace is None) == (args.prompt is None):
        parser.error("give either --trace DIR or --prompt TEXT")
    from diffusionlens import DenoisingTrace
    from diffusionlens.viz.viewer import write_viewer

    model_name = args.model
    if args.trace is not None:
        run_file = Path(args.trace) / "run.json"
        if model_name == "toy" and run_file.exists():
            model_name = json.loads(run_file.read_text()).get("model", "toy")
        trace = DenoisingTrace.load(args.trace)
        tokenizer = _tokenizer_only(model_name)
        title = f"trace {args.trace}"
    else:
        model = _load(args.model, progress=not args.no_progress)
        input_ids, kwargs = _generation_inputs(model, args)
        trace = model.generate(input_ids, **kwargs).trace
        tokenizer, title = model.tokenizer, args.prompt[args.row]
    if not 0 <= args.canvas < len(trace):
        parser.error(f"--canvas {args.canvas} is out of range: the trace has {len(trace)} canvas(es)")
    if not 0 <= args.row < trace[args.canvas].input_canvas.shape[1]:
        parser.error(f"--row {args.row} is out of range: the trace has {trace[args.canvas].input_canvas.shape[1]}")
    path = write_viewer(trace, tokenizer, args.out, canvas=args.canvas, row=args.row, title=title)
    print(f"viewer written to {path}")


def _tokenizer_only(model_name: str):
    from transformers import AutoTokenizer

    from diffusionlens.weights.checkpoint import SHIPPED_CHECKPOINTS

    return AutoTokenizer.from_pretrained(str(SHIPPED_CHECKPOINTS.get(model_name, model_name)))


def _patch(argv: list[str]) -> None:
    """Run a patch sweep described in a JSON or YAML spec and save it (sweep.safetensors + sweep.json,
    optionally a heatmap). Example spec (JSON; YAML takes the same keys):

    {"clean": "squares 400 800:", "corrupted": "squares 600 800:",
     "hook": "decoder.blocks.{layer}.hook_resid_pre", "over": ["step", "position"], "layers": [2],
     "positions": {"start": 0, "stop": 12}, "metric_steps": "cell",
     "metric": {"kind": "logit_diff", "position": 0, "good": "8", "bad": "4"}}

    Metric kinds: logit_diff (position, good, bad), target_prob (position, token), kl_to_clean;
    each takes an optional step (default: the last). Axes: layer×position, step×position, layer×step,
    layer×head. Optional: model, mode (frozen|free), layers, steps, positions, metric_steps, seed,
    batch_size (cells run together on the fast path), path (fast|reference)."""
    parser = argparse.ArgumentParser(
        prog="diffusionlens patch", description=_patch.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="a .json, .yaml or .yml sweep spec")
    parser.add_argument("--out", required=True, help="directory for sweep.safetensors and sweep.json")
    parser.add_argument("--model", default=None, help="overrides the spec's model")
    parser.add_argument("--plot", default=None, help="also save a heatmap (PNG/SVG; needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="run every cell as its own patched run (the slow path fast sweeps match)",
    )
    parser.add_argument("--ray", action="store_true", help="fan rows out over a local Ray (needs [distributed])")
    parser.add_argument("--ray-address", default=None, help="join the Ray cluster at host:port instead")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers, one model (and GPU) each")
    args = parser.parse_args(argv)
    from diffusionlens.patching.sweep_spec import SpecError, SweepSpec, check_before_load, run_sweep_spec

    # The whole spec is checked before anything heavy (Ray, the model's weights): against its schema, then
    # against the model's config.json, tokenizer and hook names.
    try:
        overrides = {"model": args.model} if args.model else {}
        if args.reference:
            overrides["path"] = "reference"
        spec = SweepSpec.load(args.spec, overrides)
        check_before_load(spec)
    except (OSError, ValueError, TypeError) as error:
        _fail("patch", error)
    if args.ray or args.ray_address:
        from diffusionlens.distributed.pool import connect

        try:
            connect(args.ray_address)
        except (ImportError, ConnectionError) as error:
            _fail("patch", error)
    try:
        if args.ray or args.ray_address:
            from diffusionlens.distributed import run_sweep_spec_distributed

            result = run_sweep_spec_distributed(spec, num_workers=args.workers, progress=not args.no_progress)
        else:
            result = run_sweep_spec(spec, progress=not args.no_progress)
    except (SpecError, KeyError) as error:  # checked on the loaded model or the recorded runs; or no such hook
        _fail("patch", error)
    result.save(args.out)
    print(result.table())
    print(f"largest value at {dict(zip(result.axes, result.argmax(), strict=True))}; saved to {args.out}")
    if args.plot:
        result.plot(title=f"{spec.hook}: {spec.metric['kind']}").savefig(args.plot, dpi=120)
        print(f"heatmap written to {args.plot}")


def _fail(command: str, error: BaseException) -> None:
    """Exit with status 2 and the error as one line on stderr (no traceback): what a bad input gets."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    print(f"diffusionlens {command}: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


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
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULTS.max_denoising_steps,
        help="denoising steps per canvas (largest row shown)",
    )
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


def _graph(argv: list[str]) -> None:
    """Attribution graph of one logit across the denoising steps of a generation (circuit-tracer's JSON)."""
    parser = _parser("graph", _graph.__doc__)
    _add_generation_args(parser)
    parser.add_argument("--out", required=True, help="the graph JSON file to write")
    parser.add_argument("--html", default=None, help="also write the graph's HTML view (steps as columns) here")
    parser.add_argument("--transcoders", default=None, help="a TranscoderSet file (default: random ones, --width)")
    parser.add_argument("--width", type=int, default=512, help="width of the random transcoders (no --transcoders)")
    parser.add_argument("--transcoder-seed", type=int, default=0)
    parser.add_argument("--position", type=int, default=0, help="canvas position of the target logit")
    parser.add_argument("--step", type=int, default=-1, help="denoising step of the target (negative: from the end)")
    parser.add_argument("--token", default=None, help="target token (text or id; default: that step's argmax)")
    parser.add_argument("--versus", default=None, help="attribute logit(token) - logit(versus)")
    parser.add_argument("--max-feature-nodes", type=int, default=2048)
    parser.add_argument("--node-threshold", type=float, default=0.8)
    parser.add_argument("--edge-threshold", type=float, default=0.98)
    args = parser.parse_args(argv)
    if len(args.prompt) != 1:
        parser.error("a graph traces one prompt: give --prompt once")
    from diffusionlens.graphs.attribution import attribute_trajectory
    from diffusionlens.graphs.trajectory import record_trajectory
    from diffusionlens.graphs.transcoders import TranscoderSet, random_transcoders

    model = _load(args.model, not args.no_progress)
    input_ids, kwargs = _generation_inputs(model, args)
    kwargs.pop("progress")
    try:
        if args.transcoders:
            transcoders = TranscoderSet.load(args.transcoders, model)
        else:
            transcoders = random_transcoders(model, args.width, seed=args.transcoder_seed, dtype=model.dtype)
        trajectory = record_trajectory(model, input_ids, **kwargs)
        step = args.step
        if args.token is None and -trajectory.n_steps <= step < trajectory.n_steps and 0 <= args.position:
            logits = trajectory.steps[step].logits
            token = int(logits[min(args.position, logits.shape[0] - 1)].argmax())
        else:
            token = _token_arg(model, args.token)
        target_token = token if args.versus is None else (token, _token_arg(model, args.versus))
        target = dict(position=args.position, step=step, token=target_token)
        graph = attribute_trajectory(model, transcoders, trajectory, target, max_feature_nodes=args.max_feature_nodes)
    except ValueError as error:
        _fail("graph", error)
    graph.metadata["prompt"] = args.prompt[0]
    graph.metadata["scan"] = args.transcoders or f"random-{args.width}-seed{args.transcoder_seed}"
    graph.to_json(args.out, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
    if args.html:
        from diffusionlens.viz.graph_view import write_graph_view

        write_graph_view(args.out, args.html, model.tokenizer, title=f"attribution graph: {args.prompt[0]}")
    kinds = {k: graph.kind.count(k) for k in ("feature", "error", "token", "prompt", "logit")}
    print(
        f"graph of {target} over {graph.metadata['n_steps']} steps: nodes {kinds}, "
        f"replacement score {graph.replacement_score:.3f}, completeness {graph.completeness_score:.3f}; "
        f"written (pruned at node {args.node_threshold}, edge {args.edge_threshold}) to {args.out}"
        + (f" and viewable in {args.html}" if args.html else "")
    )


def _token_arg(model, text: str | None) -> int:
    if text is None:
        raise ValueError("give --token (the target step or position is out of range for a default)")
    return int(text) if text.isdigit() else model.to_single_token(text)


COMMANDS = {
    "demo": demo,
    "generate": _generate,
    "trace": _trace,
    "view": _view,
    "patch": _patch,
    "depth": _depth,
    "train-toy": _train_toy,
    "evaluate": _evaluate,
    "graph": _graph,
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
        return
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
