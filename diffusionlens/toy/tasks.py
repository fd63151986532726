"""Synthetic tasks for a toy DiffusionGemma model organism.

Each task maps a short prompt to an answer string (the eos token is appended by the
tokenizer helpers, never by the task itself):

- ``addition``: ``"347+589="`` -> ``"936"``
- ``squares``: ``"squares 400 800:"`` -> ``"8: 441 484 529 576 625 676 729 784"``
- ``sort``: ``"sort 5 3 9 1:"`` -> ``"1 3 5 9"``
- ``reverse``: ``"reverse 7 2 4:"`` -> ``"4 2 7"``

Two tasks have several valid answers, so a denoiser cannot settle every position at once: the positions must
agree, and committing some first is what lets the rest follow (see ``SEVERAL_ANSWER_TASKS``):

- ``shuffle``: ``"shuffle 52817:"`` -> any order of those distinct digits, e.g. ``"71852"``
- ``pick``: ``"pick 3 of 52817:"`` -> any three of those digits in increasing order, e.g. ``"158"``

All sampling goes through an explicit :class:`random.Random`; nothing touches the global RNG.
Evaluation prompts are kept disjoint from training prompts by a stable hash of the prompt
text (see :func:`is_held_out`).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "ADDITION",
    "ALL_TASKS",
    "DEFAULT_HELD_OUT_MODULUS",
    "EXAMPLE_PROMPTS",
    "MAX_SQUARES",
    "PICK",
    "REVERSE",
    "SEVERAL_ANSWER_TASKS",
    "SHUFFLE",
    "SORT",
    "SQUARES",
    "SQUARES_MAX_BOUND",
    "TASKS",
    "TRAINING_VARIANTS",
    "Example",
    "Task",
    "ToyDataset",
    "is_held_out",
    "make_dataset",
    "parse_task_names",
    "sample_examples",
    "solve",
    "split_of",
    "task_of",
]


class Example(NamedTuple):
    """One (task, prompt, answer) triple. The answer excludes the eos token."""

    task: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A synthetic task: how to sample it, parse it and check answers."""

    name: str
    pattern: re.Pattern[str]
    _sample: Callable[[random.Random], str]
    _solve: Callable[[re.Match[str]], str]
    # Tasks with several valid answers: draw one at random, and check any answer against the prompt.
    _sample_answer: Callable[[re.Match[str], random.Random], str] | None = None
    _is_valid: Callable[[re.Match[str], str], bool] | None = None
    _can_extend: Callable[[re.Match[str], str], bool] | None = None

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """Sample one ``(prompt, answer)`` pair using ``rng`` only (for a task with several valid answers,
        one of them drawn uniformly)."""
        prompt = self._sample(rng)
        return prompt, self.sample_answer(prompt, rng)

    def sample_answer(self, prompt: str, rng: random.Random) -> str:
        """A right answer to `prompt`: the answer, or for a task with several, one drawn uniformly with `rng`."""
        answer = self.solve(prompt)
        if self._sample_answer is None:
            return answer
        return self._sample_answer(self.pattern.fullmatch(prompt), rng)

    def matches(self, prompt: str) -> bool:
        return self.pattern.fullmatch(prompt) is not None

    def solve(self, prompt: str) -> str:
        """Parse ``prompt`` and compute the exact answer (without eos).

        Raises ``ValueError`` if ``prompt`` is not a valid prompt for this task.
        """
        m = self.pattern.fullmatch(prompt)
        if m is None:
            raise ValueError(f"not a valid {self.name!r} prompt: {prompt!r}")
        return self._solve(m)

    def is_correct(self, prompt: str, answer_text: str) -> bool:
        """Whether a model answer (eos/pads already removed) is right: the answer exactly, or for a task with
        several valid answers, any of them."""
        if self._is_valid is None:
            return answer_text == self.solve(prompt)
        self.solve(prompt)  # validates the prompt
        return self._is_valid(self.pattern.fullmatch(prompt), answer_text)

    def can_extend(self, prompt: str, prefix: str) -> bool:
        """Whether some right answer starts with `prefix` (for a single-answer task: the answer does)."""
        answer = self.solve(prompt)
        if self._can_extend is None:
            return answer.startswith(prefix)
        return self._can_extend(self.pattern.fullmatch(prompt), prefix)


