"""Who am I in the job? One place that answers it for every launcher, plus a small rank facade.

Launchers announce ranks in different environment variables. `parse_launch(env)` is a pure function
from an environment mapping to a `Launch` record; it knows, in order of precedence:

  torchrun / deepspeed   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT
                         (the deepspeed launcher may pass --local_rank instead of LOCAL_RANK)
  Open MPI / PMIx        OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}, PMIX_RANK
  MPICH / hydra          PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS
  SLURM (srun)           SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_JOB_NODELIST
  nothing                one rank on 127.0.0.1

MPI launchers do not say where rank 0 lives: then `master_addr` is None and `init()` broadcasts
rank 0's host and a free port over mpi4py. SLURM's rank 0 runs on the first host of the (compressed)
node list, which `expand_nodelist` parses without scontrol; the port is derived from the job id so
every task computes the same one.

After `init()`, `rank()`, `world_size()`, `is_main()`, `barrier()`, `all_reduce()` and
`all_gather_object()` work with or without a process group (plain `python` = one rank), so tools
and tests can call them unconditionally.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

# SLURM step ids that are not srun steps (the batch script itself, the extern step, ...).
_SLURM_NON_SRUN_STEPS = {"4294967290", "4294967291", "4294967292", "4294967293", "4294967294",
                         "4294967295", "batch", "extern", "interactive"}


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str | None = "127.0.0.1"  # None: unknown yet (MPI), found by init()
    master_port: int | None = None  # None: pick a free one (single rank) or broadcast (MPI)
    launcher: str = "single"  # torchrun | slurm | openmpi | mpich | single

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if not 0 <= self.local_rank < max(self.local_world_size, 1):
            raise ValueError(f"local rank {self.local_rank} outside local world size {self.local_world_size}")


# --------------------------------------------------------------------------- pure parsing


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names, e.g.
    "node[01-03,07],gpu-a[1-2]-ib,login" -> node01 node02 node03 node07 gpu-a1-ib gpu-a2-ib login.
    Zero padding is kept (the width of the range's start); several bracket groups multiply out."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(s: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM node list {s!r}")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in SLURM node list {s!r}")
    out.append("".join(cur))
    return out


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", item)
    if m is None:
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    values: list[str] = []
    for part in m.group(1).split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {part!r} in SLURM node list {item!r}")
            width = len(lo)
            values.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        elif part.isdigit():
            values.append(part)
        else:
            raise ValueError(f"bad entry {part!r} in SLURM node list {item!r}")
    out = []
    for v in values:
        out.extend(_expand_one(head + v + tail))  # further bracket groups in the tail
    return out


def slurm_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE / SLURM_STEP_TASKS_PER_NODE, e.g. "4(x2),3" -> [4, 4, 3]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"bad SLURM tasks-per-node spec {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for n in names:
        v = env.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise ValueError(f"environment variable {n}={v!r} is not an integer") from None
    return default


def _srun_task(env: Mapping[str, str], addr: str | None, port: int | None) -> Launch | None:
    """The layout of a task started by srun (not the batch script or another non-srun step)."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if "SLURM_PROCID" in env and step is not None and step not in _SLURM_NON_SRUN_STEPS:
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
        local = _int(env, "SLURM_LOCALID", default=0)
        node = _int(env, "SLURM_NODEID", default=0)
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        per_node = slurm_tasks_per_node(spec) if spec else None
        local_world = per_node[node] if per_node and node < len(per_node) else world
        if addr is None:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodes:
                raise ValueError("SLURM_PROCID is set but no SLURM_JOB_NODELIST: cannot find rank 0's host")
            addr = expand_nodelist(nodes)[0]
        if port is None:
            # Same on every task, different between concurrent jobs sharing a node.
            # Below Linux's ephemeral range (32768+), where an outgoing connection could hold it.
            port = 15000 + _int(env, "SLURM_JOB_ID", "SLURM_JOBID", default=0) % 15000
        return Launch(rank, world, local, local_world, node, addr, port, "slurm")
    return None


