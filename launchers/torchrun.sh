#!/usr/bin/env bash
# Launch `etsdm train` with torchrun.
#   one node:    launchers/torchrun.sh 8 configs/ffhq256.yaml [key=value ...]
#   many nodes, static (fixed node ranks), on every node:
#                NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0> [MASTER_PORT=29500] launchers/torchrun.sh 8 CONFIG
#   many nodes, c10d rendezvous (node ranks assigned at join; any node may host the endpoint):
#                NNODES=4 RDZV_ENDPOINT=<host>:<port> [RDZV_ID=<job id>] launchers/torchrun.sh 8 CONFIG
# On a CPU-only machine export DS_ACCELERATOR=cpu (gloo backend).
set -euo pipefail
NPROC=${1:?usage: launchers/torchrun.sh NPROC_PER_NODE CONFIG [key=value ...]}; shift
NNODES=${NNODES:-1}
if [[ "$NNODES" == 1 ]]; then
  exec torchrun --standalone --nnodes 1 --nproc_per_node "$NPROC" -m etsdm_dist.train "$@"
fi
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv_backend c10d \
    --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-etsdm}" -m etsdm_dist.train "$@"
fi
exec torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK (or RDZV_ENDPOINT)}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \
  -m etsdm_dist.train "$@"
