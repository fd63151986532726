"""The thread model: hooks passed to a run (`run_with_hooks`, `hooks()`, `generate(fwd_hooks=...)`,
`generate_with_cache`, patch runs) fire in that run only, even while other threads run the same model;
hooks added to the model (`add_hook`) fire everywhere; the generation context is per thread; no run
leaves a hook or a `hook.ctx` attribute behind.

Two kinds of overlap are tested. "Inside": thread A's hook blocks until thread B has finished a whole
call, so B's call runs entirely while A's hooks are attached, whatever the scheduler does. "Stress":
both threads loop, released together by a barrier each iteration.
"""

from __future__ import annotations

import gc
import pickle
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch

from diffusionlens import HookedDiffusionGemma, HookPoint, ReplayNoise
from diffusionlens.patching import Patch, record_run, run_patched

RESID = "decoder.blocks.0.hook_resid_post"
ZEROED = "decoder.blocks.*.hook_attn_out"
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def toy():
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    ids = model.to_tokens("squares 400 800:")
    canvas = torch.randint(
        0, model.cfg.vocab_size, (1, model.cfg.canvas_length), generator=torch.Generator().manual_seed(0)
    )
    return model, ids, canvas


@pytest.fixture(autouse=True)
def clean(toy):
    yield
    toy[0].reset_hooks(including_permanent=True)


def zero(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    return torch.zeros_like(x)


def gen_kwargs(model: HookedDiffusionGemma) -> dict[str, Any]:
    return dict(max_new_tokens=model.cfg.canvas_length, max_denoising_steps=6, noise=ReplayNoise(1), progress=False)


def in_threads(*bodies: Callable[[], Any]) -> list[Any]:
    """Run each body in its own thread; return their results, re-raising the first error."""
    results: list[Any] = [None] * len(bodies)
    errors: list[BaseException] = []

    def runner(i: int, body: Callable[[], Any]) -> None:
        try:
            results[i] = body()
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=runner, args=(i, body)) for i, body in enumerate(bodies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 4)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


