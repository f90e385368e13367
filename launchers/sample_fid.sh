#!/usr/bin/env bash
# Sampling + FID job on NPROC ranks per node, started by LAUNCHER=deepspeed|torchrun|mpiexec|srun
# (srun: use launchers/sample_fid.sbatch). No DeepSpeed engine is built; ranks find each other
# through the same rank facade as training (etsdm_dist/dist.py).
#   MODE=write  (default) 1. etsdm sample SOURCE --num N --out OUT   (webdataset shards + index.json,
#                            resumable: a rerun skips committed chunks)
#                         2. etsdm fid --samples OUT --ref REF --out FID_JSON
#   MODE=direct           etsdm fid --run SOURCE --num N --ref REF --out FID_JSON
#                         (sample and measure in one job, no image written)
# Both modes give the same images (image i is drawn from seed (SEED, i) on any rank count), so the
# same FID.
#
# usage:  SOURCE=runs/x N=50000 OUT=s3://bucket/samples/x REF=refs/ffhq256.npz \
#           [MODE=write|direct] [LAUNCHER=deepspeed] launchers/sample_fid.sh NPROC [sampler flags]
#   e.g.  ... launchers/sample_fid.sh 8 --sampler ddim --steps 50
# Required variables:
#   SOURCE  run directory (newest committed EMA) or a file from `etsdm export`; local or s3://
#   N       number of images
#   OUT     MODE=write: where the samples go (folder or s3:// URL); MODE=direct: folder/URL for the JSON
#   REF     reference statistics (.npz from `etsdm fid-ref`), local or s3://
# Optional: MODE, LAUNCHER, SEED (0), FID_JSON ($OUT/fid.json), SAMPLE_ARGS (extra flags of
#   `etsdm sample`: --batch, --chunk, --format png, --classes ...), FID_ARGS (extra flags of the fid
#   step: --batch, --kid-subset-size, --threads ...; MODE=direct also --sample-batch),
#   PYTHON (python), MASTER_PORT (29500; the fid step of MODE=write uses MASTER_PORT+1).
#   The arguments after NPROC are sampler flags, given to `etsdm sample` and `etsdm fid --run` alike
#   (--sampler --steps --grid --eta --order ... --ema-index); unset ones come from the run's config.
# Several nodes (run this script once per node for torchrun; once in all for deepspeed/mpiexec):
#   deepspeed: HOSTFILE=launchers/hostfile.example [MASTER_ADDR=<node 0>]   (passwordless ssh/pdsh)
#   torchrun:  NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0>, or NNODES=4 RDZV_ENDPOINT=<host>:<port>
#   mpiexec:   MPI_HOSTS=node01,node02 (NPROC is then the total); MPIEXEC=<the mpich wheel's mpiexec>
# Environment the ranks need:
#   s3:// paths: AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / ~/.aws/credentials, or
#     an instance role), AWS_ENDPOINT_URL for a non-AWS store (MinIO, SeaweedFS, ...).
#   GPUs on several nodes: NCCL_SOCKET_IFNAME=<the nodes' network interface>, and on InfiniBand
#     NCCL_IB_HCA=<mlx5_0,...> (NCCL_IB_DISABLE=1 to force TCP); NCCL_DEBUG=INFO when it hangs.
#   CPU only: DS_ACCELERATOR=cpu GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 (gloo; lo on one machine).
#   deepspeed on several nodes starts ranks over ssh, which forwards only PYTHON*, NCCL*, UCX*, MV2*
#   variables: put AWS_PROFILE (not keys: DeepSpeed prints that file in its log; this script warns),
#   DS_ACCELERATOR, PATH to the venv ... in .deepspeed_env or DS_ENV_FILE. The arguments are quoted
#   for the nodes' login shells (launchers/deepspeed_remote.sh).
# Exit codes: 0 done (FID JSON written); 2 bad input: a variable or flag, a missing or unreadable
#   SOURCE / REF / samples (the message names it; every rank stops with it); anything else: a rank
#   crashed or was killed (the launcher's code, e.g. 1 or 137). deepspeed, mpiexec and srun pass a
#   rank's 2 on; torchrun reports every failed rank as 1 (its "exitcode" line and the ranks'
#   "error:" lines in the log say which). Rerun the same command: sampling resumes from committed chunks.
set -euo pipefail
usage() { echo "sample_fid: error: $1" >&2; sed -n '13,15p' "$0" >&2; exit 2; }
NPROC=${1:-}; [[ "$NPROC" =~ ^[0-9]+$ ]] || usage "first argument must be NPROC (processes per node), got '${NPROC}'"
shift
for v in SOURCE N OUT REF; do [[ -n "${!v:-}" ]] || usage "set $v"; done
[[ "$N" =~ ^[1-9][0-9]*$ ]] || usage "N must be a positive integer, got '$N'"
MODE=${MODE:-write}; LAUNCHER=${LAUNCHER:-deepspeed}
[[ "$MODE" == write || "$MODE" == direct ]] || usage "MODE must be write or direct, got '$MODE'"
case "$LAUNCHER" in deepspeed|torchrun|mpiexec|srun) ;; *) usage "LAUNCHER must be deepspeed, torchrun, mpiexec or srun, got '$LAUNCHER'";; esac
SEED=${SEED:-0}; PYTHON=${PYTHON:-python}; PORT=${MASTER_PORT:-29500}
OUT=${OUT%/}; FID_JSON=${FID_JSON:-$OUT/fid.json}
read -r -a SAMPLE_EXTRA <<< "${SAMPLE_ARGS:-}"
read -r -a FID_EXTRA <<< "${FID_ARGS:-}"
if [[ "$LAUNCHER" == deepspeed && -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || usage "HOSTFILE=$HOSTFILE is not a file"
  source "$(dirname "${BASH_SOURCE[0]}")/deepspeed_remote.sh"
  ds_warn_env_secrets sample_fid
fi
if [[ "$SOURCE$OUT$REF$FID_JSON" == *s3://* && -z "${AWS_ACCESS_KEY_ID:-}${AWS_PROFILE:-}" && ! -f ~/.aws/credentials ]]; then
  echo "sample_fid: warning: s3:// paths but no AWS_ACCESS_KEY_ID / AWS_PROFILE / ~/.aws/credentials (fine with an instance role)" >&2
fi

# launch PORT MODULE ARGS...: every rank runs `python -m MODULE ARGS`. `--` ends the launcher's own
# options: deepspeed and torchrun would otherwise take `--num` / `--run` as abbreviations of theirs
# (and refuse them as ambiguous); both drop the `--` before starting the ranks.
launch() {
  local port=$1 module=$2; shift 2
  case "$LAUNCHER" in
    deepspeed)
      if [[ -n "${HOSTFILE:-}" ]]; then
        pdsh_words "$@"
        deepspeed --hostfile "$HOSTFILE" --force_multi --num_gpus "$NPROC" --master_port "$port" \
          ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} --module "$module" -- "${PDSH_WORDS[@]}"
      else
        deepspeed --num_nodes 1 --num_gpus "$NPROC" --master_port "$port" --module "$module" -- "$@"
      fi ;;
    torchrun)
      local nodes=(--standalone --nnodes 1)
      if [[ "${NNODES:-1}" != 1 && -n "${RDZV_ENDPOINT:-}" ]]; then
        nodes=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-etsdm}-$module")
      elif [[ "${NNODES:-1}" != 1 ]]; then
        nodes=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK (or RDZV_ENDPOINT)}"
               --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "$port")
      fi
      torchrun "${nodes[@]}" --nproc_per_node "$NPROC" -m "$module" -- "$@" ;;
    mpiexec)
      local hosts=()
      if [[ -n "${MPI_HOSTS:-}" ]]; then hosts=(-hosts "$MPI_HOSTS"); fi
      "${MPIEXEC:-mpiexec}" -n "$NPROC" "${hosts[@]}" "$PYTHON" -u -m "$module" "$@" ;;
    srun)
      # --kill-on-bad-exit=0 --wait=60: as in slurm.sbatch, every task ends on its own (the ranks
      # agree on errors and exit together) and a crashed one cannot leave the rest hanging.
      srun --ntasks "$NPROC" --kill-on-bad-exit=0 --wait=60 --cpu-bind=none "$PYTHON" -u -m "$module" "$@" ;;
  esac
}

echo "sample_fid: MODE=$MODE LAUNCHER=$LAUNCHER NPROC=$NPROC SOURCE=$SOURCE N=$N OUT=$OUT REF=$REF FID_JSON=$FID_JSON"
if [[ "$MODE" == write ]]; then
  launch "$PORT" etsdm_dist.eval.sample "$SOURCE" --num "$N" --out "$OUT" --seed "$SEED" "${SAMPLE_EXTRA[@]}" "$@"
  launch "$((PORT + 1))" etsdm_dist.eval.measure --samples "$OUT" --ref "$REF" --out "$FID_JSON" --seed "$SEED" \
    "${FID_EXTRA[@]}"
else
  launch "$PORT" etsdm_dist.eval.measure --run "$SOURCE" --num "$N" --ref "$REF" --out "$FID_JSON" \
    --seed "$SEED" "${FID_EXTRA[@]}" "$@"
fi
echo "sample_fid: FID of $N images in $FID_JSON"
