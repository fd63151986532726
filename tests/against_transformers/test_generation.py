"""Generation against transformers' own `generate`, noise sources, hooks at every step, the trace."""

from __future__ import annotations

import pytest
import torch
from reference import CANVAS, build_pair, reference_generate

from diffusionlens import DenoisingTrace, ReplayNoise


@pytest.fixture(scope="module", params=["mixed", "single_kv"])
def pair(request):
    return request.param, *build_pair(request.param)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generate_matches_transformers(pair, seed):
    name, reference, ours = pair
    vocab = reference.config.text_config.vocab_size
    ids = torch.randint(3, vocab, (3, 9), generator=torch.Generator().manual_seed(seed))
    kw = dict(
        max_new_tokens=CANVAS[name] * 3,
        max_denoising_steps=10,
        entropy_bound=0.4,
        stability_threshold=0,  # random tiny models never hold an argmax canvas still
        confidence_threshold=1e-6,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    probe = ours.generate(ids, progress=False, eos_token_id=None, **kw)
    # Random tiny models are never confident: put the threshold inside the observed range of mean
    # entropies so that some rows stop early and others run on.
    mean_entropy = torch.cat([c.entropy.mean(-1).flatten() for c in probe.trace.canvases])
    kw["confidence_threshold"] = float(mean_entropy.quantile([0.3, 0.5, 0.9][seed]))
    torch.manual_seed(seed)
    probe = ours.generate(ids, progress=False, eos_token_id=None, **kw)
    eos = int(probe.sequences[0, ids.shape[1] + 2])  # a token row 0 writes in its first canvas
    torch.manual_seed(seed)
    expected = reference_generate(reference, ids, eos_token_id=eos, **kw).sequences
    torch.manual_seed(seed)
    result = ours.generate(ids, progress=False, eos_token_id=eos, **kw)
    assert torch.equal(result.sequences, expected)
    stops = torch.stack([c.stop_step() for c in result.trace.canvases])
    assert (stops < kw["max_denoising_steps"] - 1).any(), "no row stopped early: the test lost its power"
    new = result.sequences[0, ids.shape[1] :]
    first_eos = int((new == eos).nonzero()[0])
    assert (new[first_eos + 1 :] == 0).all(), "tokens after eos must be pad"


def test_left_padded_generation_matches_transformers():
    reference, ours = build_pair("mixed", seed=3)
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :3] = False
    ids[1, :3] = 0
    kw = dict(max_new_tokens=16, max_denoising_steps=6, entropy_bound=0.3, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(11)
    expected = reference_generate(reference, ids, attention_mask=mask, **kw).sequences
    torch.manual_seed(11)
    assert torch.equal(ours.generate(ids, attention_mask=mask, progress=False, **kw).sequences, expected)


def test_replay_noise_is_a_function_of_seed_canvas_step_purpose():
    noise = ReplayNoise(7)
    probs = torch.softmax(torch.randn(2, 5, 11), -1)
    a = noise.sample(probs, canvas=1, step=3)
    torch.manual_seed(123)  # the global RNG must not matter
    _ = noise.renoise(2, 5, 11, torch.device("cpu"), canvas=0, step=0)
    assert torch.equal(noise.sample(probs, canvas=1, step=3), a)
    draws = {tuple(noise.sample(probs, canvas=1, step=s).flatten().tolist()) for s in range(6)}
    assert len(draws) > 1
    assert not torch.equal(ReplayNoise(8).initial_canvas(2, 5, 11, "cpu", 0), noise.initial_canvas(2, 5, 11, "cpu", 0))


def test_replay_noise_sampling_follows_the_distribution():
    probs = torch.tensor([[[0.7, 0.2, 0.1]]]).expand(1, 4000, 3)
    draws = torch.cat([ReplayNoise(s).sample(probs, 0, 0) for s in range(5)], dim=1)
    freq = torch.bincount(draws.flatten(), minlength=3).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02)


