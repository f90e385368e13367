"""Each launcher that runs on this machine starts 2 ranks of the real job through the scripts in
launchers/, and the fp32 losses equal the reference run's (train_harness.ensure_reference) bit for
bit, across ZeRO stages: the launchers differ only in how ranks learn who they are (dist.py).
Every launch is a process-group kill on timeout, so a hung rank cannot hang CI."""
from __future__ import annotations

import shutil

import pytest

import train_harness as H

pytestmark = pytest.mark.slow


def _check(base, reference, name, cmd, launcher, env_extra=None):
    step_log = base / f"steps-{name}.log"
    step_log.unlink(missing_ok=True)
    run_dir = base / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    res = H.launch_cmd([*cmd, *H.train_args(str(run_dir), H.ensure_shards(base), *overrides[name])],
                       base / f"logs-{name}", timeout_s=240,
                       env_extra={"ETSDM_STEP_LOG": str(step_log), "MASTER_PORT": str(H.free_port()),
                                  **(env_extra or {})})
    out = res.outputs[0]
    assert res.returncodes == [0], res.output()[-4000:]
    assert f"launcher={launcher} world=2" in out, out[-3000:]
    steps = H.read_step_log(step_log)
    ref = dict(reference.steps)
    assert [i for i, _ in steps] == [16, 32, 48, 64]
    assert all(loss == ref[i] for i, loss in steps)


overrides = {
    "deepspeed": ("train.zero_stage=0", "train.total_kimg=0.064"),
    "torchrun": ("train.zero_stage=1", "train.total_kimg=0.064"),
    "mpiexec": ("train.zero_stage=2", "train.total_kimg=0.064"),
    "deepspeed-mpich": ("train.zero_stage=1", "train.total_kimg=0.064"),
}


def test_deepspeed_launcher(base, reference):
    _check(base, reference, "deepspeed", ["bash", str(H.REPO / "launchers" / "deepspeed.sh"), "2"], "torchrun")


def test_torchrun(base, reference):
    _check(base, reference, "torchrun", ["bash", str(H.REPO / "launchers" / "torchrun.sh"), "2"], "torchrun")


def test_mpiexec_mpich_wheel(base, reference):
    _check(base, reference, "mpiexec", ["bash", str(H.REPO / "launchers" / "mpi.sh"), "2"], "mpich",
           env_extra={"MPIEXEC": str(H.VENV_BIN / "mpiexec")})


def test_deepspeed_launcher_mpich_backend(base, reference):
    hostfile = base / "hostfile-local"
    hostfile.write_text("localhost slots=2\n")
    _check(base, reference, "deepspeed-mpich", ["bash", str(H.REPO / "launchers" / "mpi.sh"), "0"], "torchrun",
           env_extra={"LAUNCH": "deepspeed", "HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1"})
