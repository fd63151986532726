"""Monitors and probes on both toys: bootstrap AUROC, the draft / prefix monitors, the twin's CausalRows,
probes by lookahead, the logit lens on rows, and the readable-share helpers.

Each monitor test forces runs whose right and wrong answers are known in advance, so a monitor that
ignored its input (or read the wrong unit) could not pass."""

from __future__ import annotations

import pytest
import torch

from diffusionlens import HookedDiffusionGemma, HookedGemma4CausalLM
from diffusionlens.analysis import auroc, auroc_ci, bootstrap_weights, logit_lens_rows, weighted_auroc
from diffusionlens.features import ActivationStore, CausalRows, train_probe
from diffusionlens.toy.monitor import (
    MonitorRun,
    answer_readout,
    diffusion_monitor_run,
    fraction_grid,
    monitor_curves,
    monitor_scores,
    twin_monitor_run,
    units_absolute,
    units_at_fractions,
)
from diffusionlens.toy.readout import diffusion_answer_lengths, diffusion_readable_share, twin_readable_share
from diffusionlens.toy.tasks import make_dataset
from diffusionlens.toy.tokenizer import EOS_ID, VOCAB, encode_answer


@pytest.fixture(scope="module")
def twin():
    return HookedGemma4CausalLM.from_pretrained("toy-ar", progress=False)


@pytest.fixture(scope="module")
def diffusion():
    return HookedDiffusionGemma.from_pretrained("toy", progress=False)


# ------------------------------------------------------------------ bootstrap AUROC
def test_weighted_auroc_is_auroc_of_the_resample():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (150,), generator=g).double()  # many ties
    labels = torch.rand(150, generator=g, dtype=torch.double) < 0.2 + 0.1 * scores
    weights = bootstrap_weights(150, 40, seed=3)
    assert torch.equal(weights.sum(1), torch.full((40,), 150))
    assert torch.equal(weights, bootstrap_weights(150, 40, seed=3))
    assert not torch.equal(weights, bootstrap_weights(150, 40, seed=4))
    fast = weighted_auroc(scores, labels, weights)
    for b in range(40):
        slow = auroc(scores.repeat_interleave(weights[b]), labels.repeat_interleave(weights[b]))
        assert abs(float(fast[b]) - slow) < 1e-12
    assert abs(float(weighted_auroc(scores, labels, torch.ones(1, 150))[0]) - auroc(scores, labels)) < 1e-12
    assert torch.isnan(weighted_auroc(scores, torch.zeros(150, dtype=torch.bool), weights)).all()


def test_auroc_interval_covers_the_truth_and_shrinks_with_more_problems():
    g = torch.Generator().manual_seed(1)

    def sample(n):
        labels = torch.rand(n, generator=g) < 0.3
        return labels.double() + torch.randn(n, generator=g, dtype=torch.double), labels

    small, large = auroc_ci(*sample(100), seed=0), auroc_ci(*sample(3000), seed=0)
    truth = 0.7602  # P(N(1,1) > N(0,1)) = Phi(1 / sqrt 2)
    for point, lo, hi in (small, large):
        assert lo <= point <= hi and lo < truth < hi
    assert large[2] - large[1] < 0.5 * (small[2] - small[1])
    perfect = auroc_ci(torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([False, False, True, True]), n_boot=50)
    assert perfect[0] == 1.0


# ------------------------------------------------------------------ monitor records
def _run(kind: str, check, entropy, finals, answers) -> MonitorRun:
    n = len(answers)
    return MonitorRun(
        kind,
        ["t"] * n,
        [f"p{i}" for i in range(n)],
        answers,
        finals,
        check=check,
        max_entropy=entropy,
        agreement=[[(u + 1) / len(c) for u in range(len(c))] for c in check],
        exact=[[u + 1 == len(c) for u in range(len(c))] for c in check],
    )