# --------------------------------------------------------------------------- addition


def _sample_operand(rng: random.Random) -> int:
    n_digits = rng.randint(1, 3)
    if n_digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (n_digits - 1), 10**n_digits - 1)


def _sample_addition(rng: random.Random) -> str:
    return f"{_sample_operand(rng)}+{_sample_operand(rng)}="


def _solve_addition(m: re.Match[str]) -> str:
    return str(int(m.group(1)) + int(m.group(2)))


_OPERAND = r"(0|[1-9][0-9]{0,2})"
ADDITION = Task("addition", re.compile(rf"{_OPERAND}\+{_OPERAND}="), _sample_addition, _solve_addition)

# ---------------------------------------------------------------------------- squares

SQUARES_MAX_BOUND = 999
MAX_SQUARES = 8
_MAX_ROOT = 31  # 31**2 = 961 is the largest square <= 999


def _squares_between(a: int, b: int) -> list[int]:
    """Perfect squares strictly between ``a`` and ``b``."""
    out = []
    r = 0
    while r * r <= a:
        r += 1
    while r * r < b:
        out.append(r * r)
        r += 1
    return out


def _sample_squares(rng: random.Random) -> str:
    """Choose the count first (uniform over 0..8), then a run of roots, then bounds."""
    k = rng.randint(0, MAX_SQUARES)
    top = SQUARES_MAX_BOUND
    if k == 0:
        # a, b both in [r^2, (r+1)^2] (clipped to [1, 999]): nothing strictly between.
        r = rng.randint(1, _MAX_ROOT)
        hi = min((r + 1) ** 2, top)
        a = rng.randint(r * r, hi - 1)
        b = rng.randint(a + 1, hi)
    else:
        # squares r^2 .. (r+k-1)^2; need 1 <= a < r^2 (so r >= 2) and (r+k-1)^2 < b <= 999.
        r = rng.randint(2, _MAX_ROOT - k + 1)
        a = rng.randint(max(1, (r - 1) ** 2), r * r - 1)
        b = rng.randint((r + k - 1) ** 2 + 1, min((r + k) ** 2, top))
    return f"squares {a} {b}:"


def _solve_squares(m: re.Match[str]) -> str:
    a, b = int(m.group(1)), int(m.group(2))
    if not (1 <= a < b <= SQUARES_MAX_BOUND):
        raise ValueError(f"squares bounds must satisfy 1 <= a < b <= {SQUARES_MAX_BOUND}, got {a} {b}")
    sq = _squares_between(a, b)
    if len(sq) > MAX_SQUARES:
        raise ValueError(f"squares prompt has {len(sq)} > {MAX_SQUARES} squares between {a} and {b}")
    return f"{len(sq)}:" + "".join(f" {s}" for s in sq)


_BOUND = r"([1-9][0-9]{0,2})"
SQUARES = Task("squares", re.compile(rf"squares {_BOUND} {_BOUND}:"), _sample_squares, _solve_squares)

# ------------------------------------------------------------------- sort and reverse

_MIN_DIGITS, _MAX_DIGITS = 2, 8
_DIGIT_LIST = r"([0-9](?: [0-9]){1,7})"


def _sample_digits(rng: random.Random) -> str:
    n = rng.randint(_MIN_DIGITS, _MAX_DIGITS)
    return " ".join(str(rng.randint(0, 9)) for _ in range(n))


def _sample_sort(rng: random.Random) -> str:
    return f"sort {_sample_digits(rng)}:"


def _sample_reverse(rng: random.Random) -> str:
    return f"reverse {_sample_digits(rng)}:"


def _solve_sort(m: re.Match[str]) -> str:
    return " ".join(sorted(m.group(1).split(" ")))


