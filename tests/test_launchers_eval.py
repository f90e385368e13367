"""launchers/sample_fid.sh (and sample_fid.sbatch, in tests/test_slurm.py) run for real on 2 CPU
ranks under each launcher: the images must be exactly N, bit-identical to one in-process
generation (per-image seeds), and the FID JSON must hold n == N and the FID of those images.
The tiny model, the reference statistics and the expected images/FID are made once per session
(`ensure_inputs`, cached under the session's base temp dir, also used by test_slurm.py)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import train_harness as H
from test_sample_job import read_images, write_export

pytestmark = pytest.mark.slow

SCRIPT = str(H.REPO / "launchers" / "sample_fid.sh")
NUM = 5
SAMPLER = ("--sampler", "ddim", "--steps", "2")
# --chunk 2: 3 chunks dealt round-robin, so both ranks write shards
SAMPLE_ARGS = "--chunk 2 --batch 2 --no-progress"
FID_ARGS = "--kid-subset-size 4 --no-progress"


@dataclass
class Inputs:
    model: str  # an `etsdm export` file
    ref: str  # reference statistics from `etsdm fid-ref`
    images: np.ndarray  # uint8 [NUM, 32, 32]: the images of an in-process, one-rank generation
    fid: float  # their FID against `ref`, computed on one rank in-process


def ensure_inputs(base: Path) -> Inputs:
    """Build once per session (the files are the cache): model, reference, expected images and FID."""
    from etsdm_dist import cli
    from etsdm_dist.eval.sampling import ImageSampler, image_batches, load_model, sampler_settings

    d = base / "eval-launchers"
    done = d / "expected.json"
    if not done.exists():
        d.mkdir(parents=True, exist_ok=True)
        model = write_export(d / "tiny.safetensors")
        rng = np.random.default_rng(0)
        np.save(d / "ref-images.npy", rng.integers(0, 256, (8, 32, 32), dtype=np.uint8))
        assert cli.main(["fid-ref", str(d / "ref-images.npy"), "--out", str(d / "ref.npz"), "--kid-rows", "8",
                         "--no-progress", "--threads", "1"]) == 0
        sampler = ImageSampler(load_model(model), sampler_settings(None, sampler="ddim", steps=2), seed=0)
        images = np.concatenate([b[:, 0].numpy() for b, _ in image_batches(sampler, range(NUM), NUM)])
        np.save(d / "expected.npy", images)
        assert cli.main(["fid", "--samples", str(d / "expected.npy"), "--ref", str(d / "ref.npz"),
                         "--out", str(d / "expected-fid.json"), "--kid-subset-size", "4", "--no-progress",
                         "--threads", "1"]) == 0
        fid = json.loads((d / "expected-fid.json").read_text())["fid"]
        done.write_text(json.dumps({"fid": fid}))
    return Inputs(str(d / "tiny.safetensors"), str(d / "ref.npz"), np.load(d / "expected.npy"),
                  json.loads(done.read_text())["fid"])


def job_env(inputs: Inputs, out: Path, mode: str = "write", **extra: str) -> dict:
    """The variables the templates read (the harness adds the CPU ones: DS_ACCELERATOR, gloo, OMP)."""
    return {"SOURCE": inputs.model, "N": str(NUM), "OUT": str(out), "REF": inputs.ref, "MODE": mode,
            "SAMPLE_ARGS": SAMPLE_ARGS, "FID_ARGS": FID_ARGS, **extra}


def check_outputs(inputs: Inputs, out: Path, log: str, *, written: bool = True) -> dict:
    """Exactly N images, equal to the expected ones bit for bit (write mode), and the FID JSON."""
    if written:
        keys, imgs, _ = read_images(str(out))
        assert keys == [str(i).zfill(9) for i in range(NUM)], (keys, log[-3000:])
        assert np.array_equal(imgs, inputs.images), "images differ from the one-rank in-process generation"
        assert len(json.loads((out / "index.json").read_text())["shards"]) == 3  # --chunk 2
        assert f"{NUM} images in {out} ({NUM} made now on 2 rank(s)" in log, log[-3000:]
    else:
        assert sorted(p.name for p in out.iterdir()) == ["fid.json"], "MODE=direct wrote more than the JSON"
    res = json.loads((out / "fid.json").read_text())
    assert res["n"] == NUM and res["ranks"] == 2, res
    assert np.isfinite(res["fid"]) and res["fid"] > 0
    assert abs(res["fid"] - inputs.fid) <= 1e-6, (res["fid"], inputs.fid)
    return res


@pytest.fixture(scope="module")
def inputs(base) -> Inputs:
    return ensure_inputs(base)


def _launch(inputs: Inputs, tmp_path: Path, launcher: str, mode: str = "write", **extra: str):
    out = tmp_path / f"out-{launcher}-{mode}"
    res = H.launch_cmd(["bash", SCRIPT, "2", *SAMPLER], tmp_path / f"logs-{launcher}-{mode}", timeout_s=240,
                       env_extra=job_env(inputs, out, mode, LAUNCHER=launcher, MASTER_PORT=str(H.free_port()),
                                         **extra))
    assert res.returncodes == [0], res.output()[-5000:]
    return out, res.output()


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "mpiexec"])
def test_sample_then_fid(inputs, tmp_path, launcher):
    extra = {"MPIEXEC": str(H.VENV_BIN / "mpiexec")} if launcher == "mpiexec" else {}
    out, log = _launch(inputs, tmp_path, launcher, **extra)
    check_outputs(inputs, out, log)


def test_direct_mode_writes_no_images_and_gives_the_same_fid(inputs, tmp_path):
    """MODE=direct (`etsdm fid --run`) under the deepspeed launcher, whose --local_rank=N the
    measure entry point must strip."""
    out, log = _launch(inputs, tmp_path, "deepspeed", "direct")
    res = check_outputs(inputs, out, log, written=False)
    assert (res["sampler"], res["steps"]) == ("ddim", 2)


@pytest.mark.parametrize("env, message", [
    ({"N": "0"}, "N must be a positive integer"),
    ({"REF": ""}, "set REF"),
    ({"MODE": "both"}, "MODE must be write or direct"),
    ({"LAUNCHER": "pdsh"}, "LAUNCHER must be"),
])
def test_bad_variables_exit_2_before_launching(inputs, tmp_path, env, message):
    out = tmp_path / "never"
    res = H.launch_cmd(["bash", SCRIPT, "2"], tmp_path / "logs", timeout_s=30,
                       env_extra={**job_env(inputs, out), **env})
    assert res.returncodes == [2] and message in res.outputs[0], res.output()
    assert "sample_fid: MODE=" not in res.outputs[0] and not out.exists()


def test_bad_source_is_exit_2_from_the_job(inputs, tmp_path):
    """A missing SOURCE reaches the job (not the script): every rank stops with 2, and mpiexec
    passes that code on."""
    out = tmp_path / "o"
    res = H.launch_cmd(["bash", SCRIPT, "2"], tmp_path / "logs", timeout_s=120,
                       env_extra={**job_env(inputs, out, SOURCE=str(tmp_path / "missing.safetensors")),
                                  "LAUNCHER": "mpiexec", "MPIEXEC": str(H.VENV_BIN / "mpiexec")})
    assert res.returncodes == [2], res.output()[-3000:]
    assert "missing.safetensors" in res.outputs[0], res.output()[-3000:]
    assert not (out / "fid.json").exists()


def test_templates_document_their_variables():
    """Each template names what it runs, its variables, the environment and the exit codes."""
    for name in ("sample_fid.sh", "sample_fid.sbatch"):
        head = (H.REPO / "launchers" / name).read_text().split("\nset -")[0]
        for word in ("SOURCE", "N=", "OUT", "REF", "MODE=write", "MODE=direct", "etsdm sample",
                     "etsdm fid --samples", "etsdm fid --run", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_ENDPOINT_URL", "AWS_PROFILE", "NCCL_SOCKET_IFNAME", "NCCL_IB_", "DS_ACCELERATOR=cpu",
                     "GLOO_SOCKET_IFNAME=lo", "OMP_NUM_THREADS=1", "Exit codes", "0 done", "2 bad input"):
            assert word in head, (name, word)
        assert os.access(H.REPO / "launchers" / name, os.X_OK), name