def test_fractions_read_the_units_spent_so_far():
    # problem 0: 2 units, wrong from the first; problem 1: 4 units, right throughout; problem 2: 4 units,
    # looks right for 2 units, then wrong
    run = _run(
        "twin",
        check=[[False, False], [True] * 4, [True, True, False, False]],
        entropy=[[1.0, 2.0], [0.1] * 4, [0.1, 0.2, 3.0, 3.0]],
        finals=["x", "a", "y"],
        answers=["a", "a", "a"],
    )
    units = units_at_fractions(run, [0.25, 0.5, 0.75, 1.0])
    assert units.tolist() == [[0, 1, 1], [1, 2, 2], [1, 3, 3], [2, 4, 4]]
    check = monitor_scores(run, units, "check")
    assert check[:, 0].tolist() == [0.5, 1.0, 1.0, 1.0]  # nothing computed yet at f = 0.25: no information
    assert check[1].tolist() == [1.0, 0.0, 0.0] and check[2].tolist() == [1.0, 0.0, 1.0]
    confidence = monitor_scores(run, units, "confidence")
    assert confidence[:, 2].tolist() == [0.1, 0.2, 3.0, 3.0]
    wrong = run.wrong
    assert wrong.tolist() == [True, False, True]
    assert [auroc(s, wrong) for s in check] == [0.75, 0.75, 1.0, 1.0]
    readout = answer_readout(run, units)
    assert readout["agreement"][:, 1].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert readout["exact"][:, 1].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert units_absolute(run, [1, 3]).tolist() == [[1, 1, 1], [2, 3, 3]]
    with pytest.raises(ValueError, match="fractions"):
        units_at_fractions(run, [1.5])
    with pytest.raises(ValueError, match="monitor"):
        monitor_scores(run, units, "vibes")


def test_curves_pair_the_runs():
    run = _run("twin", [[False, True], [True, True], [True, False]], [[1.0, 0.0]] * 3, ["x", "a", "y"], ["a"] * 3)
    curves = monitor_curves({"a": run, "b": run}, fraction_grid(4), units=[1], n_boot=64)
    diff = curves["difference"]["a"]["check"]
    assert diff["auroc"] == [0.0] * 4 and all(iv == [0.0, 0.0] for iv in diff["interval"])
    assert curves["models"]["a"]["n_wrong"] == 2 and curves["fractions"] == [0.25, 0.5, 0.75, 1.0]
    other = run.subset([2, 1, 0])
    with pytest.raises(ValueError, match="same problems"):
        monitor_curves({"a": run, "b": other}, [1.0], n_boot=8)


def test_twin_prefix_monitor_flags_a_wrong_first_token(twin):
    """Teacher-force every row's correct answer, except a wrong first character in rows 0 and 1: exactly
    those two answers end wrong, and the check monitor flags them after one token (AUROC 1) while the
    confidence monitor, reading forced one-hot logits, sees near-zero entropy everywhere."""
    pool = make_dataset("sort", 60, seed=5, split="eval").examples
    data = [e for e in pool if len(e.prompt) == len(pool[0].prompt)][:6]  # one batch, in this order
    assert len(data) == 6
    targets = torch.tensor([encode_answer(twin.tokenizer, e.answer) for e in data])
    targets[:2, 0] = VOCAB["x"]

    def force(logits, hook):
        k = hook.ctx.step
        forced = torch.full_like(logits[:, -1], -30.0).scatter(-1, targets[: logits.shape[0], k, None], 30.0)
        return torch.cat([logits[:, :-1], forced[:, None]], dim=1)

    with twin.hooks(fwd_hooks=[("hook_logits", force)]):
        run = twin_monitor_run(twin, examples=data)
    assert run.wrong.tolist() == [True, True, False, False, False, False]
    assert run.finals[0].startswith("x") and run.finals[2] == data[2].answer and run.tasks == ["sort"] * 6
    assert run.units.tolist() == [len(e.answer) + 1 for e in data]  # answer + eos
    first = units_absolute(run, [1])
    assert auroc(monitor_scores(run, first, "check")[0], run.wrong) == 1.0
    assert monitor_scores(run, first, "confidence").max() < 1e-6  # forced one-hot logits: nothing to read
    assert all(r[-1] for r in run.exact) and not any(any(r[:-1]) for r in run.exact)


