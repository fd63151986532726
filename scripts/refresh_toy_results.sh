#!/usr/bin/env bash
# After retraining the toy model: install the new checkpoint and rerun everything the docs quote from it.
# Usage: bash scripts/refresh_toy_results.sh RUN_DIR OUT_DIR   (e.g. runs/toy /tmp/refresh)
# Each result goes to OUT_DIR/<name>.txt; copy the tables into the docs pages named beside each step.
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir=$1
out=$2
py=${PYTHON:-python}
mkdir -p "$out"
checkpoint=diffusionlens/toy/checkpoint
cmp "$run_dir/tokenizer.json" "$checkpoint/tokenizer.json"  # the tokenizer never changes with training
cp "$run_dir/model.safetensors" "$run_dir/config.json" "$run_dir/generation_config.json" "$checkpoint/"
"$py" -m diffusionlens.cli evaluate --model toy --n 200 > "$out/evaluate.txt"          # docs/toy_model.md
"$py" -m diffusionlens.cli demo > "$out/demo.txt"
"$py" examples/patching_squares.py --out docs/patching_squares.png > "$out/patching.txt"  # docs/patching.md
"$py" scripts/attribution_agreement.py > "$out/attribution.txt"                          # docs/patching.md
"$py" examples/case_studies.py --out "$out/case_studies" > "$out/case_studies.txt"        # docs/case_studies.md
"$py" scripts/make_figures.py                                                              # docs/figures/
"$py" scripts/screenshot_viewer.py                                                         # docs/viewer.png
"$py" -c "from diffusionlens import HookedDiffusionGemma
from diffusionlens.toy.monitor import draft_monitor_auroc
print(draft_monitor_auroc(HookedDiffusionGemma.from_pretrained('toy', progress=False), n=50))" > "$out/monitor.txt"
"$py" -c "from diffusionlens import HookedDiffusionGemma
from diffusionlens.toy.evaluate import bottleneck_table
print(bottleneck_table(HookedDiffusionGemma.from_pretrained('toy', progress=False), n=100, progress=False))" \
  > "$out/bottleneck.txt"                                                                  # docs/variable_transparency.md

# Third wave: what is trained on the toy, then what measures it. Transcoders and the tuned lens record the
# toy's weights fingerprint and are refused by any other weights, so they are retrained first.
"$py" -m diffusionlens.graphs.training --model toy --no-progress \
  --out diffusionlens/graphs/checkpoint/toy-transcoders.safetensors > "$out/transcoders.txt"  # docs/attribution_graphs.md
"$py" -m diffusionlens.lens.train_tuned --model toy --no-progress \
  --out diffusionlens/lens/shipped/toy_tuned_lens.safetensors --report docs/figures/reading_latents \
  > "$out/tuned_lens.txt"                                                                    # docs/reading_latents.md
"$py" -m diffusionlens.toy.dynamics --model toy --json "$out/dynamics.json" \
  --figure docs/figures/denoising_dynamics.png > "$out/dynamics.txt"                          # docs/toy_model.md
"$py" scripts/organism_corrections.py --model toy --out "$out/corrections.json" > "$out/corrections.txt"  # docs/toy_model.md
"$py" scripts/circuits_toy.py > "$out/circuits_toy.txt"                                       # docs/circuits_toy.md
"$py" scripts/probe_toy_count.py --out "$out/probe_count" --figure docs/figures/probe_count.png \
  > "$out/probe_count.txt"                                                                    # docs/features.md
"$py" scripts/graph_interventions.py --json "$out/graph_interventions.json" > "$out/graph_interventions.txt"
"$py" benchmarks/attribution_graph.py > "$out/attribution_graph_benchmark.txt"                 # docs/attribution_graphs.md
# The autoregressive twin trains on the same task mix (about an hour on one thread), then the comparisons.
OUT=runs/toy-ar bash scripts/train_toy_ar.sh                                                  # docs/ar_twin.md
cp runs/toy-ar/model.safetensors runs/toy-ar/config.json diffusionlens/toy/checkpoint_ar/
"$py" scripts/twin_serial_depth.py --n 200 > "$out/twin_serial_depth.txt"                     # docs/ar_twin.md
"$py" scripts/twin_monitorability.py --model toy-ar > "$out/twin_monitorability.txt"          # docs/ar_twin.md
"$py" scripts/twin_transparency.py --model toy-ar > "$out/twin_transparency.txt"              # docs/ar_twin.md
"$py" benchmarks/run.py --repeats 3 --models toy > "$out/benchmarks_toy.txt"                # docs/benchmarks.md (toy rows)
