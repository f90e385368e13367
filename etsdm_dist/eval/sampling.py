"""Images from a trained model by index: the part of `etsdm sample` that metrics reuse.

Image i is a pure function of (weights, sampler settings, seed, i, eval_width): its initial noise and
every later noise (DDPM, DDIM with eta > 0) come from its own generator seeded by (seed, i), and the
network is evaluated on fixed slices of `eval_width` images aligned to the image index (image i sits
at row i % eval_width of slice i // eval_width; rows not in the batch are zero padding). A kernel's
choice then depends only on that fixed shape, never on the batch, the rank count or a resume: on
CPU (fp32) oneDNN/MKL pick other algorithms for other batch widths, which changes the last bits.

`image_batches(sampler, indices, batch_images)` yields (uint8 [B, C, H, W], indices [B]) in index
order, like the image sources of `etsdm fid`.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from etsdm_dist import run_dir
from etsdm_dist.config import SampleConfig
from etsdm_dist.diffusion import samplers

DEFAULT_EVAL_WIDTH = {"cpu": 8, "cuda": 64}


class SampleError(ValueError):
    """A bad source or option; the message names the path, flag or config field."""


def sampler_options(sample_cfg: SampleConfig) -> dict[str, Any]:
    """The `sample` fields that the chosen sampler takes as keyword options, by name.

    The sampler's own signature decides (samplers.SAMPLERS), so a `sample` field reaches every
    sampler that has an option of that name and no other: no hand-kept table to drift."""
    params = inspect.signature(samplers.SAMPLERS[sample_cfg.sampler]).parameters
    return {k: v for k, v in sample_cfg.model_dump().items()
            if k in params and params[k].kind is inspect.Parameter.KEYWORD_ONLY}


SAMPLER_FLAGS = ("sampler", "steps", "grid", "eta", "order", "variance", "method", "solver_type",
                 "lower_order_final", "denoise_to_zero", "clip_denoised", "thresholding",
                 "thresholding_ratio", "thresholding_max_val")


def add_sampler_flags(p) -> None:
    """The `sample.*` options as command-line flags (help from the config field descriptions);
    unset ones come from the run's `sample` section (`settings_from_args`)."""
    import argparse

    g = p.add_argument_group("sampler (default: the run's `sample` section)")
    for name in SAMPLER_FLAGS:
        field = SampleConfig.model_fields[name]
        flag, doc = "--" + name.replace("_", "-"), field.description
        if field.annotation is bool or name in ("lower_order_final", "denoise_to_zero", "clip_denoised",
                                                 "thresholding"):
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif name in ("steps", "order"):
            g.add_argument(flag, dest=name, type=int, default=None, help=doc)
        elif name in ("eta", "thresholding_ratio", "thresholding_max_val"):
            g.add_argument(flag, dest=name, type=float, default=None, help=doc)
        else:
            g.add_argument(flag, dest=name, default=None, help=doc)


def settings_from_args(section: dict | None, args) -> SampleConfig:
    """A run's `sample` section with the sampler flags that were given on top."""
    return sampler_settings(section, **{k: getattr(args, k, None) for k in SAMPLER_FLAGS})