def _solve_reverse(m: re.Match[str]) -> str:
    return " ".join(reversed(m.group(1).split(" ")))


SORT = Task("sort", re.compile(rf"sort {_DIGIT_LIST}:"), _sample_sort, _solve_sort)
REVERSE = Task("reverse", re.compile(rf"reverse {_DIGIT_LIST}:"), _sample_reverse, _solve_reverse)

# ------------------------------------------------------------ tasks with several valid answers

_DIGITS = "0123456789"
_DIGIT_SET = r"([0-9]{2,10})"


def _distinct(m: re.Match[str], group: int = 1) -> str:
    digits = m.group(group)
    if len(set(digits)) != len(digits):
        raise ValueError(f"the digits {digits!r} repeat; give distinct digits")
    return digits


def _sample_shuffle(rng: random.Random) -> str:
    return f"shuffle {''.join(rng.sample(_DIGITS, rng.randint(6, 9)))}:"


def _solve_shuffle(m: re.Match[str]) -> str:
    return "".join(sorted(_distinct(m)))  # the canonical answer; any order is valid


def _shuffle_answer(m: re.Match[str], rng: random.Random) -> str:
    return "".join(rng.sample(m.group(1), len(m.group(1))))


def _is_shuffle(m: re.Match[str], text: str) -> bool:
    return sorted(text) == sorted(m.group(1))  # the prompt's digits are distinct (solve checks)


def _can_extend_shuffle(m: re.Match[str], prefix: str) -> bool:
    return len(set(prefix)) == len(prefix) and set(prefix) <= set(m.group(1))


def _sample_pick(rng: random.Random) -> str:
    pool = "".join(rng.sample(_DIGITS, rng.randint(8, 10)))
    return f"pick {rng.randint(5, len(pool) - 2)} of {pool}:"


def _solve_pick(m: re.Match[str]) -> str:
    k, pool = int(m.group(1)), _distinct(m, 2)
    if not 1 <= k < len(pool):
        raise ValueError(f"pick {k} of {len(pool)} digits: k must be at least 1 and below the pool's size")
    return "".join(sorted(pool)[:k])  # the canonical answer: the k smallest


def _pick_answer(m: re.Match[str], rng: random.Random) -> str:
    return "".join(sorted(rng.sample(m.group(2), int(m.group(1)))))


def _is_pick(m: re.Match[str], text: str) -> bool:
    return len(text) == int(m.group(1)) and _is_pick_shaped(text, m.group(2))


def _can_extend_pick(m: re.Match[str], prefix: str) -> bool:
    k, pool = int(m.group(1)), m.group(2)
    if not (len(prefix) <= k and _is_pick_shaped(prefix, pool)):
        return False
    larger = sum(digit > prefix[-1] for digit in pool) if prefix else len(pool)
    return larger >= k - len(prefix)


def _is_pick_shaped(text: str, pool: str) -> bool:
    return all(a < b for a, b in zip(text, text[1:], strict=False)) and set(text) <= set(pool)


SHUFFLE = Task(
    "shuffle",
    re.compile(rf"shuffle {_DIGIT_SET}:"),
    _sample_shuffle,
    _solve_shuffle,
    _shuffle_answer,
    _is_shuffle,
    _can_extend_shuffle,
)
PICK = Task(
    "pick",
    re.compile(rf"pick ([1-9]) of {_DIGIT_SET}:"),
    _sample_pick,
    _solve_pick,
    _pick_answer,
    _is_pick,
    _can_extend_pick,
)

# ---------------------------------------------------------------------------- registry

TASKS: dict[str, Task] = {t.name: t for t in (ADDITION, SQUARES, SORT, REVERSE)}

#: Tasks whose prompts have several valid answers (a training example draws one); `Task.is_correct` accepts any.
SEVERAL_ANSWER_TASKS: dict[str, Task] = {t.name: t for t in (SHUFFLE, PICK)}

