"""Sample grids: N images tiled into one PNG. The training loop writes one from the EMA weights
every `train.sample_kimg` (the first images of `etsdm sample` for those weights: image i from seed
(0, i), the `sample` section's sampler), so grids compare across kimg and with sampling jobs."""
from __future__ import annotations

import io
import math

import torch

def encode_png(img) -> bytes:
    """uint8 [C, H, W] -> PNG bytes (deterministic: same pixels, same bytes)."""
    from PIL import Image

    arr = img.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def grid_png(images) -> bytes:
    """uint8 [N, C, H, W] -> one PNG, ceil(sqrt(N)) columns."""
    n, c, h, w = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = torch.zeros(c, rows * h, cols * w, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i]
    return encode_png(grid)


def save_sample_grid(cfg, ema_model, schedule, device, path: str, num: int = 64) -> None:
    """The first `num` images of the model under cfg.sample, seeds (0, i), as one PNG."""
    from etsdm_dist.data import storage
    from etsdm_dist.eval.sampling import ImageSampler, LoadedModel, sampler_settings, to_uint8

    loaded = LoadedModel.in_memory(ema_model, schedule, kind="training")
    sampler = ImageSampler(loaded, sampler_settings(cfg.sample.model_dump()), seed=0, device=device)
    storage.write_bytes_atomic(path, grid_png(to_uint8(sampler.generate(range(num))).cpu()))
