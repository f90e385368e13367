"""Test helpers for engine/EMA/checkpoint tests, and a worker script for real multi-rank runs.

As a module: a tiny conv net, a deterministic batch per step, single-rank DeepSpeed setup for
in-process tests, and `launch(n, args)` which spawns n ranks of this file (own process group,
killed as a group on timeout). As a script: trains a few steps under each given ZeRO stage, saves a checkpoint
through etsdm_dist.train.checkpoint, records the reference state, then takes one more step.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from etsdm_dist import config as config_mod  # noqa: E402


class TinyNet(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 3, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.register_buffer("scale", torch.tensor([1.5]))  # persistent: must reach export

    def forward(self, x):
        h = torch.nn.functional.silu(self.a(x))
        h = torch.nn.functional.silu(self.b(h))
        return self.c(h) * self.scale


def batch(step: int, n: int = 8):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)


def make_cfg(run_dir: str = "runs/t", **train) -> config_mod.Config:
    t = {"run_dir": run_dir, "batch_images": 8, "checkpoint_kimg": 0.008, "total_kimg": 1.0,
         "ema_decays": [0.9, 0.5], "zero_stage": 2, "precision": "fp32"}
    t.update(train)
    return config_mod.from_dict({"optim": {"lr": 1e-2, "grad_clip": 0.5, "warmup_kimg": 0.02},
                                 "train": t})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_rank() -> None:
    """A 1-rank gloo process group for in-process engine tests (idempotent)."""
    import torch.distributed as tdist

    if tdist.is_initialized():
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    from etsdm_dist.train.engine import skip_shm_comm_jit

    skip_shm_comm_jit()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def train(engine, ema, cfg, steps: range) -> int:
    """Train `steps` (global batches); returns the image counter after the last one."""
    from etsdm_dist.train import engine as E

    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    micro, accum = config_mod.batch_layout(cfg.train.batch_images, world, cfg.train.micro_batch_images)
    images = 0
    for step in steps:
        images = (step + 1) * cfg.train.batch_images
        E.set_lr(engine, E.lr_at(cfg, images))
        x, y = batch(step, cfg.train.batch_images)
        per_rank = cfg.train.batch_images // world
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        applied = False
        for m in range(accum):
            xs, ys = x[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro]
            dtype = next(engine.module.parameters()).dtype
            loss = (engine(xs.to(dtype)).float() - ys).pow(2).mean()
            stepped = E.engine_micro_step(engine, loss)
            assert stepped == (m == accum - 1)
            applied |= stepped
        if applied:  # as train.step does: the EMA follows applied optimizer steps only
            ema.update(images)
    return images


def full_params(engine) -> dict[str, torch.Tensor]:
    """fp32 master weights, consolidated (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for n, p in engine.module.named_parameters():
        v = safe_get_full_fp32_param(p)  # None without a DeepSpeed fp32 master (ZeRO-0 fp32)
        out[n] = (p if v is None else v).detach().float().clone().cpu()
    return out


def full_exp_avg(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_optimizer_state

    out = {}
    for n, p in engine.module.named_parameters():
        v = safe_get_full_optimizer_state(p, "exp_avg")
        out[n] = (engine.optimizer.state[p]["exp_avg"] if v is None else v).detach().clone().cpu()
    return out


def launch(nproc: int, args: list[str], timeout_s: float = 240.0, script: str | None = None) -> None:
    """Run this file (or `script`) as `nproc` ranks; raise with their output if any fails or it
    times out."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", DEEPSPEED_TIMEOUT="2")
        procs.append(subprocess.Popen([sys.executable, script or __file__, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    outputs, failed = [], False
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for q in procs:
                try:
                    os.killpg(q.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            out, _ = p.communicate()
            failed = True
        outputs.append(out.decode(errors="replace"))
        failed |= p.returncode != 0
    if failed:
        raise RuntimeError("worker failed:\n" + "\n----\n".join(o[-4000:] for o in outputs))


def main(argv: list[str]) -> int:
    """For each --stages entry S: train, save to {out}/run-z{S}, write {out}/ref-z{S}.pt, step once more."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="3", help="comma-separated ZeRO stages, one run each")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)

    from etsdm_dist.train import checkpoint
    from etsdm_dist.train import engine as E
    from etsdm_dist.train.ema import EMA

    E.skip_shm_comm_jit()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    world = torch.distributed.get_world_size()
    for stage in (int(s) for s in args.stages.split(",")):
        cfg = make_cfg(os.path.join(args.out, f"run-z{stage}"), zero_stage=stage, micro_batch_images=2)
        engine = E.build_engine(cfg, TinyNet(), world)
        ema = EMA.from_config(engine, cfg)
        images = train(engine, ema, cfg, range(args.steps))
        checkpoint.save(engine, ema, cfg, images=images,
                        stats={"loss": 1.0})
        ref = {"params": full_params(engine), "exp_avg": full_exp_avg(engine), "ema": ema.state_dict()}
        train(engine, ema, cfg, range(args.steps, args.steps + 1))
        ref["params_next"] = full_params(engine)
        if torch.distributed.get_rank() == 0:
            torch.save(ref, os.path.join(args.out, f"ref-z{stage}.pt"))
        torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
