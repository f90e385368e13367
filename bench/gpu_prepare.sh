#!/usr/bin/env bash
# Here (the CPU box, with PyPI): gather into .whl/ the wheels the GPU machine lacks, for
# bench/gpu_check.sh. The device image has torch, numpy, Pillow, PyYAML, fsspec, safetensors, but
# no deepspeed (no wheel on PyPI: built here from the sdist, pure Python with DS_BUILD_OPS=0),
# pydantic (+ its core for cp312), hjson. .whl/ is git-ignored via .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl
PY=${PY:-.venv/bin/python}
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# the versions validated here with deepspeed 0.19.8: those of our venv
mapfile -t pins < <("$PY" - <<'PYEOF'
from importlib.metadata import version
for n in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "hjson"):
    print(f"{n}=={version(n)}")
PYEOF
)
"$PY" -m pip download -q --no-deps "${plat[@]}" -d .whl "${pins[@]}"
if ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary :all: "deepspeed==0.19.8" -d "$tmp"
  tar -xzf "$tmp"/deepspeed-0.19.8.tar.gz -C "$tmp"
  (cd "$tmp/deepspeed-0.19.8" && DS_BUILD_OPS=0 "$OLDPWD/$PY" -m pip wheel -q --no-deps --no-build-isolation . -w "$OLDPWD/.whl")
  rm -rf "$tmp"
fi
ls -la .whl
