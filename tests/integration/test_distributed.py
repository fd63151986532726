"""Sweeps, seed searches and harvests over Ray workers (2 local CPU workers on loopback): equal to the
single-process run, even when a worker dies mid-sweep or mid-harvest; an item that kills its worker
every time fails after finite retries, naming the item; a slow item holds up no other (dynamic
assignment); unreachable addresses fail fast; the CLI flags. One Ray session serves the module (Ray
starts slowly); the CLI test, which shuts the shared pool down to free its CPUs, comes last among the
tests that use the pool."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from diffusionlens import DenoisingCache
from diffusionlens.analysis.seeds import generate_over_seeds
from diffusionlens.cli import main
from diffusionlens.patching.sweep import SweepResult
from diffusionlens.patching.sweep_spec import SweepSpec, run_sweep_spec

ray = pytest.importorskip("ray")

from diffusionlens.distributed import (  # noqa: E402
    ModelPool,
    WorkItemFailed,
    connect,
    generate_over_seeds_distributed,
    harvest_distributed,
    run_sweep_spec_distributed,
)
from diffusionlens.distributed.pool import CONNECT_TIMEOUT_S  # noqa: E402
from diffusionlens.distributed.sweeps import _harvest_one, _sweep_labels, _sweep_rows, harvest_run, row_groups  # noqa: E402

# The helpers below run on the workers, which cannot import this test module: pickle them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SPEC = dict(
    clean="squares 400 800:",
    corrupted="squares 600 800:",
    hook="decoder.blocks.{layer}.hook_resid_pre",
    over=["layer", "position"],
    positions={"start": 0, "stop": 3},
    metric={"kind": "logit_diff", "position": 0, "good": "8", "bad": "4"},
    max_new_tokens=12,
)


# Prompts of different lengths (left padding in a batch) and tasks.
PROMPTS = ["squares 400 800:", "sort 3 1 2:"]
HARVEST = dict(names_filter=["decoder.blocks.*.hook_resid_post", "decoder.hook_logits"], max_new_tokens=12)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The module's single-process references and its pool's workers run torch with one thread. At two
    threads the default kernels of an AVX-512 Xeon give a worker the driver's bits, but MKL's AVX2 kernels
    (what a CPU without AVX-512, such as an AMD EPYC, may get) do not: emulated with
    `MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2`, ten of these equalities failed at two threads and
    passed at one. One thread is bit-identical across processes by construction."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def spec():
    return SweepSpec.from_dict(dict(SPEC))


@pytest.fixture(scope="module")
def single_process(spec):
    # the driver's own thread count (one here, see one_thread): the pool's workers run with it
    return run_sweep_spec(spec, progress=False)


@dataclass
class DiesOnce:
    """`fn`, except that the first attempt at `victim` kills its worker's process (as a crash or an
    out-of-memory kill would); `marker` remembers, across workers, that it did."""

    fn: Any
    victim: Any
    marker: str

    def __call__(self, model, memo, item):
        if item == self.victim and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return self.fn(model, memo, item)


def always_dies(model, memo, item):
    if item == "poison":
        os._exit(1)
    return item


def raises_on_two(model, memo, item):
    if item == 2:
        raise ValueError("two is not allowed here")
    return item


def slow_or_fast(model, memo, item):
    if item == "slow":
        time.sleep(3.0)
    return item, os.getpid()


@pytest.fixture(scope="module")
def pool():
    # three logical CPUs: the module's two workers, and one for the two-thread pool of the thread-count test
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
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


def torch_threads(model, memo, item):
    return torch.get_num_threads()


def test_row_groups_start_at_chunk_boundaries():
    free = dict(SPEC, mode="free", batch_size=4)
    # 6 cells per row, chunks of 4: two rows (12 cells) per task
    assert row_groups(SweepSpec.from_dict(free), [0, 1, 2, 3, 4], 6) == [[0, 1], [2, 3], [4]]
    # free cells run in step order: a task's rows are consecutive steps
    step_rows = dict(free, over=["step", "position"], layers=[1], steps=[5, 0, 3])
    assert row_groups(SweepSpec.from_dict(step_rows), [5, 0, 3], 3) == [[0, 3, 5]]
    assert row_groups(SweepSpec.from_dict(step_rows), [5, 0, 3], 4) == [[0], [3], [5]]
    # columns that are steps interleave every row's cells: one task
    columns = {**{k: v for k, v in free.items() if k != "positions"}, "over": ["layer", "step"]}
    assert row_groups(SweepSpec.from_dict(columns), [0, 1, 2], 5) == [[0, 1, 2]]
    # frozen cells and free cells one at a time chunk within a row
    assert row_groups(SweepSpec.from_dict(dict(SPEC, batch_size=4)), [0, 1], 6) == [[0], [1]]
    assert row_groups(SweepSpec.from_dict(dict(SPEC, mode="free")), [0, 1], 6) == [[0], [1]]


def test_workers_run_the_drivers_thread_count(pool):
    # Ray starts workers with OMP_NUM_THREADS=1; CPU sums depend on the thread count
    assert pool.map(torch_threads, [0, 1], progress=False) == [torch.get_num_threads()] * 2
    torch.set_num_threads(2)  # the module runs at one thread (see one_thread): a second pool at two
    try:
        two = ModelPool("toy", num_workers=1)
        assert two.map(torch_threads, [0], progress=False) == [2]
        two.shutdown()
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize(
    "extra",
    [
        dict(batch_size=2),
        dict(over=["step", "position"], layers=[1], batch_size=2),
        dict(mode="free", batch_size=2),
        dict(mode="free", over=["step", "position"], layers=[1], steps=[1, 0], batch_size=2),
    ],
    ids=["frozen-layer-rows", "frozen-step-rows", "free-layer-rows", "free-step-rows"],
)
def test_rows_form_the_chunks_of_the_whole_sweep(extra, pool):
    # 3 positions per row in chunks of 2: each task chunks its cells as the whole sweep does
    spec = SweepSpec.from_dict({**SPEC, **extra})
    expected = run_sweep_spec(spec, progress=False)
    assert expected.stats["chunks"] > 1, "the sweep ran as one chunk: no power"
    assert torch.equal(run_sweep_spec_distributed(spec, pool, progress=False).values, expected.values)


def test_a_worker_killed_mid_sweep_loses_nothing(spec, single_process, pool, tmp_path):
    labels = pool.map(_sweep_labels, [spec], progress=False)[0]
    tasks = [(spec, [row]) for row in labels["layer"]]
    dies = DiesOnce(_sweep_rows, tasks[1], str(tmp_path / "died"))
    rows = pool.map(dies, tasks, progress=False)
    assert (tmp_path / "died").exists(), "no worker died: the test lost its power"
    assert torch.equal(torch.cat([r.values for r in rows]), single_process.values)
    assert len(pool.workers) == 2
    assert pool.map(_sweep_labels, [spec, spec], progress=False)[0] == labels  # the replaced worker works


def test_an_item_that_kills_its_worker_every_time_fails_naming_it(pool):
    before = pool.max_retries
    pool.max_retries = 1
    try:
        failed = r"probe 'poison' \(item 1\) failed after running 2 times.*died"
        with pytest.raises(WorkItemFailed, match=failed) as info:
            pool.map(always_dies, ["fine", "poison", "also fine"], progress=False, label=lambda item: f"probe {item!r}")
    finally:
        pool.max_retries = before
    assert (info.value.index, info.value.attempts) == (1, 2)
    assert pool.map(always_dies, ["fine", "after"], progress=False) == ["fine", "after"]  # the pool still works


def test_an_item_whose_function_raises_fails_at_once_naming_it_and_the_error(pool):
    with pytest.raises(WorkItemFailed, match=r"item 2\) failed after running once: ValueError: two is not allowed"):
        pool.map(raises_on_two, [0, 1, 2, 3], progress=False)


def test_a_slow_item_holds_up_no_other_item(pool):
    # round-robin would queue items 2 and 4 behind the slow item 0 on the same worker
    done = pool.map(slow_or_fast, ["slow", *range(5)], progress=False)
    assert [item for item, _ in done] == ["slow", *range(5)]
    slow_worker = done[0][1]
    assert all(pid != slow_worker for _, pid in done[1:]), "a fast item waited behind the slow one"


def test_pool_arguments_are_checked_before_ray_starts():
    with pytest.raises(ValueError, match="max_retries must be an integer >= 0"):
        ModelPool("toy", max_retries=-1)
    with pytest.raises(ValueError, match="num_workers must be a positive integer"):
        ModelPool("toy", num_workers=0)


def test_progress_bar_spans_all_workers_and_can_be_silenced(spec, pool, capsys):
    pool.map(_sweep_labels, [spec, spec], progress=True, desc="probe")
    assert "probe: 100%" in capsys.readouterr().err
    pool.map(_sweep_labels, [spec, spec], progress=False)
    assert "probe" not in capsys.readouterr().err


def assert_same_generation(got, expected) -> None:
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(got.tokens_per_forward, expected.tokens_per_forward)
    assert len(got.trace) == len(expected.trace)
    for canvas in range(len(expected.trace)):
        want = expected.trace[canvas].tensors()
        have = got.trace[canvas].tensors()
        assert have.keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(have[name], value, rtol=0, atol=0, equal_nan=True, msg=name)


def test_seed_search_equals_the_single_process_run(toy, pool):
    seeds = [3, 40]
    expected = list(generate_over_seeds(toy, PROMPTS, seeds, batch_size=3, progress=False))
    got = generate_over_seeds_distributed(pool, PROMPTS, seeds, batch_size=3, progress=False)
    # seed-major rows, batches of 3 then 1: both workers get one
    assert [b.runs for b in got] == [b.runs for b in expected]
    assert [b.runs for b in got] == [[(PROMPTS[0], 3), (PROMPTS[1], 3), (PROMPTS[0], 40)], [(PROMPTS[1], 40)]]
    for have, want in zip(got, expected, strict=True):
        assert_same_generation(have.result, want.result)
    # the default is one canvas, as in generate_over_seeds (not generate's 256 tokens)
    assert got[0].result.new_tokens().shape[1] == toy.cfg.canvas_length
    first_canvas = got[0].result.trace[0].input_canvas[0]  # [batch, canvas]: the noise each seed drew
    assert not torch.equal(first_canvas[0], first_canvas[2]), "seeds 3 and 40 should start from different noise"
    # generate keywords travel to the workers
    short = generate_over_seeds_distributed(pool, PROMPTS[0], [3], max_new_tokens=12, progress=False)
    (reference,) = generate_over_seeds(toy, PROMPTS[0], [3], max_new_tokens=12, progress=False)
    assert_same_generation(short[0].result, reference.result)


def assert_same_cache(got: DenoisingCache, expected: DenoisingCache) -> None:
    assert sorted(got.names) == sorted(expected.names)
    assert got.canvases() == expected.canvases()
    for canvas in expected.canvases():
        assert got.steps(canvas) == expected.steps(canvas)
        for step in expected.steps(canvas):
            have, want = got.step_cache(step, canvas), expected.step_cache(step, canvas)
            assert sorted(have.keys()) == sorted(want.keys())
            for name in want.keys():
                assert torch.equal(have[name], want[name]), (canvas, step, name)


def test_harvest_equals_the_single_process_run(toy, pool, tmp_path):
    prompts, seeds = [*PROMPTS, "reverse 5 6 7:"], [40, 3, 7]
    dirs = harvest_distributed(pool, prompts, tmp_path / "ray", seeds=seeds, progress=False, **HARVEST)
    assert dirs == [tmp_path / "ray" / f"run_{i:05d}" for i in range(3)]
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        expected = harvest_run(toy, prompt, tmp_path / "local" / f"run_{i:05d}", seed, **HARVEST)
        assert expected.steps(0), "nothing was recorded: the comparison lost its power"
        assert_same_cache(DenoisingCache.load(dirs[i], model=toy), expected)
    # one int seeds every run alike; the same prompt twice then gives the same cache
    twice = harvest_distributed(pool, [PROMPTS[0]] * 2, tmp_path / "same", seeds=40, progress=False, **HARVEST)
    assert_same_cache(DenoisingCache.load(twice[1], model=toy), DenoisingCache.load(dirs[0], model=toy))


def test_a_worker_killed_mid_harvest_loses_nothing(toy, pool, tmp_path):
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    tasks = [(i, p, 40 + i, str(tmp_path / "ray"), HARVEST) for i, p in enumerate(prompts)]
    # run 2's first worker dies; its retry runs on a fresh worker
    dies = DiesOnce(_harvest_one, tasks[2], str(tmp_path / "died"))
    dirs = [Path(p) for p in pool.map(dies, tasks, progress=False)]
    assert (tmp_path / "died").exists()
    for i, prompt in enumerate(prompts):
        expected = harvest_run(toy, prompt, tmp_path / "local" / f"run_{i:05d}", 40 + i, **HARVEST)
        assert_same_cache(DenoisingCache.load(dirs[i], model=toy), expected)


def test_seed_searches_and_harvests_refuse_bad_input_before_any_work(pool, tmp_path):
    with pytest.raises(ValueError, match="noise is set per seed"):
        generate_over_seeds_distributed(pool, PROMPTS, [1], noise=object(), progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate_over_seeds_distributed(pool, PROMPTS, [1], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="at least one prompt and one seed"):
        generate_over_seeds_distributed(pool, PROMPTS, [], progress=False)
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 prompts"):
        harvest_distributed(pool, PROMPTS, tmp_path, seeds=[1], progress=False)
    with pytest.raises(ValueError, match="a harvest sets noise, storage itself"):
        harvest_distributed(pool, PROMPTS, tmp_path, noise=object(), storage="memory", progress=False)
    with pytest.raises(ValueError, match="at least one prompt"):
        harvest_distributed(pool, [], tmp_path, progress=False)
    assert not any(tmp_path.iterdir()), "a refused harvest wrote something"


def test_the_address_check_passes_a_real_cluster(pool):
    # the GCS of the running local cluster answers the HTTP/2 handshake the check asks for
    address = ray.get_runtime_context().gcs_address
    assert connect(address) is ray


def test_cli_ray_flag_runs_the_sweep_on_the_running_cluster(spec, single_process, pool, tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    pool.shutdown()  # the CLI starts its own two workers; free the two CPUs this cluster has
    with pytest.raises(RuntimeError, match="shut down"):
        pool.map(_sweep_labels, [spec], progress=False)
    main(["patch", str(spec_file), "--out", str(tmp_path / "sweep"), "--no-progress", "--ray", "--workers", "2"])
    saved = SweepResult.load(tmp_path / "sweep")
    assert torch.equal(saved.values, single_process.values)


def _exit_message(capsys, argv: list[str]) -> str:
    """The one line `main(argv)` exits with (status 2, on stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    return error


def test_without_ray_the_cli_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    assert "diffusionlens[distributed]" in _exit_message(capsys, ["patch", str(spec_file), "--out", "x", "--ray"])


def test_unreachable_address_fails_fast_and_names_it(tmp_path, capsys):
    # Port 9 (discard) has no listener on loopback: refused at once, not after Ray's minute of retries.
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="127.0.0.1:9"):
        connect("127.0.0.1:9")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    assert "127.0.0.1:9" in _exit_message(
        capsys, ["patch", str(spec_file), "--out", "x", "--ray-address", "127.0.0.1:9"]
    )
    with pytest.raises(ConnectionError, match="no-such-host.invalid:6379"):  # a name that does not resolve
        connect("no-such-host.invalid:6379")
    with pytest.raises(ConnectionError, match="'localhost' is not host:port"):
        connect("localhost")
    assert time.monotonic() - start < CONNECT_TIMEOUT_S


@contextmanager
def listener(reply: bytes | None):
    """A TCP server on loopback that is not Ray: it says `reply` and hangs up, or (None) says nothing."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if reply is None:
                held.append(conn)
            else:
                conn.recv(1024)
                conn.sendall(reply)
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize(
    "reply, message",
    [(None, "no answer within"), (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a Ray cluster.*dashboard")],
    ids=["silent", "http1"],
)
def test_a_listener_that_is_not_ray_fails_fast_and_names_it(reply, message):
    # ray.init alone retries for minutes against these; the check refuses them in seconds
    with listener(reply) as address:
        start = time.monotonic()
        with pytest.raises(ConnectionError, match=f"{address}.*{message}"):
            connect(address)
        assert time.monotonic() - start < CONNECT_TIMEOUT_S + 2