def sampler_settings(section: dict | None = None, **overrides) -> SampleConfig:
    """The `sample` config section that decides an image besides the weights and the seed: a run's
    stored section (keys this version does not know are ignored, missing ones default), then the
    overrides that are not None (command-line flags). Errors name the `sample.*` field."""
    known = set(SampleConfig.model_fields)
    values = {k: v for k, v in (section or {}).items() if k in known and v is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - known
    if unknown:
        raise SampleError(f"unknown sampler option(s) {sorted(unknown)}; sample.* has: {sorted(known)}")
    try:
        return SampleConfig.parse(values)
    except ValueError as e:
        raise SampleError(str(e)) from e


def settings_dict(settings: SampleConfig) -> dict:
    """What of the settings decides the images (for job records and reports)."""
    return {k: v for k, v in settings.model_dump().items() if k not in SampleConfig.NOT_SAMPLER_OPTIONS}


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """Identity of a set of weights (names, dtypes, shapes and bytes), whatever file held it."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class LoadedModel:
    model: torch.nn.Module  # ConditionedModel: eps(x, true t, y); its `prediction` came with the weights
    schedule: Any
    sample_section: dict  # the run's `sample` section ({} for an export)
    source: dict  # what was loaded: kind, path, checkpoint, ema index, weights sha256

    @classmethod
    def in_memory(cls, model: torch.nn.Module, schedule, **source) -> "LoadedModel":
        """A model that is already built (the training loop's EMA, a benchmark's network)."""
        return cls(model, schedule, {}, {**source, "weights_sha256": weights_sha256(model.state_dict())})

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.model.net.config
        return (c.in_channels, c.resolution, c.resolution)

    @property
    def num_classes(self) -> int:
        return int(self.model.net.config.num_classes or 0)


# --------------------------------------------------------------------------- reading weights


def _is_run_dir(source: str) -> bool:
    from etsdm_dist.data import storage

    return storage.exists(storage.join(source, run_dir.CHECKPOINTS))


def load_model(source: str, *, ema_index: int | None = None, device="cpu") -> LoadedModel:
    """A run directory (EMA `ema_index` of its newest committed checkpoint; default: the run's
    `sample.ema`) or a file written by `etsdm export`. Never imports DeepSpeed."""
    from etsdm_dist import config
    from etsdm_dist.data import storage
    from etsdm_dist.diffusion import build

    if _is_run_dir(source):
        try:
            state, run_cfg, info = run_dir.newest_ema(source, ema_index)
        except ValueError as e:
            raise SampleError(str(e)) from e
        info = {"kind": "run", "path": source, **info}
    else:
        if not storage.exists(source):
            raise SampleError(f"SOURCE {source}: neither a run directory (no checkpoints/) nor a file")
        if ema_index is not None:
            raise SampleError("--ema-index applies to a run directory; an exported file holds one EMA")
        try:
            state, run_cfg = run_dir.load_exported(source)
        except ValueError as e:
            raise SampleError(str(e)) from e
        info = {"kind": "export", "path": source, "ema": run_cfg.get("ema")}
    try:
        cfg = config.from_dict({k: run_cfg[k] for k in ("network", "diffusion", "etsdm") if k in run_cfg})
    except config.ConfigError as e:
        raise SampleError(f"{source}: the stored model config is not valid here: {e}") from e
    try:
        model = build.model_with_weights(cfg, state)
    except ValueError as e:
        raise SampleError(f"{source}: {e}") from e
    info["weights_sha256"] = weights_sha256(model.state_dict())
    model = model.to(device)
    return LoadedModel(model, build.build_schedule(cfg), dict(run_cfg.get("sample") or {}), info)


def balanced_labels(indices: Sequence[int], classes: Sequence[int]) -> torch.Tensor:
    """Image i gets classes[i % len(classes)]: every class equally often (within one) in any prefix."""
    return torch.tensor([classes[int(i) % len(classes)] for i in indices], dtype=torch.long)


class ImageSampler:
    """Float images in [-1, 1] (about) for given indices; see the module docstring."""

    def __init__(self, loaded: LoadedModel, settings: SampleConfig, *, seed: int = 0,
                 eval_width: int | None = None, classes: Sequence[int] | None = None, device="cpu"):
        self.loaded, self.settings, self.seed = loaded, settings, int(seed)
        self.device = torch.device(device)
        self.eval_width = int(eval_width or DEFAULT_EVAL_WIDTH.get(self.device.type, 64))
        if self.eval_width < 1:
            raise SampleError(f"--eval-width must be >= 1, got {eval_width}")
        n_cls = loaded.num_classes
        if n_cls and classes is None:
            classes = list(range(n_cls))
        if classes is not None:
            if not n_cls:
                raise SampleError("--classes given, but the model is unconditional (network.num_classes = 0)")
            bad = [c for c in classes if not 0 <= int(c) < n_cls]
            if bad or not classes:
                raise SampleError(f"--classes must be non-empty labels in [0, {n_cls}), got {list(classes)}")
        self.classes = None if classes is None else [int(c) for c in classes]
        samplers.time_grid(loaded.schedule, settings.steps, settings.grid)  # bad steps/grid fail now

    def labels(self, indices: Sequence[int]) -> torch.Tensor | None:
        return None if self.classes is None else balanced_labels(indices, self.classes)

    def _model_fn(self, indices: list[int], y: torch.Tensor | None):
        """eps(x, t) for a batch of images, evaluated on index-aligned slices of eval_width rows."""
        width, model = self.eval_width, self.loaded.model
        slices: dict[int, list[tuple[int, int]]] = {}
        for row, i in enumerate(indices):
            slices.setdefault(i // width, []).append((row, i % width))
        plan = [(torch.tensor([r for r, _ in v]), torch.tensor([p for _, p in v])) for v in slices.values()]
        plan = [(r.to(self.device), p.to(self.device)) for r, p in plan]

        def fn(x: torch.Tensor, t: torch.Tensor):
            # The model's sampler form: eps, or (eps, x0) for a v model (see ConditionedModel).
            outs = None
            for rows, pos in plan:
                xs = x.new_zeros((width,) + tuple(x.shape[1:]))
                xs[pos] = x[rows]
                ts = t[rows[:1]].repeat(width)
                ts[pos] = t[rows]
                if y is None:
                    got = model(xs, ts, output="denoise")
                else:
                    ys = y.new_zeros(width)
                    ys[pos] = y[rows]
                    got = model(xs, ts, ys, output="denoise")
                parts = got if isinstance(got, tuple) else (got,)
                if outs is None:
                    outs = tuple(torch.empty_like(x) for _ in parts)
                for o, p in zip(outs, parts):
                    o[rows] = p[pos].to(x.dtype)
            if outs is None:
                return torch.empty_like(x)
            return outs if len(outs) > 1 else outs[0]

        return fn

    @torch.no_grad()
    def generate(self, indices: Sequence[int]) -> torch.Tensor:
        indices = [int(i) for i in indices]
        if len(set(indices)) != len(indices):
            raise SampleError("image indices in one batch must be distinct")
        gens = samplers.image_generators(self.seed, indices, self.device)
        x_T = samplers.noise((len(indices),) + self.loaded.image_shape, gens, device=self.device)
        y = self.labels(indices)
        fn = self._model_fn(indices, None if y is None else y.to(self.device))
        s = self.settings
        return samplers.sample(s.sampler, fn, x_T, self.loaded.schedule, s.steps, s.grid,
                               **sampler_options(s), generator=gens)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 pixels (the same rounding as the training sample grid)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_batches(sampler: ImageSampler, indices: Sequence[int],
                  batch_images: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 [B, C, H, W] on CPU, int64 indices [B]) for `indices` in order, `batch_images` at a time."""
    if batch_images < 1:
        raise SampleError(f"--batch must be >= 1, got {batch_images}")
    indices = list(indices)
    for a in range(0, len(indices), batch_images):
        part = indices[a:a + batch_images]
        yield to_uint8(sampler.generate(part)).cpu(), torch.tensor(part, dtype=torch.long)


def describe(sampler: ImageSampler) -> dict:
    """Everything that decides the images (for a job's identity file and metric reports)."""
    return {"weights_sha256": sampler.loaded.source["weights_sha256"],
            "settings": settings_dict(sampler.settings), "seed": sampler.seed, "eval_width": sampler.eval_width,
            "classes": sampler.classes, "image_shape": list(sampler.loaded.image_shape)}


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


__all__ = ["SampleError", "sampler_settings", "settings_dict", "LoadedModel", "load_model", "ImageSampler",
           "image_batches", "to_uint8", "SAMPLER_FLAGS", "add_sampler_flags", "settings_from_args", "balanced_labels", "describe", "weights_sha256"]
