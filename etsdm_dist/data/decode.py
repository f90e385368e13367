"""Encoded sample bytes -> pixels, and uint8 pixels -> model input on the device.

The per-image work of the loader, kept apart from the reading and batching around it: these
functions hold no state and do no I/O, so the benchmark times them alone and the training loop
uses to_model_input without the loader's machinery. Decoding happens in the DataLoader workers
(Pillow releases the GIL); the float conversion waits for the GPU, where it is 4x less traffic.

Every decode reads the image header first (Pillow opens lazily) and refuses an image whose size
is wrong or whose pixel count exceeds a bound BEFORE decoding it: a 52 KB PNG of 12000x12000
would otherwise cost 550 MB. The fit to a square resolution (center-crop / pad) is the one
`etsdm shard` writes with, so shards of other tools, fitted on the fly, give the same pixels.
torch is imported only by to_model_input: `etsdm shard` workers use the image functions alone.
"""
from __future__ import annotations

import io
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from etsdm_dist.data.tarformat import split_name

# Image member extension -> the one Pillow decoder allowed for it (a .png is never tried as
# anything else). The order is the preference when a sample holds several image members.
PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
IMAGE_MEMBERS = tuple(PIL_FORMATS)
FIT_MODES = ("center-crop", "pad")
# Pixel bound of an image fitted to N x N: generous (16x the side), but never below 4096^2, so
# photos of any usual size pass at small training resolutions while a decompression bomb does not.
BOUND_FACTOR = 256
MIN_PIXEL_BOUND = 4096 * 4096


class ImageRefused(ValueError):
    """An image refused from its header alone (size / pixel count), before any decoding."""


def image_member(exts: Iterable[str]) -> str | None:
    """The image member of a sample (its extension), by IMAGE_MEMBERS preference; None if none."""
    have = set(exts)
    return next((e for e in IMAGE_MEMBERS if e in have), None)


def pixel_bound(height: int, width: int) -> int:
    """The largest pixel count accepted for an image brought to height x width."""
    return max(MIN_PIXEL_BOUND, BOUND_FACTOR * height * width)


def _open_checked(data, formats: Sequence[str] | None, max_pixels: int | None,
                  expect_hw: tuple[int, int] | None) -> Image.Image:
    """Image.open (header only), then the size checks; the caller decodes."""
    img = Image.open(io.BytesIO(data), formats=formats)
    w, h = img.size
    if expect_hw is not None and (h, w) != tuple(expect_hw):
        img.close()
        raise ImageRefused(f"image is {h}x{w} (HxW), expected {expect_hw[0]}x{expect_hw[1]} "
                           f"(refused before decoding)")
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise ImageRefused(f"image is {h}x{w} (HxW) = {w * h} pixels, above the bound of "
                           f"{max_pixels} (refused before decoding)")
    return img


def decode_image(data, channels: int, formats: Sequence[str] | None = None, *,
                 max_pixels: int | None = None,
                 expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> uint8 array [H, W, C] (one decode, one copy out of Pillow).

    expect_hw: the only size accepted; max_pixels: the largest pixel count. Both are checked from
    the header, before decoding (ImageRefused)."""
    with _open_checked(data, formats, max_pixels, expect_hw) as img:
        mode = "L" if channels == 1 else "RGB"
        if img.mode != mode:
            img = img.convert(mode)
        arr = np.asarray(img)
    return arr if arr.ndim == 3 else arr[:, :, None]


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Pillow image -> mode L (1 channel) or RGB (3)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels carry arbitrary colour: composite on white instead of exposing it.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    want = "L" if channels == 1 else "RGB"
    return img if img.mode == want else img.convert(want)


def fit_image(img: Image.Image, n: int, mode: str) -> Image.Image:
    """Bring a Pillow image to n x n: center-crop (scale the short side to n, crop the middle) or
    pad (scale the long side to n, paste centred on black). Lanczos resampling."""
    if img.size == (n, n):
        return img
    w, h = img.size
    if mode == "center-crop":
        s = n / min(w, h)
        rw, rh = max(n, round(w * s)), max(n, round(h * s))
        img = img.resize((rw, rh), Image.Resampling.LANCZOS)
        left, top = (rw - n) // 2, (rh - n) // 2
        return img.crop((left, top, left + n, top + n))
    if mode == "pad":
        s = n / max(w, h)
        rw, rh = max(1, round(w * s)), max(1, round(h * s))
        canvas = Image.new(img.mode, (n, n), 0)
        canvas.paste(img.resize((rw, rh), Image.Resampling.LANCZOS), ((n - rw) // 2, (n - rh) // 2))
        return canvas
    raise ValueError(f"fit mode must be one of {FIT_MODES}, got {mode!r}")


def decode_fit(data, channels: int, n: int, mode: str, formats: Sequence[str] | None = None, *,
               max_pixels: int | None = None) -> np.ndarray:
    """Any-size image bytes -> uint8 [n, n, C], exactly as `etsdm shard --resolution n --mode
    mode` would store it (EXIF orientation applied, alpha composited on white, Lanczos), without
    the re-encoding. max_pixels (default pixel_bound(n, n)) is checked before decoding."""
    bound = pixel_bound(n, n) if max_pixels is None else max_pixels
    with _open_checked(data, formats, bound, None) as im:
        im.load()
        img = fit_image(to_channels(ImageOps.exif_transpose(im), channels), n, mode)
        arr = np.asarray(img)
    return arr if arr.ndim == 3 else arr[:, :, None]


def to_model_input(images, device=None, dtype=None, memory_format=None):
    """uint8 [N, C, H, W] -> float in [-1, 1] on `device`, in `memory_format`
    (defaults: float32, contiguous).

    The uint8 batch crosses to the device first (4x less traffic than float32); the loader's
    channels_last layout becomes `memory_format` there, fused with the conversion.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    memory_format = torch.contiguous_format if memory_format is None else memory_format
    x = images.to(device, non_blocking=True) if device is not None else images
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=memory_format)
    return out.copy_(x).div_(127.5).sub_(1.0)


def key_from_header(header: bytes) -> str:
    """The sample key in one 512-byte ustar header, best effort (for error messages only: the
    key of a sample whose bytes did not parse)."""
    name = header[0:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    member = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
    try:
        return split_name(member)[0]
    except ValueError:
        return member
