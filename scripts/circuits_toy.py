"""Which components write the corrected count of the squares answer (docs/circuits_toy.md quotes this output).

With ReplayNoise(40), `squares 400 800:` drafts the count '7' at step 0 and corrects it to '8' at step 1.
Direct logit attribution of '8' − '7' at canvas position 0 splits each step's pre-soft-cap logit
difference over the embedding path and every block's attention and FFN outputs, then over every head,
dense MLP and expert (granularity="component"); the attention pattern of the last two blocks' heads shows
which keys the count position reads at the correction. Runs in seconds.
"""

from __future__ import annotations

import torch

from diffusionlens import HookedDiffusionGemma, ReplayNoise
from diffusionlens.analysis import DLA_COMPONENT_NAMES, DLA_NAMES, dla_by_step
from diffusionlens.viz import attention_labels, attention_pattern


def main() -> None:
    torch.manual_seed(0)
    model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
    ids = model.to_tokens("squares 400 800:")
    model.set_use_attn_result(True)  # per-head outputs (attn.hook_result)
    model.set_use_expert_outputs(True)  # per-expert outputs (moe.hook_expert_out)
    result, cache = model.generate_with_cache(
        ids,
        names_filter=[*DLA_NAMES, *DLA_COMPONENT_NAMES, "decoder.blocks.*.attn.hook_pattern"],
        noise=ReplayNoise(40),
        progress=False,
    )
    model.set_use_attn_result(False)
    model.set_use_expert_outputs(False)
    trace = result.trace
    drafts = [model.tokenizer.decode(trace[0].argmax[s, 0, :3].tolist()) for s in range(trace.steps())]
    print("draft of positions 0-2 per step:", drafts)
    dla = dla_by_step(cache, "8", other="7", position=0)
    print("logit('8') - logit('7') before the soft-cap, per step:", [round(float(v), 2) for v in dla.logit])
    print(f"{'component':>12}" + "".join(f"  step {s:>2}" for s in dla.steps) + "   Δ(1−0)")
    delta = dla.attributions[1] - dla.attributions[0]
    for c, name in enumerate(dla.labels):
        row = "".join(f"  {float(v):+7.2f}" for v in dla.attributions[:, c])
        print(f"{name:>12}{row}  {float(delta[c]):+7.2f}")
    top = delta.argsort(descending=True)[:4]
    print("largest increases from step 0 to 1:", [(dla.labels[i], round(float(delta[i]), 2)) for i in top])
    parts = dla_by_step(cache, "8", other="7", position=0, granularity="component")
    fine_delta = parts.attributions[1] - parts.attributions[0]
    for name, order in (("increases", True), ("decreases", False)):
        top = fine_delta.argsort(descending=order)[:6]
        print(
            f"components, largest {name} from step 0 to 1:",
            [(parts.labels[i], round(float(fine_delta[i]), 2)) for i in top],
        )
    inputs = "  ".join(
        f"{name} " + "/".join(f"{float(v):+.2f}" for v in parts.attributions[:, parts.labels.index(name)])
        for name in ("embed", "self_cond")
    )
    print(f"steps 0/1/2, decoder input: {inputs}")
    for layer in (4, 5):
        for kind in ("H", "_mlp", "E"):
            cols = [i for i, label in enumerate(parts.labels) if label.startswith(f"L{layer}{kind}")]
            cells = "  ".join(
                f"{parts.labels[i]} " + "/".join(f"{float(v):+.2f}" for v in parts.attributions[:, i]) for i in cols
            )
            print(f"steps 0/1/2, layer {layer}: {cells}")
    for layer in (4, 5):
        keys = attention_labels(model, trace, 1, layer, tokens=ids)
        pattern = attention_pattern(cache, 1, layer)[:, 0]  # [head, key] for the count's query
        for head in range(pattern.shape[0]):
            best = pattern[head].topk(3)
            reads = ", ".join(
                f"{keys.label(int(k))} {float(w):.2f}" for w, k in zip(best.values, best.indices, strict=True)
            )
            prompt_share = float(pattern[head, : keys.n_prompt].sum())
            print(f"step 1, layer {layer} head {head}: prompt share {prompt_share:.2f}; top keys {reads}")


if __name__ == "__main__":
    main()
