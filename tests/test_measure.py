"""`etsdm fid --run` (sample and measure, no images written) and `etsdm compare`, with the real
Inception weights on a tiny network: few images, so the figures are only checked for consistency,
not for quality."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from etsdm_dist import cli
from test_sample_job import write_export

NUM = 6
SAMPLER = ["--sampler", "ddim", "--steps", "3"]
COMMON = ["--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("measure")
    rng = np.random.default_rng(0)
    np.save(base / "ref.npy", rng.integers(0, 256, (8, 32, 32), dtype=np.uint8))
    assert cli.main(["fid-ref", str(base / "ref.npy"), "--out", str(base / "ref.npz"), "--kid-rows", "8",
                     *COMMON]) == 0
    a = write_export(base / "a.safetensors")
    b = write_export(base / "b.safetensors", "etsdm.enabled=false", seed=1)
    return base, a, b


def test_fid_run_equals_sampling_to_disk_then_measuring(setup, tmp_path):
    base, a, _ = setup
    out = tmp_path / "run.json"
    assert cli.main(["fid", "--run", a, "--num", str(NUM), "--ref", str(base / "ref.npz"), "--out", str(out),
                     "--sample-batch", "4", "--kid-subset-size", "4", *SAMPLER, *COMMON]) == 0
    on_the_fly = json.loads(out.read_text())
    pngs = tmp_path / "pngs"
    assert cli.main(["sample", a, "--num", str(NUM), "--out", str(pngs), "--format", "png", *SAMPLER,
                     "--no-progress"]) == 0
    out2 = tmp_path / "disk.json"
    assert cli.main(["fid", "--samples", str(pngs), "--ref", str(base / "ref.npz"), "--out", str(out2),
                     "--kid-subset-size", "4", *COMMON]) == 0
    from_disk = json.loads(out2.read_text())
    assert torch.is_grad_enabled()  # in-process jobs leave the caller's autograd state alone
    assert on_the_fly["n"] == from_disk["n"] == NUM
    assert on_the_fly["fid"] == pytest.approx(from_disk["fid"], rel=1e-9)  # the same images
    assert on_the_fly["sampler"] == "ddim" and on_the_fly["steps"] == 3
    assert on_the_fly["weights"]["kind"] == "export" and on_the_fly["protocol"] == from_disk["protocol"]


def test_fid_run_refuses_a_bad_num(setup, capsys):
    base, a, _ = setup
    assert cli.main(["fid", "--run", a, "--num", "1", "--ref", str(base / "ref.npz"), "--out", "", *COMMON]) == 2
    assert "--num" in capsys.readouterr().err


def test_compare_same_seeds_for_every_run(setup, tmp_path):
    base, a, b = setup
    out = tmp_path / "cmp"
    # `a` twice: the same weights must give the same figures (same per-image seeds per run)
    assert cli.main(["compare", a, a, b, "--ref", str(base / "ref.npz"), "--num", str(NUM),
                     "--ddim", "2,3", "--dpm", "2", "--out", str(out), "--labels", "a,a-again,ddpm",
                     "--sample-batch", "3", *COMMON]) == 0
    summary = json.loads((out / "compare.json").read_text())
    rows = {(r["run"], r["sampler"], r["steps"]): r for r in summary["rows"]}
    assert len(rows) == 9
    for key in [("ddim", 2), ("ddim", 3), ("dpm_solver++", 2)]:
        assert rows[("a", *key)]["fid"] == rows[("a-again", *key)]["fid"]
        assert rows[("a", *key)]["fid"] != rows[("ddpm", *key)]["fid"]  # other weights
    assert [r["etsdm"]["enabled"] for r in summary["runs"]] == [True, True, False]
    table = (out / "compare.md").read_text()
    assert "| ddim | 3 |" in table and "a-again" in table
    assert (out / "fid_vs_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_needs_a_setting(setup, capsys):
    base, a, _ = setup
    assert cli.main(["compare", a, "--ref", str(base / "ref.npz"), "--ddim", "", "--dpm", "",
                     "--out", str(Path(base) / "x"), *COMMON]) == 2
    assert "no sampler settings" in capsys.readouterr().err
