"""Pass self-conditioning through a top-1 token bottleneck and measure what it carried.

python examples/token_bottleneck.py
"""

from diffusionlens import HookedDiffusionGemma, ReplayNoise, TokenBottleneck
from diffusionlens.analysis import transparency_summary
from diffusionlens.toy import decode_canvas

model = HookedDiffusionGemma.from_pretrained("toy", progress=False)
for prompt in ["squares 400 800:", "sort 5 3 9 1:", "reverse 7 2 4:"]:
    for bottleneck in (None, TokenBottleneck(top_k=1)):
        result = model.generate(
            model.to_tokens(prompt),
            max_new_tokens=48,
            noise=ReplayNoise(0),
            bottleneck=bottleneck,
            record_top_k=4,
            progress=False,
        )
        answer = decode_canvas(model.tokenizer, result.new_tokens()[0].tolist())
        print(f"{prompt!r:20} {str(bottleneck or 'full logits'):26} -> {answer!r}")
        for name, per_step in transparency_summary(result.trace[0], ks=(1,)).items():
            print(f"    {name:16s} per step:", [round(float(v), 2) for v in per_step])
