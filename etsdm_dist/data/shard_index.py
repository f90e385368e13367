"""index.json -> a validated ShardIndex: the first step of loading, before any shard is read.

Separate from the loader because it is pure validation with no I/O beyond one small JSON read:
the training loop reads the index once to size the run, tests feed it malformed documents, and
neither needs torch's data machinery for that. Every error names the URL and the field, so a bad
index fails at startup with a message that says what to fix, not mid-epoch in a worker.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from etsdm_dist.data import storage

INDEX_FORMAT = "etsdm-shards/1"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # image_format may also be "mixed" (`etsdm index`)


class ShardIndexError(ValueError):
    """index.json is missing or malformed; the message names the URL and the field."""


# --------------------------------------------------------------------------- names

# Shard files sit directly in the shard folder, whose URL is joined with the name: a separator or
# `..` would reach outside it, NUL and control characters break paths and logs, and `?`, `#`, `%`
# or spaces change the meaning of an http(s):// or s3:// URL. So a name (and `etsdm shard
# --prefix`, the start of one) is a short run of ASCII letters, digits, `_`, `-` and `.`.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MAX_NAME_CHARS = 200  # leaves room for `-000000.tar` and the writer's `.NAME.partial` staging file


def name_problem(name: Any) -> str | None:
    """Why `name` is not a safe shard file name or shard prefix; None when it is one.

    Safe: 1 to MAX_NAME_CHARS characters from [A-Za-z0-9_.-], not starting with `.` or `-`
    (hidden files, option-like names), and no `..` anywhere."""
    if not isinstance(name, str):
        return f"expected a string, got {type(name).__name__}"
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_CHARS:
        return f"is {len(name)} characters long, at most {MAX_NAME_CHARS} allowed"
    if ".." in name:
        return f"{name!r} contains '..'"
    if not _SAFE_NAME.fullmatch(name):
        bad = next((c for c in name if not (c.isascii() and (c.isalnum() or c in "_.-"))), name[0])
        return (f"{name!r} has the character {bad!r}; allowed: ASCII letters, digits, '_', '-', '.' "
                f"(not first: '.', '-')")
    return None


# --------------------------------------------------------------------------- sample size bound

SAMPLE_OVERHEAD_BYTES = 1 << 20  # tar headers, .cls, .json, and the image format's own headers
# Pillow refuses to open images over this many pixels (twice Image.MAX_IMAGE_PIXELS), and JPEG
# sides stop at 65535: an index claiming more is not one of ours, and the loader would allocate
# batches of that size.
MAX_PIXELS = 178_956_970
MAX_SIDE = 65535
# index.json without a resolution (images at their source size): MAX_PIXELS of RGB is 537 MB.
NATIVE_SAMPLE_BYTES = 512 << 20


def max_sample_bytes(resolution: tuple[int, int] | None, channels: int) -> int:
    """The most bytes one sample's tar members may span for an index of this resolution and
    channel count. PNG stores incompressible pixels at ~1.01x their raw size and JPEG at quality
    100 at up to ~1.6x (grayscale noise), so 4x raw plus SAMPLE_OVERHEAD_BYTES leaves a wide margin:
    the bound exists to refuse absurd claims (a 40 GB sample) before a byte is read, not to be
    tight."""
    if resolution is None:
        return NATIVE_SAMPLE_BYTES
    h, w = resolution
    return 4 * h * w * channels + SAMPLE_OVERHEAD_BYTES


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
    scan: dict | None = None  # `etsdm index` (tar_scan.py): how to fit/label other tools' samples

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
    channels, image_format, res, num_classes = _header(raw, where, index_url)
    cap = max_sample_bytes(None if raw.get("scan") else res, channels)  # scanned: any source size
    shards = []
    for i, s in enumerate(_field(raw, "shards", list, where, index_url)):
        w = f"shards[{i}]."
        if not isinstance(s, dict):
            raise ShardIndexError(f"{index_url}: {w[:-1]}: expected an object")
        name = _field(s, "name", str, w, index_url)
        bad_name = name_problem(name)
        if bad_name:
            raise ShardIndexError(f"{index_url}: {w}name: not a safe shard file name: {bad_name}")
        n = _field(s, "samples", int, w, index_url)
        size = _field(s, "bytes", int, w, index_url)
        offs = _field(s, "offsets", list, w, index_url)
        if n < 0 or len(offs) != n + 1:
            raise ShardIndexError(f"{index_url}: {w}offsets: expected samples+1 = {n + 1} entries, got {len(offs)}")
        if any(not isinstance(o, int) for o in offs) or any(b <= a for a, b in zip(offs, offs[1:])) \
                or (offs and (offs[0] < 0 or offs[-1] > size)):
            raise ShardIndexError(f"{index_url}: {w}offsets: must be increasing integers within [0, bytes={size}]")
        widest = max((b - a for a, b in zip(offs, offs[1:])), default=0)
        if widest > cap:
            j = next(k for k in range(n) if offs[k + 1] - offs[k] == widest)
            raise ShardIndexError(
                f"{index_url}: {w}offsets: sample {j} spans {widest} bytes, more than the {cap} a sample "
                f"may take ({_shape_text(res, channels)}); the index is corrupt or not ours")
        shards.append(ShardInfo(name, n, size, tuple(offs), s.get("first_key"), s.get("sha256")))
    if not shards:
        raise ShardIndexError(f"{index_url}: field 'shards' is empty")
    total = _field(raw, "total_samples", int, where, index_url)
    if total != sum(s.samples for s in shards) or total <= 0:
        raise ShardIndexError(f"{index_url}: field 'total_samples' = {total} but the shards hold "
                          f"{sum(s.samples for s in shards)}")
    return ShardIndex(url=url.rstrip("/"), shards=tuple(shards), total_samples=total, resolution=res,
                      channels=channels, image_format=image_format, label_map=raw.get("label_map"),
                      num_classes=num_classes, fingerprint=raw.get("fingerprint"), scan=raw.get("scan"))


def _header(raw: dict, where: str, index_url: str) -> tuple[int, str, tuple[int, int] | None, int | None]:
    """(channels, image_format, resolution, num_classes) of an index document, validated."""
    channels = _field(raw, "channels", int, where, index_url)
    if channels not in (1, 3):
        raise ShardIndexError(f"{index_url}: field 'channels' must be 1 or 3, got {channels}")
    image_format = _field(raw, "image_format", str, where, index_url)
    if image_format not in IMAGE_EXTS + ("mixed",):
        raise ShardIndexError(f"{index_url}: field 'image_format' must be png or jpg, got {image_format!r}")
    res = raw.get("resolution")
    if res is not None:
        if not (isinstance(res, list) and len(res) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= MAX_SIDE for x in res)
                and res[0] * res[1] <= MAX_PIXELS):
            raise ShardIndexError(f"{index_url}: field 'resolution' must be [H, W] (sides 1..{MAX_SIDE}, "
                                  f"H*W <= {MAX_PIXELS}) or null, got {res!r:.80}")
        res = (res[0], res[1])
    num_classes = raw.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < 1):
        raise ShardIndexError(f"{index_url}: field 'num_classes' must be an integer >= 1 or null, "
                              f"got {num_classes!r:.80}")
    return channels, image_format, res, num_classes


def _shape_text(res: tuple[int, int] | None, channels: int) -> str:
    if res is None:
        return f"index.json has no resolution: images of any size, at most {NATIVE_SAMPLE_BYTES} bytes"
    return f"{res[0]}x{res[1]}x{channels} images, 4x their raw pixels plus {SAMPLE_OVERHEAD_BYTES} bytes"


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
