"""Typed settings of the diffusion part: the network's architecture and the E-TSDM rule.

Each is defined once, here, and used both by the code that builds the objects (network.py,
etsdm.py) and, unchanged, as a section of the run config (etsdm_dist.config). The module imports
no torch, so reading a config (`etsdm config`, the launchers) stays fast.

Settings are pydantic models: every field has a type and a range, unknown fields are rejected, NaN
and inf never pass, and :func:`describe` turns pydantic's errors into one line per problem that
names the dotted field (``network.groups: ...``), the form every config error takes.
"""
from __future__ import annotations

import copy
import math
import types
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError,
                      field_validator, model_validator)
from typing_extensions import Self


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1; in a config a bool where a number belongs is a mistake.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


# Field types of the settings trees (with allow_inf_nan=False below, floats are always finite).
Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Bool = Annotated[bool, Strict()]
PosInt = Annotated[Int, Field(ge=1)]
NonNegInt = Annotated[Int, Field(ge=0)]
PosFloat = Annotated[Float, Field(gt=0)]
NonNegFloat = Annotated[Float, Field(ge=0)]


class Settings(BaseModel):
    """Base of every settings section: strict about names, finite numbers only.

    Numbers written where a string is expected are taken as their text, and YAML 1.1's string
    `1e-4` (no dot) as the number it looks like (pydantic's lax float parsing)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)
    section: ClassVar[str] = ""  # where the model sits in the run config, for error messages

    @classmethod
    def parse(cls, data: Any) -> Self:
        """Validate a plain mapping; all problems in one ValueError, one `section.field: ...` line each."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ValueError(describe(e, cls, cls.section)) from None

    def replace(self, **changes: Any) -> Self:
        """A validated copy with some fields changed (dataclasses.replace for settings)."""
        return self.parse({**self.model_dump(), **changes})


# --------------------------------------------------------------------------- error messages


def _unwrap(tp: Any) -> Any:
    """The model class / Literal inside Optional[...] and Annotated[...]."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(inner) != 1:
                return tp
            tp = inner[0]
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _walk(cls: type, loc: tuple) -> Any:
    """The annotation of the field at `loc` below model `cls` (Any where loc leaves the models)."""
    ann: Any = cls
    for key in loc:
        inner = _unwrap(ann)
        if _is_model(inner) and isinstance(key, str) and key in inner.model_fields:
            ann = inner.model_fields[key].annotation
        elif typing.get_origin(inner) in (list, tuple) and isinstance(key, int):
            ann = typing.get_args(inner)[0] if typing.get_args(inner) else Any
        else:
            return Any
    return ann


def _path(prefix: str, loc: tuple) -> str:
    out = prefix
    for key in loc:
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            out = f"{out}.{key}" if out else str(key)
    return out


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)


def _choices(ann: Any) -> str:
    allowed = list(typing.get_args(_unwrap(ann)))
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and type(None) in typing.get_args(ann):
        allowed.insert(0, None)
    return ", ".join("null" if a is None else str(a) for a in allowed)


_PLAIN = {
    "int_type": "expected an integer", "int_parsing": "expected an integer",
    "int_from_float": "expected an integer", "float_type": "expected a number",
    "float_parsing": "expected a number", "bool_type": "expected true or false",
    "bool_parsing": "expected true or false", "string_type": "expected a string",
    "list_type": "expected a list", "tuple_type": "expected a list", "dict_type": "expected a mapping",
    "model_type": "expected a mapping", "model_attributes_type": "expected a mapping",
    "finite_number": "must be a finite number", "missing": "is required",
}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def _line(err: dict, cls: type, prefix: str) -> str:
    loc, kind, ctx, got = tuple(err["loc"]), err["type"], err.get("ctx", {}), err.get("input")
    path = _path(prefix, loc)
    ann = _walk(cls, loc)
    if kind == "extra_forbidden":
        section = _path(prefix, loc[:-1]) or "config"
        known = _unwrap(_walk(cls, loc[:-1]))
        fields = ", ".join(known.model_fields) if _is_model(known) else "no fields"
        return f"unknown config field {path!r}; {section} has: {fields}"
    if kind == "value_error":
        message = str(ctx.get("error", err["msg"]))
        # A model-level check (loc at a section) names its fields itself; a field check does not.
        return message if _is_model(_unwrap(ann)) else f"{path}: {message}"
    if kind == "literal_error":
        return f"{path}: {_show(got)} is not allowed; allowed values: {_choices(ann)}"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"{path}: must be {op} {ctx[key]}, got {_show(got)}"
    if kind in ("too_short", "too_long"):
        n = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        return f"{path}: needs {'at least' if kind == 'too_short' else 'at most'} {n} items, got {_show(got)}"
    return f"{path or 'config'}: {_PLAIN.get(kind, err['msg'])}, got {_show(got)}"


def describe(exc: ValidationError, cls: type, prefix: str = "") -> str:
    """pydantic's errors for model `cls` as lines `dotted.field: what is wrong, got VALUE`."""
    return "\n".join(_line(e, cls, prefix) for e in exc.errors(include_url=False))


