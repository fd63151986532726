"""The organism's tasks with several valid answers (shuffle, pick) and its hedged training targets."""

from __future__ import annotations

import random
from itertools import permutations

import pytest
import torch

from diffusionlens.losses import denoising_loss
from diffusionlens.toy.answers import wrong_answers
from diffusionlens.toy.hedges import hedge_tensors, hedges_of
from diffusionlens.toy.tasks import (
    ALL_TASKS,
    PICK,
    SEVERAL_ANSWER_TASKS,
    SHUFFLE,
    TASKS,
    Example,
    ToyDataset,
    make_dataset,
    parse_task_names,
    sample_examples,
    task_of,
)
from diffusionlens.toy.tokenizer import CANVAS_LENGTH, VOCAB
from diffusionlens.toy.train import TrainSettings, hidden_hedges, plausible_hedge_noise, training_loss


def test_every_sampled_answer_is_valid_and_answers_vary():
    for name, task in SEVERAL_ANSWER_TASKS.items():
        examples = sample_examples(name, 300, seed=3)
        assert all(task.is_correct(e.prompt, e.answer) for e in examples)
        assert all(task.can_extend(e.prompt, e.answer[:cut]) for e in examples for cut in range(len(e.answer) + 1))
        prompt = examples[0].prompt
        rng = random.Random(0)
        drawn = {task.sample_answer(prompt, rng) for _ in range(200)}
        assert len(drawn) > 5 and all(task.is_correct(prompt, answer) for answer in drawn)
        assert task_of(prompt) is task


def test_shuffle_accepts_exactly_the_orderings_of_its_digits():
    prompt = "shuffle 5281:"
    valid = {"".join(p) for p in permutations("5281")}
    assert all(SHUFFLE.is_correct(prompt, text) for text in valid)
    for wrong in ("528", "52811", "5282", "12345", "1 2 5 8", ""):
        assert not SHUFFLE.is_correct(prompt, wrong)
    assert SHUFFLE.solve(prompt) == "1258"
    assert SHUFFLE.can_extend(prompt, "82") and not SHUFFLE.can_extend(prompt, "88")
    with pytest.raises(ValueError, match="repeat"):
        SHUFFLE.solve("shuffle 5581:")


def test_pick_accepts_increasing_choices_of_the_right_size_from_the_pool():
    prompt = "pick 3 of 52817:"
    assert PICK.solve(prompt) == "125"
    for right in ("125", "158", "578", "258"):
        assert PICK.is_correct(prompt, right)
    for wrong in ("152", "12", "1258", "129", "155"):
        assert not PICK.is_correct(prompt, wrong)
    # after "7" only "8" is larger: no third digit can follow
    assert PICK.can_extend(prompt, "57") and not PICK.can_extend(prompt, "78")
    with pytest.raises(ValueError, match="below the pool"):
        PICK.solve("pick 5 of 52817:")


def test_several_answer_tasks_stay_out_of_the_four_and_keep_the_split():
    assert set(TASKS) == {"addition", "squares", "sort", "reverse"}
    data = make_dataset(["shuffle", "pick"], 50, seed=1, split="eval")
    assert all(task_of(p).name in ("shuffle", "pick") for p in data.prompts)


def test_task_names_are_checked_before_anything_loads():
    assert parse_task_names("") is None
    assert parse_task_names("addition, pick") == ["addition", "pick"]
    assert list(ALL_TASKS) == [*TASKS, *SEVERAL_ANSWER_TASKS]
    with pytest.raises(ValueError, match="choose from .*'pick'"):
        parse_task_names("addition,picks")
    from diffusionlens.toy.evaluate import main as evaluate_main

    with pytest.raises(ValueError, match="picks"):  # refused before the checkpoint is read
        evaluate_main(["--model", "no/such/checkpoint", "--tasks", "picks"])


def test_wrong_answers_accept_any_valid_answer():
    data = ToyDataset(["shuffle", "shuffle", "addition"], ["shuffle 5281:"] * 2 + ["3+4="], ["5281"] * 2 + ["7"])
    wrong = wrong_answers(data, ["8215", "8225", "7"])
    assert [w.output for w in wrong] == ["8225"]


