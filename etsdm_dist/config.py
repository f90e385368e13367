"""The typed config tree: the one source of truth for every setting.

A run is described by a YAML file in configs/ plus command-line overrides `key.sub=value`.
Everything downstream (the DeepSpeed JSON, the loader, the network) is derived from this
tree, so a setting is written in exactly one place. Validation happens at load time and
every error names the dotted field and what is allowed, because a bad value found an hour
into a 512-GPU job costs far more than one found before launch.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the dotted field."""


def _choice(*allowed: Any) -> dict:
    return {"choices": allowed}


@dataclass
class DiffusionConfig:
    schedule: str = field(default="linear", metadata=_choice("linear", "quadratic", "cosine"))
    time: str = field(default="discrete", metadata=_choice("discrete", "continuous"))
    num_timesteps: int = 1000  # T, discrete time only
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008
    stratified_t: bool = False  # one t per equal stratum across the batch (lower-variance loss)


@dataclass
class EtsdmConfig:
    enabled: bool = True  # false: plain DDPM, bit-identical network inputs
    # Shared-condition region [0, t_tilde) split into n sub-intervals. None = the default for
    # diffusion.time (100 for discrete T=1000, 0.1 for continuous).
    t_tilde: float | None = None
    n: int = 5


@dataclass
class NetworkConfig:
    preset: str | None = field(default="32", metadata=_choice(None, "tiny", "32", "64", "256"))
    # Overrides of the preset; None keeps the preset's value.
    resolution: int | None = None
    in_channels: int | None = None
    base_channels: int | None = None
    channel_mult: list[int] | None = None
    num_res_blocks: int | None = None
    attention_resolutions: list[int] | None = None
    num_heads: int | None = None
    head_channels: int | None = None
    dropout: float | None = None
    num_classes: int | None = None  # 0 = unconditional
    use_scale_shift_norm: bool | None = None
    resblock_updown: bool | None = None
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False  # torch.compile the network (GPU)


@dataclass
class DataConfig:
    # Folder or URL holding the shards and their index.json (local path, s3://, http(s)://).
    url: str = ""
    hflip: bool = True
    num_workers: int = 2  # dataloader workers per rank
    prefetch_factor: int = 2
    on_error: str = field(default="raise", metadata=_choice("raise", "skip"))
    skip_budget: int = 2  # shards a run may skip before it fails loudly
    retries: int = 8  # transient storage errors (reset, timeout, 503) per read
    retry_backoff_s: float = 0.5
    use_labels: bool = False  # feed .cls labels to a class-conditional network


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_kimg: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    offload: bool = False  # ZeRO optimizer-state offload to CPU


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # local path or s3:// URL
    seed: int = 0
    batch_images: int = 128  # global batch, all ranks and accumulation steps together
    micro_batch_images: int | None = None  # per rank per step; None = batch / world size
    total_kimg: float = 128.0
    precision: str = field(default="fp32", metadata=_choice("fp32", "bf16", "fp16"))
    zero_stage: int = field(default=2, metadata=_choice(0, 1, 2, 3))
    ema_decays: list[float] = field(default_factory=lambda: [0.9999])
    ema_start_kimg: float = 0.0
    # EDM's EMA ramp-up: each decay's half-life (in images) is capped at this fraction of the
    # images trained so far, so a short run's EMA is not still mostly the initial weights.
    # null: fixed decays from the start.
    ema_rampup_ratio: float | None = None
    report_kimg: float = 1.28  # stats.jsonl line every this many kimg (10 batches of 128)
    checkpoint_kimg: float = 12.8
    keep_last: int = 2  # newest checkpoints kept
    milestone_every: int = 0  # also keep every M-th checkpoint (0: none)
    sample_kimg: float = 0.0  # fixed-seed sample grid PNG every this many kimg (0: never)
    tensorboard: bool = False
    requeue_exit_code: int = 75  # exit code after a preemption save (EX_TEMPFAIL)
    # Extra DeepSpeed keys merged into the generated JSON; a conflict with ours is an error.
    deepspeed_extra: dict = field(default_factory=dict)


@dataclass
class SampleConfig:
    sampler: str = field(default="ddim", metadata=_choice("ddpm", "ddim", "dpm_solver", "dpm_solver++"))
    steps: int = 50
    grid: str = field(default="uniform", metadata=_choice("uniform", "quadratic", "logsnr"))
    eta: float = 0.0  # DDIM
    order: int = field(default=2, metadata=_choice(1, 2, 3))  # DPM-Solver
    variance: str = field(default="beta_tilde", metadata=_choice("beta", "beta_tilde"))  # DDPM
    ema: int = 0  # which of train.ema_decays to sample with


