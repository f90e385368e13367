"""The run directory's lease (etsdm_dist/train/lease.py): one training run per train.run_dir.

In-process against the real backends (flock on a local directory, conditional PUTs on the
SeaweedFS fixture), with real processes where a holder has to die (kill -9) or stall (SIGSTOP);
then two `etsdm train` on one run directory, local and s3://.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import train_harness as H
from etsdm_dist.data import storage
from etsdm_dist.train import lease as L

HOLDER = """
import sys, time
from etsdm_dist.train import lease as L
held = L.acquire(sys.argv[1], lease_s=float(sys.argv[2]), log=lambda m: print(m, flush=True))
print("held", held.record["run_id"], flush=True)
while True:  # what the training loop does before each write
    reason = held.lost_reason()
    if reason is not None:
        print("LOST", reason, flush=True)
        sys.exit(5)
    time.sleep(0.05)
"""


def _start_holder(run_dir: str, lease_s: float) -> tuple[subprocess.Popen, str]:
    """A process holding the lease (and checking it like the loop); returns it and its run id."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir, str(lease_s)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=H.base_env(), start_new_session=True)
    line = p.stdout.readline()
    assert line.startswith("held "), line + p.stdout.read()
    return p, line.split()[1]


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the session we started for it
    except ProcessLookupError:
        pass
    p.wait()


def _race(n: int, fn) -> tuple[list, list]:
    """fn() in n threads released together: (results, exceptions)."""
    go = threading.Barrier(n)
    results, errors = [], []

    def run():
        go.wait()
        try:
            results.append(fn())
        except Exception as e:  # noqa: BLE001 - collected for the assertions
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


# --------------------------------------------------------------------------- local: flock


def test_local_second_run_refused_with_holder_named_then_released(tmp_path):
    run = str(tmp_path / "run")
    held = L.acquire(run)
    with pytest.raises(L.LeaseHeld) as refused:
        L.acquire(run)
    msg = str(refused.value)
    rec = held.record
    for part in (f"host {socket.gethostname()}", f"pid {os.getpid()}", f"started {rec['started']}",
                 rec["run_id"][:12], f"train.run_dir={run}"):
        assert part in msg, (part, msg)
    held.check()  # the refusal did not disturb the holder
    held.release()
    again = L.acquire(run)  # released: free at once
    assert again.record["run_id"] != rec["run_id"]
    assert json.loads(Path(run, L.LEASE_FILE).read_text())["run_id"] == again.record["run_id"]
    again.release()
    assert json.loads(Path(run, L.LEASE_FILE).read_text())["released"] is True


def test_local_lock_dies_with_a_killed_holder(tmp_path):
    run = str(tmp_path / "run")
    p, run_id = _start_holder(run, 60)
    try:
        with pytest.raises(L.LeaseHeld, match=f"pid {p.pid}"):
            L.acquire(run)
    finally:
        _kill(p)  # kill -9: no release, the kernel drops the lock
    logs = []
    held = L.acquire(run, log=logs.append)
    assert any("without releasing" in m and f"pid {p.pid}" in m for m in logs), logs
    held.release()


def test_local_lease_lost_when_its_file_is_replaced(tmp_path):
    run = tmp_path / "run"
    held = L.acquire(str(run))
    assert held.lost_reason() is None
    os.remove(run / L.LEASE_FILE)  # e.g. the run directory deleted and made again under it
    with pytest.raises(L.LeaseLost, match="removed or replaced"):
        held.check()
    held.release()


def test_unleasable_storage_is_a_clear_error():
    with pytest.raises(L.LeaseError, match="gs://"):
        L.acquire("gs://bucket/run")


# --------------------------------------------------------------------------- s3: conditional PUTs


def test_s3_racing_runs_exactly_one_holds(s3_bucket):
    run = f"{s3_bucket}/run"
    results, errors = _race(4, lambda: L.acquire(run, lease_s=2, log=lambda m: None))
    assert len(results) == 1 and len(errors) == 3, (results, errors)
    winner = results[0]
    for e in errors:  # each loser saw the winner renew and names it
        assert isinstance(e, L.LeaseHeld), e
        assert winner.record["run_id"][:12] in str(e) and f"pid {os.getpid()}" in str(e), str(e)
    assert json.loads(storage.read_bytes(f"{run}/{L.LEASE_FILE}"))["run_id"] == winner.record["run_id"]
    winner.check()
    winner.release()
    logs: list[str] = []
    t0 = time.monotonic()
    nxt = L.acquire(run, lease_s=60, log=logs.append)  # released: taken at once, not watched for 60 s
    assert time.monotonic() - t0 < 30 and any("released the lease" in m for m in logs), logs
    nxt.release()


def test_s3_stale_lease_after_kill_9_taken_over_by_exactly_one(s3_bucket):
    run = f"{s3_bucket}/run"
    p, dead_id = _start_holder(run, 1.5)
    _kill(p)
    logs: list[str] = []
    t0 = time.monotonic()
    results, errors = _race(4, lambda: L.acquire(run, lease_s=1.5, log=logs.append))
    assert len(results) == 1 and len(errors) == 3, (results, errors)
    assert time.monotonic() - t0 >= 1.5  # watched a whole lease duration first
    winner = results[0]
    assert all(isinstance(e, L.LeaseHeld) and winner.record["run_id"][:12] in str(e) for e in errors), errors
    took = [m for m in logs if "took it over" in m]
    assert len(took) == 1 and dead_id[:12] in took[0] and f"pid {p.pid}" in took[0], logs
    winner.release()


