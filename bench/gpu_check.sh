#!/usr/bin/env bash
# The issue's GPU measurement, as ONE device call (about 8 minutes on an H200, most of it
# torch.compile). Here first:  bash bench/gpu_prepare.sh   (wheels into .whl/, git-ignored); then
#   device run, carry [".whl"], command "bash bench/gpu_check.sh", timeout_s 600
# Prints and writes to $OUT: the GPU, then `etsdm bench train` for the 256 preset (113.7M parameters)
# under DeepSpeed ZeRO-2 bf16, batch 32, every step fed from shards through our loader, beside a
# plain PyTorch step of the same network (autocast bf16, fused AdamW): eager, then torch.compile on
# both sides; images/s, MFU and peak memory for each. Then 1 kimg of the real `etsdm train` loop
# from the same shards (stats.jsonl: images/s and time waiting for data).
# CPU smoke test of this script (tiny sizes, minutes):  GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/etsdm-gpu-check}
mkdir -p "$OUT"
if [[ -d .whl && -z "${GPU_CHECK_SMOKE:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1   # the image's "9.0a" breaks DeepSpeed's op builder
PY=${PY:-python3}
if [[ -n "${GPU_CHECK_SMOKE:-}" ]]; then  # CPU: same commands, tiny sizes
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  N=64 RES=32 BATCH=8 STEPS=2 ROUNDS=1 WORKERS=1 KIMG=0.016 COMPILES="false"
  NET=(network.preset=tiny network.resolution=32)
else
  N=2048 RES=256 BATCH=32 STEPS=10 ROUNDS=2 WORKERS=8 KIMG=1.024 COMPILES="false true"
  NET=()
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.cuda.is_available())"

# 1. Shards: nothing can be fetched on that machine, so JPEGs are made there. Smooth random images
#    (bilinear upsampling of 8x8 noise plus a gradient) give JPEGs of photo-like size to decode.
$PY - "$N" "$RES" <<'PYEOF'
import os, sys
import numpy as np
from PIL import Image
n, res = int(sys.argv[1]), int(sys.argv[2])
os.makedirs("/tmp/etsdm-imgs", exist_ok=True)
rng = np.random.default_rng(0)
for i in range(n):
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    img = np.asarray(small.resize((res, res), Image.BILINEAR), dtype=np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(f"/tmp/etsdm-imgs/{i:06d}.jpg", quality=90)
PYEOF
rm -rf /tmp/etsdm-shards
$PY -m etsdm_dist.cli shard /tmp/etsdm-imgs /tmp/etsdm-shards --resolution "$RES" --format jpg \
  --max-samples 256 --workers "$WORKERS" --no-progress || exit 1

# 2. The step benchmark, eager then compiled (each side's compile happens in the warm-up steps).
rc=0
for compile in $COMPILES; do
  echo "=== etsdm bench train: network.compile=$compile"
  timeout 330 $PY -m etsdm_dist.bench.train --config configs/ffhq256.yaml --batch "$BATCH" --steps "$STEPS" \
    --rounds "$ROUNDS" --data /tmp/etsdm-shards --json "$OUT/bench-compile-$compile.json" \
    "${NET[@]}" network.compile=$compile data.num_workers="$WORKERS" || rc=1
done

# 3. The real loop from the same shards for 1 kimg (1 rank): images/s and data wait from stats.jsonl.
echo "=== etsdm train (1 rank, eager)"
rm -rf /tmp/etsdm-run
timeout 150 $PY -m etsdm_dist.train configs/ffhq256.yaml "${NET[@]}" data.url=/tmp/etsdm-shards \
  train.run_dir=/tmp/etsdm-run train.batch_images="$BATCH" train.total_kimg="$KIMG" \
  train.report_kimg="$KIMG" train.checkpoint_kimg=0 train.sample_kimg=0 data.num_workers="$WORKERS" \
  > "$OUT/train.log" 2>&1 || rc=1
tail -5 "$OUT/train.log"
cp /tmp/etsdm-run/stats.jsonl "$OUT/stats.jsonl" 2>/dev/null && tail -1 "$OUT/stats.jsonl"
exit $rc
