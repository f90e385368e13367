"""launchers/slurm.sbatch under a real Slurm (tests/slurm_cluster.py: munged + slurmctld + slurmd on
loopback, one node with this machine's CPUs, no GPUs), compared bit for bit with the shared fp32
ZeRO-2 reference run (train_harness.ensure_reference), like tests/test_launchers.py.

- sbatch of the unchanged script with command-line overrides for this machine: srun starts the
  2 ranks, dist.py finds them from SLURM_* alone (rank 0's host from the node list, the port from
  the job id), the losses equal the reference's.
- The scheduler fault path: `scancel --signal=USR1` reaches the srun tasks (not the batch shell);
  they agree on a step, commit a checkpoint and exit 75; the script runs `scontrol requeue`; Slurm
  starts the same job again; the rerun resumes from that checkpoint and every one of the
  reference's 16 steps is reproduced exactly, none twice. srun must not kill the step when the
  tasks exit 75 (it did under --kill-on-bad-exit=1: a rank still shutting down then died of the
  SIGTERM with 143 and the job was not requeued, ~1 run in 12 on 2 ranks).
- srun --mpi=pmi2 (a common MpiDefault) also exports PMI_RANK / PMI_SIZE: the tasks must still be
  srun tasks with SLURM local ranks (they were launcher=mpich, local rank 0 of 1, before dist.py
  preferred SLURM_* when both describe the same tasks).

Every wait is bounded: on timeout the job is cancelled and the job output plus the daemons' logs
are in the failure message. A cluster that does not start is a failure (with its logs), not a skip.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

import slurm_cluster as S
from daemons import running
import train_harness as H

pytestmark = pytest.mark.slow

SCRIPT = str(H.REPO / "launchers" / "slurm.sbatch")
# The script asks for 8 GPUs, 8 tasks and 12 CPUs per task per node: command-line options take
# precedence over #SBATCH lines, so this machine's job asks for 2 tasks of 1 CPU and no GPUs
# (--gpus-per-node=0 is accepted by a cluster without any GRES configured).
THIS_MACHINE = ("-N1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
REQUEUE_CODE = 75


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with running(S.SlurmCluster(tmp_path_factory.mktemp("slurm")), S.missing_binaries(),
                 "tools/install.sh apt-installs Slurm and munge", S.SlurmError) as cluster:
        yield cluster


class Job:
    def __init__(self, slurm: S.SlurmCluster, job_id: str, output: Path, step_log: Path, run_dir: Path):
        self.slurm, self.id, self.output, self.step_log, self.run_dir = slurm, job_id, output, step_log, run_dir

    def out(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else "(no job output yet)"

    def info(self) -> dict[str, str]:
        return self.slurm.job(self.id)

    def steps(self) -> list[tuple[int, float]]:
        return H.read_step_log(self.step_log) if self.step_log.exists() else []

    def diagnose(self, why: str) -> str:
        return (f"{why}\njob {self.id}: {self.info()}\n----- job output -----\n{self.out()[-6000:]}\n"
                f"{self.slurm.logs()}")

    def wait(self, timeout_s: float, poll=None) -> dict[str, str]:
        """Until the job has finished (after any requeue: a requeued job is PENDING again, not
        finished). On timeout: cancel it and fail with everything we know."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.info()
            if not info:
                pytest.fail(self.diagnose("slurmctld no longer knows the job"), pytrace=False)
            if info["JobState"] in FINISHED:
                return info
            if poll is not None:
                poll(self, info)
            time.sleep(0.25)
        why = self.diagnose(f"job not finished after {timeout_s:.0f}s")
        self.slurm.run("scancel", self.id, check=False)
        pytest.fail(why, pytrace=False)