def test_addition_hedges_read_the_digit_to_the_right_and_spread_over_both_carries():
    hedges = hedges_of(Example("addition", "989+47=", "1036"))
    # units (position 3) read nothing; the leading carry digit (position 0) is not hedged
    assert [(h.position, h.reads) for h in hedges] == [(2, (3,)), (1, (2,))]
    tens, hundreds = hedges
    assert "3" in tens.alternatives and set(tens.alternatives) == {"2", "3"}  # 8 + 4, with or without a carry
    assert "0" in hundreds.alternatives and set(hundreds.alternatives) == {"9", "0"}  # 9 + 0
    assert hedges_of(Example("addition", "9+4=", "13")) == []


def test_squares_hedges_read_the_square_before_and_the_count_reads_the_list():
    answer = "8: 441 484 529 576 625 676 729 784"
    count, *digits = hedges_of(Example("squares", "squares 400 800:", answer))
    assert count.position == 0 and count.alternatives == "78"  # 9 squares cannot be
    assert count.reads == tuple(range(1, len(answer)))
    # 484's digits read 441's; unread, each may be 484's or 529's digit at that place
    first = [h for h in digits if h.reads == (3, 4, 5)]
    assert [(h.position, h.alternatives) for h in first] == [(7, "45"), (8, "28"), (9, "49")]
    assert {h.position for h in digits} == {p for p, c in enumerate(answer) if c.isdigit() and p >= 7}
    # a longer next square: 100 after 81 spreads over 100's first two digits only
    short = hedges_of(Example("squares", "squares 50 120:", "3: 64 81 100"))
    assert [(h.position, h.alternatives) for h in short[1:3]] == [(6, "18"), (7, "01")]
    (zero,) = hedges_of(Example("squares", "squares 401 440:", "0:"))
    assert zero.alternatives == "01" and zero.reads == (1,)
    assert hedges_of(Example("sort", "sort 3 1:", "1 3")) == []


def test_hedge_tensors_place_reads_and_spread_targets():
    examples = [Example("addition", "361+467=", "828"), Example("sort", "sort 3 1:", "1 3")]
    reads, spread = hedge_tensors(examples, CANVAS_LENGTH, len(VOCAB))
    assert reads.shape == (2, CANVAS_LENGTH, CANVAS_LENGTH) and spread.shape == (2, CANVAS_LENGTH, len(VOCAB))
    assert reads[0].nonzero().tolist() == [[0, 1], [1, 2]]
    assert not reads[1].any() and not spread[1].any()
    assert torch.allclose(spread[0].sum(-1)[:2], torch.ones(2)) and spread[0, 2:].sum() == 0
    assert spread[0, 1, VOCAB["2"]] == 0.5 and spread[0, 1, VOCAB["3"]] == 0.5  # 6 + 6, with or without a carry


@pytest.mark.without_shape_checks  # the wrong shape must reach the library's own message
def test_spread_targets_replace_the_exact_loss_only_where_a_row_is_given():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    target = torch.randint(0, 7, (2, 5))
    weights = torch.rand(2, 5) + 0.1
    spread = torch.zeros(2, 5, 7)
    spread[0, 1, [2, 4]] = 0.5
    exact = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    none_hidden = torch.zeros_like(spread)
    assert torch.allclose(
        denoising_loss(logits, target, weights=weights, spread_targets=none_hidden),
        (exact * weights).sum() / weights.sum(),
    )
    log_probs = torch.log_softmax(logits[0, 1], -1)
    expected = exact.clone()
    expected[0, 1] = -(log_probs[2] + log_probs[4]) / 2
    assert torch.allclose(
        denoising_loss(logits, target, weights=weights, spread_targets=spread),
        (expected * weights).sum() / weights.sum(),
    )
    with pytest.raises(ValueError, match="distribution"):
        denoising_loss(logits, target, spread_targets=spread * 2)
    with pytest.raises(ValueError, match="shape"):
        denoising_loss(logits, target, spread_targets=spread[:, :4])


