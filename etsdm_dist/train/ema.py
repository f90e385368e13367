"""fp32 exponential moving averages of the weights, one per decay, correct under every ZeRO stage.

Per step there is no communication: every rank averages only the fp32 values it already owns.
Each parameter is seen as a flat vector, and a rank keeps the EMA of one contiguous *fragment*
[start, start + numel) of it, read from the best fp32 source DeepSpeed has:

  ZeRO-3                 the rank's fp32 master partition (safe_get_local_fp32_param)
  ZeRO-1/2, bf16 ZeRO-0  the rank's fp32 master fragment (`param._hp_mapping`)
  fp16/bf16 unfused      the optimizer's fp32 copy of the whole param (replicated)
  fp32 ZeRO-0, plain     the module parameter itself (replicated)

Using the fp32 masters (not `param.float()` of bf16 weights) matters: an average of rounded
weights is itself rounded. Fragments of different ranks are disjoint and cover the parameter;
replicated ones are counted once (rank 0). `state_dict()` assembles full tensors with one
all-reduce at save time, so the checkpoint is world-size independent, and `load_state_dict()`
cuts each rank's fragment out of them again for whatever world size and stage it runs under.

Loop usage: `ema = EMA.from_config(engine, cfg)` after build_engine (and after checkpoint.load,
which calls ema.load_state_dict); `ema.update(images_seen)` after every applied optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as tdist

FORMAT = 1


def _rank_world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def _unwrap(model):
    """The nn.Module whose parameter names we use: engine.module for a DeepSpeed engine."""
    if hasattr(model, "save_checkpoint") and hasattr(model, "module"):
        return model.module, getattr(model, "optimizer", None)
    return model, None


def persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that module.state_dict() would contain (exported beside the EMA weights)."""
    out = {}
    for mod_name, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{name}" if mod_name else name] = buf
    return out


@dataclass
class _Fragment:
    name: str
    shape: tuple[int, ...]
    start: int  # offset into the flattened parameter
    numel: int  # 0: this rank holds nothing of it
    replicated: bool  # every rank holds the same full value: only rank 0 contributes at save
    source: Callable[[], torch.Tensor]  # current fp32 values of [start, start + numel), 1-D


def _full_fp32_copies(optimizer) -> dict[int, Callable[[], torch.Tensor]]:
    """id(param) -> fp32 master copy, for DeepSpeed's fp16/bf16 optimizers without ZeRO."""
    out: dict[int, Callable[[], torch.Tensor]] = {}
    lp_groups = getattr(optimizer, "fp16_groups", None)
    if lp_groups is None:
        return out
    if hasattr(optimizer, "fp32_groups"):  # unfused: one fp32 clone per param
        for lps, hps in zip(lp_groups, optimizer.fp32_groups):
            for lp, hp in zip(lps, hps):
                out[id(lp)] = (lambda hp=hp: hp.detach().view(-1))
    elif hasattr(optimizer, "fp32_groups_flat"):  # fused: params are views of one flat buffer
        for i, lps in enumerate(lp_groups):
            flat_lp, flat_hp = optimizer.fp16_groups_flat[i], optimizer.fp32_groups_flat[i]
            for lp in lps:
                same = lp.untyped_storage().data_ptr() == flat_lp.untyped_storage().data_ptr()
                if same:
                    off, n = lp.storage_offset() - flat_lp.storage_offset(), lp.numel()
                    out[id(lp)] = (lambda o=off, n=n, h=flat_hp: h.detach().narrow(0, o, n))
    return out


def _fragments(module: torch.nn.Module, optimizer) -> list[_Fragment]:
    rank, _ = _rank_world()
    copies = _full_fp32_copies(optimizer) if optimizer is not None else {}
    frags = []
    for name, p in module.named_parameters():
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the flattened parameter
            from deepspeed.utils import safe_get_local_fp32_param

            part = p.ds_tensor.ds_numel
            start = rank * part
            n = max(0, min(part, p.ds_numel - start))

            def src(p=p, n=n):
                hp = safe_get_local_fp32_param(p) if p.requires_grad else None
                if hp is None:  # frozen: no master copy, the partition itself is the value
                    hp = p.ds_tensor.detach().float()
                return hp.view(-1)[:n]

            frags.append(_Fragment(name, tuple(p.ds_shape), start, n, False, src))
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer: fp32 master fragment
            m = p._hp_mapping
            if m is None:
                frags.append(_Fragment(name, tuple(p.shape), 0, 0, False, lambda: torch.empty(0)))
            else:
                addr = m.lp_fragment_address
                frags.append(_Fragment(name, tuple(p.shape), addr.start, addr.numel, False,
                                       lambda m=m: m.get_hp_fragment().detach().view(-1)))
        elif id(p) in copies:
            frags.append(_Fragment(name, tuple(p.shape), 0, p.numel(), True, copies[id(p)]))
        else:  # fp32 without ZeRO, frozen params, plain modules: the weights themselves
            frags.append(_Fragment(name, tuple(p.shape), 0, p.numel(), True,
                                   lambda p=p: p.detach().float().reshape(-1)))
    return frags