def _submit(slurm: S.SlurmCluster, base: Path, name: str, *overrides: str, sbatch_opts: tuple = (),
            train_opts: tuple = ()) -> Job:
    step_log = base / f"steps-{name}.log"
    step_log.unlink(missing_ok=True)
    run_dir = base / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    output = base / f"slurm-{name}.out"
    output.unlink(missing_ok=True)
    # The job inherits this environment (sbatch exports the submitter's): the venv's bin first so
    # the script's `python` is the venv's, DS_ACCELERATOR=cpu, gloo on lo, OMP_NUM_THREADS=1 (the
    # script keeps a value it is given), DEEPSPEED_TIMEOUT=2. No MASTER_ADDR / MASTER_PORT: dist.py
    # must derive both from SLURM_* on every task.
    env = H.base_env(ETSDM_TEST_STEP_LOG=str(step_log))
    config, *settings = H.train_args(str(run_dir), H.ensure_shards(base), *overrides)
    r = slurm.run("sbatch", "--parsable", f"--job-name=etsdm-{name}", *THIS_MACHINE, *sbatch_opts,
                  f"--output={output}", SCRIPT, config, *settings, *train_opts, env=env, cwd=str(H.REPO))
    return Job(slurm, r.stdout.strip().split(";")[0], output, step_log, run_dir)