# --------------------------------------------------------------------------- network


# Architectures by name; each maps NetworkConfig fields to values, the rest keep their defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests / toy runs (e.g. 32x32 grayscale).
    "tiny": dict(resolution=32, in_channels=1, base_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                 attention_resolutions=[16], num_heads=2, head_channels=-1, dropout=0.0, groups=8),
    # DDPM CIFAR-10 (Ho et al. 2020): 35.7M params.
    "32": dict(resolution=32, in_channels=3, base_channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
               attention_resolutions=[16], num_heads=1, head_channels=-1, dropout=0.1),
    # In between (ADM-ish 64x64): multi-resolution attention with 64-channel heads, FiLM norm.
    "64": dict(resolution=64, in_channels=3, base_channels=128, channel_mult=[1, 2, 3, 4], num_res_blocks=3,
               attention_resolutions=[32, 16, 8], num_heads=-1, head_channels=64, dropout=0.1,
               use_scale_shift_norm=True, resblock_updown=True),
    # DDPM 256x256 (CelebA-HQ / LSUN): ~114M params.
    "256": dict(resolution=256, in_channels=3, base_channels=128, channel_mult=[1, 1, 2, 2, 4, 4],
                num_res_blocks=2, attention_resolutions=[16], num_heads=1, head_channels=-1, dropout=0.0),
}
Preset = Literal["tiny", "32", "64", "256"]
_HEADS = Annotated[Int, Field(ge=-1)]


