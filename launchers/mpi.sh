#!/usr/bin/env bash
# Launch `etsdm train` under MPI. Rank 0's address and a port are broadcast over mpi4py
# (etsdm_dist/dist.py), so no MASTER_ADDR is needed. Use ONE MPI: the mpich wheel's mpiexec with
# the mpi4py built against it (never mix with a system Open MPI).
#   direct:     launchers/mpi.sh 16 configs/ffhq256.yaml                (MPI_HOSTS=node01,node02 for hosts)
#   DeepSpeed:  LAUNCH=deepspeed HOSTFILE=launchers/hostfile.example launchers/mpi.sh 0 CONFIG
#               (deepspeed --launcher mpich: process count from the hostfile's slots; the script path
#               is passed, not --module: DeepSpeed 0.19.8's mpich runner puts -m before its helper).
#               No credentials in .deepspeed_env / DS_ENV_FILE: the runner puts its lines on mpirun's
#               command line and in its log (this script warns; README "Credentials"). mpirun starts
#               the ranks without a shell, so the arguments need no quoting.
set -euo pipefail
NPROC=${1:?usage: launchers/mpi.sh TOTAL_PROCESSES CONFIG [key=value ...]}; shift
MPIEXEC=${MPIEXEC:-mpiexec}
if [[ "${LAUNCH:-mpiexec}" == deepspeed ]]; then
  source "$(dirname "${BASH_SOURCE[0]}")/deepspeed_remote.sh"
  ds_warn_env_secrets mpi.sh
  exec deepspeed --hostfile "${HOSTFILE:?set HOSTFILE}" --launcher mpich --force_multi --no_ssh_check \
    --master_addr "${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | awk '{print $1}')}" \
    --master_port "${MASTER_PORT:-29500}" "$(cd "$(dirname "$0")/.." && pwd)/launchers/etsdm_train.py" "$@"
fi
HOSTS=()
if [[ -n "${MPI_HOSTS:-}" ]]; then HOSTS=(-hosts "$MPI_HOSTS"); fi
exec "$MPIEXEC" -n "$NPROC" "${HOSTS[@]}" python -u -m etsdm_dist.train "$@"
