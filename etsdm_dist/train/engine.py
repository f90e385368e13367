"""DeepSpeed engine: the generated DeepSpeed JSON, the LR schedule and the per-micro-step helpers.

The config tree is the one source of truth (DESIGN.md): `deepspeed_config` derives every DeepSpeed
key from it, and `train.deepspeed_extra` may only *add* keys. A key we set that the extras set to
something else is an error naming both fields, because a silently overridden batch size, ZeRO stage
or precision would change the run without the config file saying so.

The loop calls, in order:
    ds_cfg = deepspeed_config(cfg, world_size, load_universal=...)   # or let build_engine do it
    engine = build_engine(cfg, model, world_size, load_universal=...)
    per global batch:  set_lr(engine, lr_at(cfg, images_after_this_batch))
    per micro batch:   stepped = engine_micro_step(engine, loss)  # True once per global batch
    after a step:      grad_norm(engine), loss_scale(engine), skipped_steps(engine)

DeepSpeed is used here through deepspeed.initialize and the engine's public methods only; what
needs its internals goes through deepspeed_adapter (which also checks the installed version).
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch

from etsdm_dist.config import Config, ConfigError, batch_layout
from etsdm_dist.train import deepspeed_adapter as ds

# We print our own progress; DeepSpeed's per-step log line would only interleave with it.
_NEVER = 2**31 - 1

# fp16 dynamic loss scaling: 2**16 start, halve on overflow, double after 1000 clean steps.
FP16_LOSS_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                     "hysteresis": 2, "min_loss_scale": 1}

# Which of our config fields owns each DeepSpeed key we generate (for conflict messages).
# Longest matching dotted prefix wins.
_OWNERS = {
    "train_batch_size": "train.batch_images",
    "train_micro_batch_size_per_gpu": "train.micro_batch_images",
    "gradient_accumulation_steps": "train.micro_batch_images",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer": "optim.offload",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "gradient_clipping": "optim.grad_clip",
    "optimizer.type": "optim (AdamW is fixed)",
    "optimizer.params.lr": "optim.lr",
    "optimizer.params.betas": "optim.betas",
    "optimizer.params.eps": "optim.eps",
    "optimizer.params.weight_decay": "optim.weight_decay",
    "optimizer.params.torch_adam": "the accelerator (torch Adam on CPU, fused Adam on GPU)",
    "checkpoint.load_universal": "checkpoint.needs_universal (automatic on resume)",
    "steps_per_print": "our own progress reporting (train.report_kimg)",
    "wall_clock_breakdown": "our own progress reporting (train.report_kimg)",
}
# Keys we do not generate but that would fight something we own: always refused.
_RESERVED = {
    "scheduler": "optim.lr / optim.warmup_kimg (the LR is set from the image counter each step)",
    "amp": "train.precision",
    "train_batch_size_per_gpu": "train.micro_batch_images",
}


on_cpu = ds.on_cpu
skip_shm_comm_jit = ds.skip_shm_comm_jit


def _base_config(cfg: Config, world_size: int, load_universal: bool, cpu: bool) -> dict:
    t, o = cfg.train, cfg.optim
    micro, accum = batch_layout(t.batch_images, world_size, t.micro_batch_images)
    if o.offload and t.zero_stage == 0:
        raise ConfigError("optim.offload=true needs train.zero_stage >= 1 (ZeRO offloads its "
                          "partitioned optimizer state; stage 0 has none)")
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if o.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not cpu}
    # Both precision sections are always written, enabled or not, so an extra that tries to turn
    # one on under another train.precision is a conflict instead of a silent addition.
    fp16: dict[str, Any] = {"enabled": t.precision == "fp16"}
    if t.precision == "fp16":
        fp16.update(FP16_LOSS_SCALING)
    out = {
        "train_batch_size": t.batch_images,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": fp16,
        "gradient_clipping": float(o.grad_clip),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(o.lr),
                "betas": [float(b) for b in o.betas],
                "eps": float(o.eps),
                "weight_decay": float(o.weight_decay),
                # DeepSpeed's own Adams JIT-compile (minutes) on CPU; torch's AdamW is the same
                # math. On GPU leave it False: DeepSpeed picks FusedAdam (or CPUAdam for offload).
                "torch_adam": cpu,
            },
        },
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        out["checkpoint"] = {"load_universal": True}
    return out


def _owner(dotted: str) -> str:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in _OWNERS:
            return _OWNERS[key]
    return "the generated DeepSpeed config"


def _owner_value(cfg: Config, owner: str) -> str:
    """'train.batch_images=128' when the owner is a real config field, else the owner text."""
    node: Any = cfg
    for k in owner.split("."):
        if not hasattr(node, k):
            return owner
        node = getattr(node, k)
    return f"{owner}={node!r}"


def _merge_extra(cfg: Config, ours: dict, extra: dict, prefix: str = "") -> dict:
    out = dict(ours)
    for key, value in extra.items():
        dotted = f"{prefix}{key}"
        if not prefix and key in _RESERVED:
            raise ConfigError(f"train.deepspeed_extra.{dotted} is not allowed: it is owned by "
                              f"{_RESERVED[key]}")
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge_extra(cfg, out[key], value, dotted + ".")
        elif out[key] != value or type(out[key]) is bool and type(value) is not bool:
            raise ConfigError(
                f"train.deepspeed_extra.{dotted}={value!r} conflicts with "
                f"{_owner_value(cfg, _owner(dotted))} (we set {out[key]!r}); change that field "
                f"instead, or drop the key from train.deepspeed_extra")
    return out


def deepspeed_config(cfg: Config, world_size: int, *, load_universal: bool = False,
                     cpu: bool | None = None) -> dict:
    """THE DeepSpeed JSON for this config and world size (see the module docstring).

    `load_universal`: resuming from a checkpoint written under another world size or ZeRO stage
    (checkpoint.needs_universal); DeepSpeed reads this key at initialize time only.
    `cpu`: accelerator override (None: ask DeepSpeed).
    """
    cpu = on_cpu() if cpu is None else cpu
    return _merge_extra(cfg, _base_config(cfg, world_size, load_universal, cpu),
                        cfg.train.deepspeed_extra or {})


# --------------------------------------------------------------------------- learning rate


def lr_at(cfg: Config, images_seen: float) -> float:
    """Learning rate for the step that brings the image counter to `images_seen`.

    Linear warm-up from 0 over optim.warmup_kimg, then constant. A pure function of the image
    counter: resume restores the counter, so the LR after resume is exact with no scheduler state.
    The loop passes the counter *including* the batch being stepped, so the first step is not 0.
    """
    warmup_images = cfg.optim.warmup_kimg * 1000.0
    if warmup_images <= 0:
        return float(cfg.optim.lr)
    return float(cfg.optim.lr) * min(1.0, max(0.0, float(images_seen)) / warmup_images)


def set_lr(engine, lr: float) -> None:
    """Set the LR of every param group before the optimizer step.

    Every group of the wrapped optimizers too, so no wrapper keeps a stale copy.
    """
    for group in ds.param_groups(engine):
        group["lr"] = lr


def current_lr(engine) -> float:
    return float(ds.param_groups(engine)[0]["lr"])


# --------------------------------------------------------------------------- engine


def keep_freed_host_memory() -> bool:
    """Let glibc keep freed memory for reuse (process-wide; Linux/glibc only). For CPU training.

    When the optimizer steps on the host, DeepSpeed's flat partitions make every temporary of an
    Adam step or a gradient copy one partition-sized block. glibc serves blocks above its mmap
    threshold with fresh mmap()s and unmaps them on free, and trims the heap top once more than
    M_TRIM_THRESHOLD of it is free, so each step page-faults those bytes in again. With mmap off
    and trimming off, freed blocks stay mapped and are reused. Measured on the 35.7M preset, ZeRO-1,
    1 thread: 105k page faults per step -> 0, optimizer step 420 -> 258 ms. The price: the heap
    never shrinks, and fragments more (resident memory 2.56 GiB instead of a 1.90 GiB peak on that
    run). So only where the accelerator is the CPU, not for optimizer offload on GPU nodes, whose
    host memory is sized for the partitions. ETSDM_KEEP_HOST_MEMORY=0 turns it off.

    Process-wide and irreversible, so only entry points that own the process call it (`etsdm
    train`, the bench), never library code: inside a test process it made later fork()s fail with
    ENOMEM (the never-trimmed heap inflates the address space that fork must commit)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("ETSDM_KEEP_HOST_MEMORY") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>; a threshold of -1 disables trimming
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))
    except (OSError, AttributeError):  # not glibc (musl, ...): leave the allocator alone
        return False


