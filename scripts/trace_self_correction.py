"""Trace a squares-count self-correction through denoising steps with an attribution graph (#35, item 7).

    python scripts/trace_self_correction.py --model runs/organism3 --transcoders runs/organism3-transcoders.safetensors

Finds the squares runs (held-out prompts × seeds, as scripts/organism_corrections.py) in which an accepted
count digit is later replaced, and traces `--traces` of them (first those that persist to the end and whose
replacing step read the wrong digit in its canvas). For each:

- builds the attribution graph of the corrected count at the step that changed it, on the same trajectory
  (`ReplayNoise(seed)`), as the logit difference corrected token - first (wrong) token;
- splits the target by source step and kind, and by channel: what earlier steps hand on through
  self-conditioning, the canvas tokens the step reads, that step's own error nodes and feature biases, the
  prompt (`diffusionlens.graphs.breakdown`);
- lists the top features by influence with (step, layer, position, what the position holds in the final
  answer: the count, the colon, list item k, a separator, eos or a pad) and activation, and the canvas-token
  sources (direct edge into the target, total effect) with what they held at their step;
- ablates the top-k features each alone and all together at their steps in the real model (the trajectory
  replayed with recorded canvases, `diffusionlens.graphs.validate`), against k random active features at the
  same steps, and sets the change of the target against the graph's prediction;
- reruns the target step on the real model with one channel changed at a time (no self-conditioning, its
  count or list rows flattened, the count or the list in the canvas reset), and scales the top earlier-step
  features with the norms' scales live or held at the clean run (the graph holds them).

Everything printed is also written with `--json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from organism_corrections import (  # the sibling script: same events, same layout
    analyse_run,
    answer_layout,
    patched_inputs,
)

from diffusionlens import HookedDiffusionGemma
from diffusionlens.graphs.attribution import attribute_trajectory
from diffusionlens.graphs.breakdown import channel_breakdown, node_contributions, step_breakdown
from diffusionlens.graphs.replacement import ReplacementModel, recorded_sources
from diffusionlens.graphs.splicing import FeatureIntervention
from diffusionlens.graphs.trajectory import record_trajectory
from diffusionlens.graphs.transcoders import load_transcoders
from diffusionlens.graphs.validate import (
    RecordedRun,
    check_graph,
    direct_effects,
    graph_target,
    pearson,
    replacement_target_changes,
    total_effects,
)
from diffusionlens.sampling.noise import ReplayNoise
from diffusionlens.toy.tasks import make_dataset


def position_roles(final: list[int], tokenizer) -> list[str]:
    """What each canvas position holds in the run's final answer: 'count', ':', 'item k' (1-based, the k-th
    square in the list), 'sep' (a space between items), 'eos', or 'pad' (after the answer)."""
    count_positions, list_positions = answer_layout(final, tokenizer)
    roles = ["pad"] * len(final)
    for p in count_positions:
        roles[p] = "count"
    if list_positions:
        roles[list_positions[0] - 1] = ":"
        item, previous_sep = 0, True
        for p in list_positions:
            if tokenizer.decode([final[p]]).strip() == "":
                roles[p], previous_sep = "sep", True
                continue
            item += previous_sep
            roles[p], previous_sep = f"item {item}", False
        end = list_positions[-1] + 1
        if end < len(final):
            roles[end] = "eos"
    return roles


@torch.no_grad()
def find_events(model, prompts: list[str], seeds: int) -> tuple[list[dict], int]:
    """scripts/organism_corrections.py's count-correction events, each with what the canvas the replacing
    step read held at the position: the old token (the model overruled its own canvas), the new one (the
    sampler drew it there at the step before, and the model endorsed the draw), or another."""
    events = [
        event
        for prompt in prompts
        for seed in range(seeds)
        for event in analyse_run(model, model.tokenizer, prompt, seed)
    ]
    return events, len(prompts) * seeds


def feature_rows(graph, roles, influence, total, direct, top: int, before_step: int | None = None) -> list[dict]:
    """The top features by influence (only those at steps before `before_step`, if given)."""
    features = graph.indices("feature")
    if before_step is not None:
        features = features[graph.step[features] < before_step]
    order = features[torch.argsort(influence[features], descending=True)[:top]].tolist()
    return [
        dict(
            step=int(graph.step[i]),
            layer=int(graph.layer[i]),
            position=int(graph.position[i]),
            holds=roles[int(graph.position[i])],
            feature=int(graph.feature[i]),
            activation=round(float(graph.activation[i]), 4),
            influence=round(float(influence[i]), 4),
            total_effect=round(float(total[i]), 4),
            direct_effect=round(float(direct[i]), 4),
        )
        for i in order
    ]


def role_rows(graph, roles, contribution, influence) -> list[dict]:
    """Feature, error and canvas-token nodes grouped by when (earlier steps or the target step) and where
    (what the position holds in the final answer: the count, the list with its colon and separators, or the
    rest): their summed share of the target and influence."""
    target_step = graph_target(graph)[0]
    kinds = ("feature", "error", "token")
    groups: dict[tuple[str, str, str], list[int]] = {}
    for index, kind in enumerate(graph.kind):
        if kind not in kinds:
            continue
        role = roles[int(graph.position[index])]
        where = (
            "count"
            if role == "count"
            else "list"
            if role == ":" or role == "sep" or role.startswith("item")
            else "rest"
        )
        when = "earlier steps" if int(graph.step[index]) < target_step else "target step"
        groups.setdefault((when, where, kind), []).append(index)
    rows = []
    for (when, where, kind), members in sorted(groups.items()):
        pick = torch.tensor(members, dtype=torch.long)
        rows.append(
            dict(
                when=when,
                where=where,
                kind=kind,
                n_nodes=len(members),
                contribution=round(float(contribution[pick].sum()), 4),
                influence=round(float(influence[pick].sum()), 4),
            )
        )
    return rows


def token_rows(graph, roles, tokenizer, final, contribution, direct, top: int) -> list[dict]:
    """Canvas-token source nodes by |total effect|: what they held at their step and in the final answer."""
    tokens = graph.indices("token")
    order = tokens[torch.argsort(contribution[tokens].abs(), descending=True)[:top]].tolist()
    rows = []
    for i in order:
        position, token = int(graph.position[i]), int(graph.token[i])
        rows.append(
            dict(
                step=int(graph.step[i]),
                position=position,
                holds=roles[position],
                token=tokenizer.decode([token]),
                is_final_token=token == final[position],
                total_effect=round(float(contribution[i]), 4),
                direct_effect=round(float(direct[i]), 4),
            )
        )
    return rows


def frozen_norm_check(model, transcoders, ids, trajectory, graph, seed: int, top_k: int, steer: float) -> dict:
    """The graph freezes every norm's scale at the recorded run (as circuit-tracer does); the real model does
    not. Scale each of the top-k earlier-step features by `steer` on the real model with the scales of the
    norms that have a `hook_scale` (the self-conditioning block's post-norm, the blocks' post-norms, the final
    norm) live, or held at the clean replay's values, a group at a time, and count the changes whose sign
    the graph predicts: which norms' response the graph's cross-step edges miss."""
    target = graph_target(graph)
    features = graph.indices("feature")
    features = features[graph.step[features] < target[0]]
    influence, total = graph.node_influence(), total_effects(graph)
    top = features[torch.argsort(influence[features], descending=True)[:top_k]].tolist()
    run = RecordedRun(model, transcoders, ids, trajectory, target, noise=ReplayNoise(seed))
    names = [n for n in model.hook_dict if n.startswith("decoder.") and n.endswith(".hook_scale")]
    groups = {
        "live (the real model)": [],
        "self-conditioning post-norm frozen": ["decoder.self_cond.post_norm.hook_scale"],
        "block post-norms frozen": [n for n in names if ".blocks." in n],
        "final norm frozen": ["decoder.ln_final.hook_scale"],
        "all of them frozen": names,
    }
    idle = int((recorded_sources(trajectory, transcoders).acts[0][0][0] == 0).nonzero()[0])
    replay_all = [FeatureIntervention(0, 0, 0, idle, 0.0)]  # an inactive feature left at 0: replays from step 0
    clean_scales = {}

    def keep(scale, hook):
        clean_scales[(hook.name, hook.ctx.step)] = scale.detach().clone()
        return scale

    def clean_scale(scale, hook):
        return clean_scales[(hook.name, hook.ctx.step)]

    with model.hooks(fwd_hooks=[(n, keep) for n in names]):
        run.target_value(replay_all)
    result = {}
    for label, frozen in groups.items():
        changes = []
        with model.hooks(fwd_hooks=[(n, clean_scale) for n in frozen]):
            base = run.target_value(replay_all)
            for i in top:
                site = (int(graph.step[i]), int(graph.layer[i]), int(graph.position[i]), int(graph.feature[i]))
                edit = [FeatureIntervention(*site, steer * float(graph.activation[i]))]
                changes.append((run.target_value(edit) - base, (steer - 1.0) * float(total[i])))
        result[label] = dict(
            sign_agreement=sum((m > 0) == (p > 0) for m, p in changes) / max(1, len(changes)),
            pearson=pearson(torch.tensor([p for _, p in changes]), torch.tensor([m for m, _ in changes])),
            mean_abs_measured=sum(abs(m) for m, _ in changes) / max(1, len(changes)),
            mean_abs_predicted=sum(abs(p) for _, p in changes) / max(1, len(changes)),
        )
    return result


def ablation_check(
    model, transcoders, ids, trajectory, graph, seed: int, top_k: int, steps, roles, steer: float
) -> dict:
    """`check_graph`'s per-feature check of the top-k features (at `steps`, default any), and the same
    features ablated together, as are the k random active features (at the same steps): the prediction
    (the sum of minus their total effects; the replacement model with gates frozen, which counts paths
    shared by two ablated features once; with live JumpReLU gates) against the real model's change. Each top
    feature is also scaled by `steer` alone (a small change: does the graph get the local slope right?)."""
    noise = ReplayNoise(seed)
    agreement = check_graph(
        model, transcoders, ids, trajectory, graph, noise=noise, top_n=top_k, steps=steps, steer=steer, n_random=top_k
    )
    target = graph_target(graph)
    run = RecordedRun(model, transcoders, ids, trajectory, target, noise=noise)
    replacement = ReplacementModel(model, transcoders, trajectory)
    sources = recorded_sources(trajectory, transcoders)
    joint = {}
    for name, nodes in (("top", agreement.nodes), ("random", agreement.random)):
        if not nodes:
            continue
        edits = [FeatureIntervention(n.step, n.layer, n.position, n.feature, 0.0) for n in nodes]
        linear, jumprelu = (
            replacement_target_changes(replacement, sources, target, [edits], r)[0] for r in ("linear", "jumprelu")
        )
        joint[name] = dict(
            n=len(nodes),
            sum_of_predicted=sum(n.predicted for n in nodes),
            replacement_linear=linear,
            replacement_jumprelu=jumprelu,
            real=run.target_change(edits),
        )
    return dict(
        steps=steps,
        clean=run.clean,
        summary=agreement.summary,
        nodes=[vars(n) | {"predicted": n.predicted, "holds": roles[n.position]} for n in agreement.nodes],
        random=[vars(n) | {"holds": roles[n.position]} for n in agreement.random],
        joint=joint,
    )


@torch.no_grad()
def channel_checks(model, prompt: str, seed: int, step: int, position: int, tokens: tuple[int, int]) -> dict:
    """The target step's decoder pass rerun on the real model with one channel changed at a time, as
    scripts/organism_corrections.py reruns it: the (post-soft-cap) logit difference new - old at the position
    with the recorded inputs, without self-conditioning (what step 0 gets), with the self-conditioning rows of
    the count or of the list flattened (uniform logits), and with the canvas's count token set to the new
    token, or the count or the list set back to the run's starting noise."""
    ids = model.to_tokens(prompt)
    result, cache = model.generate_with_cache(
        ids, noise=ReplayNoise(seed), progress=False, names_filter=["sampler.hook_logits"]
    )
    trace = result.trace[0]
    count_positions, list_positions = answer_layout(trace.final[0].tolist(), model.tokenizer)
    state = model.encode(ids)
    canvas, start = trace.input_canvas[step], trace.input_canvas[0]
    self_cond = cache.get("sampler.hook_logits", canvas=0, step=step - 1) if step > 0 else None
    new, old = tokens

    def difference(canvas_positions=(), canvas_from=None, flatten=(), drop_self_cond=False) -> float:
        cond = None if drop_self_cond else self_cond
        patched = patched_inputs(canvas, cond, reset=canvas_positions, reset_from=canvas_from, flatten=flatten)
        logits = model.denoise(patched[0], state, patched[1])[0, position]
        return float(logits[new] - logits[old])

    new_canvas = canvas.clone()
    new_canvas[0, position] = new
    checks = {
        "recorded": difference(),
        "no self-conditioning (as step 0)": difference(drop_self_cond=True),
        "self-conditioning flattened at the count": difference(flatten=count_positions),
        "self-conditioning flattened at the list": difference(flatten=list_positions),
        "canvas count token set to the new token": difference([position], new_canvas),
        "canvas count token back to the starting noise": difference(count_positions, start),
        "canvas list back to the starting noise": difference(list_positions, start),
    }
    return {name: round(value, 4) for name, value in checks.items()}


