"""fp32 exponential moving averages of the weights, one per decay, correct under every ZeRO stage.

Per step there is no communication: every rank averages only the fp32 values it already owns.
Each parameter is seen as a flat vector, and a rank keeps the EMA of one contiguous *fragment*
[start, start + numel) of it, read from the best fp32 source DeepSpeed has
(deepspeed_adapter.master_fragments: the ZeRO-3 partition, the ZeRO-1/2 master fragment, the
fp16/bf16 wrapper's fp32 copy, or the fp32 parameter itself).

Using the fp32 masters (not `param.float()` of bf16 weights) matters: an average of rounded
weights is itself rounded. Fragments of different ranks are disjoint and cover the parameter;
replicated ones are counted once (rank 0). `state_dict()` assembles full tensors with one
all-reduce at save time, so the checkpoint is world-size independent, and `load_state_dict()`
cuts each rank's fragment out of them again for whatever world size and stage it runs under.

EMA ramp-up (EDM, Karras et al. 2022; `train.ema_rampup_ratio`): a decay d per global batch of B
images has a half-life of h = B ln(0.5) / ln(d) images. Early in training h is capped at
ratio * images trained so far, so the per-step decay is 0.5 ** (B / min(h, ratio * images)): a
short run's EMA forgets its random initialisation as fast as the run is long. None: fixed decays.

Loop usage: `ema = EMA.from_config(engine, cfg)` after build_engine (and after checkpoint.load,
which calls ema.load_state_dict); `ema.update(images_seen)` after every applied optimizer step.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as tdist

from etsdm_dist.train import deepspeed_adapter as ds

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


def rampup_decay(decay: float, batch_images: int, images_seen: int, ratio: float | None) -> float:
    """The per-step decay after EDM's ramp-up (module docstring). `images_seen` counts the batch
    being averaged in. Returns `decay` itself (the same float) whenever the cap does not bind."""
    if ratio is None:
        return decay
    half_life = batch_images * math.log(0.5) / math.log(decay)
    cap = ratio * images_seen
    if cap >= half_life:
        return decay
    if cap <= 0:
        return 0.0
    return 0.5 ** (batch_images / cap)


class EMA:
    """EMAs of `model`'s parameters for each decay in `decays`, in fp32.

    `model` is a DeepSpeed engine or a plain nn.Module. Until the image counter passes
    `start_images`, every EMA is a copy of the weights; afterwards each applied optimizer step
    does ema = decay * ema + (1 - decay) * weights (as one lerp per decay), with each decay
    ramped up (`rampup_decay`) when `rampup_ratio` is set; `batch_images` is the global batch
    the decays are defined for (needed for the ramp-up only).
    """

    def __init__(self, model, decays: list[float], start_images: int = 0, *,
                 batch_images: int | None = None, rampup_ratio: float | None = None):
        self.module, optimizer = _unwrap(model)
        self.decays = [float(d) for d in decays]
        self.start_images = int(start_images)
        if rampup_ratio is not None:
            if not rampup_ratio > 0:
                raise ValueError(f"train.ema_rampup_ratio must be > 0 or null, got {rampup_ratio}")
            if not batch_images or batch_images <= 0:
                raise ValueError("the EMA ramp-up (train.ema_rampup_ratio) needs the global batch "
                                 f"size train.batch_images > 0, got {batch_images}")
        self.rampup_ratio = None if rampup_ratio is None else float(rampup_ratio)
        self.batch_images = batch_images
        self.num_updates = 0
        self.images = 0
        self._frags = ds.master_fragments(self.module, optimizer)
        self._sharded = any(not f.replicated for f in self._frags)
        src = self._sources()
        self._ema = [[s.clone() for s in src] for _ in self.decays]

    @classmethod
    def from_config(cls, model, cfg) -> "EMA":
        t = cfg.train
        return cls(model, t.ema_decays, round(t.ema_start_kimg * 1000), batch_images=t.batch_images,
                   rampup_ratio=t.ema_rampup_ratio)

    def decays_at(self, images_seen: int) -> list[float]:
        """The per-step decays `update(images_seen)` applies (after the start threshold)."""
        return [rampup_decay(d, self.batch_images, images_seen, self.rampup_ratio) for d in self.decays]

    def _sources(self) -> list[torch.Tensor]:
        return [f.read() if f.numel else torch.empty(0) for f in self._frags]

    @torch.no_grad()
    def update(self, images_seen: int) -> None:
        """After an applied optimizer step; `images_seen` is the counter including that batch."""
        # One fused pass per decay over all fragments: lerp reads ema and src once and writes ema
        # once (ema += (1 - decay) * (src - ema)), where mul_ + add_ made two passes over the EMA.
        # The sources are views of the fp32 masters (no copies), so this is the whole per-step cost.
        src = self._sources()
        for decay, ema in zip(self.decays_at(images_seen), self._ema):
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
                return f.read().device
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
