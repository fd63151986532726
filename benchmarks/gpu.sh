#!/usr/bin/env bash
# Issue #23's GPU checks in one short run on a CUDA machine (one GPU; the 30-layer bf16 model needs
# ~51 GB for weights shared by ours and transformers', so an 80 GB H100 holds it):
#   1. bf16 and float32 equivalence with transformers: tiny configs + the full-width 2-layer slice
#   2. the full 30-layer random 26B-A4B config in bf16: build time, peak GPU memory / weight bytes,
#      decoder pass and generate-step ratios vs transformers, generate_with_cache of every
#      hook_resid_post for 48 steps to disk, a frozen patch sweep's per-cell cost
#   3. the full-width pytest (float32 bit-identity, in-memory and from a sharded checkpoint)
# Prints a markdown table; raw rows go to benchmarks/results/gpu.json.
# Usage: bash benchmarks/gpu.sh   (from the repository root; PYTHON overrides the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
"$PYTHON" benchmarks/gpu_checks.py --device cuda --steps 48 --json benchmarks/results/gpu.json
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_full_width.py tests/test_device_map.py
