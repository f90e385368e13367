"""ADM-style UNet epsilon-prediction network (DDPM / Dhariwal & Nichol 2021 layout).

Public API
----------
- ``NetworkConfig``: the validated architecture (defined in settings.py; it is also the
  ``network`` section of the run config, so every field is settable from YAML).
- ``UNet(config=None, **kwargs)``: ``net(x, t, y=None) -> eps`` (same shape/dtype as ``x``).
- ``PRESETS``: ``{"tiny", "32", "64", "256"}`` -> dict of NetworkConfig fields.
- ``build_network(preset=None, **overrides)``: merge + validate + build.
- ``count_parameters(net)``, ``flops_per_image(net, resolution=None, in_channels=None)``.
- ``timestep_embedding(t, dim)``: fp32 sinusoidal embedding.

fp32 time path
--------------
The sinusoidal embedding, the time MLP and the class embedding (``net.time_embed``,
a :class:`TimeEmbedding`) always *compute* in fp32: forward runs them under
``torch.autocast(enabled=False)`` and up-casts their weights with ``.float()`` (a no-op
for fp32 weights).  Their *storage* is kept fp32 too: ``TimeEmbedding._apply`` is
overridden, so ``net.to(torch.bfloat16)``, ``net.bfloat16()``, ``net.half()`` (what
DeepSpeed does) leave those parameters in fp32.  Call ``net.keep_time_path_fp32(False)``
before casting if an optimizer needs one uniform parameter dtype: the computation is
still fp32 (weights are up-cast on the fly), only storage follows the cast.  The
embedding is cast to the activation dtype inside each residual block.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from etsdm_dist.diffusion.settings import PRESETS, NetworkConfig

__all__ = [
    "NetworkConfig", "UNet", "PRESETS", "build_network", "count_parameters",
    "flops_per_image", "timestep_embedding", "TimeEmbedding",
]

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "hpu", "mps")


def _no_autocast(device_type: str):
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()




# -------------------------------------------------------------------------- building blocks
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] in fp32 (cos half then sin half), autocast disabled."""
    with _no_autocast(t.device.type):
        half = dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                          * (-math.log(max_period) / half))
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32, returned in the input dtype."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        with _no_autocast(x.device.type):
            y = F.group_norm(x.float(), self.num_groups, w, b, self.eps)
        return y.to(x.dtype)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding -> Linear -> SiLU -> Linear (+ class embedding), always fp32."""

    def __init__(self, base: int, emb_dim: int, num_classes: int, keep_fp32: bool = True):
        super().__init__()
        self.base = base
        self.lin1 = nn.Linear(base, emb_dim)
        self.lin2 = nn.Linear(emb_dim, emb_dim)
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None
        self.keep_fp32 = keep_fp32

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.keep_fp32:  # undo dtype casts (.to(bf16)/.half()/.bfloat16()); device moves are kept
            for p in self.parameters():
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
                    if p.grad is not None:
                        p.grad = p.grad.float()
        return self

    def forward(self, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with _no_autocast(t.device.type):
            e = timestep_embedding(t, self.base)
            e = F.linear(e, self.lin1.weight.float(), self.lin1.bias.float())
            e = F.linear(F.silu(e), self.lin2.weight.float(), self.lin2.bias.float())
            if self.label_emb is not None:
                if y is None:
                    raise ValueError("class-conditional network (num_classes > 0) needs y")
                e = e + F.embedding(y, self.label_emb.weight.float())
        return e


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    def __init__(self, ch: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x, emb=None):
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    def __init__(self, ch: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1) if use_conv else None

    def forward(self, x, emb=None):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """GroupNorm-SiLU-(up/down)-Conv, + time embedding (add or FiLM scale-shift), GroupNorm-SiLU-Dropout-zeroConv."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout, groups, scale_shift, up=False, down=False):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = GroupNorm32(groups, in_ch)
        self.updown = Upsample(in_ch, False) if up else Downsample(in_ch, False) if down else None
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = GroupNorm32(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = F.silu(self.norm1(x))
        if self.updown is not None:
            h, x = self.updown(h), self.updown(x)
        h = self.conv1(h)
        e = self.emb_proj(F.silu(emb).to(h.dtype))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions with fused SDPA (no per-head loops)."""

    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm32(groups, ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = _zero(nn.Linear(ch, ch))

    def forward(self, x, emb=None):
        b, c, hgt, wid = x.shape
        n, nh = hgt * wid, self.heads
        tok = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C] (a free view for channels_last)
        qkv = self.qkv(tok).view(b, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, HW, hd], last dim contiguous
        o = F.scaled_dot_product_attention(q, k, v)
        o = self.proj(o.transpose(1, 2).reshape(b, n, c))  # [B, HW, C]
        return x + o.transpose(1, 2).view(b, c, hgt, wid)  # channels_last-strided view


class Stage(nn.ModuleList):
    """A sequence of layers all called as layer(h, emb)."""


# -------------------------------------------------------------------------------- UNet
class UNet(nn.Module):
    def __init__(self, config: NetworkConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = NetworkConfig.parse(kwargs)
        elif kwargs:
            config = config.replace(**kwargs)
        # A private copy: the run config's section may still be edited after the network is built.
        self.config = cfg = config.model_copy(deep=True)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        base, groups = cfg.base_channels, cfg.groups
        emb_dim = 4 * base
        self.time_embed = TimeEmbedding(base, emb_dim, cfg.num_classes, cfg.fp32_time_path)

        def res(i, o, **kw):
            return ResBlock(i, o, emb_dim, cfg.dropout, groups, cfg.use_scale_shift_norm, **kw)

        def attn(ch):
            return AttentionBlock(ch, cfg.heads_for(ch), groups)

        self.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, res_now = [base], base, cfg.resolution
        nlev = len(cfg.channel_mult)
        for lvl, m in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                stage = Stage([res(ch, base * m)])
                ch = base * m
                if res_now in cfg.attention_resolutions:
                    stage.append(attn(ch))
                self.down.append(stage)
                skips.append(ch)
            if lvl != nlev - 1:
                self.down.append(Stage([res(ch, ch, down=True) if cfg.resblock_updown
                                        else Downsample(ch, True)]))
                skips.append(ch)
                res_now //= 2
        self.mid = Stage([res(ch, ch), attn(ch), res(ch, ch)])
        self.up = nn.ModuleList()
        for lvl, m in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                stage = Stage([res(ch + skips.pop(), base * m)])
                ch = base * m
                if res_now in cfg.attention_resolutions:
                    stage.append(attn(ch))
                if lvl != 0 and i == cfg.num_res_blocks:
                    stage.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, True))
                    res_now *= 2
                self.up.append(stage)
        self.norm_out = GroupNorm32(groups, ch)
        self.conv_out = _zero(nn.Conv2d(ch, cfg.out_ch, 3, padding=1))

    # -- dtype helpers
    def keep_time_path_fp32(self, enabled: bool = True) -> "UNet":
        """Keep (True, default) time-MLP/class-embedding params stored fp32 through dtype casts.

        With ``enabled=True`` this also re-casts them to fp32 now.  The time path
        computes in fp32 either way."""
        self.time_embed.keep_fp32 = enabled
        if enabled:
            self.time_embed._apply(lambda p: p)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def _run(self, layer, h, emb):
        if (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                and isinstance(layer, (ResBlock, AttentionBlock))):
            return checkpoint(layer, h, emb, use_reentrant=False)
        return layer(h, emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W]; t: [B] float network time (~0..1000); y: [B] long labels or None."""
        emb = self.time_embed(t, y)  # fp32 [B, 4*base]
        h = self.conv_in(x.to(self.dtype))
        hs = [h]
        for stage in self.down:
            for layer in stage:
                h = self._run(layer, h, emb)
            hs.append(h)
        for layer in self.mid:
            h = self._run(layer, h, emb)
        for stage in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            for layer in stage:
                h = self._run(layer, h, emb)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h.to(x.dtype)


def build_network(preset: str | None = None, **overrides: Any) -> UNet:
    """Build a UNet from ``PRESETS[preset]`` (or the NetworkConfig defaults) updated with ``overrides``.

    Overriding only one of ``num_heads``/``head_channels`` with a positive value
    disables (-1) the other.  Raises ValueError naming the offending ``network.<field>``."""
    return UNet(NetworkConfig.parse({"preset": preset, **overrides}))


# ------------------------------------------------------------------------------ metrics
def count_parameters(net: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


def flops_per_image(net: UNet, resolution: int | None = None, in_channels: int | None = None) -> int:
    """Forward FLOPs for one image (FlopCounterMode: matmul/conv/attention; a training step is ~3x).

    Counts on a fresh meta-device copy built from ``net.config`` (no allocation, and
    SDPA decomposes to countable matmuls there; CPU fused attention is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = net.config
    res = resolution or cfg.resolution
    cin = in_channels or cfg.in_channels
    with torch.device("meta"):
        meta_net = UNet(cfg.replace(in_channels=cin, gradient_checkpointing=False))
        x = torch.zeros(1, cin, res, res)
        t = torch.zeros(1)
        y = torch.zeros(1, dtype=torch.long) if cfg.num_classes > 0 else None
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta_net(x, t, y)
    return int(counter.get_total_flops())
