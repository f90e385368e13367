"""Sampling from a trained model's EMA weights: the fixed-seed sample grid the training loop writes
every `train.sample_kimg`. Every sampler sees the E-TSDM map through the ConditionedModel wrapper;
the sampler and its settings come from the config's `sample` section."""
from __future__ import annotations

import math
from typing import Any

import torch



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
    opts: dict[str, Any] = {}
    if s.sampler == "ddim":
        opts["eta"] = s.eta
    elif s.sampler.startswith("dpm_solver"):
        opts["order"] = s.order
    elif s.sampler == "ddpm":
        opts["variance"] = s.variance
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
