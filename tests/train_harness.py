"""Shared launch helpers for the multi-process training tests.

Every launch runs in its own session (process group) and is killed as a group on timeout, so a hung
rank never hangs CI. Ranks are either started directly (`launch_ranks`: one `python -m
etsdm_dist.train` per rank with the torchrun variables set, which lets a test SIGKILL or SIGTERM one
rank) or through a real launcher command (`launch_cmd`).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
# On PYTHONPATH of every launched process: sitecustomize.py there installs the step log and the
# faults named by ETSDM_TEST_STEP_LOG / ETSDM_TEST_FAULT from the test side.
HOOKS = Path(__file__).resolve().parent / "hooks"
VENV_BIN = Path(sys.executable).parent
CI_CONFIG = str(REPO / "configs" / "ci_tiny.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict:
    """CPU DeepSpeed settings from RECIPES.md, the venv's bin on PATH (launchers, mpiexec), the
    repository and the test hooks on PYTHONPATH."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "PMI_RANK", "PMI_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        env.pop(k, None)
    env.update(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", DEEPSPEED_TIMEOUT="2",
               PYTHONUNBUFFERED="1", PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
               PYTHONPATH=f"{REPO}:{HOOKS}:{env.get('PYTHONPATH', '')}")
    env.update(extra)
    return env


@dataclass
class Result:
    returncodes: list[int]
    outputs: list[str]
    elapsed_s: float
    timed_out: bool = False

    def output(self) -> str:
        return "\n".join(f"----- process {i} (rc={rc}) -----\n{out}"
                         for i, (rc, out) in enumerate(zip(self.returncodes, self.outputs)))


@dataclass
class _Proc:
    popen: subprocess.Popen
    log_path: Path


