"""Where do a model's squares-count corrections come from? (#34, item 3)

For fresh held-out squares problems × seeds, find every run in which an accepted count digit (the answer
characters before ':') is later replaced, and for each such correction report:

- whether the first, wrong count simply copied the random token the canvas started with at that position;
- whether the wrong count was a sampled non-argmax token (sampling noise) or the model's own argmax;
- how much of the list (answer characters after ':') was already committed when the count changed;
- a patching test at the step that made the change: rerun that decoder pass with the list's canvas tokens
  set back to the run's starting noise and its self-conditioning rows flattened (uniform logits). If the
  corrected count no longer wins, the correction was computed from the drafted list. A control patches
  the same number of prompt-independent positions (the pads after the answer) instead.

    python scripts/organism_corrections.py --model runs/organism3b --prompts 8 --seeds 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffusionlens import HookedDiffusionGemma
from diffusionlens.analysis.self_correction import find_corrections
from diffusionlens.sampling.noise import ReplayNoise
from diffusionlens.toy.tasks import make_dataset
from diffusionlens.toy.tokenizer import EOS_ID


def answer_layout(final: list[int], tokenizer) -> tuple[list[int], list[int]]:
    """(count positions, list positions) of a final canvas: answer characters before and after ':'."""
    text = [tokenizer.decode([t]) for t in final]
    end = final.index(EOS_ID) if EOS_ID in final else len(final)
    colon = text.index(":") if ":" in text[:end] else end
    return list(range(colon)), list(range(colon + 1, end))


@torch.no_grad()
def decoder_argmax(model, state, canvas, self_cond) -> torch.Tensor:
    return model.denoise(canvas, state, self_cond).argmax(-1)


def patched_inputs(canvas, self_cond, *, reset=(), reset_from=None, flatten=()):
    """A decoder pass's inputs patched: canvas positions `reset` taken from `reset_from` (e.g. the run's
    starting noise), self-conditioning rows `flatten` set to uniform logits. Copies; the inputs stay."""
    patched_canvas = canvas.clone()
    if reset:
        patched_canvas[0, list(reset)] = reset_from[0, list(reset)]
    patched_cond = None if self_cond is None else self_cond.clone()
    if patched_cond is not None and flatten:
        patched_cond[0, list(flatten)] = 0.0
    return patched_canvas, patched_cond


@torch.no_grad()
def argmax_with_positions_reset(model, state, canvas, self_cond, start_canvas, positions: list[int], at: int) -> int:
    """The decoder's argmax at position `at` with `positions` of the canvas set back to the run's starting
    noise and their self-conditioning rows flattened (uniform logits)."""
    inputs = patched_inputs(canvas, self_cond, reset=positions, reset_from=start_canvas, flatten=positions)
    return decoder_argmax(model, state, *inputs)[0, at].item()


@torch.no_grad()
def analyse_run(model, tokenizer, prompt: str, seed: int) -> list[dict]:
    ids = model.to_tokens(prompt)
    result, cache = model.generate_with_cache(
        ids, noise=ReplayNoise(seed), progress=False, names_filter=["sampler.hook_logits"]
    )
    trace = result.trace[0]
    final = trace.final[0].tolist()
    count_positions, list_positions = answer_layout(final, tokenizer)
    if not count_positions or not list_positions:
        return []
    mask = torch.zeros(1, len(final), dtype=torch.bool)
    mask[0, count_positions] = True
    events = find_corrections(trace, mode="accepted", mask=mask)
    found = []
    state = model.encode(ids)
    start_canvas = trace.input_canvas[0]
    pads = [p for p in range(len(final)) if p > list_positions[-1] + 1][: len(list_positions)]
    for event in events:
        step = event.step_replaced
        canvas = trace.input_canvas[step].clone()
        self_cond = cache.get("sampler.hook_logits", canvas=0, step=step - 1).clone() if step > 0 else None
        baseline = decoder_argmax(model, state, canvas, self_cond)[0, event.position].item()

        def patched(positions: list[int], canvas=canvas, self_cond=self_cond, at=event.position) -> int:
            return argmax_with_positions_reset(model, state, canvas, self_cond, start_canvas, positions, at)

        committed = trace.accepted[:step, 0, list_positions].any(0) & (
            trace.argmax[step - 1, 0, list_positions] == torch.tensor(final)[list_positions]
        )
        # what the replacing step's canvas held there: the old token (the step overruled its canvas), the new
        # one (the sampler drew it the step before), or another
        read = {event.old_token: "old", event.new_token: "new"}.get(int(canvas[0, event.position]), "other")
        found.append(
            dict(
                prompt=prompt,
                seed=seed,
                position=event.position,
                canvas_read=read,
                step_held=event.step_held,
                step_replaced=step,
                old=tokenizer.decode([event.old_token]),
                new=tokenizer.decode([event.new_token]),
                final=tokenizer.decode([event.final_token]),
                copied_start_token=event.old_token == int(start_canvas[0, event.position]),
                held_was_argmax=event.held_was_argmax,
                list_committed_before=float(committed.float().mean()),
                baseline_is_new=baseline == event.new_token,
                list_patched_keeps_new=patched(list_positions) == event.new_token,
                control_patched_keeps_new=patched(pads) == event.new_token if pads else None,
            )
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--out", default=None, help="write the events as JSON here")
    args = parser.parse_args()
    model = HookedDiffusionGemma.from_pretrained(args.model, progress=False)
    model.eval()
    tokenizer = model.tokenizer
    prompts = [e.prompt for e in make_dataset(["squares"], args.prompts, seed=1234, split="eval").examples]
    events, runs = [], 0
    for prompt in prompts:
        for seed in range(args.seeds):
            runs += 1
            events.extend(analyse_run(model, tokenizer, prompt, seed))
    corrected_runs = len({(e["prompt"], e["seed"]) for e in events})
    summary = {
        "runs": runs,
        "runs_with_count_correction": corrected_runs,
        "events": len(events),
        "first_count_copied_start_token": sum(e["copied_start_token"] for e in events),
        "first_count_was_model_argmax": sum(e["held_was_argmax"] for e in events),
        "mean_list_committed_before": round(sum(e["list_committed_before"] for e in events) / max(1, len(events)), 3),
        "decoder_rerun_reproduces": sum(e["baseline_is_new"] for e in events),
        "list_patched_keeps_correction": sum(e["list_patched_keeps_new"] for e in events),
        "control_patched_keeps_correction": sum(bool(e["control_patched_keeps_new"]) for e in events),
    }
    print(json.dumps(summary, indent=1))
    for e in events[:12]:
        print(e)
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "events": events}, indent=1))


if __name__ == "__main__":
    main()