#: Every task a prompt can belong to: the four, then those with several answers.
ALL_TASKS: dict[str, Task] = {**TASKS, **SEVERAL_ANSWER_TASKS}


def parse_task_names(text: str) -> list[str] | None:
    """`"addition,pick"` -> ["addition", "pick"]; "" -> None (the default tasks). Unknown names are refused
    naming the tasks there are, so a command line can check them before it loads a model."""
    if not text:
        return None
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(ALL_TASKS)}")
    return names


# ------------------------------------------------------------------ training variants
# The stage-4 checkpoint's errors cluster where the plain samplers rarely go: addition's tens and hundreds
# digits when both operands have two or three digits, and squares whose bound lies next to a square
# (``squares 50 100:`` -> ``3: 64 81 100``). These variants draw only such prompts, in the same formats and
# with the same answers, so a training mix can oversample them; evaluation always uses the plain tasks.

_NEAR_SQUARE = 2
_MAX_REJECTIONS = 1000


def _rejection_sampled(
    sample: Callable[[random.Random], str], accept: Callable[[str], bool], what: str
) -> Callable[[random.Random], str]:
    def draw(rng: random.Random) -> str:
        for _ in range(_MAX_REJECTIONS):
            prompt = sample(rng)
            if accept(prompt):
                return prompt
        raise RuntimeError(f"no {what} prompt in {_MAX_REJECTIONS} draws")

    return draw


def _is_multi_digit_sum(prompt: str) -> bool:
    a, b = (int(x) for x in ADDITION.pattern.fullmatch(prompt).groups())
    return min(a, b) >= 10 and max(a, b) >= 100


def _distance_to_square(n: int) -> int:
    root = math.isqrt(n)
    return min(n - root * root, (root + 1) ** 2 - n)


def _has_bound_near_square(prompt: str) -> bool:
    a, b = (int(x) for x in SQUARES.pattern.fullmatch(prompt).groups())
    return min(_distance_to_square(a), _distance_to_square(b)) <= _NEAR_SQUARE


ADDITION_MULTI_DIGIT = Task(
    "addition",
    ADDITION.pattern,
    _rejection_sampled(_sample_addition, _is_multi_digit_sum, "multi-digit addition"),
    _solve_addition,
)
SQUARES_NEAR_BOUND = Task(
    "squares",
    SQUARES.pattern,
    _rejection_sampled(_sample_squares, _has_bound_near_square, "near-square bound"),
    _solve_squares,
)

#: Extra names a training mix may use (``--task-weights addition_multi_digit=0.2,...``). Each samples a
#: harder slice of a registered task; its examples carry the plain task's name.
TRAINING_VARIANTS: dict[str, Task] = {
    "addition_multi_digit": ADDITION_MULTI_DIGIT,
    "squares_near_bound": SQUARES_NEAR_BOUND,
}

#: The canonical example prompt of each task (used in docs and interpretability demos).
EXAMPLE_PROMPTS: dict[str, str] = {
    "addition": "347+589=",
    "squares": "squares 400 800:",
    "sort": "sort 5 3 9 1:",
    "reverse": "reverse 7 2 4:",
}


def task_of(prompt: str) -> Task:
    """The task whose format ``prompt`` matches. Raises ``ValueError`` if none does."""
    for task in ALL_TASKS.values():
        if task.matches(prompt):
            return task
    raise ValueError(f"prompt matches no task: {prompt!r}")


def solve(prompt: str) -> str:
    """Answer any valid prompt of any registered task."""
    return task_of(prompt).solve(prompt)


# ----------------------------------------------------------------------------- splits

DEFAULT_HELD_OUT_MODULUS = 10


def is_held_out(prompt: str, modulus: int = DEFAULT_HELD_OUT_MODULUS) -> bool:
    """Whether ``prompt`` belongs to the evaluation split.

    Stable across processes (sha256, not Python's salted ``hash``): a prompt is held out iff
    ``sha256(prompt) % modulus == 0``, i.e. about ``1/modulus`` of all prompts.
    """
    if modulus < 2:
        raise ValueError(f"modulus must be >= 2, got {modulus}")
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % modulus == 0