def trace_event(model, transcoders, event: dict, args) -> dict:
    tokenizer = model.tokenizer
    ids = model.to_tokens(event["prompt"])
    noise = ReplayNoise(event["seed"])
    trajectory = record_trajectory(model, ids, noise=noise)
    new, old = model.to_single_token(event["new"]), model.to_single_token(event["old"])
    step, position = event["step_replaced"], event["position"]
    target = dict(position=position, step=step, token=(new, old))
    start = time.perf_counter()
    graph = attribute_trajectory(
        model,
        transcoders,
        trajectory,
        target,
        max_feature_nodes=args.max_feature_nodes,
        min_influence=args.min_influence,
    )
    seconds = time.perf_counter() - start
    final = trajectory.steps[-1].logits.argmax(-1).tolist()
    roles = position_roles(final, tokenizer)
    influence, total, direct = graph.node_influence(), total_effects(graph), direct_effects(graph)
    contribution = node_contributions(graph)
    by_step, by_channel = step_breakdown(graph), channel_breakdown(graph)
    before = [
        float(trajectory.steps[s].pre_logits[position, new] - trajectory.steps[s].pre_logits[position, old])
        for s in range(step + 1)
    ]
    setting = (event["seed"], args.top_k)
    checks = [ablation_check(model, transcoders, ids, trajectory, graph, *setting, None, roles, args.steer)]
    if step > 0 and bool((graph.step[graph.indices("feature")] < step).any()):
        earlier = list(range(step))
        checks.append(ablation_check(model, transcoders, ids, trajectory, graph, *setting, earlier, roles, args.steer))
    norms = frozen_norm_check(model, transcoders, ids, trajectory, graph, *setting, args.steer) if step > 0 else {}
    canvases = [tokenizer.decode(trajectory.steps[s].canvas.tolist()) for s in range(trajectory.n_steps)]
    channels = channel_checks(model, event["prompt"], event["seed"], step, position, (new, old))
    return dict(
        event=event,
        final_answer=tokenizer.decode(final),
        n_steps=trajectory.n_steps,
        canvases=canvases,
        logit_difference_by_step=[round(x, 4) for x in before],
        graph=dict(
            seconds=round(seconds, 1),
            n_features=len(graph.indices("feature")),
            max_feature_nodes=args.max_feature_nodes,
            target_value=by_step.target,
            unattributed=by_step.unattributed,
            replacement_score=graph.replacement_score,
            completeness_score=graph.completeness_score,
        ),
        by_step=[vars(r) for r in by_step.rows],
        by_channel=[vars(r) for r in by_channel.rows],
        real_channel_checks=channels,
        by_role=role_rows(graph, roles, contribution, influence),
        top_features=feature_rows(graph, roles, influence, total, direct, args.show),
        token_sources=token_rows(graph, roles, tokenizer, final, contribution, direct, args.show),
        direct_token_sources=[
            r for r in token_rows(graph, roles, tokenizer, final, direct, direct, args.show) if r["direct_effect"] != 0
        ],
        top_features_earlier_steps=feature_rows(graph, roles, influence, total, direct, args.show, before_step=step),
        ablations=checks,
        frozen_norm_check=norms,
    )


