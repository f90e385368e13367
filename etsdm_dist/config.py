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

import math
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
    """The forward process: noise schedule and time kind."""

    section: ClassVar[str] = "diffusion"

    schedule: Literal["linear", "quadratic", "cosine"] = Field(
        "linear", description="Noise schedule: beta_t linear or quadratic in t, or Nichol & Dhariwal's cosine.")
    time: TimeKind = Field(
        "discrete", description="discrete: integer timesteps 0..T-1; continuous: t in (0, 1].")
    # The schedule holds T values per coefficient: the cap keeps a typo from allocating gigabytes.
    num_timesteps: Annotated[Int, Field(ge=2, le=1_000_000)] = Field(
        1000, description="T, the number of steps (discrete time only).")
    beta_start: Probability = Field(1e-4, description="beta at the first step (linear / quadratic schedules).")
    beta_end: Probability = Field(0.02, description="beta at the last step (linear / quadratic schedules).")
    cosine_s: PosFloat = Field(
        0.008, description="Offset s of the cosine schedule (keeps beta small near t = 0).")
    stratified_t: Bool = Field(
        False, description="Draw one t per equal stratum across the global batch (a lower-variance loss "
                  "estimate), the same strata for any rank count or micro-batch.")
    prediction: Literal["eps", "v"] = Field(
        "eps", description="What the network predicts: eps, the noise; or v = alpha eps - sigma x0 "
                           "(variance-preserving schedules), whose x0 = alpha x_t - sigma v stays "
                           "bounded at high noise. Stored with checkpoints and exports; samplers "
                           "convert at the model wrapper.")

    @model_validator(mode="after")
    def _betas_ordered(self) -> "DiffusionConfig":
        """diffusion.beta_start <= diffusion.beta_end, unless diffusion.schedule is cosine."""
        if self.schedule != "cosine" and self.beta_start > self.beta_end:
            raise ValueError(f"diffusion.beta_start: {self.beta_start} must be <= diffusion.beta_end "
                             f"({self.beta_end})")
        return self


class DataConfig(Settings):
    """Where the training shards are and how the loader reads them."""

    section: ClassVar[str] = "data"

    url: str = Field("", description="Folder or URL holding the shards and their index.json "
                                     "(local path, s3://, http(s)://).")
    hflip: Bool = Field(True, description="Random horizontal flips (seeded per image position).")
    num_workers: NonNegInt = Field(2, description="Dataloader worker processes per rank.")
    prefetch_factor: PosInt = Field(2, description="Batches each worker prepares ahead.")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A corrupt or unreadable shard: fail the run, or skip it "
                             "(within data.skip_budget).")
    skip_budget: NonNegInt = Field(2, description="Shards a run may skip before it fails loudly.")
    retries: NonNegInt = Field(
        8, description="Retries of a transient storage error (reset, timeout, 503) per read.")
    retry_backoff_s: NonNegFloat = Field(
        0.5, description="First retry delay in seconds; doubles per retry (with jitter, at most 30 s).")
    use_labels: Bool = Field(False, description="Feed the shards' .cls labels to a class-conditional network "
                                                "(network.num_classes > 0).")
    fid_ref: str = Field("", description="Reference statistics (.npz from `etsdm fid-ref`) for train.fid_kimg; "
                                         "local path or URL.")