def split_of(prompt: str, modulus: int = DEFAULT_HELD_OUT_MODULUS) -> str:
    """``"eval"`` if the prompt is held out, else ``"train"``."""
    return "eval" if is_held_out(prompt, modulus) else "train"


# ---------------------------------------------------------------------------- sampling


def _resolve(task_names: str | Sequence[str] | None) -> list[Task]:
    if task_names is None:
        names: list[str] = list(TASKS)
    elif isinstance(task_names, str):
        names = [task_names]
    else:
        names = list(task_names)
    if not names:
        raise ValueError("task_names is empty")
    known = {**ALL_TASKS, **TRAINING_VARIANTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(known)}")
    return [known[n] for n in names]


def _stream(tasks: list[Task], rng: random.Random, weights: Sequence[float] | None) -> Iterator[Example]:
    if weights is not None and len(weights) != len(tasks):
        raise ValueError(f"{len(weights)} weights for {len(tasks)} tasks")
    while True:
        task = tasks[0] if len(tasks) == 1 else rng.choices(tasks, weights=weights)[0]
        prompt, answer = task.sample(rng)
        yield Example(task.name, prompt, answer)


def sample_examples(
    task_names: str | Sequence[str] | None,
    n: int,
    seed: int,
    weights: Sequence[float] | None = None,
) -> list[Example]:
    """``n`` examples from a deterministic mixture of tasks (``None`` = all tasks).

    Each example picks its task with ``weights`` (uniform by default), then samples from it.
    The same arguments always give the same list. No split filtering; see :func:`make_dataset`.
    """
    rng = random.Random(seed)
    stream = _stream(_resolve(task_names), rng, weights)
    return [next(stream) for _ in range(n)]


@dataclass
class ToyDataset:
    """Parallel lists of tasks, prompts and answers (answers exclude eos)."""

    tasks: list[str]
    prompts: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Example:
        return Example(self.tasks[i], self.prompts[i], self.answers[i])

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]

    @property
    def examples(self) -> list[Example]:
        return list(self)


def make_dataset(
    task_names: str | Sequence[str] | None,
    n: int,
    seed: int,
    split: str = "train",
    held_out_modulus: int = DEFAULT_HELD_OUT_MODULUS,
    unique: bool = False,
    weights: Sequence[float] | None = None,
    exclude: Collection[str] = (),
    max_tries_factor: int = 1000,
) -> ToyDataset:
    """``n`` examples of ``split`` (``"train"``, ``"eval"`` or ``"all"``), deterministic in ``seed``.

    Prompts are rejection-sampled so that every ``"train"`` prompt satisfies
    ``not is_held_out(prompt, held_out_modulus)`` and every ``"eval"`` prompt satisfies
    ``is_held_out(...)``: the two splits never share a prompt, whatever the seeds.
    Prompts in ``exclude`` are never emitted (e.g. ``EXAMPLE_PROMPTS.values()`` to keep the
    showcase prompts out of training; they all hash to the train split at the default modulus).
    With ``unique=True`` no prompt repeats within the dataset (raises ``RuntimeError`` if the
    task space is too small to supply ``n`` distinct prompts within ``max_tries_factor * n`` draws).
    """
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    rng = random.Random(seed)
    stream = _stream(_resolve(task_names), rng, weights)
    exclude = set(exclude)
    out = ToyDataset([], [], [])
    seen: set[str] = set()
    max_tries = max(1, max_tries_factor * n)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise RuntimeError(f"could only find {len(out)} of {n} {split} examples in {max_tries} draws")
        ex = next(stream)
        if split != "all" and (split == "eval") != is_held_out(ex.prompt, held_out_modulus):
            continue
        if ex.prompt in exclude:
            continue
        if unique:
            if ex.prompt in seen:
                continue
            seen.add(ex.prompt)
        out.tasks.append(ex.task)
        out.prompts.append(ex.prompt)
        out.answers.append(ex.answer)
    return out
