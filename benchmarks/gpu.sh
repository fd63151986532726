#!/usr/bin/env bash
# Issue #23's (and #21's GPU) checks in one short run on a CUDA machine with one GPU. The 30-layer bf16
# model needs ~51 GB for the weights that ours and transformers' model share, so an 80 GB card holds it.
#   1. benchmarks/gpu_checks.py: bf16 and float32 equivalence with transformers (tiny configs and the
#      full-width 2-layer slice), then the full 30-layer random 26B-A4B config in bf16: build time, peak
#      GPU memory / weight bytes, decoder pass and generate-step ratios vs transformers,
#      generate_with_cache of every hook_resid_post for 48 steps to disk, frozen sweep cost per cell,
#      and last torch.profiler tables of one generate of each model ($RESULTS/profile_*.txt)
#   2. tests/against_transformers/test_device_map.py: blocks split across cuda:0 and cpu give the one-device tokens
#   3. benchmarks/run.py --cases sweeps in bf16: fast sweeps vs the per-cell path, batch 8/32 vs 1
#   4. benchmarks/run.py, the other cases in bf16 (quick): ratios vs transformers on the GPU
# Each part has its own time limit, so one that overruns still leaves the others' rows; the limits sum
# to 570 s, under a 600 s device call. (Session 3's H200 run: gpu_checks ended at its then 330 s limit
# before the sweep rows, and the 55m sweeps at 90 s.)
# Rows go to $RESULTS (default benchmarks/results): gpu.json, gpu_sweeps.json, gpu_cases.json.
# Usage: bash benchmarks/gpu.sh   (from anywhere; PYTHON overrides the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
RESULTS="${RESULTS:-benchmarks/results}"
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
part() {  # part SECONDS LABEL COMMAND...
    local limit=$1 label=$2
    shift 2
    local start=$SECONDS
    echo "=== $label (limit ${limit}s)"
    timeout "$limit" "$@"
    echo "=== $label: exit $? after $((SECONDS - start))s"
}
part 390 "gpu_checks" "$PYTHON" benchmarks/gpu_checks.py --device cuda --steps 48 --json "$RESULTS/gpu.json" \
    --out "$RESULTS" --profile
part 50 "device map cuda+cpu" "$PYTHON" -m pytest -q -p no:cacheprovider tests/against_transformers/test_device_map.py -k cuda
part 70 "sweeps bf16" "$PYTHON" benchmarks/run.py --device cuda --dtype bfloat16 --models toy,55m \
    --cases sweeps --quick --out "$RESULTS/gpu_sweeps.json"
part 60 "cases bf16" "$PYTHON" benchmarks/run.py --device cuda --dtype bfloat16 --models toy,200m \
    --cases decoder,hooks,generate --quick --out "$RESULTS/gpu_cases.json"