class Inside:
    """A's hook calls `hold()`: the first time, it signals B to go and waits until B says it is done."""

    def __init__(self) -> None:
        self.a_inside, self.b_done = threading.Event(), threading.Event()

    def hold(self) -> None:
        if not self.a_inside.is_set():
            self.a_inside.set()
            assert self.b_done.wait(TIMEOUT), "thread B never finished"

    def zeroing_hook(self, step: int | None = None) -> Callable[[torch.Tensor, HookPoint], torch.Tensor]:
        """A hook that zeroes its value and holds (at `step` only, when given) while B runs."""

        def zero_and_hold(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            if step is None or hook.ctx.step == step:
                self.hold()
            return torch.zeros_like(x)

        return zero_and_hold

    def b(self, body: Callable[[], Any]) -> Callable[[], Any]:
        def run_b() -> Any:
            assert self.a_inside.wait(TIMEOUT), "thread A never entered its hook"
            try:
                return body()
            finally:
                self.b_done.set()

        return run_b


def assert_fast_path_restored(model: HookedDiffusionGemma) -> None:
    assert not model.has_hooks
    assert all(type(p) is HookPoint and p.run_hook_count == 0 for p in model.hook_dict.values())


# --------------------------------------------------------------------------- forward passes
def test_run_with_hooks_in_one_thread_does_not_reach_another_running_inside_it(toy):
    model, ids, canvas = toy
    with torch.no_grad():
        base = model(ids, canvas)
        hooked = model.run_with_hooks(ids, canvas, fwd_hooks=[(ZEROED, zero)])
    assert not torch.equal(base, hooked)  # the hook matters, so a leak would show
    inside = Inside()

    zero_and_hold = inside.zeroing_hook()

    def run_a() -> torch.Tensor:
        with torch.no_grad():
            return model.run_with_hooks(ids, canvas, fwd_hooks=[(ZEROED, zero_and_hold)])

    def run_b() -> tuple[torch.Tensor, bool]:
        with torch.no_grad():
            return model(ids, canvas), model.has_hooks

    out_a, (out_b, b_saw_hooks) = in_threads(run_a, inside.b(run_b))
    assert torch.equal(out_a, hooked)
    assert torch.equal(out_b, base)
    assert not b_saw_hooks  # has_hooks speaks for the calling thread
    assert_fast_path_restored(model)


def test_concurrent_hooked_and_plain_runs_stay_apart_under_stress(toy):
    model, ids, canvas = toy
    with torch.no_grad():
        base = model(ids, canvas)
        hooked = model.run_with_hooks(ids, canvas, fwd_hooks=[(ZEROED, zero)])
    iterations = 25
    barrier = threading.Barrier(2, timeout=TIMEOUT)

    def loop(body: Callable[[], torch.Tensor], expected: torch.Tensor) -> int:
        wrong = 0
        with torch.no_grad():
            for _ in range(iterations):
                barrier.wait()
                wrong += not torch.equal(body(), expected)
        return wrong

    wrong_a, wrong_b = in_threads(
        lambda: loop(lambda: model.run_with_hooks(ids, canvas, fwd_hooks=[(ZEROED, zero)]), hooked),
        lambda: loop(lambda: model(ids, canvas), base),
    )
    assert (wrong_a, wrong_b) == (0, 0)
    assert_fast_path_restored(model)


def test_hooks_block_and_run_with_cache_are_per_thread(toy):
    model, ids, canvas = toy
    with torch.no_grad():
        base, base_cache = model.run_with_cache(ids, canvas, names_filter=RESID)
    inside = Inside()

    def hold(x: torch.Tensor, hook: HookPoint) -> None:
        inside.hold()

    def run_a() -> torch.Tensor:
        with torch.no_grad(), model.hooks(fwd_hooks=[(ZEROED, zero), (RESID, hold)]):
            return model(ids, canvas)

    def run_b() -> tuple[torch.Tensor, Any]:
        with torch.no_grad():
            return model.run_with_cache(ids, canvas, names_filter=RESID)

    _, (out_b, cache_b) = in_threads(run_a, inside.b(run_b))
    assert torch.equal(out_b, base)
    assert torch.equal(cache_b[RESID], base_cache[RESID])
    assert_fast_path_restored(model)


def test_model_level_hooks_are_global(toy):
    model, ids, canvas = toy
    with torch.no_grad():
        hooked = model.run_with_hooks(ids, canvas, fwd_hooks=[(ZEROED, zero)])
    model.add_hook(ZEROED, zero)
    (out,) = in_threads(lambda: model(ids, canvas))
    assert torch.equal(out, hooked)


def test_reset_hooks_in_another_thread_leaves_a_run_alone(toy):
    model, ids, canvas = toy
    with torch.no_grad():
        hooked = model.run_with_hooks(ids, canvas, fwd_hooks=[(ZEROED, zero)])
    inside = Inside()

    zero_and_hold = inside.zeroing_hook()

    def run_a() -> torch.Tensor:
        with torch.no_grad():
            return model.run_with_hooks(ids, canvas, fwd_hooks=[(ZEROED, zero_and_hold)])

    out_a, _ = in_threads(run_a, inside.b(lambda: model.reset_hooks(including_permanent=True)))
    assert torch.equal(out_a, hooked)
    assert_fast_path_restored(model)


def test_reset_hooks_end_false_leaves_model_level_hooks_seen_by_every_thread(toy):
    model, ids, canvas = toy
    with torch.no_grad():
        hooked = model.run_with_hooks(ids, canvas, fwd_hooks=[(ZEROED, zero)], reset_hooks_end=False)
    (out,) = in_threads(lambda: model(ids, canvas))
    assert torch.equal(out, hooked)
    assert all(model.hook_dict[n].fwd_fns == [zero] for n in model.resolve_hook_names(ZEROED))


def test_pickling_while_another_thread_runs_hooks_gives_a_hook_free_copy(toy):
    model, ids, canvas = toy
    with torch.no_grad():
        base = model(ids, canvas)
    inside = Inside()

    zero_and_hold = inside.zeroing_hook()

    def run_a() -> None:
        with torch.no_grad():
            model.run_with_hooks(ids, canvas, fwd_hooks=[(ZEROED, zero_and_hold)])

    _, payload = in_threads(run_a, inside.b(lambda: pickle.dumps(model)))
    copy = pickle.loads(payload)
    assert all(type(p) is HookPoint and p.run_hook_count == 0 for p in copy.hook_dict.values())
    with torch.no_grad():
        assert torch.equal(copy(ids, canvas), base)


# --------------------------------------------------------------------------- generation and patching
def test_generate_with_fwd_hooks_in_one_thread_does_not_reach_another(toy):
    model, ids, _ = toy
    kwargs = gen_kwargs(model)
    base = model.generate(ids, **kwargs).sequences
    hooked = model.generate(ids, fwd_hooks=[(ZEROED, zero)], **kwargs).sequences
    assert not torch.equal(base, hooked)
    inside = Inside()

    zero_and_hold = inside.zeroing_hook(step=1)

    out_a, out_b = in_threads(
        lambda: model.generate(ids, fwd_hooks=[(ZEROED, zero_and_hold)], **kwargs).sequences,
        inside.b(lambda: model.generate(ids, **kwargs).sequences),
    )
    assert torch.equal(out_a, hooked)
    assert torch.equal(out_b, base)
    assert_fast_path_restored(model)


def test_concurrent_generations_under_stress(toy):
    model, ids, _ = toy
    kwargs = gen_kwargs(model)
    base = model.generate(ids, **kwargs).sequences
    hooked = model.generate(ids, fwd_hooks=[(ZEROED, zero)], **kwargs).sequences
    barrier = threading.Barrier(2, timeout=TIMEOUT)

    def loop(hooks: list, expected: torch.Tensor) -> int:
        wrong = 0
        for _ in range(6):
            barrier.wait()
            wrong += not torch.equal(model.generate(ids, fwd_hooks=hooks, **kwargs).sequences, expected)
        return wrong

    assert in_threads(lambda: loop([(ZEROED, zero)], hooked), lambda: loop([], base)) == [0, 0]
    assert_fast_path_restored(model)


def test_generation_context_is_per_thread(toy):
    """A's hooks read A's step while B's forward (which sets step None in its encoder) runs; B's hooks
    read B's own context (step None outside generation), not A's step."""
    model, ids, canvas = toy
    inside = Inside()
    steps_a: list[int | None] = []

    def record_and_hold(x: torch.Tensor, hook: HookPoint) -> None:
        steps_a.append(hook.ctx.step)
        if hook.ctx.step == 1:
            inside.hold()
            steps_a.append(hook.ctx.step)  # read again after B's encoder ran

    with torch.no_grad():
        state = model.encode(ids)

    def run_b() -> list[tuple[int | None, int]]:
        seen: list[tuple[int | None, int]] = []

        def record(x: torch.Tensor, hook: HookPoint) -> None:
            seen.append((hook.ctx.step, hook.ctx.canvas))

        with torch.no_grad():
            # a decoder pass on an encoded prompt: nothing in it sets the step, so it reads this thread's
            model.run_with_hooks(None, canvas, prompt_state=state, fwd_hooks=[(RESID, record)])
            model.encode(ids)  # sets this thread's step to None; A's must stay 1
        return seen

    kwargs = gen_kwargs(model)
    _, seen_b = in_threads(lambda: model.generate(ids, fwd_hooks=[(RESID, record_and_hold)], **kwargs), inside.b(run_b))
    assert seen_b == [(None, 0)]
    assert steps_a == [0, 1, 1]
    assert model.hook_ctx.step is None  # the main thread's context was never touched


def test_generate_with_cache_records_only_its_own_run(toy):
    model, ids, _ = toy
    kwargs = gen_kwargs(model)
    _, reference = model.generate_with_cache(ids, names_filter=RESID, **kwargs)
    inside = Inside()

    zero_and_hold = inside.zeroing_hook(step=1)

    def run_b() -> Any:
        return model.generate_with_cache(ids, names_filter=RESID, **kwargs)[1]

    _, cache_b = in_threads(lambda: model.generate(ids, fwd_hooks=[(ZEROED, zero_and_hold)], **kwargs), inside.b(run_b))
    assert cache_b.steps(0) == reference.steps(0)
    for step in reference.steps(0):
        assert torch.equal(cache_b.get(RESID, canvas=0, step=step), reference.get(RESID, canvas=0, step=step))
    assert_fast_path_restored(model)


@pytest.mark.parametrize("mode", ["frozen", "free"])
def test_patch_run_in_one_thread_does_not_reach_another(toy, mode):
    model, ids, canvas = toy
    kwargs = dict(max_new_tokens=model.cfg.canvas_length, max_denoising_steps=4)
    clean = record_run(model, ids, names_filter=RESID, **kwargs)
    corrupted = record_run(model, model.to_tokens("squares 100 900:"), **kwargs)
    patch = Patch(RESID, clean.cache)
    reference = run_patched(model, corrupted, patch, mode=mode)
    assert any(not torch.equal(reference.logits[k], v) for k, v in corrupted.logits.items())
    with torch.no_grad():
        base = model(ids, canvas)
    inside = Inside()
    thread_a: list[int] = []

    def run_a() -> Any:
        thread_a.append(threading.get_ident())
        return run_patched(model, corrupted, patch, mode=mode)

    def run_b() -> torch.Tensor:
        with torch.no_grad():
            return model(ids, canvas)

    # A model-level hook that changes nothing, only to hold thread A's patch run at step 1 while B runs.
    model.add_hook(RESID, lambda x, h: inside.hold() if threading.get_ident() in thread_a and h.ctx.step == 1 else None)
    patched, out_b = in_threads(run_a, inside.b(run_b))
    assert inside.a_inside.is_set()
    assert patched.logits.keys() == reference.logits.keys()
    assert all(torch.equal(patched.logits[k], v) for k, v in reference.logits.items())
    assert torch.equal(out_b, base)
    model.reset_hooks()
    assert_fast_path_restored(model)


# --------------------------------------------------------------------------- leftovers
def test_hook_added_inside_a_hook_is_removed_when_the_run_ends(toy):
    model, ids, canvas = toy
    with torch.no_grad():
        base = model(ids, canvas)
    fired: list[str] = []

    def adder(x: torch.Tensor, hook: HookPoint) -> None:
        if not fired:
            model.add_hook("decoder.ln_final.hook_normalized", lambda x, h: fired.append(h.name))
        fired.append(hook.name)

    with torch.no_grad():
        model.run_with_hooks(ids, canvas, fwd_hooks=[(RESID, adder)])
    assert fired == [RESID, "decoder.ln_final.hook_normalized"]  # it fired in the run
    assert_fast_path_restored(model)
    with torch.no_grad():
        assert torch.equal(model(ids, canvas), base)


def test_hook_added_inside_a_generate_hook_is_removed_when_generation_ends(toy):
    model, ids, _ = toy
    kwargs = gen_kwargs(model)
    base = model.generate(ids, **kwargs).sequences
    added: list[int] = []

    def adder(x: torch.Tensor, hook: HookPoint) -> None:
        if hook.ctx.step == 0:
            model.add_hook(RESID, lambda x, h: added.append(1), prepend=True)
            model.add_hook(RESID, lambda g, h: None, dir="bwd")

    model.generate(ids, fwd_hooks=[("decoder.hook_embed", adder)], **kwargs)
    assert added
    assert_fast_path_restored(model)
    assert torch.equal(model.generate(ids, **kwargs).sequences, base)


def test_permanent_hook_added_inside_a_run_stays(toy):
    model, ids, canvas = toy
    perma = []

    def adder(x: torch.Tensor, hook: HookPoint) -> None:
        if not model.hook_dict[RESID].fwd_fns:
            model.add_perma_hook(RESID, lambda x, h: perma.append(1))

    with torch.no_grad():
        model.run_with_hooks(ids, canvas, fwd_hooks=[("decoder.hook_embed", adder)])
        model(ids, canvas)
    assert len(perma) == 2


def test_ctx_attribute_is_cleared_by_reset_hooks_and_frees_its_tensor(toy):
    model, ids, canvas = toy
    kept: list[weakref.ref] = []

    def stash(x: torch.Tensor, hook: HookPoint) -> None:
        hook.ctx.saved = x.clone()
        hook.ctx["also"] = 1
        kept.append(weakref.ref(hook.ctx.saved))

    model.add_hook(RESID, stash)
    with torch.no_grad():
        model(ids, canvas)
    ctx = model.hook_dict[RESID].ctx
    assert hasattr(ctx, "saved")
    model.reset_hooks()
    gc.collect()
    assert not hasattr(ctx, "saved") and "also" not in ctx
    assert kept[0]() is None  # the tensor is freed
    assert ctx.shared is model.hook_ctx  # the generation context survives the reset
    model.hook_ctx.step = 3
    try:
        assert ctx.step == 3
    finally:
        model.hook_ctx.reset()


def test_hooks_are_removed_when_a_hook_raises_in_a_thread(toy):
    model, ids, canvas = toy

    def boom(x: torch.Tensor, hook: HookPoint) -> None:
        raise RuntimeError("boom")

    def run_a() -> None:
        with torch.no_grad():
            model.run_with_hooks(ids, canvas, fwd_hooks=[(ZEROED, zero), (RESID, boom)], bwd_hooks=[(RESID, zero)])

    with pytest.raises(RuntimeError, match="boom"):
        in_threads(run_a)
    with pytest.raises(RuntimeError, match="boom"):
        in_threads(lambda: model.generate(ids, fwd_hooks=[(RESID, boom)], **gen_kwargs(model)))
    assert_fast_path_restored(model)


def test_bad_hook_in_a_list_attaches_none_of_them(toy):
    model, ids, canvas = toy
    with pytest.raises(KeyError, match="Unknown hook point"):
        with model.hooks(fwd_hooks=[(RESID, zero), ("decoder.blocks.0.hook_resid_typo", zero)]):
            pass
    with pytest.raises(TypeError, match="fn\\(tensor, hook\\)"):
        model.run_with_hooks(ids, canvas, fwd_hooks=[(RESID, zero), (RESID, "not a function")])
    assert_fast_path_restored(model)
