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
