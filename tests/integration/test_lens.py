"""The tuned lens per step and canvas-scope (#36), on the shipped toy: identity at init is the logit lens,
training lowers the KL on held-out runs, files round-trip and refuse another model, canvas-scope writes what a
patched generation writes and refuses a latent of another width."""

from __future__ import annotations

import pytest
import torch
from random_models import random_model
from tolerance import readout_atol

from diffusionlens import ReplayNoise, RowReplayNoise
from diffusionlens.analysis.logit_lens import logit_lens_logits
from diffusionlens.lens import StepTranslators, TunedLens, harvest_residuals, resid_hook
from diffusionlens.lens.commit_forecast import fit_multinomial, forecast_commits, forecast_rows
from diffusionlens.lens.fit import kl_table, logit_lens_reader, reader_kl, translated_reader
from diffusionlens.lens.scope import canvas_scope, canvas_scope_tokens
from diffusionlens.lens.translators import fitted_bucket_starts
from diffusionlens.patching.spec import Patch
from diffusionlens.toy import make_dataset


@pytest.fixture(scope="module")
def held_out(toy):
    prompts = make_dataset(None, 12, 7, split="eval", unique=True).prompts
    return harvest_residuals(toy, prompts, progress=False)


@pytest.fixture(scope="module")
def trained(toy):
    prompts = make_dataset(None, 48, 5, split="train", unique=True).prompts
    return TunedLens.train(toy, prompts, epochs=4, batch_size=1024, progress=False)


def test_harvest_rows_are_the_runs_steps(toy, held_out):
    n_layers, length = toy.cfg.num_hidden_layers, toy.cfg.canvas_length
    assert held_out.resid.shape[1:] == (n_layers, toy.cfg.hidden_size)
    assert len(held_out) % length == 0  # every kept (run, step) contributes every position
    # the last layer through the head is the model's own draft at that step
    draft = logit_lens_logits(toy, held_out.resid[:, -1]).argmax(-1)
    last_step = held_out.step == held_out.step.max()
    assert torch.equal(draft[last_step], held_out.final_token[last_step])
    # after a position commits, every later pass reads its final token in the canvas
    after = held_out.step > held_out.commit_step
    assert bool(after.any()) and torch.equal(held_out.input_token[after], held_out.final_token[after])


def test_untrained_lens_is_the_logit_lens_exactly(toy):
    ids = toy.to_tokens("sort 5 3 9 1:")
    settings = dict(noise=ReplayNoise(1), progress=False, max_new_tokens=toy.cfg.canvas_length)
    names = ["decoder.blocks.*.hook_resid_pre", "decoder.blocks.*.hook_resid_post"]
    _, cache = toy.generate_with_cache(ids, names_filter=names, **settings)
    for kind in ("step_embedding", "step_buckets"):
        lens = TunedLens.for_model(toy, kind)
        for step in cache.steps(0):
            lens_stack = cache.logit_lens(step)  # [layers + 1, batch, pos, vocab]: index l + 1 reads resid_post l
            for layer in range(toy.cfg.num_hidden_layers):
                resid = cache.get(resid_hook(layer), step=step)
                logits = lens(resid, layer=layer, step=step)
                assert torch.equal(logits, logit_lens_logits(toy, resid))  # the same kernels on the same tensor
                atol = readout_atol(toy, lens_stack[layer + 1])  # the cache's lens runs every layer at once
                torch.testing.assert_close(logits, lens_stack[layer + 1], rtol=0, atol=atol)


def test_training_lowers_the_kl_on_held_out_runs(toy, trained, held_out):
    logit = kl_table(reader_kl(toy, held_out, logit_lens_reader(toy)), held_out, held_out.in_answer)
    tuned = kl_table(
        reader_kl(toy, held_out, translated_reader(toy, trained.translators)), held_out, held_out.in_answer
    )
    below_last = slice(0, toy.cfg.num_hidden_layers - 1)
    assert bool((tuned.mean()[below_last] < logit.mean()[below_last]).all()), (tuned.mean(), logit.mean())
    assert float(tuned.mean()[-1]) == 0.0 and float(logit.mean()[-1]) == 0.0  # the last layer is the output
    losses = trained.metadata["train_losses"]
    assert losses[-1] < losses[0]


