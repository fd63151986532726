"""The hook API: every hook fires with the documented shape, hooks read and replace values, and the
model is left clean after errors."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from reference import CANVAS, build_pair
from tolerance import readout_atol, summed_parts_atol

from diffusionlens import HookedDiffusionGemma, HookError, hook_specs

NAME = "mixed"
BATCH, PROMPT = 2, 9  # the prompt is longer than the sliding window (6)


@pytest.fixture(scope="module")
def setup():
    reference, model = build_pair(NAME, seed=4)
    cfg = model.cfg
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, cfg.vocab_size, (BATCH, PROMPT), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (BATCH, CANVAS[NAME]), generator=g)
    self_cond = 3.0 * torch.randn(BATCH, CANVAS[NAME], cfg.vocab_size, generator=g)
    with torch.no_grad():
        base = model(ids, canvas, self_cond)
    return SimpleNamespace(reference=reference, model=model, cfg=cfg, ids=ids, canvas=canvas, sc=self_cond, base=base)


def run(s, **kw):
    with torch.no_grad():
        return s.model.run_with_hooks(s.ids, s.canvas, s.sc, **kw)


def non_sampler(name: str) -> bool:
    return not name.startswith("sampler.")


def record_all(s, self_cond):
    seen: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    order: list[str] = []

    def rec(x, hook):
        order.append(hook.name)
        seen[hook.name] = (tuple(x.shape), x.dtype)

    # The opt-in hooks (per-head and per-expert outputs) fire only once switched on.
    s.model.set_use_attn_result(True)
    s.model.set_use_expert_outputs(True)
    try:
        with torch.no_grad(), s.model.hooks(fwd_hooks=[(non_sampler, rec)]):
            s.model(s.ids, s.canvas, self_cond)
    finally:
        s.model.set_use_attn_result(False)
        s.model.set_use_expert_outputs(False)
    return seen, order


def expected_shape(name: str, cfg, batch: int, prompt: int) -> tuple[int, ...]:
    """Shapes by the DESIGN conventions, derived independently of diffusionlens.hooks.shapes."""
    canvas, d = cfg.canvas_length, cfg.hidden_size
    stack = name.split(".")[0]
    pos = prompt if stack == "encoder" else canvas
    leaf = name.rsplit(".", 1)[1]
    if leaf == "hook_scale":  # 1/rms of a norm, one per position
        return (batch, pos, 1)
    m = re.match(r"^(encoder|decoder)\.blocks\.(\d+)\.(.*)$", name)
    if m is None:
        table = {
            "decoder.hook_logits": (batch, canvas, cfg.vocab_size),
            "decoder.self_cond.hook_logits_in": (batch, canvas, cfg.vocab_size),
        }
        if name in table:
            return table[name]
        if name.startswith("decoder.self_cond.mlp."):
            return (batch, canvas, cfg.intermediate_size)
        if leaf in ("hook_embed", "hook_soft_embed", "hook_out", "hook_normalized"):
            return (batch, pos, d)
        raise AssertionError(f"no expected shape for {name}")
    layer, rest = int(m.group(2)), m.group(3)
    heads, kv, hd = cfg.num_attention_heads, cfg.layer_kv_heads(layer), cfg.layer_head_dim(layer)
    if stack == "encoder":
        keys = prompt
    else:
        kept = min(prompt, cfg.sliding_window - 1) if cfg.is_sliding(layer) else prompt
        keys = kept + canvas
    if rest.startswith("attn."):
        attn = rest[len("attn.") :]
        if attn in ("hook_q", "hook_rot_q", "hook_z", "q_norm.hook_normalized"):
            return (batch, pos, heads, hd)
        if attn in ("hook_k", "hook_v", "hook_rot_k", "k_norm.hook_normalized", "v_norm.hook_normalized"):
            return (batch, pos, kv, hd)
        if attn in ("hook_attn_scores", "hook_pattern"):
            return (batch, heads, pos, keys)
        if attn == "hook_result":
            return (batch, pos, heads, d)
    if rest.startswith("mlp.hook_"):
        return (batch, pos, cfg.intermediate_size)
    if rest == "moe.hook_router_logits":
        return (batch, pos, cfg.num_experts)
    if rest in ("moe.hook_expert_weights", "moe.hook_expert_indices"):
        return (batch, pos, cfg.top_k_experts)
    if rest == "moe.hook_expert_out":
        return (batch, pos, cfg.top_k_experts, d)
    resid = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_moe_out")
    if rest in (*resid, "hook_ffn_out", "hook_resid_post") or rest.endswith(".hook_normalized"):
        return (batch, pos, d)
    raise AssertionError(f"no expected shape for {name}")


def expected_dtype(name: str) -> torch.dtype:
    if name.endswith("hook_expert_indices"):
        return torch.int64
    return torch.float32  # the fp32 model; hook_logits and expert weights are fp32 in any dtype


# ---------------------------------------------------------------------- firing and shapes
def test_every_hook_fires_once_with_documented_shape(setup):
    s = setup
    seen, order = record_all(s, s.sc)
    expected_names = {n for n in s.model.hook_dict if non_sampler(n)}
    assert set(seen) == expected_names, f"never fired: {sorted(expected_names - set(seen))}"
    assert len(order) == len(expected_names), "some hook fired more than once in one forward pass"
    assert all(n.startswith("sampler.") for n in set(s.model.hook_dict) - expected_names)
    for name, (shape, dtype) in seen.items():
        assert shape == expected_shape(name, s.cfg, BATCH, PROMPT), name
        assert dtype == expected_dtype(name), name
    # The encoder runs before the decoder, and blocks fire in order.
    assert order.index("encoder.blocks.0.hook_resid_pre") < order.index("decoder.hook_embed")
    assert order[-1] == "decoder.hook_logits"
    # Sliding layers keep sliding_window - 1 prompt keys: a real cut for this prompt.
    sliding = next(i for i in range(s.cfg.n_layers) if s.cfg.is_sliding(i))
    full = next(i for i in range(s.cfg.n_layers) if not s.cfg.is_sliding(i))
    keys = lambda i: seen[f"decoder.blocks.{i}.attn.hook_pattern"][0][-1]  # noqa: E731
    assert keys(sliding) == s.cfg.sliding_window - 1 + s.cfg.canvas_length
    assert keys(full) == PROMPT + s.cfg.canvas_length


def test_hook_reference_matches_fired_hooks(setup):
    """diffusionlens.hook_specs (used to size caches) agrees with what a forward pass records."""
    s = setup
    seen, _ = record_all(s, s.sc)
    specs = hook_specs(s.cfg, batch=BATCH, prompt_len=PROMPT)
    assert set(specs) == set(s.model.hook_dict)
    for name, (shape, _) in seen.items():
        assert specs[name].shape == shape, name


def test_no_self_conditioning_skips_logits_in(setup):
    s = setup
    seen, _ = record_all(s, None)
    assert "decoder.self_cond.hook_logits_in" not in seen
    assert set(seen) == {n for n in s.model.hook_dict if non_sampler(n)} - {"decoder.self_cond.hook_logits_in"}
    _, cache = s.model.run_with_cache(s.ids, s.canvas, names_filter="decoder.self_cond.*")
    assert (cache["decoder.self_cond.hook_soft_embed"] == 0).all()
    _, cache = s.model.run_with_cache(s.ids, s.canvas, s.sc, names_filter="decoder.self_cond.*")
    assert cache["decoder.self_cond.hook_soft_embed"].abs().max() > 0
    assert torch.equal(cache["decoder.self_cond.hook_logits_in"], s.sc)


# ---------------------------------------------------------------------- reading and replacing
@pytest.mark.parametrize("mode", ["return_none", "return_same"])
def test_identity_hooks_on_all_points_leave_logits_bit_identical(setup, mode):
    s = setup
    fired = []

    def identity(x, hook):
        fired.append(hook.name)
        return None if mode == "return_none" else x

    # With the opt-in per-head and per-expert hooks on too: they must not move a bit either.
    s.model.set_use_attn_result(True)
    s.model.set_use_expert_outputs(True)
    try:
        out = run(s, fwd_hooks=[(non_sampler, identity)])
    finally:
        s.model.set_use_attn_result(False)
        s.model.set_use_expert_outputs(False)
    assert len(fired) == sum(non_sampler(n) for n in s.model.hook_dict)
    assert torch.equal(out, s.base)
    assert not s.model.has_hooks


def test_replacing_hooks_change_the_output(setup):
    s = setup
    zeroed = run(s, fwd_hooks=[("decoder.blocks.1.hook_attn_out", lambda x, h: torch.zeros_like(x))])
    assert not torch.allclose(zeroed, s.base, atol=1e-3)

    def uniform(pattern, hook):
        allowed = pattern > 0
        return allowed / allowed.sum(-1, keepdim=True)

    flattened = run(s, fwd_hooks=[("decoder.blocks.*.attn.hook_pattern", uniform)])
    assert not torch.allclose(flattened, s.base, atol=1e-3)

    # Replacing the indices re-routes tokens.
    rerouted = run(s, fwd_hooks=[("decoder.blocks.0.moe.hook_expert_indices", lambda x, h: (x + 1) % 4)])
    assert not torch.allclose(rerouted, s.base, atol=1e-3)


def test_replaced_pattern_takes_the_explicit_path_faithfully(setup):
    """A copy of the pattern forces the explicit pattern @ values path; it must agree with the fused
    kernel to rounding, or hooks that edit patterns would act on a different computation."""
    s = setup
    copied = run(s, fwd_hooks=[("*.hook_pattern", lambda x, h: x.clone())])
    assert torch.allclose(copied, s.base, rtol=0, atol=1e-4 * float(s.base.abs().max()))
    # Scaling a pattern by 2 doubles that head's z exactly where it was not replaced.
    store = {}
    name = "decoder.blocks.1.attn"
    with torch.no_grad():
        s.model.run_with_hooks(
            s.ids,
            s.canvas,
            s.sc,
            fwd_hooks=[
                (f"{name}.hook_pattern", lambda x, h: x * 2),
                (f"{name}.hook_z", lambda x, h: store.__setitem__("scaled", x)),
            ],
        )
        _, cache = s.model.run_with_cache(s.ids, s.canvas, s.sc, names_filter=f"{name}.hook_z")
    torch.testing.assert_close(store["scaled"], 2 * cache[f"{name}.hook_z"], rtol=1e-5, atol=1e-5)


def test_hook_context_exposes_name(setup):
    s = setup
    names = []
    run(s, fwd_hooks=[("decoder.blocks.*.hook_resid_post", lambda x, h: names.append(h.name))])
    assert names == [f"decoder.blocks.{i}.hook_resid_post" for i in range(s.cfg.n_layers)]


# ---------------------------------------------------------------------- errors and cleanup
class Boom(Exception):
    pass


def test_hooks_removed_after_a_hook_raises(setup):
    s = setup

    def explode(x, hook):
        raise Boom(hook.name)

    with pytest.raises(Boom, match="decoder.blocks.2.hook_mlp_out"):
        run(s, fwd_hooks=[("decoder.blocks.2.hook_mlp_out", explode), ("*.hook_resid_pre", lambda x, h: None)])
    assert not s.model.has_hooks
    with torch.no_grad():
        assert torch.equal(s.model(s.ids, s.canvas, s.sc), s.base)


def test_unknown_hook_name_suggests_nearest(setup):
    s = setup
    with pytest.raises(KeyError) as err:
        run(s, fwd_hooks=[("decoder.blocks.0.hook_resid_psot", lambda x, h: None)])
    assert "decoder.blocks.0.hook_resid_post" in str(err.value)
    assert "decoder.blocks.0.hook_resid_psot" in str(err.value)
    with pytest.raises(KeyError):
        s.model.add_hook("nothing.matches.*", lambda x, h: None)
    assert not s.model.has_hooks


@pytest.mark.parametrize(
    "bad, expect",
    [
        (lambda x, h: x[..., :-1], r"shape \(2, 8, 32\)"),
        (lambda x, h: x.to(torch.float64), "torch.float32"),
        (lambda x, h: x.tolist(), "tensor"),
    ],
    ids=["shape", "dtype", "not_a_tensor"],
)
def test_wrong_hook_result_raises_hook_error(setup, bad, expect):
    s = setup
    name = "decoder.blocks.1.hook_resid_mid"
    with pytest.raises(HookError) as err:
        run(s, fwd_hooks=[(name, bad)])
    message = str(err.value)
    assert name in message
    assert re.search(expect, message), message
    assert not s.model.has_hooks
    with torch.no_grad():
        assert torch.equal(s.model(s.ids, s.canvas, s.sc), s.base)


def test_hooks_context_manager_removes_on_exit_and_on_exception(setup):
    s = setup
    zero = ("decoder.blocks.0.hook_attn_out", lambda x, h: torch.zeros_like(x))
    with torch.no_grad():
        with s.model.hooks(fwd_hooks=[zero]) as m:
            assert m is s.model and s.model.has_hooks
            inside = s.model(s.ids, s.canvas, s.sc)
        assert not s.model.has_hooks
        assert not torch.equal(inside, s.base)
        with pytest.raises(Boom), s.model.hooks(fwd_hooks=[zero], bwd_hooks=[("decoder.hook_logits", zero[1])]):
            raise Boom()
        assert not s.model.has_hooks
        # Hooks added outside the context survive it.
        s.model.add_hook("decoder.hook_embed", lambda x, h: None)
        try:
            with s.model.hooks(fwd_hooks=[zero]):
                pass
            assert s.model.hook_dict["decoder.hook_embed"].fwd_fns
            assert not s.model.hook_dict["decoder.blocks.0.hook_attn_out"].fwd_fns
        finally:
            s.model.reset_hooks()
        assert torch.equal(s.model(s.ids, s.canvas, s.sc), s.base)


def test_glob_patterns_match(setup):
    s = setup
    n = s.cfg.n_layers
    assert s.model.resolve_hook_names("decoder.blocks.*.hook_resid_post") == [
        f"decoder.blocks.{i}.hook_resid_post" for i in range(n)
    ]
    assert len(s.model.resolve_hook_names("*.attn.hook_pattern")) == 2 * n
    with pytest.raises(KeyError, match="encoder.blocks.0.attn.hook_z"):  # one pattern of a list matches nothing
        s.model.resolve_hook_names(["decoder.hook_logits", "encoder.blocks.[01].hook_z*"])
    assert s.model.resolve_hook_names(["encoder.blocks.[01].attn.hook_z"]) == [
        "encoder.blocks.0.attn.hook_z",
        "encoder.blocks.1.attn.hook_z",
    ]


# ---------------------------------------------------------------------- caching
def test_run_with_cache_names_filter(setup):
    s = setup
    logits, cache = s.model.run_with_cache(s.ids, s.canvas, s.sc, names_filter="decoder.blocks.*.hook_resid_post")
    assert torch.equal(logits, s.base)
    assert sorted(cache) == sorted(f"decoder.blocks.{i}.hook_resid_post" for i in range(s.cfg.n_layers))
    names = ["decoder.hook_logits", "encoder.blocks.1.attn.hook_pattern"]
    _, cache = s.model.run_with_cache(s.ids, s.canvas, s.sc, names_filter=names)
    assert set(cache) == set(names)
    assert torch.equal(cache["decoder.hook_logits"], s.base)
    _, cache = s.model.run_with_cache(s.ids, s.canvas, s.sc, names_filter=lambda n: n.endswith("hook_z"))
    assert set(cache) == {n for n in s.model.hook_dict if n.endswith("hook_z")}
    _, cache = s.model.run_with_cache(s.ids, s.canvas, s.sc)
    # Every hook but the opt-in ones (per-head and per-expert outputs), which fire only when switched on.
    opt_in = {name for name, spec in hook_specs(s.cfg).items() if spec.opt_in}
    assert opt_in and all(n.endswith(("attn.hook_result", "moe.hook_expert_out")) for n in opt_in)
    assert set(cache) == {n for n in s.model.hook_dict if non_sampler(n)} - opt_in
    with pytest.raises(KeyError, match="decoder.blocks.0.hook_resid_post"):
        cache["decoder.blocks.0.hook_resid_psot"]
    assert not s.model.has_hooks


@pytest.fixture(scope="module")
def grad_model(setup):
    return HookedDiffusionGemma.from_pretrained(setup.reference).requires_grad_(True)


def test_backward_hooks_fire(setup, grad_model):
    s = setup
    grads: dict[str, torch.Tensor] = {}

    def keep(grad, hook):
        grads[hook.name] = grad.clone()

    bwd = [("decoder.hook_logits", keep), ("decoder.blocks.*.hook_resid_post", keep)]
    with grad_model.hooks(bwd_hooks=bwd):
        logits = grad_model(s.ids, s.canvas, s.sc)
        assert not grads  # nothing before backward
        logits.sum().backward()
    assert not grad_model.has_hooks
    assert torch.equal(grads["decoder.hook_logits"], torch.ones_like(logits))  # d(sum)/d(logits)
    for i in range(s.cfg.n_layers):
        g = grads[f"decoder.blocks.{i}.hook_resid_post"]
        assert g.shape == (BATCH, s.cfg.canvas_length, s.cfg.hidden_size) and g.abs().max() > 0

    # A backward hook that replaces the gradient changes the parameters' gradients.
    grad_model.zero_grad()
    with grad_model.hooks(bwd_hooks=[("decoder.hook_logits", lambda g, h: torch.zeros_like(g))]):
        grad_model(s.ids, s.canvas, s.sc).sum().backward()
    assert grad_model.decoder.embed.W_E.grad.abs().max() == 0

    # run_with_hooks removes its hooks when the forward returns; the backward of that forward still
    # runs the backward hooks that were attached during it.
    grads.clear()
    grad_model.zero_grad()
    out = grad_model.run_with_hooks(s.ids, s.canvas, s.sc, bwd_hooks=[("decoder.hook_logits", keep)])
    assert not grad_model.has_hooks
    out.sum().backward()
    assert set(grads) == {"decoder.hook_logits"}


# ---------------------------------------------------------------------- ActivationCache helpers
def test_activation_cache_residual_helpers(setup):
    s = setup
    logits, cache = s.model.run_with_cache(s.ids, s.canvas, s.sc)
    n, canvas, d = s.cfg.n_layers, s.cfg.canvas_length, s.cfg.hidden_size
    resid = cache.accumulated_resid()
    assert resid.shape == (n + 1, BATCH, canvas, d)
    assert torch.equal(resid[0], cache["decoder.blocks.0.hook_resid_pre"])
    assert torch.equal(resid[-1], cache[f"decoder.blocks.{n - 1}.hook_resid_post"])
    assert cache.accumulated_resid(stack="encoder").shape == (n + 1, BATCH, PROMPT, d)

    parts, labels = cache.decompose_resid(return_labels=True)
    assert parts.shape == (1 + 2 * n, BATCH, canvas, d)
    assert labels[0] == "embed" and len(labels) == len(parts)
    final = cache[f"decoder.blocks.{n - 1}.hook_resid_post"]
    torch.testing.assert_close(parts.sum(0), final, rtol=0, atol=summed_parts_atol(parts))
    # The layer scalars matter here: a decomposition ignoring them would not sum to the residual.
    assert not torch.allclose(parts.sum(0), parts.sum(0) / float(s.model.decoder.blocks[-1].layer_scalar))

    lens = cache.logit_lens()
    assert lens.shape == (n + 1, BATCH, canvas, s.cfg.vocab_size)
    torch.testing.assert_close(lens[-1], logits, rtol=0, atol=readout_atol(s.model, logits))
    assert not torch.allclose(lens[0], logits, atol=1e-2)
