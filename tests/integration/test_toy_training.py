"""The toy trainer: loss falls on a tiny config, resuming is exact, evaluation scores exact match."""

from __future__ import annotations

import pytest
import torch

from diffusionlens.toy.evaluate import evaluate, format_table
from diffusionlens.toy.train import TrainSettings, toy_config, train

TINY = dict(
    hidden_size=32,
    intermediate_size=48,
    head_dim=8,
    global_head_dim=16,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    layer_types=("sliding_attention", "sliding_attention", "full_attention"),
)


def _settings(steps: int, **kw) -> TrainSettings:
    return TrainSettings(steps=steps, batch_size=16, warmup=5, lr=3e-3, save_every=5, eval_every=10**9, **kw)


def _losses(run) -> list[float]:
    import json

    return [e["loss"] for e in json.loads((run / "training_state.json").read_text())["log"]]


def test_loss_falls(tmp_path):
    train(tmp_path / "run", _settings(40), toy_config(**TINY), progress=False)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


def test_resume_is_exact(tmp_path):
    straight = train(tmp_path / "a", _settings(10), toy_config(**TINY), progress=False)
    train(tmp_path / "b", _settings(5), toy_config(**TINY), progress=False)
    resumed = train(tmp_path / "b", _settings(10), toy_config(**TINY), progress=False)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_evaluate_scores_exact_match(tmp_path):
    model = train(tmp_path / "run", _settings(2), toy_config(**TINY), progress=False)
    scores = evaluate(model, n=4, tasks=["reverse"], batch_size=4, max_denoising_steps=3)
    assert scores["reverse"].n == 4 and 0.0 <= scores["reverse"].exact_match <= 1.0
    assert 1.0 <= scores["reverse"].mean_steps <= 3.0
    wrong = scores["reverse"].wrong
    assert len(wrong) == round(4 * (1 - scores["reverse"].exact_match))
    assert all(w.output != w.answer and w.prompt.startswith("reverse ") for w in wrong)
    assert "| reverse | 4 |" in format_table(scores)

    # A sampler forced to write the right answer must score 100%.
    from diffusionlens.toy.tasks import make_dataset
    from diffusionlens.toy.tokenizer import encode_answer

    data = make_dataset("reverse", 4, seed=12345, split="eval")
    targets = torch.tensor([encode_answer(model.tokenizer, a) for a in data.answers])

    def force(logits, hook):
        out = torch.full_like(logits, -30.0)
        return out.scatter(-1, targets[:, :, None], 30.0)

    with model.hooks(fwd_hooks=[("sampler.hook_logits", force)]):
        forced = evaluate(model, n=4, tasks=["reverse"], batch_size=4, max_denoising_steps=3)
    assert forced["reverse"].exact_match == 1.0 and forced["reverse"].wrong == []


def test_seed_table_pools_scores_with_a_wilson_interval():
    from diffusionlens.toy.evaluate import TaskScore, format_seed_table, pooled, wilson_interval

    by_seed = {
        1: {"sort": TaskScore("sort", 200, 0.90, 2.0)},
        2: {"sort": TaskScore("sort", 100, 0.60, 5.0)},
    }
    total = pooled(by_seed)["sort"]
    assert total.n == 300 and abs(total.exact_match - 0.8) < 1e-12 and abs(total.mean_steps - 3.0) < 1e-12
    low, high = wilson_interval(240, 300)
    assert 0.75 < low < 0.8 < high < 0.85
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0
    table = format_seed_table(by_seed).splitlines()
    assert table[0].startswith("| task | seed 1 | seed 2 | pooled (n) |")
    assert table[2] == f"| sort | 90.0% | 60.0% | 80.0% (300) | {100 * low:.1f}–{100 * high:.1f}% | 3.0 |"