def test_training_loss_hides_a_hedge_only_when_noise_replaced_what_it_reads(toy):
    model = toy
    examples = [Example("addition", "361+467=", "828")] * 4
    from diffusionlens.toy.data import make_batch
    from diffusionlens.toy.tokenizer import build_tokenizer

    batch = make_batch(build_tokenizer(), examples, CANVAS_LENGTH)
    settings = TrainSettings(self_cond_prob=0.0, plausible_noise=0.0)
    plain = training_loss(model, batch, settings, torch.Generator().manual_seed(5))
    batch["hedge_reads"], batch["hedge_spread"] = hedge_tensors(examples, CANVAS_LENGTH, model.cfg.vocab_size)
    hedged = training_loss(model, batch, settings, torch.Generator().manual_seed(5))
    no_reads = dict(batch, hedge_reads=torch.zeros_like(batch["hedge_reads"]))
    unhedged = training_loss(model, no_reads, settings, torch.Generator().manual_seed(5))
    assert torch.allclose(plain, unhedged)  # nothing read: exact targets everywhere, the same noise
    assert not torch.allclose(plain, hedged)


def test_the_trainers_command_line_reads_boolean_settings_as_flags():
    seen = {}

    def record(out, settings, progress, evaluate_fn):
        seen[out] = settings

    from diffusionlens.toy.train import run_training_command

    for argv, expected in ((["--out", "a"], False), (["--out", "b", "--hedged-targets"], True)):
        run_training_command(TrainSettings, record, lambda s: None, (argv, "train-toy", "", "runs/toy"))
        assert seen[argv[1]].hedged_targets is expected
    run_training_command(TrainSettings, record, lambda s: None, (["--out", "c", "--no-hedged-targets"], "", "", ""))
    assert seen["c"].hedged_targets is False


def test_a_hedge_is_hidden_when_most_of_what_it_reads_is_noise():
    reads = torch.zeros(1, 4, 4, dtype=torch.bool)
    reads[0, 0, [1, 2, 3]] = True  # position 0 reads three positions
    reads[0, 1, 2] = True  # position 1 reads one
    replaced = torch.tensor([[False, False, True, True]])
    assert hidden_hedges(reads, replaced).tolist() == [[True, True, False, False]]
    replaced = torch.tensor([[True, True, False, True]])
    assert hidden_hedges(reads, replaced).tolist() == [[True, False, False, False]]
    replaced = torch.tensor([[True, False, False, True]])
    assert hidden_hedges(reads, replaced).tolist() == [[False, False, False, False]]  # one of three: readable


def test_plausible_noise_shows_a_replaced_hedged_position_one_of_its_alternatives():
    examples = [Example("addition", "163+699=", "862")] * 200
    _, spread = hedge_tensors(examples, CANVAS_LENGTH, len(VOCAB))
    noisy = torch.full((200, CANVAS_LENGTH), VOCAB["z"])
    replaced = torch.zeros(200, CANVAS_LENGTH, dtype=torch.bool)
    replaced[:, :2] = True  # the two hedged digits are noise; the units digit is not hedged
    replaced[:100, 2] = True
    out = plausible_hedge_noise(noisy, replaced, spread, 1.0, torch.Generator().manual_seed(0))
    assert set(out[:, 0].tolist()) == {VOCAB["7"], VOCAB["8"]}  # 6 + 1, with or without a carry
    assert set(out[:, 1].tolist()) == {VOCAB["5"], VOCAB["6"]}
    assert (out[:, 2:] == VOCAB["z"]).all()  # not hedged: the uniform noise stays
    kept = plausible_hedge_noise(noisy, replaced & False, spread, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(kept, noisy)  # clean positions are never redrawn
    half = plausible_hedge_noise(noisy, replaced, spread, 0.5, torch.Generator().manual_seed(0))
    assert 60 < int((half[:, 0] != VOCAB["z"]).sum()) < 140


def test_plausible_noise_is_refused_outside_a_probability():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            TrainSettings(plausible_noise=bad)
    assert TrainSettings(plausible_noise=1.0).plausible_noise == 1.0