def _start(cmd: Sequence[str], env: dict, log_path: Path) -> _Proc:
    f = open(log_path, "wb")
    p = subprocess.Popen(list(cmd), env=env, cwd=str(REPO), stdout=f, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    f.close()
    return _Proc(p, log_path)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the session we started: the rank and all its children
    except (ProcessLookupError, PermissionError):
        pass


def _wait_all(procs: list[_Proc], timeout_s: float, poll: Callable[[list[_Proc]], None] | None) -> Result:
    t0 = time.monotonic()
    timed_out = False
    while any(p.popen.poll() is None for p in procs):
        if poll is not None:
            poll(procs)
        if time.monotonic() - t0 > timeout_s:
            timed_out = True
            break
        time.sleep(0.05)
    for p in procs:  # leave nothing behind: also children of exited processes
        _kill_group(p.popen)
        p.popen.wait()
    outs = [p.log_path.read_text(errors="replace") for p in procs]
    return Result([p.popen.returncode for p in procs], outs, time.monotonic() - t0, timed_out)


def train_args(run_dir: str, data_url: str, *overrides: str, config: str = CI_CONFIG) -> list[str]:
    return [config, f"train.run_dir={run_dir}", f"data.url={data_url}", *overrides]


def launch_ranks(args: Sequence[str], world: int, log_dir: Path, *, timeout_s: float = 240,
                 env_extra: dict | None = None, poll: Callable[[list[_Proc]], None] | None = None) -> Result:
    """Start `world` ranks of `python -m etsdm_dist.train ARGS` with torchrun-style variables."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for r in range(world):
        env = base_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env_extra or {}))
        procs.append(_start([sys.executable, "-m", "etsdm_dist.train", *args], env, log_dir / f"rank{r}.log"))
    return _wait_all(procs, timeout_s, poll)


def launch_cmd(cmd: Sequence[str], log_dir: Path, *, timeout_s: float = 240, env_extra: dict | None = None,
               poll: Callable[[list[_Proc]], None] | None = None) -> Result:
    """Run a launcher command line (deepspeed, torchrun, mpiexec, a launchers/ script)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    proc = _start(cmd, base_env(**(env_extra or {})), log_dir / "launcher.log")
    return _wait_all([proc], timeout_s, poll)


def launch_cmds(cmds: Sequence[tuple[Sequence[str], dict]], log_dir: Path, *, timeout_s: float = 240,
                poll: Callable[[list[_Proc]], None] | None = None) -> Result:
    """Run several launcher command lines together (one per simulated node), each with its env."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = [_start(cmd, base_env(**env), log_dir / f"node{i}.log") for i, (cmd, env) in enumerate(cmds)]
    return _wait_all(procs, timeout_s, poll)


def read_step_log(path) -> list[tuple[int, float]]:
    """ETSDM_TEST_STEP_LOG lines -> [(images, loss)], loss exact (written as float.hex)."""
    out = []
    for line in Path(path).read_text().splitlines():
        images, loss = line.split()
        out.append((int(images), float.fromhex(loss)))
    return out


def signal_when(step_log: Path, min_images: int, sig: int, ranks: Sequence[int] | None = None):
    """A poll callback: once the step log reaches `min_images`, send `sig` to `ranks` (all ranks
    when None: what SLURM does on preemption; one rank with SIGKILL: a node that dies)."""
    state = {"done": False}

    def poll(procs: list[_Proc]) -> None:
        if state["done"] or not step_log.exists():
            return
        lines = step_log.read_text().splitlines()
        if lines and int(lines[-1].split()[0]) >= min_images:
            for r in range(len(procs)) if ranks is None else ranks:
                os.kill(procs[r].popen.pid, sig)
            state["done"] = True

    poll.state = state  # type: ignore[attr-defined]
    return poll


def make_shards(dst: str, *, limit: int = 1024, max_samples: int = 256, timeout_s: float = 120) -> str:
    """Fashion-MNIST train images padded to 32x32x1 as shards + index.json at dst (path or s3://)."""
    cmd = [sys.executable, "-m", "etsdm_dist.cli", "shard", "/usr/share/datasets/fashion-mnist", dst,
           "--limit", str(limit), "--max-samples", str(max_samples), "--resolution", "32", "--mode", "pad",
           "--no-progress", "--workers", "1"]
    r = subprocess.run(cmd, env=base_env(), cwd=str(REPO), capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        raise RuntimeError(f"etsdm shard failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return dst


# --------------------------------------------------------------------------- shared session runs
#
# Launches are the expensive part (~15-25 s each on 2 cores), so the shards and one uninterrupted
# reference run are made once per session and cached under pytest's base temp dir, shared by
# test_training.py and test_launchers.py.

REF_OVERRIDES = ("train.zero_stage=2",)  # ci_tiny: 16 steps of 16 images, checkpoints every 64


def ensure_shards(basetemp: Path) -> str:
    dst = basetemp / "shards-fmnist32"
    if not (dst / "index.json").exists():
        make_shards(str(dst))
    return str(dst)


@dataclass
class Run:
    run_dir: str
    steps: list[tuple[int, float]]
    result: Result


def run_train(name: str, basetemp: Path, data_url: str, world: int, *overrides: str, run_dir: str | None = None,
              env_extra: dict | None = None, poll_factory=None, timeout_s: float = 240) -> Run:
    """One launch of `world` ranks; the step log accumulates across launches of the same name."""
    run_dir = run_dir or str(basetemp / f"run-{name}")
    step_log = basetemp / f"steps-{name}.log"
    logs = basetemp / f"logs-{name}-{int(time.time() * 1000)}"
    poll = poll_factory(step_log) if poll_factory else None
    res = launch_ranks(train_args(run_dir, data_url, *overrides), world, logs, timeout_s=timeout_s,
                       env_extra={"ETSDM_TEST_STEP_LOG": str(step_log), **(env_extra or {})}, poll=poll)
    steps = read_step_log(step_log) if step_log.exists() else []
    return Run(run_dir, steps, res)


def ensure_reference(basetemp: Path) -> Run:
    """The uninterrupted 2-rank fp32 ZeRO-2 run everything else is compared with."""
    data = ensure_shards(basetemp)
    run_dir = basetemp / "run-reference"
    step_log = basetemp / "steps-reference.log"
    if (run_dir / "DONE").exists():
        return Run(str(run_dir), read_step_log(step_log), Result([0, 0], ["(cached)"] * 2, 0.0))
    run = run_train("reference", basetemp, data, 2, *REF_OVERRIDES)
    assert run.result.returncodes == [0, 0], run.result.output()
    (run_dir / "DONE").write_text("ok")
    return run


def final_states(run_dir: str) -> tuple[dict, dict]:
    """(EMA weights, module weights) of the newest committed checkpoint (local or s3://)."""
    import io

    import torch

    from etsdm_dist.train import checkpoint
    from etsdm_dist.data import storage

    found, _ = checkpoint.find_resume(run_dir)
    assert found is not None, f"no committed checkpoint in {run_dir}"
    path, manifest = found
    ema = torch.load(io.BytesIO(storage.read_bytes(storage.join(path, checkpoint.EMA_FILE))), weights_only=True)
    with checkpoint.weights_only_loads():
        model = torch.load(io.BytesIO(storage.read_bytes(storage.join(path, "mp_rank_00_model_states.pt"))),
                           map_location="cpu")
    return ema["ema"][0], model["module"]


def assert_same_weights(run_dir: str, ref_dir: str) -> None:
    import torch

    (ema_a, mod_a), (ema_b, mod_b) = final_states(run_dir), final_states(ref_dir)
    assert ema_a.keys() == ema_b.keys() and mod_a.keys() == mod_b.keys()
    bad = [k for k in ema_a if not torch.equal(ema_a[k], ema_b[k])]
    assert not bad, f"EMA differs from the reference in {len(bad)} tensors, e.g. {bad[:3]}"
    bad = [k for k in mod_a if not torch.equal(mod_a[k], mod_b[k])]
    assert not bad, f"weights differ from the reference in {len(bad)} tensors, e.g. {bad[:3]}"


def stats_images(run_dir: str) -> list[int]:
    import json

    from etsdm_dist.data import storage

    text = storage.read_bytes(storage.join(run_dir, "stats.jsonl")).decode()
    return [json.loads(line)["images"] for line in text.splitlines()]