def print_trace(trace: dict) -> None:
    e, g = trace["event"], trace["graph"]
    answer = trace["final_answer"].replace("<pad>", "")
    print(
        f"\n=== {e['prompt']!r} seed {e['seed']}: count position {e['position']} {e['old']!r} (held from step "
        f"{e['step_held']}) -> {e['new']!r} at step {e['step_replaced']} (its canvas held the {e['canvas_read']} "
        f"token there); final answer {answer!r}, expected {e['expected_answer']!r}"
    )
    for s, canvas in enumerate(trace["canvases"][: e["step_replaced"] + 1]):
        print(f"  canvas read at step {s:2d}: {canvas.replace('<pad>', '_')!r}")
    print(f"  logit difference {e['new']!r} - {e['old']!r} by step: {trace['logit_difference_by_step']}")
    print(
        f"  graph: {g['n_features']} features in {g['seconds']} s; target {g['target_value']:.3f}, "
        f"unattributed {g['unattributed']:.3f}; replacement {g['replacement_score']:.3f}, "
        f"completeness {g['completeness_score']:.3f}"
    )
    print(f"  {'step':>4} {'kind':8} {'nodes':>6} {'share of target':>15} {'influence':>9}")
    for r in trace["by_step"]:
        print(f"  {r['step']:4d} {r['kind']:8} {r['n_nodes']:6d} {r['contribution']:15.3f} {r['influence']:9.3f}")
    print(f"  {'channel':36} {'nodes':>6} {'share of target':>15} {'influence':>9}")
    for r in trace["by_channel"]:
        print(f"  {r['channel']:36} {r['n_nodes']:6d} {r['contribution']:15.3f} {r['influence']:9.3f}")
    print(f"  {'when':13} {'where':5} {'kind':8} {'nodes':>6} {'share of target':>15} {'influence':>9}")
    for r in trace["by_role"]:
        print(
            f"  {r['when']:13} {r['where']:5} {r['kind']:8} {r['n_nodes']:6d} {r['contribution']:15.3f} "
            f"{r['influence']:9.3f}"
        )
    print("  the target step rerun on the real model, one channel changed (logit difference after the soft-cap):")
    for name, value in trace["real_channel_checks"].items():
        print(f"  {name:>48} {value:8.3f}")
    header = (
        f"{'step':>4} {'layer':>5} {'pos':>4} {'holds':8} {'feat':>5} {'act':>7} {'infl':>6} {'total':>8} {'direct':>8}"
    )
    for title, rows in (
        ("top features", trace["top_features"]),
        ("earlier steps", trace["top_features_earlier_steps"]),
    ):
        print(f"  {title + ':':14} {header}")
        for r in rows:
            print(
                f"  {'':14} {r['step']:4d} {r['layer']:5d} {r['position']:4d} {r['holds']:8} {r['feature']:5d} "
                f"{r['activation']:7.3f} {r['influence']:6.3f} {r['total_effect']:8.3f} {r['direct_effect']:8.3f}"
            )
    print(f"  canvas tokens: {'step':>4} {'pos':>4} {'holds':8} {'token':>7} {'final?':>6} {'total':>8} {'direct':>8}")
    for r in trace["token_sources"]:
        print(
            f"  {'':14} {r['step']:4d} {r['position']:4d} {r['holds']:8} {r['token']!r:>7} "
            f"{str(r['is_final_token']):>6} {r['total_effect']:8.3f} {r['direct_effect']:8.3f}"
        )
    for check in trace["ablations"]:
        s, joint = check["summary"], check["joint"]
        where = "any step" if check["steps"] is None else f"steps {check['steps'][0]}..{check['steps'][-1]}"
        print(
            f"  ablating each of the top {s['n_top']} features ({where}) alone: pearson(predicted, real) "
            f"{s['pearson_total']:.3f}, spearman {s['spearman_total']:.3f}, sign agreement {s['sign_agreement']:.2f}, "
            f"slope {s['slope_total']:.3f}; mean |real| {s['mean_abs_measured_top']:.4f} (predicted "
            f"{s['mean_abs_predicted_top']:.4f}) vs random {s['mean_abs_measured_random']:.4f}"
        )
        steer = [(n["steer_predicted"], n["steer_measured"]) for n in check["nodes"]]
        signed = [(p > 0) == (m > 0) for p, m in steer if p != 0 and m != 0]
        agree = sum(signed) / max(1, len(signed))
        print(
            f"  scaling each by {s['steer']}: pearson(predicted, real) {s['pearson_steer']:.3f}, sign agreement "
            f"{agree:.2f}, mean |real| {sum(abs(m) for _, m in steer) / len(steer):.4f} (predicted "
            f"{sum(abs(p) for p, _ in steer) / len(steer):.4f})"
        )
        print(
            f"  together (clean target {check['clean']:.3f}):   {'n':>3} {'-sum total':>10} {'repl lin':>9} "
            f"{'repl jump':>9} {'real':>8}"
        )
        for name, j in joint.items():
            print(
                f"  {name:>36} {j['n']:3d} {j['sum_of_predicted']:10.3f} {j['replacement_linear']:9.3f} "
                f"{j['replacement_jumprelu']:9.3f} {j['real']:8.3f}"
            )