def test_twin_run_agrees_with_the_evaluator(twin):
    from diffusionlens.toy.twin import evaluate_ar

    run = twin_monitor_run(twin, n=8, seed=9, tasks=["addition", "reverse"], max_new_tokens=16)
    scores = evaluate_ar(twin, tasks=["addition", "reverse"], n=8, seed=9, max_new_tokens=16)
    for task in ("addition", "reverse"):
        rows = [i for i, t in enumerate(run.tasks) if t == task]
        assert 1 - float(run.wrong[rows].double().mean()) == pytest.approx(scores[task].exact_match)
        assert float(run.units[rows].double().mean()) == pytest.approx(scores[task].mean_new_tokens)
    for check, wrong in zip(run.check, run.wrong.tolist(), strict=True):
        assert check[-1] == (not wrong)  # the last readout is the final answer


def test_diffusion_run_records_every_step(diffusion):
    run = diffusion_monitor_run(diffusion, n=3, seed=2, tasks=["squares", "sort"])
    assert len(run) == 6 and run.kind == "diffusion"
    assert (run.units >= 1).all()
    for i in range(len(run)):
        assert run.check[i][-1] == (not bool(run.wrong[i]))
        assert run.agreement[i][-1] == 1.0 and run.exact[i][-1]
        assert all(e >= 0 for e in run.max_entropy[i])


# ------------------------------------------------------------------ the twin's rows and probes
@pytest.fixture(scope="module")
def rows(twin):
    prompts = [p for task in ("sort", "reverse") for p in make_dataset(task, 12, seed=3, split="eval").prompts]
    hooks = ["causal.blocks.0.hook_resid_pre", "causal.blocks.5.hook_resid_post"]
    rows = CausalRows(twin, hooks, prompts=prompts, max_new_tokens=20, max_lookahead=2, batch_size=5)
    rows.harvest(progress=False)
    return rows


def test_causal_rows_hold_each_pass_and_its_future(twin, rows):
    labels = rows.labels()
    expected = sum(min(2, len(a) - 1 - k) + 1 for a in rows.answers for k in range(len(a)))
    assert len(rows) == expected == len(labels["prompt_id"])
    for i in (0, 13):
        answer = rows.answers[i]
        assert answer[-1] == EOS_ID or len(answer) == 20
        mine = labels["prompt_id"] == i
        assert torch.equal(labels["final_token"][mine], torch.tensor(answer)[labels["position"][mine]])
        assert torch.equal(labels["position"][mine], labels["step"][mine] + labels["lookahead"][mine])
        # the row of pass k is the state a full forward over prompt + answer[:k] has at its last position
        ids = twin.to_tokens(rows.prompts[i])
        k = len(answer) - 2
        _, cache = twin.run_with_cache(torch.cat([ids, torch.tensor([answer[:k]])], 1), names_filter=rows.hooks)
        row = int(((labels["prompt_id"] == i) & (labels["step"] == k) & (labels["lookahead"] == 0)).nonzero())
        for hook in rows.hooks:
            assert torch.allclose(rows.activations(hook)[row], cache[hook][0, -1], atol=1e-4)
    # the last block read through the head is the greedy token: the lens is exact at d = 0
    lens = logit_lens_rows(twin, rows.activations("causal.blocks.5.hook_resid_post"), stack="causal")
    own = labels["lookahead"] == 0
    assert torch.equal(lens[own], labels["final_token"][own])
    assert (lens[~own] == labels["final_token"][~own]).float().mean() < 0.5


