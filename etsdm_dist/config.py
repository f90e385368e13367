"""The typed config tree: the one source of truth for every setting.

A run is described by a YAML file in configs/ plus command-line overrides `key.sub=value`.
Everything downstream (the DeepSpeed JSON, the loader, the network) is derived from this
tree, so a setting is written in exactly one place. The sections are pydantic models: each
field's type and range is declared next to it, the network and E-TSDM sections are the very
models their code uses (etsdm_dist.diffusion.settings), and the checks that span sections run
once the whole tree is read. Every error names the dotted field and what is allowed, because a
bad value found an hour into a 512-GPU job costs far more than one found before launch.
"""
from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from etsdm_dist.diffusion.settings import (Bool, EtsdmConfig, Float, Int, NetworkConfig, NonNegFloat,
                                           NonNegInt, PosFloat, PosInt, Settings, TimeKind, check_etsdm,
                                           describe)

__all__ = [
    "Config", "ConfigError", "DataConfig", "DiffusionConfig", "EtsdmConfig", "NetworkConfig",
    "OptimConfig", "SampleConfig", "TrainConfig", "batch_layout", "etsdm_t_tilde", "from_dict",
    "has_field", "load", "parse_overrides", "validate",
]


class ConfigError(ValueError):
    """A config value is wrong; the message names the dotted field."""


Probability = Annotated[Float, Field(gt=0, lt=1)]


class DiffusionConfig(Settings):
    section: ClassVar[str] = "diffusion"

    schedule: Literal["linear", "quadratic", "cosine"] = "linear"
    time: TimeKind = "discrete"
    num_timesteps: Annotated[Int, Field(ge=2)] = 1000  # T, discrete time only
    beta_start: Probability = 1e-4
    beta_end: Probability = 0.02
    cosine_s: PosFloat = 0.008
    stratified_t: Bool = False  # one t per equal stratum across the batch (lower-variance loss)

    @model_validator(mode="after")
    def _betas_ordered(self) -> "DiffusionConfig":
        if self.schedule != "cosine" and self.beta_start > self.beta_end:
            raise ValueError(f"diffusion.beta_start: {self.beta_start} must be <= diffusion.beta_end "
                             f"({self.beta_end})")
        return self


class DataConfig(Settings):
    section: ClassVar[str] = "data"

    # Folder or URL holding the shards and their index.json (local path, s3://, http(s)://).
    url: str = ""
    hflip: Bool = True
    num_workers: NonNegInt = 2  # dataloader workers per rank
    prefetch_factor: PosInt = 2
    on_error: Literal["raise", "skip"] = "raise"
    skip_budget: NonNegInt = 2  # shards a run may skip before it fails loudly
    retries: NonNegInt = 8  # transient storage errors (reset, timeout, 503) per read
    retry_backoff_s: NonNegFloat = 0.5
    use_labels: Bool = False  # feed .cls labels to a class-conditional network
    # Reference statistics (.npz from `etsdm fid-ref`) for train.fid_kimg; local path or URL.
    fid_ref: str = ""


