"""Tokenisation helpers with TransformerLens's names and meanings, plus chat-template inputs.

Mixed into `HookedDiffusionGemma`; everything goes through `model.tokenizer`.

Differences from TransformerLens, both for the encoder-decoder layout: `prepend_bos=None` means
"whatever the tokenizer does by itself" (DiffusionGemma's tokenizer adds `<bos>`), and
`padding_side=None` means left, because `generate` puts the canvas right after the prompt's last
position, so a batch of prompts must end together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int, Num

PaddingSide = Literal["left", "right"]
# What a tokenizer's __call__ / apply_chat_template can hand back: a BatchEncoding or dict with
# input_ids (+ attention_mask), a tensor of ids, or plain lists of ids.
TokenizedInput = Mapping[str, Any] | torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


def check_token_ids(
    ids: Int[torch.Tensor, "batch pos"] | Int[torch.Tensor, " pos"], name: str, vocab_size: int, device: torch.device
) -> Int[torch.Tensor, "batch pos"]:
    """`ids` as a `[batch, pos]` long tensor on `device`; a 1-D tensor gains a batch axis.

    Raises a TypeError for non-integer input and a ValueError naming `name` for a wrong rank or ids
    outside `[0, vocab_size)`, so every model and entry point refuses bad tokens the same way.
    """
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16):
        raise TypeError(f"{name} must be an integer tensor of token ids, got {getattr(ids, 'dtype', type(ids))}")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"{name} must be [batch, pos], got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} contains ids outside the vocabulary [0, {vocab_size}): "
            f"min {int(ids.min())}, max {int(ids.max())}; check the tokenizer matches the model"
        )
    return ids.to(device=device, dtype=torch.long)


def checked_attention_mask(
    attention_mask: Bool[torch.Tensor, "batch pos"] | Int[torch.Tensor, "batch pos"] | None,
    input_ids: Int[torch.Tensor, "batch pos"],
    fresh: bool = True,
    left_padded: bool = True,
) -> Bool[torch.Tensor, "batch pos"]:
    """The boolean mask of `input_ids` on their device: all True when None.

    Refused, before any work: anything but a bool or integer tensor (a float mask is ambiguous), a
    shape other than the ids', integer values other than 0
    and 1 (2 or -1 would read as True), and, when `fresh` (a prompt with nothing encoded before it),
    a row with no 1 at all: a prompt of padding only, which the decoder cannot attend to. With
    `left_padded` (the diffusion model: its canvas follows the prompt's last position, so padding after
    a token, right padding or a hole, would move the canvas away from the prompt and change every
    logit), a fresh row whose 0s do not all come before its 1s.
    """
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a tensor of 0/1 (or bool) values, got {type(attention_mask).__name__}; "
            "use torch.tensor(mask) or the mask from model.to_tokens_and_mask"
        )
    if attention_mask.dtype != torch.bool and (attention_mask.is_floating_point() or attention_mask.is_complex()):
        raise TypeError(
            f"attention_mask must be bool or integer 0/1, got {attention_mask.dtype}; convert it with "
            "mask.bool() (or mask > 0.5) after checking what its values mean"
        )
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
            f"{tuple(input_ids.shape)}; pass one mask entry per token"
        )
    if attention_mask.numel() == 0:
        return attention_mask.to(device=input_ids.device, dtype=torch.bool)
    # One host sync for both checks; the details are worked out only when something is wrong.
    not_binary = (attention_mask != 0) & (attention_mask != 1) if attention_mask.dtype != torch.bool else None
    empty_rows = (attention_mask == 0).all(dim=-1) if fresh else None
    token = attention_mask != 0
    pad_after_token = token[:, :-1] & ~token[:, 1:] if fresh and left_padded else None
    problems = [p.any() for p in (not_binary, empty_rows, pad_after_token) if p is not None]
    if problems and bool(torch.stack(problems).any()):
        _raise_mask_problem(attention_mask, not_binary, empty_rows, pad_after_token)
    return attention_mask.to(device=input_ids.device, dtype=torch.bool)


def _raise_mask_problem(
    attention_mask: torch.Tensor,
    not_binary: torch.Tensor | None,
    empty_rows: torch.Tensor | None,
    pad_after_token: torch.Tensor | None,
) -> None:
    """The error for the first problem `checked_attention_mask` found."""
    if not_binary is not None and bool(not_binary.any()):
        where = tuple(int(i) for i in not_binary.nonzero()[0])
        raise ValueError(
            f"attention_mask{list(where)} = {int(attention_mask[where])}; a mask holds only 1 (token) and "
            "0 (padding): pass (mask != 0) if every nonzero value means a token"
        )
    if empty_rows is not None and bool(empty_rows.any()):
        row = int(empty_rows.nonzero()[0, 0])
        raise ValueError(
            f"attention_mask row {row} is all 0: that prompt has no token to attend to; give every row at "
            "least one real token (e.g. bos) or drop the row"
        )
    row, pos = (int(i) for i in pad_after_token.nonzero()[0])
    raise ValueError(
        f"attention_mask row {row} has padding (0) after a token (1) at position {pos + 1}: the prompt must be "
        "left-padded (0s, then 1s), since the canvas follows the prompt's last position and padding there "
        "would move it; re-pad it with ids, mask = model.to_tokens_and_mask({'input_ids': ids, "
        "'attention_mask': mask}) (left padding by default)"
    )


class TokenHelpers:
    """to_tokens, to_tokens_and_mask, to_str_tokens, to_single_token, get_token_position."""

    tokenizer: Any
    device: torch.device
    #: What `prepend_bos=None` means (TransformerLens's `cfg.default_prepend_bos`): None = as the tokenizer
    #: does by itself (Gemma's adds `<bos>`), True / False = with / without one. Set it on the model.
    default_prepend_bos: bool | None = None
    #: What `padding_side=None` means (TransformerLens's `cfg.default_padding_side`). Left by default:
    #: `generate` writes the canvas right after each prompt's last token. The tokenizer's own
    #: `padding_side` is not read, for that reason.
    default_padding_side: PaddingSide = "left"

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Attach a tokenizer (TransformerLens's method; the same as `model.tokenizer = tokenizer`)."""
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ text -> ids
    def to_tokens(
        self,
        input: str | list[str] | TokenizedInput,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        move_to_device: bool = True,
        truncate: bool = False,
    ) -> Int[torch.Tensor, "batch pos"]:
        """Token ids `[batch, pos]` of a string or list of strings (padded; see `to_tokens_and_mask`).

        prepend_bos: None = `self.default_prepend_bos` (itself None by default: as the tokenizer does by
        itself); True/False = with/without one `<bos>` (the tokenizer's own special tokens are then not
        added). padding_side: None = `self.default_padding_side` (left). move_to_device: False keeps the
        ids on the CPU (TransformerLens's flag). truncate: True keeps each row's first
        `max_position_embeddings - canvas_length` tokens, the longest prompt a pass has room for; off by
        default (TransformerLens truncates by default), so a long prompt is never cut without asking.
        """
        if not isinstance(move_to_device, bool) or not isinstance(truncate, bool):
            raise TypeError("move_to_device and truncate must be True or False")
        ids = self.to_tokens_and_mask(input, prepend_bos, padding_side, truncate=truncate)[0]
        return ids if move_to_device else ids.cpu()

    def to_tokens_and_mask(
        self,
        input: str | list[str] | TokenizedInput | None = None,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        *,
        chat: list[dict[str, Any]] | list[list[dict[str, Any]]] | None = None,
        add_generation_prompt: bool = True,
        truncate: bool = False,
        **chat_template_kwargs: Any,
    ) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
        """`(input_ids, attention_mask)` ready for `generate(input_ids, attention_mask=...)`.

        `input` is text (a string or a list of strings), or something already tokenised: the
        output of `tokenizer(...)` or `tokenizer.apply_chat_template(...)` (a BatchEncoding or
        dict with input_ids and maybe attention_mask, a tensor, a list of ids or of id lists).
        Or pass `chat=` messages (one conversation, or a list of them): they go through the
        tokenizer's chat template, with the generation prompt appended by default.
        Rows are padded (left unless `padding_side="right"`) with the tokenizer's pad id; the mask
        is 1 on tokens, 0 on padding. `truncate`: as in `to_tokens`.
        """
        side = _padding_side(self.default_padding_side if padding_side is None else padding_side)
        if (input is None) == (chat is None):
            raise ValueError("pass either input (text or token ids) or chat= (messages), exactly one of them")
        if chat is not None:
            rows = self._chat_rows(chat, add_generation_prompt, chat_template_kwargs)
        elif isinstance(input, str) or (isinstance(input, list) and input and all(isinstance(t, str) for t in input)):
            texts = [input] if isinstance(input, str) else input
            rows = [self._text_ids(text, prepend_bos) for text in texts]
        else:
            if prepend_bos is not None:
                raise ValueError(
                    "prepend_bos applies to text; these inputs are already token ids (add or drop bos yourself)"
                )
            rows = _rows_of_ids(input)
        if truncate:
            cfg = self.cfg  # type: ignore[attr-defined]
            rows = [row[: cfg.max_position_embeddings - cfg.canvas_length] for row in rows]
        return self._pad(rows, side)

    def _text_ids(self, text: str, prepend_bos: bool | None) -> list[int]:
        tok = self.need_tokenizer()
        if prepend_bos is None:
            prepend_bos = self.default_prepend_bos
        if prepend_bos is None:
            return list(tok(text)["input_ids"])
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        if not prepend_bos:
            return ids
        if tok.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no bos token; pass prepend_bos=False")
        return [tok.bos_token_id, *ids]

    def _chat_rows(
        self, chat: list[dict[str, Any]] | list[list[dict[str, Any]]], add_generation_prompt: bool, kwargs: dict
    ) -> list[list[int]]:
        tok = self.need_tokenizer()
        if getattr(tok, "chat_template", None) is None:
            raise ValueError(
                "the tokenizer has no chat_template (base checkpoints have none); use an instruct checkpoint's "
                "tokenizer, set tokenizer.chat_template, or pass the prompt as text"
            )
        if not isinstance(chat, list) or not chat:
            raise TypeError("chat must be a list of {'role': ..., 'content': ...} messages, or a list of such lists")
        conversations = [chat] if isinstance(chat[0], Mapping) else chat
        rows = []
        for conversation in conversations:
            # tokenize=True: the template writes its own bos, so no special tokens are added on top.
            encoded = tok.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True, **kwargs
            )
            rows.extend(_rows_of_ids(encoded))
        return rows

    def _pad(self, rows: list[list[int]], side: PaddingSide) -> tuple[torch.Tensor, torch.Tensor]:
        if not rows or any(len(row) == 0 for row in rows):
            raise ValueError("a prompt tokenised to no tokens; the encoder needs at least one (e.g. bos)")
        tok = self.tokenizer
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        width = max(len(row) for row in rows)
        ids, mask = [], []
        for row in rows:
            fill = width - len(row)
            ids.append([pad] * fill + row if side == "left" else row + [pad] * fill)
            mask.append([0] * fill + [1] * len(row) if side == "left" else [1] * len(row) + [0] * fill)
        return torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device)

    # ------------------------------------------------------------------ ids -> strings
    def to_str_tokens(
        self,
        input: str | list[str] | torch.Tensor | list[int],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
    ) -> list[str] | list[list[str]]:
        """Each token decoded on its own: a list of strings, or one list per row for a list of
        strings or a `[batch>1, pos]` tensor. Text is tokenised without padding, one row at a time."""
        tok = self.need_tokenizer()
        _padding_side(padding_side)  # validated for symmetry with to_tokens; single rows are never padded
        if not isinstance(input, (str, list, torch.Tensor)) and hasattr(input, "tolist"):
            input = torch.as_tensor(input.tolist())  # numpy ids, as TransformerLens takes them
        if isinstance(input, str):
            return [tok.decode([i]) for i in self._text_ids(input, prepend_bos)]
        if isinstance(input, list) and input and all(isinstance(t, str) for t in input):
            return [self.to_str_tokens(text, prepend_bos) for text in input]
        if isinstance(input, torch.Tensor) and input.ndim == 2 and input.shape[0] > 1:
            return [self.to_str_tokens(row) for row in input]
        ids = input.reshape(-1).tolist() if isinstance(input, torch.Tensor) else list(input)
        return [tok.decode([int(i)]) for i in ids]

    def to_single_token(self, string: str) -> int:
        """The id of `string` if the tokenizer makes exactly one token of it (no bos added)."""
        tok = self.need_tokenizer()
        ids = list(tok(string, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            pieces = [tok.decode([i]) for i in ids]
            raise ValueError(f"{string!r} is {len(ids)} tokens {pieces}, not one; pick a string that is a single token")
        return ids[0]

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id (TransformerLens's method of the same name)."""
        if isinstance(int_token, bool) or not isinstance(int_token, int):
            raise TypeError(
                f"int_token must be one token id (an int), got {int_token!r}; use to_str_tokens for several"
            )
        return self.to_str_tokens([int_token])[0]

    def get_token_position(
        self,
        single_token: str | int,
        input: str | Num[torch.Tensor, "pos"] | Num[torch.Tensor, "1 pos"] | list[int],
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
    ) -> int:
        """Index of `single_token` (a string of one token, or an id) in `input` (text, tokenised
        with `prepend_bos` as in `to_tokens`, or one row of ids, integer or, as TransformerLens accepts, float
        tensors of whole ids); `mode` picks the first or last hit."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode={mode!r}; use 'first' or 'last'")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos, padding_side)[0]
        else:
            ids = input if isinstance(input, torch.Tensor) else torch.tensor(list(input))
            if ids.ndim == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.ndim != 1:
                raise ValueError(f"input must be one sequence ([pos] or [1, pos]), got shape {tuple(ids.shape)}")
        hits = (ids == token).nonzero().flatten()
        if hits.numel() == 0:
            raise ValueError(f"token {single_token!r} (id {token}) does not occur in the input")
        return int(hits[0] if mode == "first" else hits[-1])


def _padding_side(side: str | None) -> PaddingSide:
    if side is None:
        return "left"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side={side!r}; use 'left', 'right' or None (left)")
    return side


def _rows_of_ids(encoded: TokenizedInput) -> list[list[int]]:
    """The real (unpadded) token rows of a tokenizer output, whatever container it came in."""
    mask = None
    if isinstance(encoded, Mapping):
        if "input_ids" not in encoded:
            raise ValueError(f"expected a tokenizer output with input_ids; got keys {sorted(encoded)}")
        ids, mask = encoded["input_ids"], encoded.get("attention_mask")
    else:
        ids = encoded
    ids = ids.tolist() if hasattr(ids, "tolist") else ids  # a tensor or a numpy array
    mask = mask.tolist() if hasattr(mask, "tolist") else mask
    if not isinstance(ids, Sequence) or not ids:
        raise TypeError(f"expected text, token ids or a tokenizer output, got {type(encoded).__name__}")
    batched = isinstance(ids[0], Sequence)
    rows = [list(r) for r in ids] if batched else [list(ids)]
    if mask is None:
        return [[int(i) for i in row] for row in rows]
    masks = [list(m) for m in mask] if batched else [list(mask)]
    out = []
    for n, (row, row_mask) in enumerate(zip(rows, masks, strict=True)):
        kept = [int(i) for i, m in zip(row, row_mask, strict=True) if m]
        first = row_mask.index(1) if 1 in row_mask else 0
        if 0 in row_mask[first : first + len(kept)]:
            raise ValueError(f"attention_mask row {n} has padding between tokens; only edge padding is supported")
        out.append(kept)
    return out