class EMA:
    """EMAs of `model`'s parameters for each decay in `decays`, in fp32.

    `model` is a DeepSpeed engine or a plain nn.Module. Until the image counter passes
    `start_images`, every EMA is a copy of the weights; afterwards each applied optimizer step
    does ema = decay * ema + (1 - decay) * weights (as one lerp per decay).
    """

    def __init__(self, model, decays: list[float], start_images: int = 0):
        self.module, optimizer = _unwrap(model)
        self.decays = [float(d) for d in decays]
        self.start_images = int(start_images)
        self.num_updates = 0
        self.images = 0
        self._frags = _fragments(self.module, optimizer)
        self._sharded = any(not f.replicated for f in self._frags)
        src = self._sources()
        self._ema = [[s.clone() for s in src] for _ in self.decays]

    @classmethod
    def from_config(cls, model, cfg) -> "EMA":
        return cls(model, cfg.train.ema_decays, round(cfg.train.ema_start_kimg * 1000))

    def _sources(self) -> list[torch.Tensor]:
        return [f.source() if f.numel else torch.empty(0) for f in self._frags]

    @torch.no_grad()
    def update(self, images_seen: int) -> None:
        """After an applied optimizer step; `images_seen` is the counter including that batch."""
        # One fused pass per decay over all fragments: lerp reads ema and src once and writes ema
        # once (ema += (1 - decay) * (src - ema)), where mul_ + add_ made two passes over the EMA.
        # The sources are views of the fp32 masters (no copies), so this is the whole per-step cost.
        src = self._sources()
        for decay, ema in zip(self.decays, self._ema):
            if images_seen <= self.start_images:
                torch._foreach_copy_(ema, src)
            else:
                torch._foreach_lerp_(ema, src, 1.0 - decay)
        self.num_updates += 1
        self.images = int(images_seen)

    # ----------------------------------------------------------------- consolidation

    @torch.no_grad()
    def _full(self, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full fp32 parameters from per-rank fragments. Collective when sharded (all ranks call);
        one all-reduce of one flat buffer, at save / export time only."""
        rank, world = _rank_world()
        sizes = [int(torch.Size(f.shape).numel()) for f in self._frags]
        flat = torch.zeros(sum(sizes), dtype=torch.float32, device=self._device())
        offset = 0
        for f, t, size in zip(self._frags, tensors, sizes):
            if f.numel and (not f.replicated or rank == 0 or not self._sharded):
                flat[offset + f.start: offset + f.start + f.numel].copy_(t)
            offset += size
        if self._sharded and world > 1:
            tdist.all_reduce(flat)  # fragments are disjoint: the sum is the concatenation
        flat = flat.cpu()
        out, offset = {}, 0
        for f, size in zip(self._frags, sizes):
            out[f.name] = flat[offset: offset + size].view(f.shape).clone()
            offset += size
        return out

    def _device(self) -> torch.device:
        for f in self._frags:
            if f.numel:
                return f.source().device
        return torch.device("cpu")

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in persistent_buffers(self.module).items()}

    def full_state(self, decay_index: int = 0) -> dict[str, torch.Tensor]:
        """{name: fp32 tensor} of EMA `decay_index` plus the module's persistent buffers: a plain
        state_dict for the network (collective)."""
        out = self._full(self._ema[decay_index])
        out.update(self._buffers())
        return out

    def copy_to(self, module: torch.nn.Module, decay_index: int = 0) -> None:
        """Load EMA `decay_index` into a plain (non-DeepSpeed) module of the same architecture."""
        state = self.full_state(decay_index)
        target = module.state_dict()
        module.load_state_dict({k: v.to(target[k].dtype) if k in target else v
                                for k, v in state.items()}, strict=True)

    def state_dict(self) -> dict:
        """World-size independent checkpoint state: plain tensors, lists and numbers only, so it
        loads with torch.load(weights_only=True). Collective under ZeRO / sharded masters."""
        return {
            "format": FORMAT,
            "decays": list(self.decays),
            "start_images": self.start_images,
            "num_updates": self.num_updates,
            "images": self.images,
            "ema": [self._full(e) for e in self._ema],
            "buffers": self._buffers(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()` output of any world size / ZeRO stage."""
        if [float(d) for d in state["decays"]] != self.decays:
            raise ValueError(
                f"the checkpoint's EMA decays {state['decays']} differ from train.ema_decays="
                f"{self.decays}; resume with the checkpoint's decays (or start a new run)")
        names = [f.name for f in self._frags]
        for i, full in enumerate(state["ema"]):
            missing = sorted(set(names) - set(full))
            extra = sorted(set(full) - set(names))
            if missing or extra:
                raise ValueError(f"EMA checkpoint does not match the network: missing {missing[:5]}, "
                                 f"unexpected {extra[:5]}")
            for f, e in zip(self._frags, self._ema[i]):
                t = full[f.name]
                if tuple(t.shape) != f.shape:
                    raise ValueError(f"EMA checkpoint: {f.name} has shape {tuple(t.shape)}, "
                                     f"network has {f.shape}")
                if f.numel:
                    e.copy_(t.reshape(-1)[f.start: f.start + f.numel].to(e.device, torch.float32))
        # start_images stays the config's (train.ema_start_kimg): the config is the source of truth.
        self.num_updates = int(state["num_updates"])
        self.images = int(state["images"])