def print_norm_check(trace: dict) -> None:
    if trace["frozen_norm_check"]:
        print("  earlier-step top features scaled alone, norm scales live or held at the clean run's:")
    for label, r in trace["frozen_norm_check"].items():
        print(
            f"  {label:>40}: sign agreement {r['sign_agreement']:.2f}, pearson {r['pearson']:.3f}, mean |real| "
            f"{r['mean_abs_measured']:.4f} (predicted {r['mean_abs_predicted']:.4f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a checkpoint directory or shipped name")
    parser.add_argument("--transcoders", required=True, help="a TranscoderSet file for that model")
    parser.add_argument("--prompts", type=int, default=8, help="held-out squares prompts")
    parser.add_argument("--seeds", type=int, default=16, help="noise seeds per prompt")
    parser.add_argument("--traces", type=int, default=2, help="corrections to trace (persisting ones first)")
    parser.add_argument("--max-feature-nodes", type=int, default=4096)
    parser.add_argument(
        "--min-influence",
        type=float,
        default=1e-3,
        help="with only a budget, the greedy selection spends it on the target's own step",
    )
    parser.add_argument("--top-k", type=int, default=10, help="features ablated, and random ones for scale")
    parser.add_argument("--steer", type=float, default=0.9, help="each top feature also scaled by this alone")
    parser.add_argument("--show", type=int, default=12, help="rows of the feature and token tables")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = HookedDiffusionGemma.from_pretrained(args.model, progress=False)
    model.eval()
    transcoders = load_transcoders(args.transcoders, model=model)
    examples = make_dataset(["squares"], args.prompts, seed=1234, split="eval").examples
    events, runs = find_events(model, [e.prompt for e in examples], args.seeds)
    expected = {e.prompt: e.answer for e in examples}
    for event in events:
        event["expected_answer"] = expected[event["prompt"]]
    # first corrections that stick and that the replacing step computes against what its canvas holds there
    chosen = sorted(
        events, key=lambda e: (e["new"] != e["final"], e["canvas_read"] != "old", not e["baseline_is_new"])
    )[: args.traces]
    read = {kind: sum(e["canvas_read"] == kind for e in events) for kind in ("old", "new", "other")}
    print(
        f"{runs} runs, {len({(e['prompt'], e['seed']) for e in events})} with a count correction, "
        f"{len(events)} events ({sum(e['new'] == e['final'] for e in events)} persist); the replacing step read "
        f"the old token at the position in {read['old']}, the new one in {read['new']}, another in "
        f"{read['other']}; the held token was the model's own argmax in {sum(e['held_was_argmax'] for e in events)} "
        f"(else a sampled non-argmax draw); tracing {len(chosen)}"
    )
    traces = []
    for event in chosen:
        traces.append(trace_event(model, transcoders, event, args))
        print_trace(traces[-1])
        print_norm_check(traces[-1])
    if args.json:
        document = dict(
            model=args.model,
            transcoders=args.transcoders,
            transcoder_quality=transcoders.metadata.get("quality"),
            runs=runs,
            events=events,
            traces=traces,
        )
        Path(args.json).write_text(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
