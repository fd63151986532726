"""Tests for the toy-task suite: task formats, solvers, splits, tokenizer and batching."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from diffusionlens.toy import (
    CANVAS_LENGTH,
    EXAMPLE_PROMPTS,
    TASKS,
    VOCAB,
    build_tokenizer,
    decode_canvas,
    encode_answer,
    is_held_out,
    make_batch,
    make_dataset,
    sample_examples,
    solve,
    task_of,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def examples():
    return sample_examples(None, 8000, seed=1234)


# ------------------------------------------------------------------------------ tasks


@pytest.mark.parametrize(
    ("prompt", "answer", "task"),
    [
        ("347+589=", "936", "addition"),
        ("0+0=", "0", "addition"),
        ("999+999=", "1998", "addition"),
        ("squares 400 800:", "8: 441 484 529 576 625 676 729 784", "squares"),
        ("squares 401 440:", "0:", "squares"),
        ("squares 1 4:", "0:", "squares"),
        ("squares 1 5:", "1: 4", "squares"),
        ("squares 960 999:", "1: 961", "squares"),
        ("squares 61 245:", "8: 64 81 100 121 144 169 196 225", "squares"),
        ("sort 5 3 9 1:", "1 3 5 9", "sort"),
        ("sort 3 3 0:", "0 3 3", "sort"),
        ("reverse 7 2 4:", "4 2 7", "reverse"),
        ("reverse 1 2 3 4 5 6 7 8:", "8 7 6 5 4 3 2 1", "reverse"),
    ],
)
def test_exact_examples(prompt, answer, task):
    assert task_of(prompt).name == task
    assert TASKS[task].solve(prompt) == answer
    assert solve(prompt) == answer
    assert TASKS[task].is_correct(prompt, answer)
    assert not TASKS[task].is_correct(prompt, answer + " ")
    assert not TASKS[task].is_correct(prompt, answer[:-1])


def test_example_prompts_registry():
    assert EXAMPLE_PROMPTS["squares"] == "squares 400 800:"
    assert solve(EXAMPLE_PROMPTS["addition"]) == "936"
    assert set(EXAMPLE_PROMPTS) == set(TASKS)


@pytest.mark.parametrize(
    "prompt",
    [
        "347+589",  # missing '='
        "0347+1=",  # leading zero
        "1000+1=",  # 4 digits
        "squares 0 10:",  # a < 1
        "squares 10 10:",  # a == b
        "squares 20 10:",  # a > b
        "squares 1 999:",  # more than 8 squares
        "squares 5 1000:",  # out of range
        "sort 5:",  # one digit
        "sort 1 2 3 4 5 6 7 8 9:",  # nine digits
        "sort 12 3:",  # not single digits
        "reverse 1  2:",  # double space
        "Sort 1 2:",
        "",
    ],
)
def test_invalid_prompts_rejected(prompt):
    with pytest.raises(ValueError):
        solve(prompt)


def test_solve_agrees_with_samples(examples):
    assert {e.task for e in examples} == set(TASKS)
    for ex in examples:
        task = TASKS[ex.task]
        assert task_of(ex.prompt) is task
        assert task.solve(ex.prompt) == ex.answer
        assert task.is_correct(ex.prompt, ex.answer)


def test_solve_independent_reference(examples):
    """Compare against a straightforward reimplementation, not the module's own parser."""
    for ex in examples:
        if ex.task == "addition":
            a, b = ex.prompt[:-1].split("+")
            assert ex.answer == str(int(a) + int(b))
        elif ex.task == "squares":
            a, b = map(int, ex.prompt[len("squares ") : -1].split())
            sq = [r * r for r in range(0, 40) if a < r * r < b]
            assert ex.answer == " ".join([f"{len(sq)}:", *map(str, sq)])
        elif ex.task == "sort":
            ds = ex.prompt[len("sort ") : -1].split(" ")
            assert ex.answer == " ".join(sorted(ds, key=int))
        else:
            ds = ex.prompt[len("reverse ") : -1].split(" ")
            assert ex.answer == " ".join(ds[::-1])


def test_sample_ranges(examples):
    n_digits = Counter()
    list_lengths = Counter()
    for ex in examples:
        if ex.task == "addition":
            for operand in ex.prompt[:-1].split("+"):
                assert operand == str(int(operand))  # no leading zeros
                n_digits[len(operand)] += 1
        elif ex.task == "squares":
            a, b = map(int, ex.prompt[len("squares ") : -1].split())
            assert 1 <= a < b <= 999
        else:
            digits = ex.prompt.split(" ", 1)[1][:-1].split(" ")
            assert all(len(d) == 1 and d.isdigit() for d in digits)
            list_lengths[len(digits)] += 1
    assert set(n_digits) == {1, 2, 3}
    assert min(n_digits.values()) > 0.25 * sum(n_digits.values())
    assert set(list_lengths) == set(range(2, 9))