def test_replay_runs_are_identical_and_identity_hooks_change_nothing(pair):
    name, _, ours = pair
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=CANVAS[name] * 2, max_denoising_steps=5, noise=ReplayNoise(3), progress=False)
    first = ours.generate(ids, **kw)
    torch.manual_seed(999)
    second = ours.generate(ids, **kw)
    assert torch.equal(first.sequences, second.sequences)
    seen = set()

    def identity(x, hook):
        seen.add(hook.name)
        return x

    # The opt-in per-head and per-expert hooks fire only when switched on; on, they change nothing either.
    ours.set_use_attn_result(True)
    ours.set_use_expert_outputs(True)
    try:
        hooked = ours.generate(ids, fwd_hooks=[(lambda n: True, identity)], **kw)
    finally:
        ours.set_use_attn_result(False)
        ours.set_use_expert_outputs(False)
    assert torch.equal(first.sequences, hooked.sequences)
    assert seen == set(ours.hook_dict)
    assert not ours.has_hooks


def test_hook_context_reports_canvas_step_and_t(pair):
    name, _, ours = pair
    ids = torch.randint(3, 50, (1, 5), generator=torch.Generator().manual_seed(1))
    log = []
    hooks = [
        ("decoder.hook_embed", lambda x, h: log.append(("dec", h.ctx.canvas, h.ctx.step, h.ctx.t))),
        ("encoder.hook_embed", lambda x, h: log.append(("enc", h.ctx.canvas, h.ctx.step, h.ctx.t))),
    ]
    result = ours.generate(
        ids, max_new_tokens=CANVAS[name] * 2, max_denoising_steps=4, fwd_hooks=hooks, progress=False, eos_token_id=None
    )
    steps = [result.trace.steps(c) for c in range(len(result.trace))]
    expected = []
    for canvas, n in enumerate(steps):
        expected.append(("enc", canvas, None, None))
        expected += [("dec", canvas, s, 4 - s) for s in range(n)]
    assert log == expected


def test_sampler_hook_can_replace_the_decision(pair):
    name, _, ours = pair
    ids = torch.randint(3, 50, (1, 5), generator=torch.Generator().manual_seed(2))
    forced = 5

    def force_argmax(logits, hook):
        out = torch.full_like(logits, -30.0)
        out[..., forced] = 30.0
        return out

    result = ours.generate(
        ids,
        max_new_tokens=CANVAS[name],
        max_denoising_steps=3,
        fwd_hooks=[("sampler.hook_logits", force_argmax)],
        progress=False,
        eos_token_id=None,
    )
    assert (result.sequences[0, 5:] == forced).all()


def test_trace_contents_and_round_trip(tmp_path, pair):
    name, _, ours = pair
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(4))
    result = ours.generate(ids, max_new_tokens=CANVAS[name], max_denoising_steps=5, record_top_k=3, progress=False)
    trace = result.trace[0]
    n, length = trace.n_steps, CANVAS[name]
    assert trace.input_canvas.shape == (n, 2, length) and trace.top_k_probs.shape == (n, 2, length, 3)
    assert torch.equal(trace.input_canvas[1:], trace.next_canvas[:-1])
    assert torch.equal(trace.final, result.sequences[:, 6 : 6 + length]) or ours.cfg.eos_token_ids
    assert torch.all(trace.temperature[:-1] >= trace.temperature[1:])
    commit = trace.commit_step()
    for row in range(2):
        for pos in range(length):
            s = int(commit[row, pos])
            assert (trace.argmax[s:, row, pos] == trace.argmax[-1, row, pos]).all()
            if s > 0:
                assert trace.argmax[s - 1, row, pos] != trace.argmax[s, row, pos]
    result.trace.save(tmp_path / "trace")
    loaded = DenoisingTrace.load(tmp_path / "trace")
    for key, value in trace.tensors().items():
        assert torch.equal(loaded[0].tensors()[key], value)


def test_progress_bar_can_be_silenced(capsys, pair):
    name, _, ours = pair
    ids = torch.randint(3, 50, (1, 4), generator=torch.Generator().manual_seed(0))
    ours.generate(ids, max_new_tokens=CANVAS[name], max_denoising_steps=2, progress=False)
    assert "denoising" not in capsys.readouterr().err
    ours.generate(ids, max_new_tokens=CANVAS[name], max_denoising_steps=2, progress=True)
    assert "denoising" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(t_min=0.9, t_max=0.5), "t_min"),
        (dict(entropy_bound=-1.0), "entropy_bound"),
        (dict(max_denoising_steps=0), "max_denoising_steps"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_invalid_sampler_settings_are_refused(pair, bad, match):
    _, _, ours = pair
    with pytest.raises(ValueError, match=match):
        ours.generate(torch.tensor([[3, 4]]), progress=False, **bad)
