#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine (`etsdm demo`, etsdm_dist/demo.py):
#   install (tools/install.sh) -> shard Fashion-MNIST -> FID reference of the test split ->
#   train E-TSDM on 2 ranks with the DeepSpeed launcher, one rank killed with -9 midway and the run
#   resumed -> sample on 2 ranks with DDIM and DPM-Solver++, FID/KID -> runs/demo/report.md
# Options: --s3 (stream the shards from a local SeaweedFS server), --compare (also train the DDPM
# baseline and compare), key=value config overrides. QUICK=1: the short variant. On a CUDA machine
# it picks the longer `gpu` profile. Rerunning continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export PATH="$PWD/.venv/bin:$PATH"
exec etsdm demo "$@"