class NetworkConfig(Settings):
    """The UNet's architecture (the `network` config section).

    `preset` names a base architecture (PRESETS); a field given explicitly overrides it, any
    other field takes the preset's value. The stored tree is the resolved one, so a dumped config
    rebuilds the same network whatever the presets later become."""

    section: ClassVar[str] = "network"

    preset: Preset | None = Field(
        "32", description="Base architecture (PRESETS) whose values fill every field not given; "
                          "null: the declared defaults.")
    resolution: PosInt = Field(32, description="Image side in pixels (square images).")
    in_channels: PosInt = Field(3, description="Image channels (1: grayscale, 3: RGB).")
    out_channels: PosInt | None = Field(
        None, description="Output channels; null: network.in_channels (epsilon prediction).")
    base_channels: PosInt = Field(128, description="Channels of the first level.")
    channel_mult: Annotated[list[PosInt], Field(min_length=1)] = Field(
        [1, 2, 2, 2], description="Per-level channel multiplier of base_channels; each level after the "
                                  "first halves the resolution.")
    num_res_blocks: PosInt = Field(2, description="Residual blocks per level.")
    attention_resolutions: list[PosInt] = Field(
        [16], description="Resolutions (pixels) at which self-attention follows the residual blocks.")
    num_heads: _HEADS = Field(1, description="Attention heads per layer; -1: use head_channels.")
    head_channels: _HEADS = Field(-1, description="Channels per attention head; -1: use num_heads.")
    dropout: Annotated[Float, Field(ge=0.0, lt=1.0)] = Field(
        0.1, description="Dropout rate inside residual blocks.")
    num_classes: NonNegInt = Field(0, description="Class-conditional with this many classes; 0: unconditional.")
    use_scale_shift_norm: Bool = Field(
        False, description="Condition residual blocks on the time embedding by scale and shift of the "
                           "normalized activations (FiLM) instead of adding it.")
    resblock_updown: Bool = Field(
        False, description="Down/upsample with residual blocks (ADM) instead of strided conv / interpolation.")
    groups: PosInt = Field(
        32, description="GroupNorm groups; must divide every level's channel count.")
    gradient_checkpointing: Bool = Field(
        False, description="Recompute block activations in the backward pass (less memory, more compute).")
    fp32_time_path: Bool = Field(
        True, description="Keep the time-MLP / class-embedding parameters stored in fp32 under bf16/fp16.")
    # How the training engine runs the network (not its architecture).
    channels_last: Bool = Field(False, description="Run in channels_last memory format (GPU tensor cores).")
    compile: Bool = Field(False, description="torch.compile the network (GPU).")

    @field_validator("preset", mode="before")
    @classmethod
    def _preset_name(cls, value: Any) -> Any:
        # `network.preset=32` on the command line is YAML's int 32, meant as the preset's name.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = cls._preset_name(data.get("preset", cls.model_fields["preset"].default))
        if preset not in PRESETS:
            return data  # None, or a bad name that field validation reports
        merged = copy.deepcopy(PRESETS[preset])  # the table must not alias any config's lists
        # Setting only one of num_heads / head_channels to a positive value selects it over the
        # preset's choice, so the other is disabled.
        for a, b in (("num_heads", "head_channels"), ("head_channels", "num_heads")):
            value = data.get(a)
            if b not in data and isinstance(value, int) and not isinstance(value, bool) and value > 0:
                merged[b] = -1
        merged.update(data)
        return merged

    @property
    def out_ch(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    def level_resolutions(self) -> list[int]:
        return [self.resolution // 2**i for i in range(len(self.channel_mult))]

    def heads_for(self, ch: int) -> int:
        return ch // self.head_channels if self.head_channels > 0 else self.num_heads

    @model_validator(mode="after")
    def _consistent(self) -> "NetworkConfig":
        """network.resolution is divisible by 2**(len(channel_mult)-1); every attention resolution is
        one of the levels' resolutions; network.groups divides every level's channels; exactly one of
        network.num_heads / head_channels is positive (the other -1) and divides the channels of
        every attention level."""
        cm = self.channel_mult
        factor = 2 ** (len(cm) - 1)
        if self.resolution % factor:
            raise ValueError(f"network.resolution: {self.resolution} must be divisible by "
                             f"2**(len(channel_mult)-1) = {factor} (network.channel_mult={cm})")
        reachable = self.level_resolutions()
        for r in self.attention_resolutions:
            if r not in reachable:
                raise ValueError(f"network.attention_resolutions: {r} is not reachable; allowed values: "
                                 f"{reachable} (network.resolution {self.resolution} halved per level "
                                 f"of network.channel_mult)")
        for m in cm:
            if (self.base_channels * m) % self.groups:
                raise ValueError(f"network.groups: channel count {self.base_channels * m} "
                                 f"(base_channels*{m}) is not divisible by groups={self.groups}")
        nh, hc = self.num_heads, self.head_channels
        for name, v in (("num_heads", nh), ("head_channels", hc)):
            if v == 0:
                raise ValueError(f"network.{name}: must be a positive int or -1 (disabled), got 0")
        if (nh > 0) == (hc > 0):
            raise ValueError(f"network.num_heads: exactly one of network.num_heads ({nh}) / "
                             f"network.head_channels ({hc}) must be positive, the other -1")
        for lvl, m in enumerate(cm):
            if reachable[lvl] not in self.attention_resolutions:
                continue
            ch = self.base_channels * m
            if hc > 0 and ch % hc:
                raise ValueError(f"network.head_channels: {hc} does not divide attention channels {ch} "
                                 f"at resolution {reachable[lvl]}")
            if nh > 0 and ch % nh:
                raise ValueError(f"network.num_heads: {nh} does not divide attention channels {ch} "
                                 f"at resolution {reachable[lvl]}")
        return self


# --------------------------------------------------------------------------- E-TSDM

TimeKind = Literal["discrete", "continuous"]
TIME_KINDS: tuple[str, ...] = typing.get_args(TimeKind)

# The paper's defaults: t_tilde = 100 of T = 1000 discrete steps (0.1 of continuous time), n = 5.
DEFAULT_T_TILDE = {"discrete": 100.0, "continuous": 0.1}
DEFAULT_N = 5


def default_t_tilde(time: str) -> float:
    if time not in DEFAULT_T_TILDE:
        raise ValueError(f"diffusion.time: must be one of {TIME_KINDS}, got {time!r}")
    return DEFAULT_T_TILDE[time]


def _divisors(m: int) -> list[int]:
    return [d for d in range(1, m + 1) if m % d == 0]


def check_etsdm(*, enabled: Any, t_tilde: Any, n: Any, time: Any, num_timesteps: int | None = None) -> None:
    """The E-TSDM rules; raise ValueError naming the offending config field.

    Discrete time: t_tilde is a whole timestep <= diffusion.num_timesteps and n divides it, so every
    sub-interval holds whole timesteps. Continuous time: 0 < t_tilde <= 1."""
    if time not in TIME_KINDS:
        raise ValueError(f"diffusion.time: must be one of {TIME_KINDS}, got {time!r}")
    if not isinstance(enabled, bool):
        raise ValueError(f"etsdm.enabled: must be true or false, got {enabled!r}")
    if isinstance(n, bool) or not isinstance(n, (int, float)) or int(n) != n or n < 1:
        raise ValueError(f"etsdm.n: must be an integer >= 1, got {n!r}")
    if isinstance(t_tilde, bool) or not isinstance(t_tilde, (int, float)) or not 0 < t_tilde < math.inf:
        raise ValueError(f"etsdm.t_tilde: must be a finite number > 0, got {t_tilde!r}")
    if time == "continuous":
        if not t_tilde <= 1.0:
            raise ValueError(f"etsdm.t_tilde: must be in (0, 1] for diffusion.time=continuous, got {t_tilde!r}")
        return
    if int(t_tilde) != t_tilde:
        raise ValueError(f"etsdm.t_tilde: must be a whole timestep for diffusion.time=discrete, got {t_tilde!r}")
    if num_timesteps is not None and t_tilde > num_timesteps:
        raise ValueError(f"etsdm.t_tilde: must be <= diffusion.num_timesteps ({num_timesteps}), got {t_tilde!r}")
    if int(t_tilde) % int(n):
        raise ValueError(
            f"etsdm.n: {n} does not divide etsdm.t_tilde={int(t_tilde)}; for diffusion.time=discrete "
            f"each sub-interval must hold whole timesteps (allowed n: {_divisors(int(t_tilde))[:12]})")


class EtsdmConfig(Settings):
    """Early timestep-shared diffusion: below t_tilde the network's time condition is shared within
    each of n sub-intervals; the noise, loss and samplers use the true t."""

    section: ClassVar[str] = "etsdm"

    enabled: Bool = Field(True, description="E-TSDM on; false: plain DDPM, bit-identical network inputs.")
    t_tilde: PosFloat | None = Field(
        None, description="End of the shared-condition region [0, t_tilde), in diffusion.time units; "
                          f"null: {DEFAULT_T_TILDE['discrete']:g} steps (discrete) or "
                          f"{DEFAULT_T_TILDE['continuous']:g} (continuous).")
    n: PosInt = Field(DEFAULT_N, description="Equal sub-intervals of [0, t_tilde); inside each the network "
                                             "is conditioned on its left end (n = t_tilde: plain DDPM).")

    def t_tilde_for(self, time: str) -> float:
        """t_tilde with the per-time-kind default filled in."""
        return default_t_tilde(time) if self.t_tilde is None else self.t_tilde
