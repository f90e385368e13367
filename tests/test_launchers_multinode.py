"""launchers/deepspeed.sh on its real multi-node path: `deepspeed --hostfile` with DeepSpeed's default
runner, pdsh over ssh, into two "nodes" that are both this machine (host names `localhost` and
`127.0.0.1`, one rank each), through a throw-away sshd on loopback (tests/sshd_server.py). The fp32
losses must equal the shared reference run's (train_harness.ensure_reference) bit for bit, like the
single-node launchers in tests/test_launchers.py.

What this exercises that a one-node launch does not:
- DeepSpeed's ssh reachability check and its `ssh <first host> hostname -I` for the master address
  (launchers/deepspeed.sh passes no --master_addr), both plain `ssh` from PATH;
- pdsh's ssh rcmd starting `deepspeed.launcher.launch --node_rank=%n` on each host;
- the remote ranks get a fresh ssh session's environment, not the caller's: only what DeepSpeed's
  runner exports reaches them (PYTHON* variables, and the KEY=VALUE lines of its `.deepspeed_env`
  file, here named by DS_ENV_FILE). DS_ACCELERATOR, OMP_NUM_THREADS, GLOO_SOCKET_IFNAME,
  DEEPSPEED_TIMEOUT, ETSDM_TEST_STEP_LOG and the venv PATH travel that way (PYTHONPATH, with the
  test hooks that write the step log, travels as a PYTHON* variable). Two of them are checked by
  the result: without ETSDM_TEST_STEP_LOG or the hooks on PYTHONPATH rank 0 writes no step log,
  and without OMP_NUM_THREADS=1 the ranks use every core and the losses stop matching the
  reference (seen here: the 4th step's loss
  differed in its last bits when DS_ACCELERATOR and OMP_NUM_THREADS were left out of the file).

Every wait is bounded (H.launch_cmd kills the launcher's process group on timeout; the fixture kills
whatever the ssh sessions started). A machine where sshd or pdsh cannot run fails, with logs.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

import sshd_server as S
from daemons import running
import train_harness as H
from etsdm_dist.train import checkpoint

pytestmark = pytest.mark.slow

HOSTS = ("localhost", "127.0.0.1")  # two distinct names to DeepSpeed and pdsh, one machine
# What the ranks need from the test's environment (H.base_env), sent through DeepSpeed's env file.
FORWARD = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "DEEPSPEED_TIMEOUT", "PATH",
           "ETSDM_TEST_STEP_LOG")


@pytest.fixture
def sshd(tmp_path):
    with running(S.SshServer(tmp_path / "sshd", hosts=HOSTS), S.missing_binaries(),
                 "tools/install.sh apt-installs pdsh and openssh-server", S.SshError) as server:
        yield server


def _strip_pdsh_prefix(line: str) -> tuple[str | None, str]:
    """pdsh prefixes every remote output line with "HOST: "."""
    for h in HOSTS:
        if line.startswith(f"{h}: "):
            return h, line[len(h) + 2:]
    return None, line


def test_deepspeed_launcher_two_nodes_over_ssh(base, reference, sshd):
    name = "deepspeed-pdsh-2nodes"
    step_log = base / f"steps-{name}.log"
    step_log.unlink(missing_ok=True)
    # A run directory and a URL holding what the nodes' login shells would act on: both must arrive
    # verbatim (nothing executed, nothing split, `%n` not expanded by pdsh), and the URL's password
    # must not be stored (launchers/deepspeed_remote.sh, etsdm_dist/redact.py; tests/test_secrets.py).
    marker = base / f"executed-{name}"
    marker.unlink(missing_ok=True)
    run_dir = base / f"run-{name} $(touch {marker}) `touch {marker}` & %n 'q' \"dq\" \\b;|"
    password = "pw-multinode-0123"
    fid_ref = f"https://etsdm:{password}@example.invalid/ref.npz?v=1&x=$HOME;y=`id`"
    shutil.rmtree(base / run_dir.relative_to(base).parts[0], ignore_errors=True)
    hostfile = sshd.dir / "hostfile"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    # DeepSpeed reads DS_ENV_FILE (default .deepspeed_env) in ~ and in the current directory; an
    # absolute name makes both lookups this file, so a developer's own ~/.deepspeed_env or
    # ./.deepspeed_env cannot leak in. Each line must be KEY=VALUE (no comments, no blank lines).
    wanted = H.base_env(ETSDM_TEST_STEP_LOG=str(step_log))
    env_file = sshd.dir / "deepspeed_env"
    env_file.write_text("".join(f"{k}={wanted[k]}\n" for k in FORWARD))
    args = H.train_args(str(run_dir), H.ensure_shards(base), "train.zero_stage=1", "train.total_kimg=0.064",
                        f"data.fid_ref={fid_ref}")
    res = H.launch_cmd(
        ["bash", str(H.REPO / "launchers" / "deepspeed.sh"), "1", *args], base / f"logs-{name}", timeout_s=180,
        env_extra={"HOSTFILE": str(hostfile), "DS_ENV_FILE": str(env_file), "MASTER_PORT": str(H.free_port()),
                   "MASTER_ADDR": "127.0.0.1",  # not DeepSpeed's guess from `hostname -I`
                   # our ssh wrapper first: DeepSpeed's checks and pdsh run plain `ssh`
                   "PATH": f"{sshd.bin_dir}:{wanted['PATH']}"})
    out = res.outputs[0]

    def why(msg: str) -> str:
        return f"{msg}\n----- launcher (timed_out={res.timed_out}) -----\n{out[-6000:]}\n{sshd.logs()}"

    assert res.returncodes == [0] and not res.timed_out, why(f"launcher exited {res.returncodes}")
    lines = [_strip_pdsh_prefix(line) for line in out.splitlines()]
    # pdsh ran a node launcher on each host, and --node_rank=%n gave the first hostfile line node 0
    for node, host in enumerate(HOSTS):
        assert any(h == host and f"node_rank={node}" in text for h, text in lines), why(f"no node {node} on {host}")
    table = [text for _, text in lines]
    assert any(t.startswith("launcher=torchrun world=2 master=127.0.0.1:") for t in table), why("no rank table")
    # the rank table: one rank per node, each local rank 0
    rows = [t.split() for t in table if t.split()[:1] in (["0"], ["1"]) and len(t.split()) >= 5
            and t.split()[3].isdigit()]
    assert sorted((r[0], r[1], r[2]) for r in rows) == [("0", "0", "0"), ("1", "1", "0")], why("rank table")
    assert step_log.exists(), why("no step log: ETSDM_TEST_STEP_LOG or the test hooks did not reach rank 0 over ssh")
    steps = H.read_step_log(step_log)
    ref = dict(reference.steps)
    assert [i for i, _ in steps] == [16, 32, 48, 64], why(f"steps {steps}")
    assert all(loss == ref[i] for i, loss in steps), why(f"losses differ: {steps} vs reference {reference.steps}")
    # the overrides arrived verbatim on both nodes, and config.yaml / manifest.json hold no password
    assert not marker.exists(), why("a remote shell executed part of an override")
    # (the marker's path makes run_dir nested; an expanded %n would give node 1 a sibling of its leaf)
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name], why(f"run dirs {run_dir.parent}")
    stored = (run_dir / "config.yaml").read_text()
    cfg = yaml.safe_load(stored)
    assert cfg["train"]["run_dir"] == str(run_dir), why(f"run_dir arrived as {cfg['train']['run_dir']!r}")
    assert cfg["data"]["fid_ref"] == fid_ref.replace(password, "***") and password not in stored, why(stored)
    found, _ = checkpoint.find_resume(str(run_dir))
    assert found is not None, why("no committed checkpoint")
    assert password not in (Path(found[0]) / checkpoint.MANIFEST).read_text(), why("password in manifest.json")
    # A finished job leaves nothing running on the "remote" nodes (bounded wait: sessions close
    # a moment after the launcher returns).
    deadline = time.monotonic() + 15
    while sshd.session_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not sshd.session_processes(), why(f"processes left by the ssh sessions: {sshd.session_processes()}")
