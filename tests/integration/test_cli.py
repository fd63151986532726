"""The `diffusionlens` command on the shipped toy model: every command's --help, generate, trace, patch."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tolerance import logit_metric_atol

from diffusionlens import DenoisingCache, DenoisingTrace, ReplayNoise
from diffusionlens.cli import COMMANDS, main
from diffusionlens.patching import LogitDiff, SweepResult, patch_sweep, record_run
from diffusionlens.patching.sweep_spec import SweepSpec


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"diffusionlens {command}" in capsys.readouterr().out


def test_unknown_command_names_the_choices(capsys):
    with pytest.raises(SystemExit, match="choose one of demo, generate"):
        main(["generat"])


def test_generate_prints_what_the_library_generates(toy, capsys):
    prompts = ["347+589=", "sort 5 3 9 1:"]
    main(["generate", "--prompt", prompts[0], "--prompt", prompts[1], "--seed", "3", "--json", "--no-progress"])
    printed = json.loads(capsys.readouterr().out)
    tokenizer = toy.tokenizer
    assert [row["prompt"] for row in printed] == prompts
    assert all(len(row["steps_per_canvas"]) == 1 for row in printed)
    # ReplayNoise draws depend on the batch shape, so answers are compared on a single prompt
    main(["generate", "--prompt", prompts[1], "--seed", "3", "--json", "--no-progress"])
    (single,) = json.loads(capsys.readouterr().out)
    result = toy.generate(toy.to_tokens(prompts[1]), max_new_tokens=48, noise=ReplayNoise(3), progress=False)
    assert single["answer"] == tokenizer.decode(result.new_tokens()[0].tolist(), skip_special_tokens=True)
    assert single["steps_per_canvas"] == [int(result.trace[0].stop_step()[0]) + 1]


def test_trace_saves_a_trace_and_a_disk_cache_that_load(toy, tmp_path, capsys):
    out = tmp_path / "run"
    hook = "decoder.blocks.1.hook_resid_post"
    main(["trace", "--prompt", "reverse 7 2 4:", "--out", str(out), "--cache", hook, "--seed", "1", "--no-progress"])
    trace = DenoisingTrace.load(out)
    cache = DenoisingCache.load(out / "cache")
    result, expected = toy.generate_with_cache(
        toy.to_tokens("reverse 7 2 4:"),
        names_filter=hook,
        max_new_tokens=48,
        noise=ReplayNoise(1),
        record_top_k=5,
        progress=False,
    )
    assert torch.equal(trace[0].argmax, result.trace[0].argmax)
    assert torch.equal(trace[0].top_k_tokens, result.trace[0].top_k_tokens)
    assert torch.equal(cache[hook], expected[hook])
    run = json.loads((out / "run.json").read_text())
    assert run["answers"] == [toy.tokenizer.decode(result.new_tokens()[0].tolist(), skip_special_tokens=True)]


SPEC = {
    "clean": "squares 400 800:",
    "corrupted": "squares 600 800:",
    "hook": "decoder.blocks.{layer}.hook_resid_pre",
    "over": ["layer", "position"],
    "layers": [0, 2],
    "positions": {"start": 0, "stop": 3},
    "metric": {"kind": "logit_diff", "position": 0, "good": "8", "bad": "4"},
}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_patch_runs_the_sweep_the_spec_describes(toy, tmp_path, suffix, capsys):
    import yaml

    spec_file = tmp_path / f"spec{suffix}"
    spec_file.write_text(json.dumps(SPEC) if suffix == ".json" else yaml.safe_dump(SPEC))
    main(["patch", str(spec_file), "--out", str(tmp_path / "sweep"), "--no-progress"])
    assert "largest value at" in capsys.readouterr().out
    saved = SweepResult.load(tmp_path / "sweep")

    names = ["decoder.blocks.0.hook_resid_pre", "decoder.blocks.2.hook_resid_pre"]
    clean = record_run(toy, toy.to_tokens(SPEC["clean"]), names_filter=names, noise=ReplayNoise(0), max_new_tokens=48)
    corrupted = record_run(toy, toy.to_tokens(SPEC["corrupted"]), noise=ReplayNoise(0), max_new_tokens=48)
    eight, four = (toy.tokenizer.convert_tokens_to_ids(t) for t in "84")
    direct = patch_sweep(
        toy,
        clean,
        corrupted,
        SPEC["hook"],
        ("layer", "position"),
        LogitDiff(0, eight, four),
        layers=[0, 2],
        positions=range(3),
        progress=False,
    )
    assert saved.axes == ("layer", "position") and saved.labels == {"layer": [0, 2], "position": [0, 1, 2]}
    torch.testing.assert_close(saved.values, direct.values)
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["metadata"]["path"] == "fast"


def test_patch_reference_flag_runs_the_per_cell_path_with_the_same_answer(toy, tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    main(["patch", str(spec_file), "--out", str(tmp_path / "fast"), "--no-progress"])
    main(["patch", str(spec_file), "--out", str(tmp_path / "reference"), "--no-progress", "--reference"])
    fast, reference = SweepResult.load(tmp_path / "fast"), SweepResult.load(tmp_path / "reference")
    assert reference.metadata["path"] == "reference" and fast.metadata["path"] == "fast"
    # The fast path batches cells: other matmul shapes than the per-cell path, so other rounding.
    torch.testing.assert_close(fast.values, reference.values, rtol=0, atol=logit_metric_atol(toy))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hooks": "x"}, "unknown keys \\['hooks'\\]"),
        ({"over": ["step"]}, "'over' needs two axes"),
        ({"metric": {"kind": "accuracy"}}, "metric kind 'accuracy'"),
        ({"positions": {"begin": 0}}, "as a range is"),
    ],
)
def test_bad_specs_name_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        SweepSpec.from_dict({**SPEC, **change})


def test_a_metric_token_must_be_one_token(toy, tmp_path, capsys):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({**SPEC, "metric": {"kind": "target_prob", "position": 0, "token": "84"}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["patch", str(spec_file), "--out", str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2
    assert "'84' is 2 tokens" in capsys.readouterr().err


def test_view_writes_the_viewer_for_a_saved_trace_and_for_a_prompt(toy, tmp_path, capsys):
    from diffusionlens.viz import render_viewer

    main(["trace", "--prompt", "sort 5 3 9 1:", "--out", str(tmp_path / "run"), "--no-progress"])
    main(["view", "--trace", str(tmp_path / "run"), "--out", str(tmp_path / "saved.html")])
    main(["view", "--prompt", "sort 5 3 9 1:", "--out", str(tmp_path / "fresh.html"), "--no-progress"])
    saved = (tmp_path / "saved.html").read_text()
    expected = render_viewer(DenoisingTrace.load(tmp_path / "run"), toy.tokenizer, title=f"trace {tmp_path / 'run'}")
    assert saved == expected
    assert "step-slider" in (tmp_path / "fresh.html").read_text()
    with pytest.raises(SystemExit):
        main(["view", "--out", str(tmp_path / "none.html")])
    assert "either --trace DIR or --prompt TEXT" in capsys.readouterr().err


def test_graph_writes_circuit_tracer_json_and_refuses_a_step_outside_the_run(toy, tmp_path, capsys):
    out = tmp_path / "graph.json"
    args = ["graph", "--prompt", "squares 400 800:", "--out", str(out), "--width", "32", "--no-progress"]
    html = tmp_path / "graph.html"
    main([*args, "--max-feature-nodes", "40", "--position", "1", "--html", str(html)])
    document = json.loads(out.read_text())
    assert {"metadata", "nodes", "links"} <= set(document)
    assert all("step" in node for node in document["nodes"])
    (logit,) = [node for node in document["nodes"] if node["feature_type"] == "logit"]
    assert logit["position"] == 1 and logit["step"] == document["metadata"]["diffusionlens"]["n_steps"] - 1
    assert "replacement score" in capsys.readouterr().out
    # the HTML view carries the file's nodes, token texts decoded by the toy's tokenizer
    data = json.loads(re.search(r'id="graph-data">(.*?)</script>', html.read_text(), flags=re.S).group(1))
    assert [node["id"] for node in data["nodes"]] == [node["node_id"] for node in document["nodes"]]
    assert data["title"] == "attribution graph: squares 400 800:"
    (shown,) = [node for node in data["nodes"] if node["kind"] == "logit"]
    assert shown["text"] == toy.tokenizer.decode([logit["feature"]]) and data["target"] == f"logit({shown['text']})"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--step", "60", "--token", "8"])
    assert exit_info.value.code == 2
    assert "target step 60 is outside the trajectory: it ran steps 0.." in capsys.readouterr().err