def test_probes_by_lookahead(rows):
    result = train_probe(
        rows, "final_token", by="lookahead", keep_predictions=True, progress=False, min_test_rows=5, max_iter=60
    )
    assert result.by == "lookahead" and result.steps == [0, 1, 2] and "lookahead 1" in result.table()
    target = rows.labels()["final_token"]
    for (hook, d), (index, predicted) in result.predictions.items():
        h = result.hooks.index(hook)
        assert float(result.score[h, result.steps.index(d)]) == pytest.approx(
            float((predicted == target[index]).float().mean())
        )
        assert (rows.labels()["lookahead"][index] == d).all()
        assert set(rows.labels()["prompt_id"][index].tolist()) <= set(result.test_prompts)
    # the last block's state names the token its pass writes; the embedding of the input token cannot
    assert float(result.score[1, 0]) > 0.9 > float(result.score[0, 0])
    with pytest.raises(KeyError, match="by="):
        train_probe(rows, "final_token", by="canvas", progress=False)


def test_diffusion_lens_rows_are_the_draft(diffusion, tmp_path):
    prompts = [e.prompt for e in make_dataset("reverse", 3, seed=4, split="eval").examples]
    hook = "decoder.blocks.5.hook_resid_post"
    store = ActivationStore(tmp_path, diffusion, [hook], prompts=prompts, positions=list(range(12)), batch_size=3)
    store.harvest(progress=False)
    labels = store.labels()
    lens = logit_lens_rows(diffusion, store.activations(hook))
    last = labels["step"] == labels["step"].max()
    assert torch.equal(lens[last], labels["final_token"][last])


# ------------------------------------------------------------------ readable shares
def test_twin_readable_share_counts_written_tokens_and_verdicts():
    # one answer of 4 tokens, rows for every (pass k, lookahead d) with k + d < 4
    pairs = [(k, d) for k in range(4) for d in range(4 - k)]
    labels = {
        "prompt_id": torch.zeros(len(pairs), dtype=torch.long),
        "step": torch.tensor([k for k, _ in pairs]),
        "lookahead": torch.tensor([d for _, d in pairs]),
        "length": torch.full((len(pairs),), 4),
    }
    read = torch.tensor([1.0 if d <= 1 else 0.0 for _, d in pairs])  # reads its own token and the next
    share = twin_readable_share(labels, read, [0.2, 0.25, 0.5, 0.75, 1.0])
    # u = 0: nothing; u = 1: pass 0 reads tokens 0, 1; u = 2: token 0 written + pass 1 reads 1, 2; ...
    assert share[:, 0].tolist() == [0.0, 0.5, 0.75, 1.0, 1.0]


def test_diffusion_readable_share_reads_the_last_step_taken():
    # two prompts; prompt 0 ran 2 steps over an answer of 3 tokens (eos at position 2), prompt 1 ran 1 step
    rows = [(0, s, p) for s in range(2) for p in range(4)] + [(1, 0, p) for p in range(4)]
    final = {0: [5, 6, EOS_ID, 0], 1: [7, EOS_ID, 0, 0]}
    labels = {
        "prompt_id": torch.tensor([r[0] for r in rows]),
        "seed": torch.zeros(len(rows), dtype=torch.long),
        "step": torch.tensor([r[1] for r in rows]),
        "position": torch.tensor([r[2] for r in rows]),
        "final_token": torch.tensor([final[r[0]][r[2]] for r in rows]),
    }
    assert diffusion_answer_lengths(labels).tolist() == [3, 2]
    read = torch.tensor([float(s == 1 or p == 0) for _, s, p in rows])  # step 0 reads only position 0
    share = diffusion_readable_share(labels, read, [0.4, 0.5, 1.0])
    assert share[:, 0].tolist() == pytest.approx([0.0, 1 / 3, 1.0])
    assert share[:, 1].tolist() == [0.0, 0.0, 0.5]  # one step: nothing before it ends


def test_json_safe_writes_nan_as_null_at_any_depth():
    import json

    from diffusionlens.toy.monitor import json_safe

    value = {"auroc": float("nan"), "curve": [0.5, float("nan")], "pair": (1.0, {"x": float("nan")}), "n": 3}
    assert json.loads(json.dumps(json_safe(value), allow_nan=False)) == {
        "auroc": None,
        "curve": [0.5, None],
        "pair": [1.0, {"x": None}],
        "n": 3,
    }
