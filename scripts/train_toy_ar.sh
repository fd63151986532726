#!/usr/bin/env bash
# Trains the toy's autoregressive twin as shipped in diffusionlens/toy/checkpoint_ar (one CPU thread,
# a wall-clock budget; see docs/ar_twin.md). Resumes from $OUT when rerun.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
python -c "import torch, sys; torch.set_num_threads(1); sys.argv[0] = 'train_ar'; \
from diffusionlens.toy.train_ar import main; main(sys.argv[1:])" \
  --out "${OUT:-runs/toy-ar}" --steps 4500 --batch-size 32 --warmup 60 --lr 3e-3 --eval-every 300 --eval-examples 25 \
  --save-every 50 --max-seconds "${MAX_SECONDS:-2500}" --no-progress "$@"
