#!/usr/bin/env bash
# Launch `etsdm train` with the DeepSpeed launcher.
#   one node:    launchers/deepspeed.sh 8 configs/ffhq256.yaml [key=value ...]
#   many nodes:  HOSTFILE=launchers/hostfile.example [MASTER_ADDR=<node 0's address>] \
#                  launchers/deepspeed.sh 8 configs/ffhq256.yaml
#                (passwordless ssh/pdsh to every host; hosts run the same checkout and venv)
# The first argument is processes (GPUs) per node. On a CPU-only machine export DS_ACCELERATOR=cpu;
# the launcher then still starts N processes (used by the tests).
# Many nodes: ranks start in fresh ssh sessions, so exported variables do NOT reach them (DeepSpeed
# forwards only PYTHON*, NCCL*, UCX*, MV2*, MLFLOW*). Put the others (AWS_* for s3://, ETSDM_*,
# OMP_NUM_THREADS, DS_ACCELERATOR, PATH to the venv, ...) as KEY=VALUE lines in ~/.deepspeed_env or
# ./.deepspeed_env, or in a file named by DS_ENV_FILE (tests/test_launchers_multinode.py does that).
# No credentials in that file: DeepSpeed prints it (`export NAME=VALUE`) in its log and on the pdsh
# command line; this script warns, naming the variable. Use AWS_PROFILE + ~/.aws/credentials on each
# node, an instance role, or AWS_SHARED_CREDENTIALS_FILE on a shared file system (README "Credentials").
# With HOSTFILE the arguments reach each node through its login shell; they are quoted so that they
# arrive verbatim (`$(...)`, `&`, quotes, `%` included), and --force_multi sends even a one-host
# hostfile over ssh, so the quoting always meets that shell (launchers/deepspeed_remote.sh).
# Without MASTER_ADDR, DeepSpeed takes the first word of `ssh <first host> hostname -I`, which can
# be a docker bridge or a management network.
# Exit code 75 (train.requeue_exit_code) means "preempted, checkpoint saved: run me again".
set -euo pipefail
NPROC=${1:?usage: launchers/deepspeed.sh NPROC_PER_NODE CONFIG [key=value ...]}; shift
PORT=${MASTER_PORT:-29500}
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "deepspeed.sh: error: HOSTFILE=$HOSTFILE is not a file" >&2; exit 2; }
  source "$(dirname "${BASH_SOURCE[0]}")/deepspeed_remote.sh"
  ds_warn_env_secrets deepspeed.sh
  pdsh_words "$@"
  exec deepspeed --hostfile "$HOSTFILE" --force_multi --num_gpus "$NPROC" --master_port "$PORT" \
    ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} --module etsdm_dist.train "${PDSH_WORDS[@]}"
fi
exec deepspeed --num_nodes 1 --num_gpus "$NPROC" --master_port "$PORT" --module etsdm_dist.train "$@"
