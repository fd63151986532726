"""Decoder attention patterns with labelled keys: which prompt tokens and which canvas tokens each canvas
query reads at one denoising step, for the HTML attention viewer and for circuitsvis (viz/circuitsvis_export.py).

A decoder layer's keys are `[prompt keys this layer keeps ; the canvas the step read]`. Full-attention
layers keep every encoded position (the prompt, plus earlier canvases for canvas > 0); sliding layers
keep only the last `sliding_window - 1` of them (no later query could see further back), so the key
labels differ from layer to layer. Prompt padding stays among the keys, masked: it is labelled as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int

from diffusionlens.cache.selectors import resolve_layer
from diffusionlens.sampling.trace import DenoisingTrace
from diffusionlens.viz._common import TokenDecoder, check_row, token_texts, visible

if TYPE_CHECKING:
    from diffusionlens.cache.denoising import DenoisingCache
    from diffusionlens.model import HookedDiffusionGemma

PROMPT, CANVAS = "prompt", "canvas"


def pattern_hook(layer: int) -> str:
    """The hook whose value is decoder layer `layer`'s attention pattern `[batch, head, query, key]`."""
    return f"decoder.blocks.{layer}.attn.hook_pattern"


@dataclass(frozen=True)
class AttentionKeys:
    """The keys of one decoder layer at one step, in the order of the pattern's key axis, and which
    pattern they label (so the pattern can be looked up from the keys alone)."""

    texts: list[str]
    """Each key's token text, whitespace drawn visibly."""
    tokens: list[int]
    """Each key's token id."""
    kinds: list[str]
    """"prompt" or "canvas" for each key."""
    positions: list[int]
    """For a prompt key, its index into `tokens` (the prompt, then earlier canvases); for a canvas key,
    its canvas position."""
    padding: list[bool]
    """True for prompt padding (masked: no query attends to it)."""
    step: int
    """The denoising step of the pattern these keys label."""
    layer: int
    """The decoder layer (counted from 0: a negative layer asked for is resolved)."""
    canvas: int
    """The canvas the step denoised."""
    row: int
    """The batch row."""

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def n_prompt(self) -> int:
        return self.kinds.count(PROMPT)

    def label(self, key: int) -> str:
        """A short, unambiguous label: `p12:a` for prompt position 12, `c3:4` for canvas position 3."""
        tag = "p" if self.kinds[key] == PROMPT else "c"
        return f"{tag}{self.positions[key]}:{self.texts[key]}" + (" (pad)" if self.padding[key] else "")

    def labels(self) -> list[str]:
        return [self.label(k) for k in range(len(self))]


def _decoder_of(model: HookedDiffusionGemma, tokenizer: TokenDecoder) -> TokenDecoder:
    return tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)


def attention_labels(
    model: HookedDiffusionGemma,
    trace: DenoisingTrace,
    step: int,
    layer: int,
    *,
    tokens: Int[torch.Tensor, "batch length"],
    attention_mask: Bool[torch.Tensor, "batch prompt"] | Int[torch.Tensor, "batch prompt"] | None = None,
    canvas: int = 0,
    row: int = 0,
    tokenizer: TokenDecoder = None,
) -> AttentionKeys:
    """The keys decoder layer `layer` attends over at `step` of canvas `canvas`, batch row `row`.

    `tokens` is the prompt `generate` was given, or `result.sequences` (the prompt followed by every
    generated canvas: needed for canvas > 0, whose prompt keys include the earlier canvases).
    `attention_mask` is the prompt's padding mask as given to `generate` (None: no padding). The canvas
    keys are the step's input canvas (`trace[canvas].input_canvas[step]`): the tokens the decoder read.
    `tokenizer` turns ids into text (default: the model's).
    """
    if not isinstance(trace, DenoisingTrace):
        raise TypeError("attention_labels needs the DenoisingTrace of the generation (it holds the prompt length)")
    cfg = model.cfg
    layer = resolve_layer(layer, cfg.num_hidden_layers, kind="block")
    if not 0 <= canvas < len(trace):
        raise IndexError(f"canvas {canvas} out of range: the trace has {len(trace)} canvases")
    canvas_trace = trace[canvas]
    if not 0 <= step < canvas_trace.n_steps:
        raise IndexError(f"step {step} out of range: canvas {canvas} ran {canvas_trace.n_steps} steps")
    check_row(canvas_trace, row)
    encoded = trace.prompt_length + canvas * cfg.canvas_length
    if tokens.ndim != 2 or tokens.shape[1] < encoded:
        raise ValueError(
            f"tokens must be [batch, length] with at least {encoded} columns (the prompt of {trace.prompt_length} "
            f"tokens and {canvas} earlier canvases of {cfg.canvas_length}); got {tuple(tokens.shape)}: pass "
            "result.sequences for canvas > 0"
        )
    prompt_ids = tokens[row, :encoded].cpu()
    real = torch.ones(encoded, dtype=torch.bool)
    if attention_mask is not None:
        # later canvases are never padded: generate encodes them with an all-ones mask
        real[: trace.prompt_length] = attention_mask[row, : trace.prompt_length].cpu().bool()
    kept = min(encoded, cfg.sliding_window - 1) if cfg.is_sliding(layer) else encoded
    first = encoded - kept
    canvas_ids = canvas_trace.input_canvas[step, row].cpu()
    ids = prompt_ids[first:].tolist() + canvas_ids.tolist()
    texts = [visible(t) for t in token_texts(_decoder_of(model, tokenizer), ids)]
    return AttentionKeys(
        texts=texts,
        tokens=ids,
        kinds=[PROMPT] * kept + [CANVAS] * len(canvas_ids),
        positions=list(range(first, encoded)) + list(range(len(canvas_ids))),
        padding=(~real[first:]).tolist() + [False] * len(canvas_ids),
        step=step,
        layer=layer,
        canvas=canvas,
        row=row,
    )


