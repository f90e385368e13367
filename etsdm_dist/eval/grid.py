"""Sampling from a trained model's EMA weights: the fixed-seed sample grid the training loop writes
every `train.sample_kimg`. Every sampler sees the E-TSDM map through the ConditionedModel wrapper;
the sampler and its settings come from the config's `sample` section."""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch


def sampler_options(sample_cfg) -> dict[str, Any]:
    """The `sample` fields that the chosen sampler takes as keyword options, by name.

    The sampler's own signature decides (samplers.SAMPLERS), so a `sample` field reaches every
    sampler that has an option of that name and no other: no hand-kept table to drift."""
    from etsdm_dist.diffusion import samplers

    params = inspect.signature(samplers.SAMPLERS[sample_cfg.sampler]).parameters
    return {k: v for k, v in sample_cfg.model_dump().items()
            if k in params and params[k].kind is inspect.Parameter.KEYWORD_ONLY}


def save_sample_grid(cfg, ema_model, schedule, device, path: str, num: int = 64) -> None:
    """Fixed-seed samples (same seed every time, so grids are comparable across kimg) as a PNG."""
    import io

    import numpy as np
    from PIL import Image

    from etsdm_dist.diffusion import samplers
    from etsdm_dist.data import storage

    res = ema_model.net.config.resolution
    ch = ema_model.net.config.in_channels
    g = torch.Generator(device="cpu").manual_seed(cfg.train.seed + 12345)
    x_T = torch.randn(num, ch, res, res, generator=g).to(device)
    s = cfg.sample
    opts = sampler_options(s)
    # Every sampler takes a generator; the stochastic ones (DDPM, DDIM with eta > 0) draw from it,
    # so their grids are as reproducible as the deterministic ones.
    opts["generator"] = torch.Generator(device=device).manual_seed(cfg.train.seed + 54321)
    dtype = next(ema_model.parameters()).dtype
    with torch.no_grad():
        x = samplers.sample(s.sampler, lambda x, t: ema_model(x.to(dtype), t).float(), x_T, schedule,
                            s.steps, s.grid, **opts)
    img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    cols = int(math.ceil(math.sqrt(num)))
    rows = int(math.ceil(num / cols))
    grid = torch.zeros(ch, rows * res, cols * res, dtype=torch.uint8)
    for i in range(num):
        r, c = divmod(i, cols)
        grid[:, r * res:(r + 1) * res, c * res:(c + 1) * res] = img[i]
    arr = grid.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if ch == 1 else np.ascontiguousarray(arr))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    storage.write_bytes_atomic(path, buf.getvalue())
