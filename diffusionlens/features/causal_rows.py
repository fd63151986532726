"""CausalRows: a causal LM's hook values over its own greedy runs, one row per (prompt, pass, lookahead).

The causal counterpart of `ActivationStore`'s rows, in memory. Pass k of a greedy run (k = 0: the pass
over the prompt) reads the tokens so far and writes answer token k; its hook values at the last position
are the state the model writes that token from. Each pass gives one row per lookahead d = 0 … max_lookahead
(while k + d is inside the answer, eos included), labelled with the answer token at k + d: d = 0 is the token
the pass writes, d ≥ 1 tokens it has not written yet. `train_probe(rows, "final_token", by="lookahead")`
fits one probe per d (pooled over passes), `by="step"` one per pass. The reading interface is the store's
(`labels()`, `activations(hook)`, `hooks`, `prompts`), so the same probe code reads both models.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from diffusionlens.causal_lm import HookedGemma4CausalLM

CAUSAL_LABEL_FIELDS = (
    "prompt_id",
    "step",
    "lookahead",
    "position",
    "input_token",
    "final_token",
    "length",
)


class CausalRows:
    """Harvest `hooks` (e.g. "causal.blocks.3.hook_resid_post") of `model`'s greedy runs on `prompts`.

    labels: prompt_id; step (pass k, = answer index of the token it writes); lookahead d; position (k + d,
    the answer index of the token read); input_token (the last token the pass reads); final_token (answer
    token k + d, as the run finally wrote it); length (answer tokens, eos included). Prompts are batched by
    token length (the model refuses padded batches)."""

    def __init__(
        self,
        model: HookedGemma4CausalLM,
        hooks: str | Sequence[str],
        *,
        prompts: Sequence[str],
        max_new_tokens: int = 48,
        max_lookahead: int = 4,
        batch_size: int = 64,
    ) -> None:
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer; load a directory with tokenizer.json or set model.tokenizer")
        if max_lookahead < 0 or max_new_tokens < 1 or batch_size < 1:
            raise ValueError(
                f"need max_lookahead >= 0, max_new_tokens >= 1, batch_size >= 1 (got {max_lookahead}, "
                f"{max_new_tokens}, {batch_size})"
            )
        self.model = model
        self.hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        for name in self.hooks:
            if name not in model.hook_dict:
                raise KeyError(model.unknown_hook_message(name))
        self.prompts = list(prompts)
        self.max_new_tokens, self.max_lookahead, self.batch_size = max_new_tokens, max_lookahead, batch_size
        self.path = "<CausalRows in memory>"
        self.answers: list[list[int]] = []  # per prompt, the generated answer tokens up to and including eos
        self._values: dict[str, torch.Tensor] = {}  # hook -> [passes, d]
        self._labels: dict[str, torch.Tensor] = {}
        self._pass_of_row = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self._pass_of_row)

    def __repr__(self) -> str:
        return f"CausalRows({len(self)} rows over {len(self.prompts)} prompts, hooks {self.hooks})"

    def harvest(self, progress: bool = True) -> int:
        """Generate every prompt greedily and record its rows; returns the number of rows."""
        model, tokenizer = self.model, self.model.tokenizer
        eos = set(model.cfg.eos_token_ids)
        encoded = [tokenizer(p)["input_ids"] for p in self.prompts]
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, ids in enumerate(encoded):
            by_length[len(ids)].append(i)
        per_prompt: dict[int, tuple[list[int], dict[str, torch.Tensor], int]] = {}
        bar = tqdm(total=len(self.prompts), desc="causal rows", disable=not progress)
        for same_length in by_length.values():
            for start in range(0, len(same_length), self.batch_size):
                chunk = same_length[start : start + self.batch_size]
                ids = torch.tensor([encoded[i] for i in chunk], device=model.device)
                with torch.inference_mode():
                    out, caches = model.generate_with_cache(ids, self.max_new_tokens, names_filter=self.hooks)
                for row, i in enumerate(chunk):
                    generated = out[row, ids.shape[1] :].tolist()
                    ends = [k for k, t in enumerate(generated) if t in eos]
                    answer = generated[: ends[0] + 1] if ends else generated
                    values = {
                        h: torch.stack([caches[k][h][row, -1].reshape(-1).float().cpu() for k in range(len(answer))])
                        for h in self.hooks
                    }
                    per_prompt[i] = (answer, values, encoded[i][-1])
                bar.update(len(chunk))
        bar.close()
        self.answers = [per_prompt[i][0] for i in range(len(self.prompts))]
        self._values = {h: torch.cat([per_prompt[i][1][h] for i in range(len(self.prompts))]) for h in self.hooks}
        labels: dict[str, list[int]] = {f: [] for f in CAUSAL_LABEL_FIELDS}
        pass_of_row: list[int] = []
        first_pass = 0
        for i, answer in enumerate(self.answers):
            length = len(answer)
            for k in range(length):
                for d in range(min(self.max_lookahead, length - 1 - k) + 1):
                    labels["prompt_id"].append(i)
                    labels["step"].append(k)
                    labels["lookahead"].append(d)
                    labels["position"].append(k + d)
                    labels["input_token"].append(per_prompt[i][2] if k == 0 else answer[k - 1])
                    labels["final_token"].append(answer[k + d])
                    labels["length"].append(length)
                    pass_of_row.append(first_pass + k)
            first_pass += length
        self._labels = {f: torch.tensor(v, dtype=torch.long) for f, v in labels.items()}
        self._pass_of_row = torch.tensor(pass_of_row, dtype=torch.long)
        return len(self)

    def labels(self) -> dict[str, Int[torch.Tensor, " rows"]]:
        """Every row's labels (`CAUSAL_LABEL_FIELDS`); empty before `harvest`."""
        return dict(self._labels)

    def activations(self, hook: str) -> Float[torch.Tensor, "rows d"]:
        """Every row's value of `hook` (rows of one pass share it: one pass, several lookaheads)."""
        if hook not in self._values:
            raise KeyError(f"{hook!r} is not in these rows; they hold {self.hooks}")
        return self._values[hook][self._pass_of_row]