def test_squares_count_distribution_covers_0_to_8():
    exs = sample_examples("squares", 4500, seed=7)
    counts = Counter(int(e.answer.split(":")[0]) for e in exs)
    assert set(counts) == set(range(9))
    # roughly uniform: each count near 500
    assert min(counts.values()) > 350, counts
    for e in exs:
        k = int(e.answer.split(":")[0])
        assert len(e.answer.split(" ")) == k + 1
        if k == 0:
            assert e.answer == "0:"


def test_famous_squares_case_in_distribution():
    """The sampler reaches 'squares 400 800:' (count 8, first root 21, a in [400,440], b in [785,841])."""

    class Scripted(random.Random):
        def __init__(self, values):
            super().__init__(0)
            self.values = list(values)

        def randint(self, lo, hi):
            v = self.values.pop(0)
            assert lo <= v <= hi, (lo, v, hi)
            return v

    prompt, answer = TASKS["squares"].sample(Scripted([8, 21, 400, 800]))
    assert prompt == "squares 400 800:"
    assert answer == "8: 441 484 529 576 625 676 729 784"


def test_answers_fit_canvas(examples, tokenizer):
    longest = max(len(e.answer) for e in examples)
    assert longest <= 34
    # the longest possible answer: eight 3-digit squares, 24^2 .. 31^2
    assert solve("squares 575 999:") == "8: 576 625 676 729 784 841 900 961"
    assert len(solve("squares 575 999:")) == 34
    assert len(encode_answer(tokenizer, solve("squares 575 999:"), CANVAS_LENGTH)) == CANVAS_LENGTH
    for ex in examples:
        ids = encode_answer(tokenizer, ex.answer, CANVAS_LENGTH)
        assert len(ids) == CANVAS_LENGTH
        assert ids[len(ex.answer)] == tokenizer.eos_token_id


def test_sampling_deterministic():
    a = sample_examples(None, 300, seed=5)
    b = sample_examples(None, 300, seed=5)
    c = sample_examples(None, 300, seed=6)
    assert a == b
    assert a != c
    state = random.getstate()
    random.seed(0)
    x = sample_examples(["sort", "reverse"], 50, seed=1)
    random.seed(99)
    y = sample_examples(["sort", "reverse"], 50, seed=1)
    random.setstate(state)
    assert x == y
    assert {e.task for e in x} == {"sort", "reverse"}
    d1 = make_dataset(None, 200, seed=3, split="eval")
    d2 = make_dataset(None, 200, seed=3, split="eval")
    assert d1 == d2


def test_unknown_task_rejected():
    with pytest.raises(ValueError):
        sample_examples(["multiplication"], 3, seed=0)
    with pytest.raises(ValueError):
        make_dataset(None, 3, seed=0, split="test")


def test_training_variants_sample_hard_slices_of_their_tasks():
    from diffusionlens.toy.tasks import TRAINING_VARIANTS

    def bound_near_square(prompt: str) -> bool:
        bounds = [int(x) for x in prompt[len("squares ") : -1].split()]
        return min(abs(n - r * r) for n in bounds for r in range(33)) <= 2

    data = make_dataset(list(TRAINING_VARIANTS), 600, seed=7, weights=[0.5, 0.5])
    assert set(data.tasks) == {"addition", "squares"}  # examples carry the plain task's name
    squares_near, additions = 0, 0
    for ex in data:
        assert task_of(ex.prompt).name == ex.task and solve(ex.prompt) == ex.answer
        assert not is_held_out(ex.prompt)
        if ex.task == "addition":
            a, b = sorted(int(x) for x in ex.prompt[:-1].split("+"))
            assert a >= 10 and b >= 100
            additions += 1
        else:
            assert bound_near_square(ex.prompt)
            squares_near += 1
    assert additions > 200 and squares_near > 200
    # the plain tasks keep their own distribution: most squares bounds are nowhere near a square
    plain = make_dataset("squares", 400, seed=7, split="eval")
    assert sum(not bound_near_square(p) for p in plain.prompts) > 200


# ----------------------------------------------------------------------------- splits