def test_s3_fresh_lease_refused_even_with_a_shorter_lease_s(s3_bucket):
    """A holder renewing every 1.5 s must not look dead to a run configured with lease_s=1."""
    run = f"{s3_bucket}/run"
    holder = L.acquire(run, lease_s=6, log=lambda m: None)
    try:
        with pytest.raises(L.LeaseHeld, match=holder.record["run_id"][:12]):
            L.acquire(run, lease_s=1, log=lambda m: None)
        holder.check()
    finally:
        holder.release()


def test_s3_stalled_holder_loses_its_lease_and_stops(s3_bucket):
    run = f"{s3_bucket}/run"
    p, stalled_id = _start_holder(run, 3)  # renewed every 0.75 s: no false loss on a loaded machine
    try:
        os.kill(p.pid, signal.SIGSTOP)  # a run frozen longer than its lease
        logs: list[str] = []
        new = L.acquire(run, lease_s=3, log=logs.append)
        assert any("took it over" in m and stalled_id[:12] in m for m in logs), logs
        os.kill(p.pid, signal.SIGCONT)
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 5, out
        lost = [line for line in out.splitlines() if line.startswith("LOST")]
        assert lost and "taken over by" in lost[0] and new.record["run_id"][:12] in lost[0], out
        time.sleep(1.0)  # the stalled run wrote nothing over the new holder's record
        new.check()
        assert json.loads(storage.read_bytes(f"{run}/{L.LEASE_FILE}"))["run_id"] == new.record["run_id"]
        new.release()
    finally:
        _kill(p)


# --------------------------------------------------------------------------- two `etsdm train`


def _step_count(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_second_train_on_a_local_run_dir_refused_first_intact(tmp_path, data):
    run = tmp_path / "run"
    step_log = tmp_path / "steps-a.log"
    second: dict = {}

    def poll(procs):
        if second or _step_count(step_log) < 1:
            return
        first = procs[0].popen
        os.kill(first.pid, signal.SIGSTOP)  # hold A mid-run, holding its lock, while B starts
        try:
            second["res"] = H.launch_ranks(H.train_args(str(run), data, "train.seed=2"), 1,
                                           tmp_path / "logs-b", timeout_s=180)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        second["pid"] = first.pid

    a = H.launch_ranks(H.train_args(str(run), data), 1, tmp_path / "logs-a", timeout_s=300,
                       env_extra={"ETSDM_TEST_STEP_LOG": str(step_log)}, poll=poll)
    b = second["res"]
    assert b.returncodes == [5], b.output()
    assert f"pid {second['pid']}" in b.outputs[0] and f"host {socket.gethostname()}" in b.outputs[0], b.output()
    assert a.returncodes == [0], a.output()
    # A's run is A's alone: its config, its reports in order, its final checkpoint.
    assert "seed: 1" in (run / "config.yaml").read_text()
    images = H.stats_images(str(run))
    assert images == list(range(32, 257, 32)), images
    found, _ = _find_resume(str(run))
    assert found is not None and found[1]["images"] == 256
    assert json.loads((run / L.LEASE_FILE).read_text())["released"] is True


def _find_resume(run_dir: str):
    from etsdm_dist import run_dir as rd

    return rd.find_resume(run_dir)


def test_s3_second_train_refused_then_stalled_run_taken_over(tmp_path, data, s3_bucket):
    """A trains on s3://; B is refused naming A; A freezes; C takes the stale lease over and
    finishes; A wakes up, finds its lease lost and exits 5 without writing."""
    run = f"{s3_bucket}/run"
    step_log = tmp_path / "steps-a.log"
    env = {"ETSDM_LOCAL_DIR": str(tmp_path / "mirror")}
    lease = "train.lease_s=4"  # A renews every second; C waits 4 s for the frozen A
    state: dict = {}

    def poll(procs):
        if state or _step_count(step_log) < 1:
            return
        first = procs[0].popen
        state["a_pid"] = first.pid
        state["b"] = H.launch_ranks(H.train_args(run, data, lease, "train.seed=2"), 1, tmp_path / "logs-b",
                                    timeout_s=180, env_extra=env)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            state["c"] = H.launch_ranks(H.train_args(run, data, lease, "train.total_kimg=0.064"), 1,
                                        tmp_path / "logs-c", timeout_s=180, env_extra=env)
        finally:
            os.kill(first.pid, signal.SIGCONT)

    # A runs far longer than the test lasts and checkpoints only at its (never reached) end.
    a = H.launch_ranks(H.train_args(run, data, lease, "train.total_kimg=16", "train.checkpoint_kimg=16"), 1,
                       tmp_path / "logs-a", timeout_s=400, poll=poll,
                       env_extra={**env, "ETSDM_TEST_STEP_LOG": str(step_log)})
    b, c = state["b"], state["c"]
    assert b.returncodes == [5], b.output()
    assert f"pid {state['a_pid']}" in b.outputs[0], b.output()
    assert c.returncodes == [0], c.output()
    assert "took it over" in c.outputs[0] and f"pid {state['a_pid']}" in c.outputs[0], c.output()
    assert a.returncodes == [5], a.output()
    assert "taken over by" in a.outputs[0], a.output()
    # The run directory is C's: its reports, its checkpoint, its released lease.
    assert H.stats_images(run) == [32, 64]
    found, _ = _find_resume(run)
    assert found is not None and found[1]["images"] == 64
    rec = json.loads(storage.read_bytes(f"{run}/{L.LEASE_FILE}"))
    assert rec["released"] is True and rec["pid"] != state["a_pid"], rec
