"""index.json -> a validated ShardIndex: the first step of loading, before any shard is read.

Separate from the loader because it is pure validation with no I/O beyond one small JSON read:
the training loop reads the index once to size the run, tests feed it malformed documents, and
neither needs torch's data machinery for that. Every error names the URL and the field, so a bad
index fails at startup with a message that says what to fix, not mid-epoch in a worker.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from etsdm_dist.data import storage

INDEX_FORMAT = "etsdm-shards/1"
IMAGE_EXTS = ("png", "jpg", "jpeg")


class ShardIndexError(ValueError):
    """index.json is missing or malformed; the message names the URL and the field."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    offsets: tuple[int, ...]
    first_key: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class ShardIndex:
    url: str  # the folder holding index.json and the shards
    shards: tuple[ShardInfo, ...]
    total_samples: int
    resolution: tuple[int, int] | None
    channels: int
    image_format: str
    label_map: dict | None
    num_classes: int | None
    fingerprint: Any = None

    @property
    def shard_samples(self) -> list[int]:
        return [s.samples for s in self.shards]

    def shard_url(self, i: int) -> str:
        return storage.join(self.url, self.shards[i].name)


def _field(d: dict, key: str, types, where: str, url: str):
    if key not in d:
        raise ShardIndexError(f"{url}: {where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, types) or (isinstance(v, bool) and types is int):
        raise ShardIndexError(f"{url}: {where}{key}: expected {types}, got {v!r:.80}")
    return v


def parse_index(raw: dict, url: str) -> ShardIndex:
    """Validate an index.json document; every error names the URL and the field."""
    where = "index.json "
    index_url = storage.join(url, "index.json")
    if not isinstance(raw, dict):
        raise ShardIndexError(f"{index_url}: expected a JSON object")
    fmt = raw.get("format")
    if fmt != INDEX_FORMAT:
        raise ShardIndexError(f"{index_url}: field 'format' is {fmt!r}, expected {INDEX_FORMAT!r} "
                          f"(rewrite the shards with `etsdm shard`)")
    shards = []
    for i, s in enumerate(_field(raw, "shards", list, where, index_url)):
        w = f"shards[{i}]."
        if not isinstance(s, dict):
            raise ShardIndexError(f"{index_url}: {w[:-1]}: expected an object")
        name = _field(s, "name", str, w, index_url)
        n = _field(s, "samples", int, w, index_url)
        size = _field(s, "bytes", int, w, index_url)
        offs = _field(s, "offsets", list, w, index_url)
        if n < 0 or len(offs) != n + 1:
            raise ShardIndexError(f"{index_url}: {w}offsets: expected samples+1 = {n + 1} entries, got {len(offs)}")
        if any(not isinstance(o, int) for o in offs) or any(b <= a for a, b in zip(offs, offs[1:])) \
                or (offs and (offs[0] < 0 or offs[-1] > size)):
            raise ShardIndexError(f"{index_url}: {w}offsets: must be increasing integers within [0, bytes={size}]")
        if "/" in name or name in ("", ".", ".."):
            raise ShardIndexError(f"{index_url}: {w}name: {name!r} is not a plain file name")
        shards.append(ShardInfo(name, n, size, tuple(offs), s.get("first_key"), s.get("sha256")))
    if not shards:
        raise ShardIndexError(f"{index_url}: field 'shards' is empty")
    total = _field(raw, "total_samples", int, where, index_url)
    if total != sum(s.samples for s in shards) or total <= 0:
        raise ShardIndexError(f"{index_url}: field 'total_samples' = {total} but the shards hold "
                          f"{sum(s.samples for s in shards)}")
    channels = _field(raw, "channels", int, where, index_url)
    if channels not in (1, 3):
        raise ShardIndexError(f"{index_url}: field 'channels' must be 1 or 3, got {channels}")
    image_format = _field(raw, "image_format", str, where, index_url)
    if image_format not in IMAGE_EXTS:
        raise ShardIndexError(f"{index_url}: field 'image_format' must be png or jpg, got {image_format!r}")
    res = raw.get("resolution")
    if res is not None:
        if not (isinstance(res, list) and len(res) == 2 and all(isinstance(x, int) and x > 0 for x in res)):
            raise ShardIndexError(f"{index_url}: field 'resolution' must be [H, W] or null, got {res!r}")
        res = (res[0], res[1])
    return ShardIndex(url=url.rstrip("/"), shards=tuple(shards), total_samples=total, resolution=res,
                      channels=channels, image_format=image_format, label_map=raw.get("label_map"),
                      num_classes=raw.get("num_classes"), fingerprint=raw.get("fingerprint"))


def load_index(url: str) -> ShardIndex:
    """Read and validate URL/index.json (URL: the shard folder, local or s3:// / http(s)://)."""
    url = url.rstrip("/")
    if url.endswith("index.json"):
        url = url[: -len("index.json")].rstrip("/")
    index_url = storage.join(url, "index.json")
    try:
        raw = storage.read_json(index_url)
    except FileNotFoundError as e:
        raise ShardIndexError(f"no shard index at {index_url}: write the shards there with "
                          f"`etsdm shard SRC {url}` (data.url must name the shard folder)") from e
    except json.JSONDecodeError as e:
        raise ShardIndexError(f"{index_url}: not valid JSON ({e})") from e
    return parse_index(raw, url)