def build_engine(cfg: Config, model: torch.nn.Module, world_size: int, *,
                 load_universal: bool = False):
    """deepspeed.initialize on `model` with the generated config; returns the engine. Raises
    DeepSpeedVersionError outside the supported DeepSpeed range."""
    ds.check_version()
    cpu = on_cpu()
    # DeepSpeed's bf16 model broadcast views parameters as bytes, which fails for channels_last
    # (non-contiguous) weights: hand it contiguous tensors, convert afterwards.
    with torch.no_grad():
        for p in model.parameters():
            if not p.data.is_contiguous():
                p.data = p.data.contiguous()
    ds_cfg = deepspeed_config(cfg, world_size, load_universal=load_universal, cpu=cpu)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = ds.initialize(model, params, ds_cfg)
    if cfg.network.channels_last and cfg.train.zero_stage == 0:
        # Only without ZeRO. ZeRO-1/2 copy gradients into flat buckets with grad.view(-1), which
        # raises for channels_last gradients (seen with DeepSpeed 0.19.8), and re-point weights at
        # contiguous flat-buffer views after every step anyway; ZeRO-3 weights are partitioned
        # placeholders. There, channels_last comes from the activations (the loop's inputs).
        engine.module.to(memory_format=torch.channels_last)
    return engine


def engine_micro_step(engine, loss: torch.Tensor) -> bool:
    """Backward + step for one micro batch. DeepSpeed scales the loss by 1/accumulation steps and
    only applies the optimizer at the accumulation boundary. Returns True when this call applied an
    optimizer step (boundary reached and, under fp16, no overflow skipped it): update the EMA then.
    """
    return ds.micro_step(engine, loss)


def grad_norm(engine) -> float | None:
    """Global gradient 2-norm of the last applied step (before clipping), or None if unknown."""
    return ds.grad_norm(engine)


def loss_scale(engine) -> float:
    """Current fp16 dynamic loss scale; 1.0 for fp32 / bf16."""
    return ds.loss_scale(engine)


def skipped_steps(engine) -> int:
    """Optimizer steps skipped because fp16 gradients overflowed (restored on resume)."""
    return ds.counters(engine)["skipped_steps"]
