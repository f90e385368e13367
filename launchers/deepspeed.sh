#!/usr/bin/env bash
# Launch `etsdm train` with the DeepSpeed launcher.
#   one node:    launchers/deepspeed.sh 8 configs/ffhq256.yaml [key=value ...]
#   many nodes:  HOSTFILE=launchers/hostfile.example launchers/deepspeed.sh 8 configs/ffhq256.yaml
#                (passwordless ssh/pdsh to every host; hosts run the same checkout and venv)
# The first argument is processes (GPUs) per node. On a CPU-only machine export DS_ACCELERATOR=cpu;
# the launcher then still starts N processes (used by the tests).
# Exit code 75 (train.requeue_exit_code) means "preempted, checkpoint saved: run me again".
set -euo pipefail
NPROC=${1:?usage: launchers/deepspeed.sh NPROC_PER_NODE CONFIG [key=value ...]}; shift
PORT=${MASTER_PORT:-29500}
if [[ -n "${HOSTFILE:-}" ]]; then
  exec deepspeed --hostfile "$HOSTFILE" --num_gpus "$NPROC" --master_port "$PORT" \
    --module etsdm_dist.train "$@"
fi
exec deepspeed --num_nodes 1 --num_gpus "$NPROC" --master_port "$PORT" --module etsdm_dist.train "$@"
