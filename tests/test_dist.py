"""dist.py: launcher environment parsing (pure, fake env dicts) and the no-process-group facade."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from etsdm_dist import dist


# --------------------------------------------------------------------------- SLURM node lists


@pytest.mark.parametrize("spec, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("a[1-2],b03,c[5]", ["a1", "a2", "b03", "c5"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("gpu-a[1-2]-ib,login", ["gpu-a1-ib", "gpu-a2-ib", "login"]),
])
def test_expand_nodelist(spec, hosts):
    assert dist.expand_nodelist(spec) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node01]", "node[3-1]", "node[a-b]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        dist.expand_nodelist(bad)


def test_slurm_tasks_per_node():
    assert dist.slurm_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert dist.slurm_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        dist.slurm_tasks_per_node("4x2")


# --------------------------------------------------------------------------- launcher envs


def test_plain_python_is_one_rank():
    launch = dist.parse_launch({})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (0, 1, 0, "single")
    assert launch.master_addr == "127.0.0.1"


def test_torchrun_env():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "node01", "MASTER_PORT": "29511"}
    launch = dist.parse_launch(env)
    assert launch == dist.Launch(5, 8, 1, 4, 1, "node01", 29511, "torchrun")


def test_deepspeed_launcher_local_rank_argument():
    # The deepspeed launcher sets RANK / WORLD_SIZE and may pass --local_rank on the command line.
    argv, local = dist.strip_local_rank(["cfg.yaml", "--local_rank=3", "train.seed=1"])
    assert argv == ["cfg.yaml", "train.seed=1"] and local == 3
    argv, local = dist.strip_local_rank(["--local_rank", "2", "cfg.yaml"])
    assert argv == ["cfg.yaml"] and local == 2
    launch = dist.parse_launch({"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, local)
    assert launch.local_rank == 2 and launch.rank == 3


def test_slurm_env_uses_first_host_and_job_port():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_TASKS_PER_NODE": "8(x2)",
           "SLURM_JOB_ID": "123456"}
    launch = dist.parse_launch(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size, launch.node_rank) == \
        (9, 16, 1, 8, 1)
    assert launch.master_addr == "gpu07"
    assert launch.master_port == 15000 + 123456 % 15000 < 32768  # below the ephemeral ports
    assert launch.launcher == "slurm"
    # An explicit MASTER_ADDR / MASTER_PORT wins.
    launch = dist.parse_launch({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000"})
    assert (launch.master_addr, launch.master_port) == ("10.0.0.1", 4000)


def test_srun_with_pmi_plugin_is_slurm_but_mpiexec_in_allocation_is_mpi():
    # srun --mpi=pmi2 / pmix exports PMI variables describing the same tasks: SLURM_* win (only
    # they carry the local rank; as "mpich" every task of a node would be local rank 0 -> cuda:0).
    srun = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
            "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
            "SLURM_JOB_ID": "5"}
    for pmi in ({"PMI_RANK": "9", "PMI_SIZE": "16", "PMI_FD": "3"}, {"PMIX_RANK": "9"}):
        launch = dist.parse_launch({**srun, **pmi})
        assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == \
            ("slurm", 9, 16, 1, 8)
    # mpiexec (hydra) inside an allocation starts its proxies with srun: the ranks inherit the
    # proxy's SLURM_PROCID (its node index) and SLURM_STEP_NUM_TASKS (nodes), which disagree with PMI.
    proxy = {**srun, "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2",
             "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
    for rank in (8, 9, 15):
        launch = dist.parse_launch({**proxy, "PMI_RANK": str(rank), "PMI_SIZE": "16", "MPI_LOCALRANKID": str(rank - 8),
                                    "MPI_LOCALNRANKS": "8"})
        assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("mpich", rank, 16, rank - 8)


def test_inherited_single_rank_variables_under_srun_are_an_error():
    # sbatch exports the submitter's environment: a RANK=0 WORLD_SIZE=1 left in that shell would
    # make every srun task train alone as rank 0 of 1 into the same run directory.
    env = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "3",
           "RANK": "0", "WORLD_SIZE": "1"}
    with pytest.raises(ValueError, match="srun task 1 of 2.*unset them"):
        dist.parse_launch(env)
    # torchrun started by srun (one agent per node) sets a real world size: it wins
    assert dist.parse_launch({**env, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}).launcher == "torchrun"


def test_slurm_batch_script_is_not_a_task():
    # Inside the sbatch script (no srun step) SLURM_PROCID=0 and SLURM_NTASKS=16 are set too, but
    # it is one process: treating it as rank 0 of 16 would hang forever waiting for the others.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "1"}
    assert dist.parse_launch(env).world_size == 1
    assert dist.parse_launch({**env, "SLURM_STEP_ID": "4294967294"}).world_size == 1


def test_torchrun_inside_slurm_wins():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "n[1-2]",
           "RANK": "7", "WORLD_SIZE": "16", "LOCAL_RANK": "7", "LOCAL_WORLD_SIZE": "8",
           "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    launch = dist.parse_launch(env)
    assert (launch.launcher, launch.rank, launch.world_size) == ("torchrun", 7, 16)


def test_openmpi_env():
    env = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    launch = dist.parse_launch(env)
    assert launch == dist.Launch(6, 8, 2, 4, 1, None, None, "openmpi")


def test_mpich_hydra_env():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    launch = dist.parse_launch(env)
    assert launch == dist.Launch(1, 2, 1, 2, 0, None, None, "mpich")


def test_bad_values_name_the_variable():
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        dist.parse_launch({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="outside"):
        dist.parse_launch({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})


# --------------------------------------------------------------------------- facade


FACADE_CHECK = """
import torch
from etsdm_dist import dist
assert not dist.initialized()
assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
dist.barrier()
t = torch.tensor([1.5, 2.0])
assert dist.all_reduce(t, "sum") is t and t.tolist() == [1.5, 2.0]
assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
assert dist.any_rank(True) and not dist.any_rank(False)
table = dist.rank_table(dist.parse_launch({}), torch.device("cpu"))
assert "launcher=single world=1" in table and " cpu " in table
print("facade ok")
"""


def test_facade_without_process_group():
    # A fresh interpreter: other tests in this pytest process may have created a process group.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", FACADE_CHECK], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "facade ok" in out.stdout, out.stderr[-2000:]


def test_timeout_minutes():
    assert dist.timeout_minutes({"DEEPSPEED_TIMEOUT": "3"}) == 3
    assert dist.timeout_minutes({}) == 30