def test_held_out_split_disjoint():
    train = make_dataset(None, 4000, seed=0, split="train")
    held = make_dataset(None, 1000, seed=0, split="eval")
    assert len(train) == 4000 and len(held) == 1000
    assert not set(train.prompts) & set(held.prompts)
    assert all(not is_held_out(p) for p in train.prompts)
    assert all(is_held_out(p) for p in held.prompts)
    for ex in held:
        assert solve(ex.prompt) == ex.answer
    # the eval split is a sizeable, non-degenerate fraction of the distribution
    all_prompts = make_dataset(None, 5000, seed=1, split="all").prompts
    frac = sum(map(is_held_out, all_prompts)) / len(all_prompts)
    assert 0.05 < frac < 0.15
    assert {t for t in held.tasks} == set(TASKS)


def test_held_out_stable_and_modulus():
    prompts = [e.prompt for e in sample_examples(None, 2000, seed=2)]
    # The split must not move between processes (Python's str hash is salted per process).
    script = "import sys; from diffusionlens.toy.tasks import is_held_out; print(''.join("
    script += "str(int(is_held_out(p))) for p in sys.stdin.read().splitlines()))"
    for hash_seed in ("1", "2"):
        other = subprocess.run(
            [sys.executable, "-c", script],
            input="\n".join(prompts[:300]),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        assert other.stdout.strip() == "".join(str(int(is_held_out(p))) for p in prompts[:300])
    frac4 = sum(is_held_out(p, 4) for p in prompts) / len(prompts)
    assert 0.18 < frac4 < 0.32
    with pytest.raises(ValueError):
        is_held_out("1+1=", 1)


def test_make_dataset_unique_and_exclude():
    d = make_dataset("sort", 300, seed=0, split="all", unique=True)
    assert len(set(d.prompts)) == 300
    excluded = set(EXAMPLE_PROMPTS.values())
    d2 = make_dataset("reverse", 400, seed=0, split="all", exclude={"reverse 1 2:", "reverse 7 2 4:"} | excluded)
    assert "reverse 1 2:" not in d2.prompts and "reverse 7 2 4:" not in d2.prompts
    with pytest.raises(RuntimeError):
        # a zero draw budget forces the give-up path instead of looping forever
        make_dataset("reverse", 50, seed=0, unique=True, max_tries_factor=0)


# -------------------------------------------------------------------------- tokenizer


def test_vocab_layout(tokenizer):
    assert len(VOCAB) < 64
    assert len(tokenizer) == len(VOCAB)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<pad>", "<eos>", "<bos>")
    for ch in "0123456789abcdefghijklmnopqrstuvwxyz +=:":
        assert ch in VOCAB and VOCAB[ch] >= 4
    assert len(set(VOCAB.values())) == len(VOCAB)


def test_prompt_encoding_is_bos_plus_chars(tokenizer, examples):
    for prompt in [*EXAMPLE_PROMPTS.values(), *(e.prompt for e in examples[:500])]:
        ids = tokenizer(prompt)["input_ids"]
        assert ids == [tokenizer.bos_token_id] + [VOCAB[c] for c in prompt]
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    assert tokenizer("sort 5 3 9 1:")["input_ids"][:3] == [2, VOCAB["s"], VOCAB["o"]]
    assert tokenizer(" ")["input_ids"] == [2, VOCAB[" "]]
    assert tokenizer("a  b")["input_ids"] == [2, VOCAB["a"], VOCAB[" "], VOCAB[" "], VOCAB["b"]]


def test_decode_no_inserted_spaces(tokenizer):
    for text in ["1 3 5 9", "8: 441 484 529 576 625 676 729 784", "0:", "936", "sort 5 3 9 1:"]:
        ids = [VOCAB[c] for c in text]
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(ids + [1, 0, 0], skip_special_tokens=True) == text


def test_save_and_autotokenizer_roundtrip(tokenizer, tmp_path, examples):
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert (tmp_path / "tokenizer_config.json").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    assert loaded.get_vocab() == tokenizer.get_vocab() == VOCAB
    texts = [*EXAMPLE_PROMPTS.values(), *(e.prompt for e in examples[:300]), *(e.answer for e in examples[:300])]
    for text in texts:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    batch_a = tokenizer(texts[:8], padding=True)["input_ids"]
    batch_b = loaded(texts[:8], padding=True)["input_ids"]
    assert batch_a == batch_b
    for ex in examples[:100]:
        canvas = encode_answer(loaded, ex.answer, CANVAS_LENGTH)
        assert canvas == encode_answer(tokenizer, ex.answer, CANVAS_LENGTH)
        assert decode_canvas(loaded, canvas) == ex.answer


def test_encode_answer_and_decode_canvas(tokenizer, examples):
    ids = encode_answer(tokenizer, "1 3 5 9", 48)
    assert ids == [VOCAB[c] for c in "1 3 5 9"] + [1] + [0] * 40
    assert decode_canvas(tokenizer, ids) == "1 3 5 9"
    assert decode_canvas(tokenizer, torch.tensor(ids)) == "1 3 5 9"
    squares = solve("squares 400 800:")
    assert decode_canvas(tokenizer, encode_answer(tokenizer, squares, 48)) == squares
    for ex in examples:
        assert decode_canvas(tokenizer, encode_answer(tokenizer, ex.answer, 48)) == ex.answer
    # cut at the first eos: anything after it is ignored
    assert decode_canvas(tokenizer, [VOCAB["9"], 1, VOCAB["7"], 1, 0]) == "9"
    # no eos: strip trailing pads only
    assert decode_canvas(tokenizer, [VOCAB["4"], VOCAB["2"], 0, 0]) == "42"
    # an interior pad before eos is not silently dropped
    assert decode_canvas(tokenizer, [VOCAB["4"], 0, VOCAB["2"], 1]) != "42"


def test_encode_answer_errors(tokenizer):
    with pytest.raises(ValueError, match="canvas_length"):
        encode_answer(tokenizer, "1" * 48, 48)
    assert len(encode_answer(tokenizer, "1" * 47, 48)) == 48
    with pytest.raises(ValueError, match="vocabulary"):
        encode_answer(tokenizer, "1-2", 48)


# ------------------------------------------------------------------------------ batch


def test_make_batch_shapes_and_left_padding(tokenizer):
    exs = [
        ("1+1=", "2"),
        ("squares 400 800:", "8: 441 484 529 576 625 676 729 784"),
        ("reverse 7 2 4:", "4 2 7"),
    ]
    batch = make_batch(tokenizer, exs, canvas_length=48)
    assert set(batch) == {"input_ids", "attention_mask", "canvas_ids"}
    width = 1 + len("squares 400 800:")
    assert batch["input_ids"].shape == (3, width)
    assert batch["attention_mask"].shape == (3, width)
    assert batch["canvas_ids"].shape == (3, 48)
    for v in batch.values():
        assert v.dtype == torch.int64
    for row, (prompt, answer) in enumerate(exs):
        n = len(prompt) + 1
        ids = batch["input_ids"][row].tolist()
        mask = batch["attention_mask"][row].tolist()
        assert ids[: width - n] == [0] * (width - n)  # left padding with pad id 0
        assert ids[width - n :] == [2] + [VOCAB[c] for c in prompt]
        assert mask == [0] * (width - n) + [1] * n
        assert batch["canvas_ids"][row].tolist() == encode_answer(tokenizer, answer, 48)
        assert decode_canvas(tokenizer, batch["canvas_ids"][row]) == answer
    # the longest prompt has no padding
    assert batch["attention_mask"][1].all()


def test_make_batch_accepts_examples_and_dataset(tokenizer):
    data = make_dataset(None, 16, seed=0)
    batch = make_batch(tokenizer, data.examples)
    assert batch["canvas_ids"].shape == (16, CANVAS_LENGTH)
    for row, ex in enumerate(data):
        assert decode_canvas(tokenizer, batch["canvas_ids"][row]) == ex.answer
        mask = batch["attention_mask"][row].bool()
        assert tokenizer.decode(batch["input_ids"][row][mask].tolist(), skip_special_tokens=True) == ex.prompt
    with pytest.raises(ValueError):
        make_batch(tokenizer, [])


def test_squares_sampler_covers_every_count_and_start():
    """Every (count k, first root r) cell of the valid prompt space is sampled."""
    exs = sample_examples("squares", 20000, seed=11)
    seen = set()
    for e in exs:
        a = int(e.prompt.split(" ")[1])
        k = int(e.answer.split(":")[0])
        r = 1
        while r * r <= a:
            r += 1
        seen.add((k, r - 1 if k == 0 else r))
    expected = {(0, r) for r in range(1, 32)} | {(k, r) for k in range(1, 9) for r in range(2, 32 - k + 1)}
    assert seen == expected


def test_wrong_answers_are_the_mismatched_problems_in_problem_order():
    from diffusionlens.toy.answers import WrongAnswer, wrong_answers

    data = make_dataset("reverse", 5, seed=3, split="eval")
    outputs = list(data.answers)
    outputs[3], outputs[1] = "x", ""
    assert wrong_answers(data, outputs) == [
        WrongAnswer(data.prompts[1], "", data.answers[1]),
        WrongAnswer(data.prompts[3], "x", data.answers[3]),
    ]
    assert wrong_answers(data, data.answers) == []
    with pytest.raises(ValueError, match="4 outputs for 5 problems"):
        wrong_answers(data, outputs[:4])
