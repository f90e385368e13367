"""Where the images of a FID statistic come from: a shard set, an image folder or an array file,
each split into one contiguous block of image indices per rank, yielded as uint8 [N, C, H, W]
batches with their global indices (what FeatureStats.add takes).

  shards   a folder or URL (s3://...) with index.json: read and decoded by the training loader's
           own path (ShardStream: range reads, decode_image, no flip), in the loader's global
           order for seed 0, i.e. epoch 0 of a seeded shard permutation, each shard's samples in
           stored order. All samples once, or the first --max-images of that order.
  folder   a local directory, searched recursively for .png/.jpg/.jpeg/.webp, sorted by relative
           path, skipping subfolders named _* or .* (`etsdm sample --format png` keeps its grid
           in _sample/); each image decoded to RGB (Pillow: grayscale replicated, palettes expanded,
           alpha dropped). Images of different sizes are fine (each goes to 299x299).
  npz/npy  a uint8 array [N, H, W, C], [N, C, H, W] (C = 1 or 3) or [N, H, W]: in an .npz the
           key `images`, else `arr_0` (what guided-diffusion / EDM sample scripts write), else
           its only array.

The fingerprint identifies the images used: the shard index's fingerprint (sha256 over the
shards' hashes) and N; the folder's sorted relative paths and byte sizes; the array file's sha256.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import zipfile
from typing import Iterator

import numpy as np
import torch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
ORDER_SEED = 0  # the shard order statistics read in (any fixed value: all samples once)
DECODE_THREADS = 4  # Pillow releases the GIL while decoding


class SourceError(ValueError):
    """An image source that cannot be read; the message names the path and what is wrong."""


def rank_block(n: int, rank: int, world_size: int) -> range:
    """The contiguous image indices of one rank: sizes differ by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class ImageSource:
    kind = ""

    def __init__(self, location: str, n: int, total: int, image_resolution, fingerprint: str):
        self.location, self.n, self.total = location, n, total
        self.image_resolution, self.fingerprint = image_resolution, fingerprint

    def describe(self) -> dict:
        return {"kind": self.kind, "location": self.location, "n": self.n, "available": self.total,
                "image_resolution": self.image_resolution, "fingerprint": self.fingerprint}

    def batches(self, rank: int, world_size: int, batch_images: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


def _limit(total: int, max_images: int | None, location: str) -> int:
    if max_images is not None and max_images < 1:
        raise SourceError(f"--max-images must be >= 1, got {max_images}")
    if total < 1:
        raise SourceError(f"{location}: no images")
    return total if max_images is None else min(total, max_images)


# --------------------------------------------------------------------------- shards


class ShardSource(ImageSource):
    kind = "shards"

    def __init__(self, url: str, max_images: int | None):
        from etsdm_dist.data.shard_index import ShardIndexError, load_index

        try:
            self.index = load_index(url)
        except ShardIndexError as e:
            raise SourceError(str(e)) from e
        n = _limit(self.index.total_samples, max_images, url)
        fp = _digest({"index": self.index.fingerprint, "n": n, "order_seed": ORDER_SEED})
        super().__init__(self.index.url, n, self.index.total_samples,
                         list(self.index.resolution) if self.index.resolution else None, fp)

    def batches(self, rank, world_size, batch_images):
        from etsdm_dist.data.loader import ShardStream

        block = rank_block(self.n, rank, world_size)
        if not block:
            return
        b = min(batch_images, len(block))
        # One rank of one: this rank's block is a plain run of global positions. The last batch
        # may read up to b-1 samples past the block; they are dropped.
        stream = ShardStream(self.index, seed=ORDER_SEED, start_position=block.start, batch_images=b,
                             world_size=1, rank=0, micro_batch_images=b, hflip=False, on_error="raise")
        it = iter(stream)
        try:
            pos = block.start
            while pos < block.stop:
                mb = next(it)
                k = min(b, block.stop - pos)
                yield mb["images"][:k], mb["positions"][:k]
                pos += k
        finally:
            it.close()
            stream.close_reads()


# --------------------------------------------------------------------------- image folder


def list_images(folder: str) -> list[str]:
    found = []
    for d, dirs, files in os.walk(folder):
        # hidden and bookkeeping folders hold no samples (`etsdm sample` puts its grid in _sample/)
        dirs[:] = sorted(x for x in dirs if not x.startswith(("_", ".")))
        for f in files:
            if f.lower().endswith(IMAGE_EXTS):
                found.append(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/"))
    return sorted(found)


class FolderSource(ImageSource):
    kind = "folder"

    def __init__(self, folder: str, max_images: int | None):
        self.folder = folder
        files = list_images(folder)
        if not files:
            raise SourceError(f"{folder}: no images ({'/'.join(IMAGE_EXTS)}) in this folder or below")
        n = _limit(len(files), max_images, folder)
        self.files = files[:n]
        sizes = [os.path.getsize(os.path.join(folder, f)) for f in self.files]
        super().__init__(os.path.abspath(folder), n, len(files), None,
                         _digest([[f, s] for f, s in zip(self.files, sizes)]))

    def _decode(self, rel: str) -> np.ndarray:
        from etsdm_dist.data.decode import decode_image

        path = os.path.join(self.folder, rel)
        try:
            with open(path, "rb") as f:
                return decode_image(f.read(), 3)
        except Exception as e:  # noqa: BLE001 - any unreadable file is named
            raise SourceError(f"{path}: cannot decode as an image ({type(e).__name__}: {e})") from e

    def batches(self, rank, world_size, batch_images):
        block = rank_block(self.n, rank, world_size)
        with concurrent.futures.ThreadPoolExecutor(DECODE_THREADS) as pool:
            chunks = [block[i:i + batch_images] for i in range(0, len(block), batch_images)]
            nxt = pool.map(self._decode, [self.files[i] for i in chunks[0]]) if chunks else None
            for c, chunk in enumerate(chunks):
                arrays = list(nxt)
                if c + 1 < len(chunks):  # decode the next chunk while this one is on the network
                    nxt = pool.map(self._decode, [self.files[i] for i in chunks[c + 1]])
                # runs of equal size form one batch (a folder may mix sizes)
                start = 0
                for j in range(1, len(arrays) + 1):
                    if j == len(arrays) or arrays[j].shape != arrays[start].shape:
                        batch = torch.from_numpy(np.stack(arrays[start:j])).permute(0, 3, 1, 2)
                        yield batch, torch.arange(chunk[start], chunk[start] + j - start)
                        start = j


# --------------------------------------------------------------------------- arrays


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def load_image_array(path: str) -> np.ndarray:
    """uint8 images from .npz/.npy, as [N, H, W, C] (a view where possible)."""
    try:
        if path.endswith(".npy"):
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if "mu" in keys and "sigma" in keys:
                    raise SourceError(f"{path}: holds FID statistics (mu, sigma), not images; "
                                      f"pass it as --ref")
                key = "images" if "images" in keys else "arr_0" if "arr_0" in keys else (
                    keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise SourceError(f"{path}: no array named 'images' or 'arr_0' among {keys}")
                arr = z[key]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, SourceError):
            raise
        raise SourceError(f"{path}: not a readable .npz/.npy of images ({e})") from e
    if arr.dtype != np.uint8:
        raise SourceError(f"{path}: images must be uint8 (0..255), got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[:, :, :, None]
    if arr.ndim != 4:
        raise SourceError(f"{path}: expected images [N, H, W, C] or [N, C, H, W], got shape {arr.shape}")
    if arr.shape[-1] not in (1, 3):
        if arr.shape[1] not in (1, 3):
            raise SourceError(f"{path}: no channel axis of size 1 or 3 in shape {arr.shape}")
        arr = arr.transpose(0, 2, 3, 1)  # [N, C, H, W] -> [N, H, W, C]
    return arr


class ArraySource(ImageSource):
    kind = "npz"

    def __init__(self, path: str, max_images: int | None):
        if not os.path.isfile(path):
            raise SourceError(f"{path}: no such file")
        self.array = load_image_array(path)
        n = _limit(len(self.array), max_images, path)
        super().__init__(os.path.abspath(path), n, len(self.array), list(self.array.shape[1:3]),
                         _sha256_file(path))

    def batches(self, rank, world_size, batch_images):
        block = rank_block(self.n, rank, world_size)
        for i in range(block.start, block.stop, batch_images):
            j = min(i + batch_images, block.stop)
            chunk = np.array(self.array[i:j], order="C")  # a writable copy (np.load may mmap)
            yield torch.from_numpy(chunk).permute(0, 3, 1, 2), torch.arange(i, j)


def open_source(spec: str, max_images: int | None = None) -> ImageSource:
    """A shard set (folder or URL with index.json), an image folder, or an .npz/.npy of images."""
    from etsdm_dist.data import storage

    if spec.endswith((".npz", ".npy")):
        return ArraySource(spec, max_images)
    if storage.is_remote(spec) or spec.rstrip("/").endswith("index.json") or \
            os.path.isfile(os.path.join(spec, "index.json")):
        return ShardSource(spec, max_images)
    if os.path.isdir(spec):
        return FolderSource(spec, max_images)
    raise SourceError(f"{spec}: not a shard set (no index.json), an image folder or an .npz/.npy file")