class OptimConfig(Settings):
    """Adam(W) optimizer and learning-rate warm-up."""

    section: ClassVar[str] = "optim"

    lr: PosFloat = Field(2e-4, description="Learning rate after warm-up.")
    betas: Annotated[list[Annotated[Float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = Field(
        [0.9, 0.999], description="Adam's (beta1, beta2).")
    eps: PosFloat = Field(1e-8, description="Adam's epsilon.")
    weight_decay: NonNegFloat = Field(0.0, description="Decoupled (AdamW) weight decay.")
    warmup_kimg: NonNegFloat = Field(0.0, description="Linear LR warm-up from 0 over this many thousand images.")
    grad_clip: NonNegFloat = Field(1.0, description="Clip the global gradient norm to this (0 disables).")
    offload: Bool = Field(
        False, description="ZeRO optimizer-state offload to CPU (needs train.zero_stage >= 1).")


class TrainConfig(Settings):
    """The training run: batch, length, precision, EMA, checkpoints and periodic reports."""

    section: ClassVar[str] = "train"

    run_dir: str = Field("runs/default", description="Where checkpoints, stats and samples go "
                                                     "(local path or s3:// URL).")
    # torch.manual_seed takes at most 64 bits; seeds.py hashes 64-bit words.
    seed: Annotated[Int, Field(ge=0, le=2**63 - 1)] = Field(
        0, description="Seed of weights, data order, noise and sample grids.")
    batch_images: PosInt = Field(128, description="Global batch in images: all ranks and accumulation "
                                                  "steps together.")
    micro_batch_images: PosInt | None = Field(
        None, description="Images per rank per step; null: train.batch_images / world size (no accumulation).")
    total_kimg: Annotated[Float, Field(ge=0.001)] = Field(
        128.0, description="Length of the run in thousands of images (at least one image).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (0: plain data parallel).")
    ema_decays: Annotated[list[Probability], Field(min_length=1)] = Field(
        [0.9999], description="Per-step decay of each EMA copy of the weights kept.")
    ema_start_kimg: NonNegFloat = Field(
        0.0, description="Until this many kimg every EMA is a copy of the weights; decay starts after.")
    # EDM's ramp-up keeps a short run's EMA from still being mostly the initial weights.
    ema_rampup_ratio: NonNegFloat | None = Field(
        None, description="EDM's EMA ramp-up: each decay's half-life (images) is capped at this fraction of "
                          "the images trained so far; null: fixed decays from the start.")
    # Intervals (kimg) are whole global batches so every rank agrees on when they fire.
    report_kimg: NonNegFloat = Field(
        1.28, description="A stats.jsonl line every this many kimg (0: never).")  # 10 batches of 128
    checkpoint_kimg: NonNegFloat = Field(12.8, description="A checkpoint every this many kimg (0: never).")
    keep_last: PosInt = Field(2, description="Newest checkpoints kept.")
    milestone_every: NonNegInt = Field(0, description="Also keep every M-th checkpoint (0: none).")
    sample_kimg: NonNegFloat = Field(
        0.0, description="A fixed-seed sample grid PNG every this many kimg (0: never).")
    fid_kimg: NonNegFloat = Field(
        0.0, description="FID/KID of the EMA weights (sample.* settings, data.fid_ref) every this many kimg, "
                         "from train.fid_num images sampled by all ranks; a stats.jsonl line each (0: never).")
    fid_num: Annotated[Int, Field(ge=2)] = Field(1000, description="Images sampled for each train.fid_kimg "
                                                                   "measurement (per-image seeds).")
    tensorboard: Bool = Field(False, description="Also write the stats as TensorBoard events.")
    requeue_exit_code: Annotated[Int, Field(ge=1, le=255)] = Field(
        75, description="Exit status after a preemption save, for the scheduler to requeue (EX_TEMPFAIL).")
    lease_s: Annotated[Float, Field(ge=1.0, le=86400.0)] = Field(
        60.0, description="s3:// run dirs: seconds the run's lease on train.run_dir lasts unrenewed (renewed every "
                          "quarter of it). A rerun after a crash waits up to this long before taking it over; a "
                          "run that cannot renew for 3/4 of it stops before its next write. Local run dirs use a "
                          "lock that dies with the process.")
    deepspeed_extra: dict[str, Any] = Field(
        {}, description="Extra DeepSpeed JSON keys merged into the generated config; a conflict with ours "
                        "is an error.")

    @model_validator(mode="after")
    def _finite_extra(self) -> "TrainConfig":
        """Every number in train.deepspeed_extra is finite (it goes to DeepSpeed unchecked)."""
        bad = _non_finite(self.deepspeed_extra, "train.deepspeed_extra")
        if bad:
            raise ValueError(f"{bad[0]}: must be a finite number, got {bad[1]}")
        return self

    @model_validator(mode="after")
    def _whole_batches(self) -> "TrainConfig":
        """train.report_kimg, checkpoint_kimg, sample_kimg and fid_kimg are each 0 or a whole number of
        global batches (value * 1000 a multiple of train.batch_images), so every rank agrees on when
        they fire."""
        for name in ("report_kimg", "checkpoint_kimg", "sample_kimg", "fid_kimg"):
            value = getattr(self, name)
            images = value * 1000
            if value and (images != int(images) or int(images) % self.batch_images):
                raise ValueError(
                    f"train.{name}={value} is {images:g} images, not a whole number of global batches "
                    f"(train.batch_images={self.batch_images})")
        return self


def _non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """(dotted path, value) of the first NaN or infinite float inside nested dicts / lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    items = (value.items() if isinstance(value, dict) else
             ((f"[{i}]", v) for i, v in enumerate(value)) if isinstance(value, list) else ())
    for key, v in items:
        found = _non_finite(v, f"{path}{key}" if str(key).startswith("[") else f"{path}.{key}")
        if found:
            return found
    return None


class SampleConfig(Settings):
    """The sampler of the in-training sample grids and FID; `etsdm sample` starts from a run's values.

    A field named like a sampler's keyword option (eta, order, ...) is passed to every sampler
    that takes it, by name (etsdm_dist.eval.sampling.sampler_options); the defaults are the samplers'."""

    section: ClassVar[str] = "sample"

    sampler: Literal["ddpm", "ddim", "dpm_solver", "dpm_solver++"] = Field(
        "ddim", description="Sampling method.")
    steps: PosInt = Field(50, description="Number of sampler steps (network evaluations for first-order "
                                          "samplers).")
    grid: Literal["uniform", "quadratic", "logsnr", "time_uniform", "ddim_quad"] = Field(
        "uniform", description="Spacing of the sampler's time grid "
                               "(ddim_quad: DDIM's quad skip, discrete only).")
    eta: NonNegFloat = Field(0.0, description="DDIM: noise scale (0: deterministic, 1: DDPM-like).")
    order: Literal[1, 2, 3] = Field(2, description="DPM-Solver: solver order.")
    method: Literal["multistep", "singlestep"] = Field("multistep", description="DPM-Solver: step method.")
    solver_type: Literal["dpmsolver", "taylor"] = Field("dpmsolver", description="DPM-Solver: update formula.")
    lower_order_final: Bool = Field(
        True, description="DPM-Solver: lower orders in the last steps of short runs.")
    variance: Literal["beta", "beta_tilde"] = Field(
        "beta_tilde", description="DDPM: reverse-step variance, beta_t or the posterior's beta_tilde_t.")
    # Without the clamp an eps model 1% off at t = T gives x0 estimates ~150x off (alpha_T = 0.0064
    # on the linear schedule), and a young model's samples are noise.
    clip_denoised: Bool = Field(
        True, description="Clamp each predicted x0 to the data range [-1, 1] (guided-diffusion's default "
                          "for pixel models); exclusive with sample.thresholding.")
    denoise_to_zero: Bool = Field(
        True, description="End with the noise-free jump from the last grid time to x0.")
    thresholding: Bool = Field(
        False, description="Imagen's dynamic thresholding of x0; exclusive with sample.clip_denoised.")
    thresholding_ratio: Annotated[Float, Field(gt=0, le=1)] = Field(
        0.995, description="Dynamic thresholding: quantile of |x0| used as the per-image limit.")
    thresholding_max_val: PosFloat = Field(
        1.0, description="Dynamic thresholding: floor of the per-image limit.")
    ema: NonNegInt = Field(0, description="Which of train.ema_decays to sample with (an index).")

    # Fields that do not change an image given the weights and seed (the rest do).
    NOT_SAMPLER_OPTIONS: ClassVar[tuple[str, ...]] = ("ema",)

    @model_validator(mode="after")
    def _one_x0_limit(self) -> "SampleConfig":
        """sample.clip_denoised and sample.thresholding are exclusive: at most one may be true."""
        if self.clip_denoised and self.thresholding:
            raise ValueError("sample.clip_denoised and sample.thresholding are exclusive: choose one")
        return self


class Config(Settings):
    """A whole run: one section per part of the system."""

    diffusion: DiffusionConfig = Field(DiffusionConfig(), description=DiffusionConfig.__doc__)
    etsdm: EtsdmConfig = Field(EtsdmConfig(), description=EtsdmConfig.__doc__)
    network: NetworkConfig = Field(NetworkConfig(), description=NetworkConfig.__doc__)
    data: DataConfig = Field(DataConfig(), description=DataConfig.__doc__)
    optim: OptimConfig = Field(OptimConfig(), description=OptimConfig.__doc__)
    train: TrainConfig = Field(TrainConfig(), description=TrainConfig.__doc__)
    sample: SampleConfig = Field(SampleConfig(), description=SampleConfig.__doc__)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # `network:` with nothing under it is YAML's null: an empty section.
        if isinstance(data, dict):
            return {k: ({} if v is None and k in cls.model_fields else v) for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _across_sections(self) -> "Config":
        """etsdm.t_tilde and etsdm.n obey the E-TSDM rules for diffusion.time (below);
        train.fid_kimg > 0 needs data.fid_ref; sample.ema indexes train.ema_decays."""
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