def parse_launch(env: Mapping[str, str], local_rank_arg: int | None = None) -> Launch:
    """The launch layout from an environment mapping (pure; see the module docstring)."""
    port = _int(env, "MASTER_PORT")
    addr = env.get("MASTER_ADDR") or None

    # torchrun, the deepspeed launcher, or a user who exported the variables (also deepspeed's
    # mpich helper, which maps PMI_RANK -> RANK and exports WORLD_SIZE / LOCAL_SIZE).
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK", default=local_rank_arg if local_rank_arg is not None else 0)
        local_world = _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=None)
        if local_world is None:
            local_world = world if world == 1 else max(local + 1, 1)
        node = _int(env, "GROUP_RANK", "NODE_RANK", default=rank // max(local_world, 1))
        slurm = _srun_task(env, addr, port)
        if world == 1 and slurm is not None and slurm.world_size > 1:
            # Every srun task would train alone as "rank 0 of 1" into the same run directory.
            raise ValueError(f"RANK={rank} WORLD_SIZE=1 in the environment, but this is srun task "
                             f"{slurm.rank} of {slurm.world_size}: RANK/WORLD_SIZE were probably "
                             f"exported by the shell that submitted the job; unset them")
        return Launch(rank, world, local, local_world, node, addr or "127.0.0.1", port, "torchrun")

    if "OMPI_COMM_WORLD_RANK" in env:
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=1)
        return Launch(rank, world, local, local_world, rank // local_world, addr, port, "openmpi")

    slurm = _srun_task(env, addr, port)
    if "PMI_RANK" in env or "PMIX_RANK" in env:
        rank = _int(env, "PMI_RANK", "PMIX_RANK")
        world = _int(env, "PMI_SIZE", "PMIX_SIZE")
        # srun --mpi=pmi2/pmix (a common MpiDefault) exports PMI variables too: then they describe
        # the same tasks as SLURM_*, and only SLURM_* know the local ranks. mpiexec inside an
        # allocation differs (SLURM_PROCID is its proxy's node index): the numbers disagree.
        if slurm is not None and rank == slurm.rank and world in (None, slurm.world_size):
            return slurm
        if world is None:
            world = _int(env, "MPI_LOCALNRANKS")
        if world is None:
            raise ValueError("PMI_RANK is set but PMI_SIZE is not; cannot tell the world size")
        local = _int(env, "MPI_LOCALRANKID", "PALS_LOCAL_RANKID", default=0)
        local_world = _int(env, "MPI_LOCALNRANKS", "PALS_LOCAL_SIZE", default=1)
        return Launch(rank, world, local, local_world, rank // local_world, addr, port, "mpich")

    if slurm is not None:
        return slurm

    return Launch(0, 1, local_rank_arg or 0, max((local_rank_arg or 0) + 1, 1), 0, addr or "127.0.0.1", port,
                  "single")


def strip_local_rank(argv: Sequence[str]) -> tuple[list[str], int | None]:
    """Remove the deepspeed launcher's `--local_rank=N` / `--local_rank N` from argv."""
    out, local, it = [], None, iter(range(len(argv)))
    skip = False
    for i in it:
        if skip:
            skip = False
            continue
        a = argv[i]
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            local = int(a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            local, skip = int(argv[i + 1]), True
        else:
            out.append(a)
    return out, local


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- process group

_LAUNCH: Launch | None = None


def device_for(launch: Launch) -> torch.device:
    """cuda:<local rank> when CUDA is usable and not forced off by DS_ACCELERATOR=cpu, else cpu."""
    if os.environ.get("DS_ACCELERATOR", "") != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", launch.local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def timeout_minutes(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("DEEPSPEED_TIMEOUT", "30"))


def _mpi_rendezvous(launch: Launch) -> Launch:
    """MPI launchers do not name rank 0's host: broadcast it (and a free port) over mpi4py."""
    from mpi4py import MPI  # imported only here: plain runs must not touch MPI

    comm = MPI.COMM_WORLD
    info = None
    if comm.Get_rank() == 0:
        info = (launch.master_addr or socket.gethostbyname(socket.gethostname()),
                launch.master_port or free_port())
    addr, port = comm.bcast(info, root=0)
    return Launch(launch.rank, launch.world_size, launch.local_rank, launch.local_world_size,
                  launch.node_rank, addr, port, launch.launcher)


def init(local_rank_arg: int | None = None, env: dict | None = None) -> Launch:
    """Resolve the launch, export the torch.distributed variables and start the process group
    with plain torch.distributed (gloo on CPU, nccl on CUDA), with a timeout of DEEPSPEED_TIMEOUT
    minutes. A single rank also gets a (one-member) process group. No DeepSpeed here, so sampling
    jobs use this facade without it; deepspeed.initialize (train/) later wraps this group in
    deepspeed.comm instead of creating another."""
    global _LAUNCH
    env = os.environ if env is None else env
    launch = parse_launch(env, local_rank_arg)
    if launch.launcher in ("openmpi", "mpich") and (launch.master_addr is None or launch.master_port is None):
        launch = _mpi_rendezvous(launch)
    if launch.master_port is None:
        launch = Launch(**{**launch.__dict__, "master_port": free_port()})
    for k, v in dict(RANK=launch.rank, WORLD_SIZE=launch.world_size, LOCAL_RANK=launch.local_rank,
                     LOCAL_WORLD_SIZE=launch.local_world_size, MASTER_ADDR=launch.master_addr,
                     MASTER_PORT=launch.master_port).items():
        env[k] = str(v)
    device = device_for(launch)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        kwargs: dict[str, Any] = {}
        if device.type == "cuda" and launch.world_size > 1 and _bind_device_ok():
            kwargs["device_id"] = device  # what DeepSpeed's init did: eager NCCL communicators
        # env:// (as DeepSpeed's init used): the store at MASTER_ADDR:MASTER_PORT exported above,
        # or torchrun's agent store when it provides one.
        torch.distributed.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
            timeout=datetime.timedelta(minutes=timeout_minutes(env)), rank=launch.rank,
            world_size=launch.world_size, **kwargs)
    _LAUNCH = launch
    return launch


def _bind_device_ok() -> bool:
    """init_process_group(device_id=...) exists (torch >= 2.3) and does not hang (it did in
    2.6.0 < torch < 2.7.1, pytorch#153960)."""
    import inspect

    from torch.torch_version import TorchVersion

    version = TorchVersion(torch.__version__.split("+")[0])
    return ("device_id" in inspect.signature(torch.distributed.init_process_group).parameters
            and not ("2.6.0" < version < "2.7.1"))


def launch_info() -> Launch:
    return _LAUNCH if _LAUNCH is not None else parse_launch(os.environ)


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if initialized() and world_size() > 1:
        torch.distributed.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a small tensor (sum | max | min); returns it. No-op with one rank.
    On nccl the tensor must live on the GPU: it is moved there and back as needed."""
    if not initialized() or world_size() == 1:
        return t
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}
    if torch.distributed.get_backend() == "nccl" and t.device.type != "cuda":
        tmp = t.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(tmp, op=ops[op])
        t.copy_(tmp.to(t.device))
    else:
        torch.distributed.all_reduce(t, op=ops[op])
    return t


def all_gather_object(obj: Any) -> list[Any]:
    if not initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank if it is True on any rank (one tiny all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device or torch.device("cpu"))
    return bool(all_reduce(t, "max").item() > 0)


def rank_table(launch: Launch, device: torch.device) -> str | None:
    """Gather (host, pid, local rank, device) from every rank; rank 0 gets the printed table."""
    row = dict(rank=rank(), host=socket.gethostname(), pid=os.getpid(), local_rank=launch.local_rank,
               node=launch.node_rank, device=str(device))
    rows = all_gather_object(row)
    if not is_main():
        return None
    lines = [f"launcher={launch.launcher} world={launch.world_size} master={launch.master_addr}:{launch.master_port}",
             f"{'rank':>4} {'node':>4} {'local':>5} {'pid':>8}  {'device':8} host"]
    for r in rows:
        lines.append(f"{r['rank']:>4} {r['node']:>4} {r['local_rank']:>5} {r['pid']:>8}  {r['device']:8} {r['host']}")
    return "\n".join(lines)
