"""Sweeps over Ray workers (2 local CPU workers on loopback): equal to the single-process run, even
when a worker is killed mid-sweep; unreachable addresses fail fast; the CLI flags."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from diffusionlens.cli import main
from diffusionlens.patching.sweep import SweepResult
from diffusionlens.patching.sweep_spec import SweepSpec, run_sweep_spec

ray = pytest.importorskip("ray")

from diffusionlens.distributed import ModelPool, connect, run_sweep_spec_distributed  # noqa: E402
from diffusionlens.distributed.sweeps import _sweep_labels, _sweep_row  # noqa: E402

SPEC = dict(
    clean="squares 400 800:",
    corrupted="squares 600 800:",
    hook="decoder.blocks.{layer}.hook_resid_pre",
    over=["layer", "position"],
    positions={"start": 0, "stop": 3},
    metric={"kind": "logit_diff", "position": 0, "good": "8", "bad": "4"},
    max_new_tokens=12,
)


@pytest.fixture(scope="module")
def spec():
    return SweepSpec.from_dict(dict(SPEC))


@pytest.fixture(scope="module")
def single_process(spec):
    # Ray workers run torch with one thread (OMP_NUM_THREADS=1); CPU float sums depend on the thread
    # count, so the single-process reference uses one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_sweep_spec(spec, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    pool = ModelPool("toy", num_workers=2)
    yield pool
    pool.shutdown()
    ray.shutdown()


def test_distributed_sweep_equals_the_single_process_run(spec, single_process, pool):
    result = run_sweep_spec_distributed(spec, pool, progress=False)
    assert result.axes == single_process.axes and result.labels == single_process.labels
    assert torch.equal(result.values, single_process.values)
    assert result.metadata == single_process.metadata
    assert single_process.values.abs().max() > 0, "no cell moved the metric: the comparison lost its power"


def test_a_worker_killed_mid_sweep_loses_nothing(spec, single_process, pool):
    labels = ray.get(pool.workers[0].run.remote(_sweep_labels, spec))
    refs = pool.submit(_sweep_row, [(spec, row) for row in labels["layer"]])
    ray.wait([refs[0]], num_returns=1)  # worker 0 finished its first row; its second is queued
    ray.kill(pool.workers[0], no_restart=False)  # Ray restarts the actor and retries its tasks
    rows = pool.gather(refs, progress=False)
    assert torch.equal(torch.cat([r.values for r in rows]), single_process.values)


def test_progress_bar_spans_all_workers_and_can_be_silenced(spec, pool, capsys):
    pool.map(_sweep_labels, [spec, spec], progress=True, desc="probe")
    assert "probe: 100%" in capsys.readouterr().err
    pool.map(_sweep_labels, [spec, spec], progress=False)
    assert "probe" not in capsys.readouterr().err


def test_cli_ray_flag_runs_the_sweep_on_the_running_cluster(spec, single_process, pool, tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    pool.shutdown()  # the CLI starts its own two workers; free the two CPUs this cluster has
    main(["patch", str(spec_file), "--out", str(tmp_path / "sweep"), "--no-progress", "--ray", "--workers", "2"])
    saved = SweepResult.load(tmp_path / "sweep")
    assert torch.equal(saved.values, single_process.values)


def test_without_ray_the_cli_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    with pytest.raises(SystemExit, match=r"diffusionlens\[distributed\]"):
        main(["patch", "spec.json", "--out", "x", "--ray"])


def test_unreachable_address_fails_fast_and_names_it():
    # Port 9 (discard) has no listener on loopback: refused at once, not after Ray's minute of retries.
    with pytest.raises(ConnectionError, match="127.0.0.1:9"):
        connect("127.0.0.1:9")
    with pytest.raises(SystemExit, match="127.0.0.1:9"):
        main(["patch", "spec.json", "--out", "x", "--ray-address", "127.0.0.1:9"])