def attention_pattern(
    cache: DenoisingCache, step: int, layer: int, *, canvas: int = 0, row: int = 0
) -> Float[torch.Tensor, "head query key"]:
    """Decoder layer `layer`'s attention pattern at `step` for one batch row, on the CPU in float32
    (a negative layer counts back from the last, given a cache that holds its model)."""
    n_layers = None if cache.model is None else cache.model.cfg.num_hidden_layers
    name = pattern_hook(resolve_layer(layer, n_layers, kind="block"))
    if name not in cache:
        raise KeyError(
            f"'{name}' was not recorded: generate_with_cache(..., "
            "names_filter=lambda n: n.endswith('attn.hook_pattern'))"
        )
    if step not in cache.steps(canvas):
        raise KeyError(f"step {step} of canvas {canvas} was not recorded; recorded steps: {cache.steps(canvas)}")
    return cache.get(name, canvas=canvas, step=step)[row].detach().float().cpu()


def labelled_pattern(
    model: HookedDiffusionGemma, cache: DenoisingCache, trace: DenoisingTrace, step: int, layer: int, **labelling: Any
) -> tuple[Float[torch.Tensor, "head query key"], AttentionKeys]:
    """`(pattern, keys)` for one layer and step, checked to agree: every key labelled, every query a canvas
    position. `labelling` is what `attention_labels` takes besides the step and layer (`tokens=` and, as
    needed, `attention_mask`, `canvas`, `row`, `tokenizer`); the pattern is read for the keys' canvas and row."""
    keys = attention_labels(model, trace, step, layer, **labelling)
    layer = keys.layer
    pattern = attention_pattern(cache, step, layer, canvas=keys.canvas, row=keys.row)
    n_canvas = len(keys) - keys.n_prompt
    if pattern.shape[-1] != len(keys) or pattern.shape[-2] != n_canvas:
        raise ValueError(
            f"layer {layer}'s pattern is {tuple(pattern.shape)} but the trace gives {n_canvas} canvas queries and "
            f"{len(keys)} keys: record every canvas position, and pass the tokens/trace of this generation"
        )
    return pattern, keys


def square_attention(
    pattern: Float[torch.Tensor, "head query key"], keys: AttentionKeys
) -> Float[torch.Tensor, "head key key"]:
    """The decoder pattern as circuitsvis wants it, square over the keys: each canvas query's row sits at
    its own canvas key; prompt keys' rows are zero."""
    heads, n_keys = pattern.shape[0], len(keys)
    if pattern.shape[1:] != (n_keys - keys.n_prompt, n_keys):
        raise ValueError(f"pattern {tuple(pattern.shape)} does not match {len(keys)} keys ({keys.n_prompt} prompt)")
    square = torch.zeros(heads, n_keys, n_keys)
    square[:, keys.n_prompt :, :] = pattern
    return square
