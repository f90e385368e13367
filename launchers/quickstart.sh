#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine:
#   1. tools/install.sh (venv, pinned CPU stack, Debian's Fashion-MNIST)
#   2. etsdm shard: Fashion-MNIST train split -> data/fmnist32 (webdataset shards + index.json)
#   3. etsdm train configs/fmnist32.yaml on 2 ranks with the DeepSpeed launcher
# On a CPU-only machine it trains a short run (QUICK_KIMG, default 6.4 kimg = 50 global batches,
# a few minutes); rerunning resumes from the last committed checkpoint. Extra arguments are config
# overrides, e.g. `bash launchers/quickstart.sh train.total_kimg=64 train.zero_stage=3`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export PATH="$PWD/.venv/bin:$PATH"
DATA=${DATA:-data/fmnist32}
if [ ! -f "$DATA/index.json" ]; then
  etsdm shard /usr/share/datasets/fashion-mnist "$DATA" --split train --resolution 32 --mode pad \
    --max-samples 5000 --shuffle-seed 0 --workers 2
fi
NPROC=${NPROC:-2}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1
  set -- train.total_kimg="${QUICK_KIMG:-6.4}" train.report_kimg=1.28 train.checkpoint_kimg=3.2 optim.warmup_kimg=0.64 \
    train.sample_kimg="${QUICK_KIMG:-6.4}" train.run_dir=runs/quickstart data.url="$DATA" "$@"
fi
MASTER_PORT=${MASTER_PORT:-$((29500 + RANDOM % 1000))} launchers/deepspeed.sh "$NPROC" configs/fmnist32.yaml "$@"
echo "quickstart: stats in runs/quickstart/stats.jsonl; export the EMA weights with: .venv/bin/etsdm export runs/quickstart"