def test_save_load_round_trip(toy, trained, held_out, tmp_path):
    path = trained.save(tmp_path / "lens.safetensors")
    loaded = TunedLens.load(path, model=toy)
    assert loaded.kind == trained.kind and loaded.metadata == trained.metadata
    for name, tensor in trained.translators.state_dict().items():
        assert torch.equal(loaded.translators.state_dict()[name], tensor), name
    resid, steps = held_out.resid[:64, 2], held_out.step[:64]
    assert torch.equal(loaded(resid, layer=2, step=steps), trained(resid, layer=2, step=steps))


def test_load_refuses_another_model(toy, trained, tmp_path):
    path = trained.save(tmp_path / "lens.safetensors")
    with pytest.raises(ValueError, match="width 192 but the model's hidden_size is 24"):
        TunedLens.load(path, model=random_model(torch.float32))
    unattached = TunedLens.load(path)
    with pytest.raises(ValueError, match="no model attached"):
        unattached(torch.zeros(192), layer=0, step=0)
    other = type(toy).from_pretrained("toy", progress=False)
    with torch.no_grad():
        other.decoder.embed.W_E.mul_(1.5)
    with pytest.raises(ValueError, match="its weights differ"):
        TunedLens.load(path, model=other)
    with pytest.raises(ValueError, match="not a diffusionlens tuned lens"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        TunedLens.load(tmp_path / "other.safetensors", model=toy)


def test_lens_refuses_bad_reads(toy):
    lens = TunedLens.for_model(toy, max_steps=4)
    with pytest.raises(ValueError, match="d_model=192"):
        lens(torch.zeros(2, 100), layer=0, step=0)
    with pytest.raises(ValueError, match="steps must lie in 0 … 3"):
        lens(torch.zeros(2, 192), layer=0, step=4)
    with pytest.raises(IndexError, match="layers 0 … 5"):
        lens(torch.zeros(2, 192), layer=6, step=0)


def test_translator_buckets_route_each_step_to_its_range():
    translators = StepTranslators(1, 4, 40, (0, 1, 2, 4, 8), step_tables=False)
    assert translators.bucket_of(torch.tensor([0, 1, 2, 3, 4, 7, 8, 39])).tolist() == [0, 1, 2, 2, 3, 3, 4, 4]
    with torch.no_grad():
        translators.bias[0, 2] = 1.0  # only steps 2 and 3 move
    out = translators(torch.zeros(5, 4), 0, torch.tensor([0, 1, 2, 3, 4]))
    assert out[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="increase from 0"):
        StepTranslators(1, 4, 10, (1, 2))


def test_buckets_are_fitted_only_where_rows_are_enough():
    steps = torch.tensor([0] * 50 + [1] * 50 + [2] * 30 + [3] * 30 + [4] * 5 + [9] * 5)
    assert fitted_bucket_starts(steps, 40) == [0, 1, 2]  # 4-7 and 8-15 are too thin: they join 2-3
    assert fitted_bucket_starts(steps, 5) == [0, 1, 2, 4, 8]
    assert fitted_bucket_starts(steps, 1000) == [0]


def test_the_shipped_lens_beats_the_logit_lens_on_held_out_runs(toy, held_out):
    lens = TunedLens.load("toy", model=toy)
    assert lens.model is toy
    logit = kl_table(reader_kl(toy, held_out, logit_lens_reader(toy)), held_out, held_out.in_answer)
    tuned = kl_table(reader_kl(toy, held_out, translated_reader(toy, lens.translators)), held_out, held_out.in_answer)
    below_last = slice(0, toy.cfg.num_hidden_layers - 1)
    assert bool((tuned.mean()[below_last] < logit.mean()[below_last]).all()), (tuned.mean(), logit.mean())
    for column, step in enumerate(tuned.steps[:2]):  # steps 0 and 1 hold nearly every row
        assert bool((tuned.values[below_last, column] < logit.values[below_last, column]).all()), step
    assert TunedLens.load("toy").model.cfg == toy.cfg  # without a model, the shipped toy is attached


def test_canvas_scope_writes_what_a_patched_generation_writes(toy, held_out):
    layer, position = 3, 1
    row = int(((held_out.position == position) & (held_out.step == 0)).nonzero()[0])
    latent = held_out.resid[row, layer]
    tokens = canvas_scope_tokens(toy, latent, layer=layer, position=position, target="sort 1 2:", write_steps=3)
    donor = torch.zeros(1, toy.cfg.canvas_length, toy.cfg.hidden_size)
    donor[0, position] = latent
    patch = Patch(resid_hook(layer), source=donor, positions=[position])
    result = toy.generate(
        toy.to_tokens("sort 1 2:"),
        noise=RowReplayNoise([0]),
        fwd_hooks=patch.hooks(toy, 3),
        max_new_tokens=toy.cfg.canvas_length,
        max_denoising_steps=3,
        progress=False,
    )
    assert torch.equal(tokens, result.trace[0].final)
    text = canvas_scope(toy, latent, layer=layer, position=position, target="sort 1 2:", write_steps=3)
    eos = (tokens[0] == toy.cfg.eos_token_id).nonzero()
    cut = int(eos[0]) if len(eos) else toy.cfg.canvas_length
    assert text == toy.to_string(tokens[0, :cut], skip_special_tokens=True)


def test_canvas_scope_of_a_runs_own_latent_leaves_the_run_unchanged(toy):
    # one write-out step: the latent placed is the value the pass computes there anyway
    ids, layer = toy.to_tokens("reverse 7 2 4:"), 2
    settings = dict(noise=RowReplayNoise([0]), progress=False, max_new_tokens=toy.cfg.canvas_length)
    result, cache = toy.generate_with_cache(ids, names_filter=resid_hook(layer), max_denoising_steps=1, **settings)
    own = cache.get(resid_hook(layer), step=0)[0]  # [pos, d_model]
    batch = torch.arange(toy.cfg.canvas_length)
    tokens = canvas_scope_tokens(
        toy, own, layer=layer, position=batch, target=["reverse 7 2 4:"] * len(batch), write_steps=1
    )
    assert torch.equal(tokens, result.trace[0].final.expand(len(batch), -1))
    # other positions' latents in position 0's place change what the pass writes there
    others = canvas_scope_tokens(
        toy, own[1:], layer=layer, position=0, target=["reverse 7 2 4:"] * (len(batch) - 1), write_steps=1
    )
    assert bool((others[:, 0] != result.trace[0].final[0, 0]).any())


def test_canvas_scope_refuses_bad_input(toy):
    with pytest.raises(ValueError, match=r"expects \[192\] or \[batch, 192\]"):
        canvas_scope(toy, torch.zeros(100), layer=2)
    with pytest.raises(ValueError, match="route='resid' needs layer="):
        canvas_scope(toy, torch.zeros(192), layer=None)
    with pytest.raises(ValueError, match="pass layer=None"):
        canvas_scope(toy, torch.zeros(192), layer=2, route="self_cond")
    with pytest.raises(ValueError, match="route must be one of"):
        canvas_scope(toy, torch.zeros(192), layer=2, route="attn")
    with pytest.raises(ValueError, match="2 targets for 3 latents"):
        canvas_scope(toy, torch.zeros(3, 192), layer=2, target=["sort 1 2:", "sort 3 4:"])


def test_multinomial_probe_recovers_separable_labels():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    centres = torch.randn(4, 6, generator=generator) * 4
    x = centres[labels] + 0.1 * torch.randn(400, 6, generator=generator)
    weight, bias = fit_multinomial(x, labels, classes=4)
    assert torch.equal((x @ weight + bias).argmax(-1), labels)


def test_commit_forecast_scores_the_held_out_rows(toy, held_out):
    other = harvest_residuals(toy, make_dataset(None, 8, 11, split="eval", unique=True).prompts, progress=False)
    scores = forecast_commits(toy, held_out, other, tolerance=2)
    rows = forecast_rows(other)
    assert scores.n_test == len(rows) and scores.n_train == len(forecast_rows(held_out))
    to_go = (other.commit_step - other.step)[rows]
    assert bool((to_go >= 0).all()) and sum(scores.steps_to_go_histogram.values()) == len(rows)
    assert len(scores.within) == toy.cfg.num_hidden_layers
    assert all(0.0 <= e <= w <= 1.0 for e, w in zip(scores.exact, scores.within, strict=True))
    # the majority class of the training rows, scored on the test rows by hand
    majority = int(torch.bincount((held_out.commit_step - held_out.step)[forecast_rows(held_out)]).argmax())
    assert scores.majority_within == float(((to_go - majority).abs() <= 2).float().mean())


def test_probe_reader_is_trained_on_other_runs_and_scored_by_step(toy, held_out):
    from diffusionlens.features.probes import fit_logistic_probe
    from diffusionlens.lens.reading import compare_readers, reading_rows

    train = harvest_residuals(toy, make_dataset(None, 24, 13, split="train", unique=True).prompts, progress=False)
    table = compare_readers(toy, held_out, probe_data=train, routes=(), max_rows_per_step=None, progress=False)
    assert table.readers == ["logit lens", "linear probe", "target alone"]
    eos_ids = [toy.cfg.eos_token_id]
    sub = held_out.subset(reading_rows(held_out, eos_ids, None, None))
    fit = train.subset(reading_rows(train, eos_ids, None, None))
    last = toy.cfg.num_hidden_layers - 1
    by_hand = fit_logistic_probe(fit.resid[:, last], fit.final_token, sub.resid[:, last]) == sub.final_token
    expected = torch.stack([by_hand[sub.step == s].float().mean() for s in table.steps])
    assert torch.equal(table.accuracy["linear probe"][last], expected)
    # the last layer's residual is what the head reads: a probe on it reads the final tokens of unseen runs
    assert float(table.pooled("linear probe")[last]) > 0.5
    with pytest.raises(ValueError, match="shares 12 prompts"):
        compare_readers(toy, held_out, probe_data=held_out, routes=(), progress=False)


def test_canvas_scope_readers_are_canvas_scope_tokens_at_each_rows_position(toy, held_out):
    from diffusionlens.lens.reading import CONTROL, compare_readers, reading_rows

    table = compare_readers(toy, held_out, max_rows_per_step=2, progress=False)
    sub = held_out.subset(reading_rows(held_out, toy.cfg.eos_token_ids, None, 2))
    layer, positions = 1, sub.position

    def accuracy(tokens: torch.Tensor) -> torch.Tensor:
        right = tokens.gather(1, positions[:, None]).squeeze(1) == sub.final_token
        return torch.stack([right[sub.step == s].float().mean() for s in table.steps])

    for route, write_layer in (("resid", layer), ("self_cond", None)):
        tokens = canvas_scope_tokens(toy, sub.resid[:, layer], layer=write_layer, position=positions, route=route)
        assert torch.equal(table.accuracy[f"canvas-scope ({route})"][layer], accuracy(tokens))
    # the control: the bare target run, no latent written
    ids, mask = toy.to_tokens_and_mask([""] * len(sub))
    plain = toy.generate(
        ids,
        attention_mask=mask,
        noise=RowReplayNoise([0] * len(sub)),
        max_new_tokens=toy.cfg.canvas_length,
        max_denoising_steps=3,
        progress=False,
    )
    assert torch.equal(table.accuracy[CONTROL][layer], accuracy(plain.trace[0].final))


def test_logistic_probe_predicts_only_training_classes():
    from diffusionlens.features.probes import fit_logistic_probe

    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([3, 7, 11]).repeat_interleave(50)
    x = torch.randn(3, 5, generator=generator)[torch.arange(3).repeat_interleave(50)] * 5
    x = x + 0.1 * torch.randn(150, 5, generator=generator)
    assert torch.equal(fit_logistic_probe(x, labels, x), labels)
