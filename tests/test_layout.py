"""The architecture's rules, checked: import-linter contracts (pyproject.toml [tool.importlinter])
and no private name imported across modules."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "etsdm_dist"


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is not installed (tools/install.sh installs it)"
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout and " kept" in out.stdout, out.stdout[-2000:]


def _private_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("etsdm_dist"):
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}"
                    for a in node.names if a.name.startswith("_")]
    return bad


def test_no_private_name_is_imported_across_modules():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py")]
    bad = [b for f in files for b in _private_imports(f)]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_check_sees_a_private_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from etsdm_dist.data.order import _hash\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert _private_imports(probe) == ["probe.py:1: etsdm_dist.data.order._hash"]
    finally:
        ROOT = saved
