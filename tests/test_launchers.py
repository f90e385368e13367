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
                       env_extra={"ETSDM_TEST_STEP_LOG": str(step_log), "MASTER_PORT": str(H.free_port()),
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


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_torchrun_two_nodes(base, reference, rendezvous):
    """Two torchrun agents, one rank each, as two "nodes" on loopback: static node ranks
    (NODE_RANK + MASTER_ADDR) and c10d rendezvous (RDZV_ENDPOINT). Same losses as 2 ranks on one."""
    name = f"torchrun-2nodes-{rendezvous}"
    step_log = base / f"steps-{name}.log"
    step_log.unlink(missing_ok=True)
    run_dir = base / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = H.train_args(str(run_dir), H.ensure_shards(base), "train.zero_stage=2", "train.total_kimg=0.064")
    port = H.free_port()
    common = {"ETSDM_TEST_STEP_LOG": str(step_log), "NNODES": "2"}
    if rendezvous == "static":
        envs = [dict(common, NODE_RANK=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) for n in (0, 1)]
    else:
        envs = [dict(common, RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID=name) for _ in (0, 1)]
    cmd = ["bash", str(H.REPO / "launchers" / "torchrun.sh"), "1", *args]
    res = H.launch_cmds([(cmd, env) for env in envs], base / f"logs-{name}")
    assert res.returncodes == [0, 0], res.output()[-6000:]
    out = "\n".join(res.outputs)
    assert "launcher=torchrun world=2" in out, out[-3000:]
    # the rank table: one rank per node, each local rank 0
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"])
            and len(line.split()) >= 5 and line.split()[3].isdigit()]
    assert sorted((r[0], r[1], r[2]) for r in rows) == [("0", "0", "0"), ("1", "1", "0")], out[-3000:]
    steps = H.read_step_log(step_log)
    ref = dict(reference.steps)
    assert [i for i, _ in steps] == [16, 32, 48, 64]
    assert all(loss == ref[i] for i, loss in steps)
