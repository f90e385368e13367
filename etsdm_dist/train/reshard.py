"""Resume a checkpoint under another ZeRO stage, world size or precision: one conversion path.

DeepSpeed 0.19.8 re-partitions ZeRO-1/2 checkpoints itself (ds_to_universal + load_universal),
but not between ZeRO-3 and ZeRO-1/2 (its ZeRO-3 universal files are flat tensors without
`ds_version` or a per-parameter `step`), and not to or from ZeRO-0 (no shards). We therefore
use DeepSpeed only on the *source* side, and write the target engine ourselves:

    convert(src_dir, dst_dir, zero_stage, trainable)  one process per host fills its local cache
    restore(engine, dst_dir)                           every rank, right after build_engine

`dst_dir` holds a canonical, layout-free state (the universal checkpoint's per-parameter layout):
    zero/{param}/{fp32,exp_avg,exp_avg_sq}.pt   full fp32 tensors (flat or shaped: we reshape)
    etsdm_reshard.json   {"steps": {param: Adam step}, "keys": [...], "counters": {...}}
    etsdm_buffers.pt     {buffer: tensor}, the module's persistent buffers
Reading DeepSpeed's files and writing into its engine (every ZeRO stage, fp32/bf16/fp16 wrappers)
is deepspeed_adapter's `to_canonical` / `restore_state`; this module owns the canonical format,
the atomic publication and the consistency checks. `restore` builds nothing: the engine is the
normal one for this run's stage and world size, and gets the source's fp32 masters, Adam moments
and steps, low-precision weights, buffers and step counters (fp16 loss-scale state is not
carried over).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket

import torch

from etsdm_dist.train import deepspeed_adapter as ds
from etsdm_dist.train.ema import persistent_buffers

META = "etsdm_reshard.json"
BUFFERS = "etsdm_buffers.pt"


def convert(src: str, dst: str, zero_stage: int, trainable: list[str]) -> None:
    """Write the canonical state of DeepSpeed checkpoint dir `src` (written under ZeRO
    `zero_stage`) into `dst`, atomically (tmp dir + rename). `trainable`: the network's trainable
    parameter names in model order (the order DeepSpeed hands them to the optimizer)."""
    tmp = f"{dst}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        found = ds.to_canonical(src, tmp, zero_stage, trainable)
        torch.save(found["buffers"], os.path.join(tmp, BUFFERS))
        keys = sorted({os.path.basename(p)[:-3] for n in trainable
                       for p in glob.glob(os.path.join(tmp, "zero", glob.escape(n), "*.pt"))} - {"fp32", ds.STEP})
        meta = {"source_zero_stage": zero_stage, "steps": found["steps"], "keys": keys,
                "counters": found["counters"]}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f)
        try:
            os.rename(tmp, dst)
        except OSError:  # another host converted into a shared cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- target side


class _Source:
    def __init__(self, root: str):
        self.root = root
        with open(os.path.join(root, META)) as f:
            meta = json.load(f)
        self.steps: dict[str, float] = meta["steps"]
        self.keys: list[str] = meta["keys"]
        self.counters: dict[str, int] = meta["counters"]

    def has(self, name: str, key: str) -> bool:
        return os.path.isfile(os.path.join(self.root, "zero", name, f"{key}.pt"))

    def read(self, name: str, key: str, shape) -> torch.Tensor:
        """Full fp32 tensor of `key` for parameter `name`, in `shape`."""
        path = os.path.join(self.root, "zero", name, f"{key}.pt")
        if not os.path.isfile(path):
            raise RuntimeError(f"checkpoint has no {key} for parameter {name}: not this network")
        t = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # ZeRO-3 reads a slice
        t = t["param"] if isinstance(t, dict) else t
        if t.numel() != torch.Size(shape).numel():
            raise RuntimeError(f"checkpoint: {name} has {t.numel()} elements, the network {tuple(shape)}")
        return t.reshape(shape).float()

    def state(self, name: str, shape) -> dict[str, torch.Tensor]:
        """Optimizer moments for `name` (zeros where the source never stepped it)."""
        return {k: self.read(name, k, shape) if self.has(name, k) else torch.zeros(shape) for k in self.keys}

    def common_step(self, names: list[str]) -> float:
        steps = {self.steps[n] for n in names if n in self.steps}
        if len(steps) > 1:
            raise RuntimeError(f"parameters {names[:3]}... had different Adam steps {sorted(steps)} in the "
                               f"checkpoint; this run's layout keeps one step per group")
        return steps.pop() if steps else 0.0


def restore(engine, src_dir: str) -> dict[str, int]:
    """Write the canonical state in `src_dir` (see `convert`) into `engine`: fp32 masters, Adam
    moments and steps, low-precision weights, persistent buffers, DeepSpeed's step counters.
    Every rank calls it (no collectives). Returns the counters."""
    src = _Source(src_dir)
    ds.restore_state(engine, src)
    saved = torch.load(os.path.join(src_dir, BUFFERS), map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, buf in persistent_buffers(engine.module).items():
            if name not in saved:
                raise RuntimeError(f"checkpoint has no buffer {name}: not this network")
            buf.copy_(saved[name])
    ds.set_counters(engine, src.counters)
    return dict(src.counters)


def trainable_names(engine) -> list[str]:
    """The network's trainable parameter names in model order (DeepSpeed's optimizer order)."""
    return [n for n, p in engine.module.named_parameters() if p.requires_grad]
