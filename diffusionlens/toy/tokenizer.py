"""Character-level tokenizer for the toy tasks.

Built with the ``tokenizers`` library (WordLevel model over single characters, a ``Split``
pre-tokenizer that isolates every character including spaces, a ``Fuse`` decoder so decoding
concatenates without inserted spaces, and a ``TemplateProcessing`` post-processor that
prepends ``<bos>``), wrapped as a ``transformers.PreTrainedTokenizerFast``.

Special ids match DiffusionGemma's config defaults: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2;
then ``<unk>`` 3 and the characters.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOS_ID",
    "BOS_TOKEN",
    "CANVAS_LENGTH",
    "CHARS",
    "EOS_ID",
    "EOS_TOKEN",
    "PAD_ID",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "UNK_TOKEN",
    "VOCAB",
    "build_tokenizer",
    "decode_canvas",
    "encode_answer",
    "encode_prompt",
]

PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<bos>", "<unk>"
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN)

#: Characters in id order after the special tokens: digits, a-z, space, '+', '=', ':'.
CHARS: str = string.digits + string.ascii_lowercase + " +=:"

#: token -> id (44 entries).
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARS))}

#: Canvas length used by the toy model (longest answer is 34 chars + eos).
CANVAS_LENGTH = 48


def _build_raw_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK_TOKEN))
    # Every character (spaces included) becomes its own piece; no normalizer.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy character tokenizer. ``tokenizer(prompt)["input_ids"] == [bos] + char ids``.

    Padding side is left (prompts are left-padded for the causal encoder).
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_raw_tokenizer(),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    for name, want in (("pad", PAD_ID), ("eos", EOS_ID), ("bos", BOS_ID), ("unk", UNK_ID)):
        got = getattr(tokenizer, f"{name}_token_id")
        if got != want:  # pragma: no cover - guards against library behaviour changes
            raise RuntimeError(f"{name}_token_id is {got}, expected {want}")
    return tokenizer


def _char_ids(tokenizer: PreTrainedTokenizerFast, text: str, what: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(text))
    unk = tokenizer.unk_token_id
    bad = sorted({c for c, i in zip(text, ids, strict=True) if i is None or i == unk})
    if bad:
        raise ValueError(f"{what} {text!r} contains characters outside the toy vocabulary: {bad}")
    return list(ids)


def encode_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """``[bos] + char ids`` of ``prompt``; raises ``ValueError`` on out-of-vocabulary chars."""
    ids = tokenizer(prompt)["input_ids"]
    if tokenizer.unk_token_id in ids:
        _char_ids(tokenizer, prompt, "prompt")  # raises with the offending characters
    return list(ids)


def encode_answer(tokenizer: PreTrainedTokenizerFast, answer: str, canvas_length: int = CANVAS_LENGTH) -> list[int]:
    """Canvas target: answer chars, then eos, then pad up to ``canvas_length``.

    Raises ``ValueError`` if ``len(answer) + 1 > canvas_length`` or a char is out of vocabulary.
    """
    ids = _char_ids(tokenizer, answer, "answer") + [tokenizer.eos_token_id]
    if len(ids) > canvas_length:
        raise ValueError(f"answer {answer!r} needs {len(ids)} tokens (with eos) but canvas_length is {canvas_length}")
    return ids + [tokenizer.pad_token_id] * (canvas_length - len(ids))


def decode_canvas(tokenizer: PreTrainedTokenizerFast, ids: Sequence[int]) -> str:
    """Answer text from a canvas: cut at the first eos, strip pads, decode.

    Pads are stripped from both ends of the pre-eos segment; any other special token left
    inside it (an interior pad, bos, unk) is decoded literally (e.g. ``"<pad>"``) so that a
    malformed canvas never reads as a correct answer. Accepts a list or a 1-D tensor.
    """
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = [int(i) for i in ids]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    start, end = 0, len(ids)
    while start < end and ids[start] == pad:
        start += 1
    while end > start and ids[end - 1] == pad:
        end -= 1
    return tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