def test_evaluate_command_with_several_seeds_prints_the_pooled_table(tmp_path, capsys):
    from diffusionlens.toy.evaluate import main

    train(tmp_path / "run", _settings(1), toy_config(**TINY), progress=False)
    main(["--model", str(tmp_path / "run"), "--n", "2", "--seed", "4", "5"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| task | seed 4 | seed 5 | pooled (n) | 95% interval |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| addition", "| squares", "| sort", "| reverse"]
    assert all("(4) |" in line for line in lines[2:])


def test_bottleneck_table_has_a_row_per_setting(tmp_path):
    from diffusionlens.toy.evaluate import BOTTLENECKS, bottleneck_table

    model = train(tmp_path / "run", _settings(1), toy_config(**TINY), progress=False)
    table = bottleneck_table(model, n=2, progress=False).splitlines()
    assert len(table) == 2 + len(BOTTLENECKS)
    assert table[2].startswith("| full logits |") and "top_k=16" in table[7] and "top_p=0.99" in table[-1]


def test_draft_monitor_auroc_sees_when_the_answer_is_written(tmp_path):
    from diffusionlens.toy.monitor import draft_monitor_auroc
    from diffusionlens.toy.tasks import make_dataset
    from diffusionlens.toy.tokenizer import encode_answer

    model = train(tmp_path / "run", _settings(1), toy_config(**TINY), progress=False)
    data = make_dataset("reverse", 4, seed=777, split="eval")
    targets = torch.tensor([encode_answer(model.tokenizer, a) for a in data.answers])

    def write_answer_in_rows_0_and_1_from_step_2(logits, hook):
        if hook.ctx.step < 2:
            return None
        forced = torch.full_like(logits[:2], -30.0).scatter(-1, targets[:2, :, None], 30.0)
        return torch.cat([forced, logits[2:]])

    with model.hooks(fwd_hooks=[("sampler.hook_logits", write_answer_in_rows_0_and_1_from_step_2)]):
        by_step = draft_monitor_auroc(model, n=4, tasks=["reverse"], batch_size=4, max_denoising_steps=4)
    assert set(by_step) == {0, 1, 2, 3}
    assert by_step[0] == 0.5 and by_step[1] == 0.5  # no draft is right yet: the monitor cannot tell
    assert by_step[3] == 1.0


@pytest.mark.parametrize("module", ["train", "train_ar"])
def test_training_command_reads_its_flags_and_evaluates_with_them(tmp_path, module):
    """Both trainers' `main`: every settings field is a flag, and evaluation runs with the flag's
    `eval_examples` (one shared command runner wires them)."""
    import importlib
    import json

    main = importlib.import_module(f"diffusionlens.toy.{module}").main
    flags = ["--steps", "1", "--batch-size", "2", "--warmup", "1", "--eval-every", "1", "--eval-examples", "1"]
    main(["--out", str(tmp_path / module), *flags, "--save-every", "1", "--no-progress"])
    state = json.loads((tmp_path / module / "training_state.json").read_text())
    assert state["step"] == 1
    assert {k: state["settings"][k] for k in ("steps", "batch_size", "eval_examples")} == {
        "steps": 1,
        "batch_size": 2,
        "eval_examples": 1,
    }
    scores = state["log"][-1]["eval"]
    assert scores and set(scores.values()) <= {0.0, 1.0}  # one example per task: all or nothing


@pytest.mark.parametrize("module", ["train", "train_ar"])
def test_every_training_flag_says_what_it_sets(module, capsys, monkeypatch):
    import importlib
    from dataclasses import fields

    trainer = importlib.import_module(f"diffusionlens.toy.{module}")
    settings_class = trainer.ARTrainSettings if module == "train_ar" else trainer.TrainSettings
    helps = {f.name: f.metadata.get("help") for f in fields(settings_class)}
    assert all(helps.values()), [name for name, text in helps.items() if not text]
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help text to the terminal, hyphens included
    with pytest.raises(SystemExit):
        trainer.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert all(" ".join(text.split()) in shown for text in helps.values())