class OptimConfig(Settings):
    section: ClassVar[str] = "optim"

    lr: PosFloat = 2e-4
    betas: Annotated[list[Annotated[Float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = [0.9, 0.999]
    eps: PosFloat = 1e-8
    weight_decay: NonNegFloat = 0.0
    warmup_kimg: NonNegFloat = 0.0
    grad_clip: NonNegFloat = 1.0  # 0 disables
    offload: Bool = False  # ZeRO optimizer-state offload to CPU


class TrainConfig(Settings):
    section: ClassVar[str] = "train"

    run_dir: str = "runs/default"  # local path or s3:// URL
    seed: NonNegInt = 0
    batch_images: PosInt = 128  # global batch, all ranks and accumulation steps together
    micro_batch_images: PosInt | None = None  # per rank per step; None = batch / world size
    total_kimg: PosFloat = 128.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 2
    ema_decays: Annotated[list[Probability], Field(min_length=1)] = [0.9999]
    ema_start_kimg: NonNegFloat = 0.0
    # EDM's EMA ramp-up: each decay's half-life (in images) is capped at this fraction of the
    # images trained so far, so a short run's EMA is not still mostly the initial weights.
    # null: fixed decays from the start.
    ema_rampup_ratio: NonNegFloat | None = None
    # Intervals (kimg) are whole global batches so every rank agrees on when they fire; 0: never.
    report_kimg: NonNegFloat = 1.28  # stats.jsonl line every this many kimg (10 batches of 128)
    checkpoint_kimg: NonNegFloat = 12.8
    keep_last: PosInt = 2  # newest checkpoints kept
    milestone_every: NonNegInt = 0  # also keep every M-th checkpoint (0: none)
    sample_kimg: NonNegFloat = 0.0  # fixed-seed sample grid PNG every this many kimg (0: never)
    # FID/KID of the EMA weights (sample.* settings, data.fid_ref) every this many kimg, computed by
    # all ranks from train.fid_num images sampled with per-image seeds; a stats.jsonl line each.
    fid_kimg: NonNegFloat = 0.0
    fid_num: Annotated[Int, Field(ge=2)] = 1000
    tensorboard: Bool = False
    requeue_exit_code: Annotated[Int, Field(ge=1, le=255)] = 75  # after a preemption save (EX_TEMPFAIL)
    # Extra DeepSpeed keys merged into the generated JSON; a conflict with ours is an error.
    deepspeed_extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _whole_batches(self) -> "TrainConfig":
        for name in ("report_kimg", "checkpoint_kimg", "sample_kimg", "fid_kimg"):
            value = getattr(self, name)
            images = value * 1000
            if value and (images != int(images) or int(images) % self.batch_images):
                raise ValueError(
                    f"train.{name}={value} is {images:g} images, not a whole number of global batches "
                    f"(train.batch_images={self.batch_images})")
        return self


class SampleConfig(Settings):
    section: ClassVar[str] = "sample"

    # A field named like a sampler's keyword option (eta, order, ...) is passed to every sampler
    # that takes it, by name (etsdm_dist.eval.grid.sampler_options); the defaults are the samplers'.
    sampler: Literal["ddpm", "ddim", "dpm_solver", "dpm_solver++"] = "ddim"
    steps: PosInt = 50
    grid: Literal["uniform", "quadratic", "logsnr", "time_uniform", "ddim_quad"] = "uniform"
    eta: NonNegFloat = 0.0  # DDIM
    order: Literal[1, 2, 3] = 2  # DPM-Solver
    method: Literal["multistep", "singlestep"] = "multistep"  # DPM-Solver
    solver_type: Literal["dpmsolver", "taylor"] = "dpmsolver"  # DPM-Solver
    lower_order_final: Bool = True  # DPM-Solver: lower orders in the last steps of short runs
    variance: Literal["beta", "beta_tilde"] = "beta_tilde"  # DDPM
    # Clamp each predicted x0 to the data range [-1, 1] (guided-diffusion's default for pixel
    # models): an eps model 1% off at t = T otherwise gives x0 estimates ~150x off (alpha_T = 0.0064
    # on the linear schedule), and a young model's samples are noise.
    clip_denoised: Bool = True
    denoise_to_zero: Bool = True  # end with the noise-free jump from the last grid time to x0
    thresholding: Bool = False  # Imagen's dynamic thresholding of x0 (exclusive with clip_denoised)
    thresholding_ratio: Annotated[Float, Field(gt=0, le=1)] = 0.995
    thresholding_max_val: PosFloat = 1.0
    ema: NonNegInt = 0  # which of train.ema_decays to sample with

    # Fields that do not change an image given the weights and seed (the rest do).
    NOT_SAMPLER_OPTIONS: ClassVar[tuple[str, ...]] = ("ema",)

    @model_validator(mode="after")
    def _one_x0_limit(self) -> "SampleConfig":
        if self.clip_denoised and self.thresholding:
            raise ValueError("sample.clip_denoised and sample.thresholding are exclusive: choose one")
        return self


class Config(Settings):
    diffusion: DiffusionConfig = DiffusionConfig()
    etsdm: EtsdmConfig = EtsdmConfig()
    network: NetworkConfig = NetworkConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # `network:` with nothing under it is YAML's null: an empty section.
        if isinstance(data, dict):
            return {k: ({} if v is None and k in cls.model_fields else v) for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _across_sections(self) -> "Config":
        d, e, t = self.diffusion, self.etsdm, self.train
        check_etsdm(enabled=e.enabled, t_tilde=e.t_tilde_for(d.time), n=e.n, time=d.time,
                    num_timesteps=d.num_timesteps if d.time == "discrete" else None)
        if t.fid_kimg and not self.data.fid_ref:
            raise ValueError("train.fid_kimg: needs data.fid_ref, the reference statistics (.npz made "
                             "by `etsdm fid-ref` from the training or test images)")
        if self.sample.ema >= len(t.ema_decays):
            raise ValueError(f"sample.ema: index {self.sample.ema} out of range for "
                             f"train.ema_decays={t.ema_decays}")
        return self

    def to_dict(self) -> dict:
        return self.model_dump()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def has_field(dotted: str) -> bool:
    """Whether `section.field[.key...]` names a field of the tree (keys under a mapping field count)."""
    node: Any = Config
    for key in dotted.split("."):
        if isinstance(node, type) and issubclass(node, Settings):
            if key not in node.model_fields:
                return False
            node = node.model_fields[key].annotation
        else:
            return node is not None and getattr(node, "__origin__", node) is dict
    return True


def etsdm_t_tilde(cfg: Config) -> float:
    """t_tilde with its per-time-kind default filled in."""
    return cfg.etsdm.t_tilde_for(cfg.diffusion.time)


# --------------------------------------------------------------------------- reading


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


def from_dict(data: Any) -> Config:
    """A plain tree (parsed YAML, a stored `cfg.to_dict()`) -> validated Config, or ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, Config)) from None


def validate(cfg: Config) -> Config:
    """Re-check a tree whose fields were assigned after loading (assignment is not checked)."""
    return from_dict(cfg.to_dict())


def load(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (or the built-in defaults when path is None) + overrides -> validated Config."""
    data: Any = {}
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
    try:
        return from_dict(data)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{e}\n(in {path} with overrides {overrides or []})") from None


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