def _assert_rank_table(job: Job, out: str) -> None:
    # dist.py: rank 0's host is the first of SLURM_JOB_NODELIST, the port 15000 + job id % 15000.
    port = 15000 + int(job.id) % 15000
    assert f"launcher=slurm world=2 master={job.slurm.node}:{port}" in out, job.diagnose("no slurm rank table")
    # Table rows: rank, node, local rank, pid, device, host: both tasks on the one node.
    rows = re.findall(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+\d+\s+cpu\s+(\S+)\s*$", out, re.M)
    assert set(rows) == {("0", "0", "0", job.slurm.node), ("1", "0", "1", job.slurm.node)}, rows


def test_sbatch_two_tasks_match_reference(slurm, base, reference):
    job = _submit(slurm, base, "slurm", "train.zero_stage=2", "train.total_kimg=0.064")
    info = job.wait(timeout_s=150)
    out = job.out()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.diagnose("job did not succeed")
    _assert_rank_table(job, out)
    assert "[etsdm] done: kimg 0.064" in out, job.diagnose("no clean end")
    steps = job.steps()
    ref = dict(reference.steps)
    assert [i for i, _ in steps] == [16, 32, 48, 64], job.diagnose(f"steps {steps}")
    bad = [(i, loss, ref[i]) for i, loss in steps if loss != ref[i]]
    assert not bad, f"losses differ from the reference (images, got, want): {bad}"


def test_usr1_preemption_requeues_and_resumes_exactly(slurm, base, reference):
    from etsdm_dist.train import checkpoint

    # The reference's own length (16 steps, checkpoints every 64 images): the rerun must end
    # where the reference ended, equal to it.
    job = _submit(slurm, base, "slurm-requeue", *H.REF_OVERRIDES)
    sent = {}

    def preempt_once_checkpointed(job: Job, info: dict) -> None:
        # After the interval checkpoint at 64 images is committed and a few steps later, as a time
        # limit's --signal=USR1@300 would: the tasks must save again at the step they agree on.
        if sent or info["JobState"] != "RUNNING":
            return
        steps = job.steps()
        if not steps or steps[-1][0] < 96:
            return
        found, _ = checkpoint.find_resume(str(job.run_dir))
        if found is None or found[1]["images"] < 64:
            return
        # Without --batch / --full, scancel signals every step's tasks, not the batch shell (whose
        # bash would die of an untrapped USR1): exactly what Slurm does before a time limit.
        job.slurm.run("scancel", "--signal=USR1", job.id)
        sent.update(at=steps[-1][0], restarts=info.get("Restarts"))

    info = job.wait(timeout_s=240, poll=preempt_once_checkpointed)
    out = job.out()
    assert sent, job.diagnose("the job ended before it could be signalled")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.diagnose("job did not succeed")
    # The tasks got the signal themselves (rank 0 names it), agreed on a step and saved there.
    assert "preempted by SIGUSR1" in out, job.diagnose("the tasks did not see SIGUSR1")
    m = re.search(rf"\[etsdm\] stopped at kimg (\d+\.\d+): checkpoint saved; exit {REQUEUE_CODE}", out)
    assert m, job.diagnose("no preemption save")
    stopped = round(float(m.group(1)) * 1000)
    assert sent["at"] <= stopped < 256, (sent, stopped)
    # srun let every task exit on its own: a step kill here means srun took exit 75 for a crash
    # (--kill-on-bad-exit=1) and SIGTERMed ranks still shutting down, which intermittently turns 75
    # into 143 and loses the requeue.
    killed = re.findall(r".*(?:Terminating StepId|\*\*\* STEP \S+ ON \S+ CANCELLED).*", out)
    assert not killed, job.diagnose(f"srun killed the step after the preemption exit: {killed}")
    # srun returned 75 and the script requeued the job; Slurm ran the same job id again.
    assert f"etsdm: preempted, checkpoint saved; requeueing job {job.id}" in out, job.diagnose("no requeue")
    assert info.get("Restarts") == "1", job.diagnose(f"Restarts={info.get('Restarts')}, expected 1")
    assert out.count("launcher=slurm world=2") == 2, job.diagnose("expected two runs in the (appended) output")
    _assert_rank_table(job, out)
    resume_dir = job.run_dir / "checkpoints" / checkpoint.ckpt_name(stopped)
    assert f"[etsdm] resuming from {resume_dir} " in out, job.diagnose(f"did not resume from {resume_dir}")
    assert "[etsdm] done: kimg 0.256" in out, job.diagnose("the rerun did not finish")
    # Every step once (none replayed, none skipped) and each loss equal to the reference's.
    steps = job.steps()
    ref = dict(reference.steps)
    assert [i for i, _ in steps] == [i for i, _ in reference.steps] == list(range(16, 257, 16)), steps
    bad = [(i, loss, ref[i]) for i, loss in steps if loss != ref[i]]
    assert not bad, f"losses differ from the reference (images, got, want): {bad}"
    H.assert_same_weights(str(job.run_dir), reference.run_dir)


def test_srun_with_pmi2_is_still_a_slurm_launch(slurm, base):
    """Clusters often set MpiDefault=pmi2: srun then also exports PMI_RANK / PMI_SIZE / PMI_FD. The
    tasks must still be recognised as srun tasks with their SLURM local ranks (a GPU rank picks
    cuda:<local rank>). `--dry-run` prints each task's parsed layout without starting a process
    group, so this costs a few seconds."""
    job = _submit(slurm, base, "slurm-pmi2", sbatch_opts=("--export=ALL,SLURM_MPI_TYPE=pmi2",),
                  train_opts=("--dry-run",))
    info = job.wait(timeout_s=90)
    out = job.out()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.diagnose("dry run failed")
    layouts = sorted(re.findall(r"launcher: (\S+)  world_size: (\d+)  this process: rank (\d+) "
                                r"\(local (\d+)/(\d+), node (\d+)\)", out))
    assert len(layouts) == 2, job.diagnose("expected one layout line per task")
    assert layouts == [("slurm", "2", "0", "0", "2", "0"), ("slurm", "2", "1", "1", "2", "0")], layouts


def test_sample_fid_sbatch_matches_the_other_launchers(slurm, base, tmp_path):
    """launchers/sample_fid.sbatch (srun tasks: `etsdm sample`, then `etsdm fid --samples`) writes
    exactly the images of one in-process generation and their FID, like the other launchers in
    tests/test_launchers_eval.py (same inputs, made once per session)."""
    from test_launchers_eval import SAMPLER, check_outputs, ensure_inputs, job_env

    inputs = ensure_inputs(base)
    out, output = tmp_path / "samples", tmp_path / "slurm-sample-fid.out"
    r = slurm.run("sbatch", "--parsable", "--job-name=etsdm-sample-fid", *THIS_MACHINE, f"--output={output}",
                  str(H.REPO / "launchers" / "sample_fid.sbatch"), *SAMPLER,
                  env=H.base_env(**job_env(inputs, out)), cwd=str(H.REPO))
    job = Job(slurm, r.stdout.strip().split(";")[0], output, tmp_path / "no-step-log", out)
    info = job.wait(timeout_s=180)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.diagnose("sampling + FID job failed")
    check_outputs(inputs, out, job.out())