@dataclass
class Config:
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    etsdm: EtsdmConfig = field(default_factory=EtsdmConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- building


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check / convert one value against a dataclass field type; errors name the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string, not a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        # `network.preset=32` on the command line is parsed as YAML, i.e. the int 32: a number
        # written where a string is expected is meant as its text.
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is list or tp is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args:
            return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config field {name!r}; {where or 'config'} has: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        path = f"{where}.{name}" if where else name
        value = _coerce(data[name], hints[name], path)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of: {shown}")
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`key.sub=value` strings -> nested dict; values parsed as YAML (so 1e-4, true, [1,2] work)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "deepspeed_extra":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def load(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (or the built-in defaults when path is None) + overrides -> validated Config."""
    data: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r}: top level must be a mapping")
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(data)


# --------------------------------------------------------------------------- validation


def etsdm_t_tilde(cfg: Config) -> float:
    """t_tilde with its per-time-kind default filled in."""
    if cfg.etsdm.t_tilde is not None:
        return cfg.etsdm.t_tilde
    return 100.0 if cfg.diffusion.time == "discrete" else 0.1


def validate(cfg: Config) -> None:
    """Cross-field checks; each error names the field(s) at fault."""
    d, e, t = cfg.diffusion, cfg.etsdm, cfg.train
    if d.num_timesteps < 2:
        raise ConfigError(f"diffusion.num_timesteps: must be >= 2, got {d.num_timesteps}")
    if not 0 < d.beta_start < d.beta_end < 1:
        raise ConfigError("diffusion.beta_start/beta_end: need 0 < beta_start < beta_end < 1")
    t_tilde = etsdm_t_tilde(cfg)
    t_max = d.num_timesteps if d.time == "discrete" else 1.0
    if not 0 < t_tilde <= t_max:
        raise ConfigError(f"etsdm.t_tilde: must be in (0, {t_max}] for diffusion.time={d.time}, got {t_tilde}")
    if e.n < 1:
        raise ConfigError(f"etsdm.n: must be >= 1, got {e.n}")
    if d.time == "discrete":
        if t_tilde != int(t_tilde):
            raise ConfigError(f"etsdm.t_tilde: must be a whole timestep in discrete time, got {t_tilde}")
        if int(t_tilde) % e.n:
            raise ConfigError(
                f"etsdm.n: {e.n} does not divide etsdm.t_tilde={int(t_tilde)}; sub-intervals must be whole "
                f"timesteps (divisors: {[k for k in range(1, int(t_tilde) + 1) if int(t_tilde) % k == 0]})")
    if t.batch_images < 1:
        raise ConfigError(f"train.batch_images: must be >= 1, got {t.batch_images}")
    if t.micro_batch_images is not None and t.micro_batch_images < 1:
        raise ConfigError(f"train.micro_batch_images: must be >= 1, got {t.micro_batch_images}")
    for name in ("report_kimg", "checkpoint_kimg", "sample_kimg"):
        value = getattr(t, name)
        if value < 0:
            raise ConfigError(f"train.{name}: must be >= 0, got {value}")
        # Intervals are counted in whole global batches so every rank agrees on when they fire.
        images = value * 1000
        if value and (images != int(images) or int(images) % t.batch_images):
            raise ConfigError(
                f"train.{name}={value} is {images:g} images, not a whole number of global batches "
                f"(train.batch_images={t.batch_images})")
    if t.total_kimg <= 0:
        raise ConfigError(f"train.total_kimg: must be > 0, got {t.total_kimg}")
    if not t.ema_decays or any(not 0 < x < 1 for x in t.ema_decays):
        raise ConfigError(f"train.ema_decays: each decay must be in (0, 1), got {t.ema_decays}")
    if t.keep_last < 1:
        raise ConfigError(f"train.keep_last: must be >= 1, got {t.keep_last}")
    if not 0 <= cfg.sample.ema < len(t.ema_decays):
        raise ConfigError(f"sample.ema: index {cfg.sample.ema} out of range for train.ema_decays={t.ema_decays}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be >= 0, got {cfg.data.num_workers}")
    if cfg.data.skip_budget < 0:
        raise ConfigError(f"data.skip_budget: must be >= 0, got {cfg.data.skip_budget}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: need two values in [0, 1), got {cfg.optim.betas}")
    if cfg.sample.steps < 1:
        raise ConfigError(f"sample.steps: must be >= 1, got {cfg.sample.steps}")


def batch_layout(batch_images: int, world_size: int, micro_batch_images: int | None) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) from one global batch in images.

    Errors name the fields, because a batch that does not split evenly would silently change
    the effective batch size (and every interval counted in images) with the world size.
    """
    if batch_images % world_size:
        raise ConfigError(
            f"train.batch_images={batch_images} does not divide over {world_size} ranks; "
            f"pick a multiple of the world size")
    per_rank = batch_images // world_size
    micro = per_rank if micro_batch_images is None else micro_batch_images
    if per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_images={micro} does not divide the per-rank batch {per_rank} "
            f"(train.batch_images={batch_images} over {world_size} ranks)")
    return micro, per_rank // micro
