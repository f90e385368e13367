"""The byte layout of our webdataset shards, shared by the writer, `etsdm verify` and the loader.

A shard is a plain ustar archive. Each sample is a run of contiguous members with one key
(`000000123.png`, `000000123.cls`, `000000123.json`, always in that order), so the bytes of sample
i are exactly [offsets[i], offsets[i+1]) of the file and can be fetched with one range read and
parsed here without tarfile (which wants a whole stream from the start).
Headers are deterministic (mtime 0, uid/gid 0, no user names): the same input gives the same
bytes, which is what makes resume checkable by sha256.
"""
from __future__ import annotations

import tarfile

BLOCK = 512
RECORD = 20 * BLOCK  # classic tar record size; the archive end is padded to it
MEMBER_ORDER = ("png", "jpg", "cls", "json")  # fixed order of a sample's members


class TarFormatError(ValueError):
    """Bytes that are not a well-formed sample; the message names the key (and where)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def member(name: str, data: bytes) -> bytes:
    """One tar member: a 512-byte ustar header, the data, zero padding to the block size."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    return header + data + b"\0" * (-len(data) % BLOCK)


def end_of_archive(bytes_so_far: int) -> bytes:
    """Two zero blocks, then zeros up to a whole record (what GNU tar writes)."""
    n = bytes_so_far + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-n % RECORD))


def split_name(name: str) -> tuple[str, str]:
    """'dir/000000123.png' -> ('dir/000000123', 'png'); the key ends at the basename's first dot."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        raise TarFormatError(f"member name {name!r} has no key.extension form")
    return (f"{head}/{stem}" if head else stem), ext


def _octal(field: bytes, what: str, where: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for huge sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"{where}: corrupt tar header ({what} field {field!r})") from None


def parse_sample_members(buf: bytes, *, key: str | None = None,
                         where: str = "") -> list[tuple[str, bytes]]:
    """Parse the tar members in `buf` (one sample's byte range) -> [(name, data), ...].

    `key` (the key the caller expects) and `where` (e.g. the shard name) only make errors precise.
    Raises TarFormatError naming the key on a bad checksum, a truncated member, a non-file member,
    or an end-of-archive block inside the range.
    """
    out: list[tuple[str, bytes]] = []
    mv = memoryview(buf)
    pos = 0
    while pos < len(buf):
        label = f"{where}: sample {out and split_name(out[-1][0])[0] or key or '?'}".lstrip(": ")
        hdr = bytes(mv[pos:pos + BLOCK])
        if len(hdr) < BLOCK:
            raise TarFormatError(f"{label}: truncated tar header at byte {pos} "
                                 f"({len(buf) - pos} bytes left)", key)
        if hdr == b"\0" * BLOCK:
            raise TarFormatError(f"{label}: end-of-archive block at byte {pos} inside the sample",
                                 key)
        stored = _octal(hdr[148:156], "checksum", label)
        actual = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
        if stored != actual:
            raise TarFormatError(f"{label}: corrupt tar header at byte {pos} (checksum "
                                 f"{stored} != {actual})", key)
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix:
                name = f"{prefix}/{name}"
        mkey = split_name(name)[0] if "." in name.rpartition("/")[2] else name
        label = f"{where}: sample {mkey}".lstrip(": ")
        if hdr[156:157] not in (b"0", b"\0"):
            raise TarFormatError(f"{label}: member {name!r} is not a regular file "
                                 f"(type {hdr[156:157]!r})", mkey)
        size = _octal(hdr[124:136], "size", label)
        start = pos + BLOCK
        if start + size > len(buf):
            raise TarFormatError(f"{label}: member {name!r} needs {size} bytes, only "
                                 f"{len(buf) - start} present (truncated)", mkey)
        out.append((name, bytes(mv[start:start + size])))
        pos = start + size + (-size % BLOCK)
    return out


def sample_from_members(members: list[tuple[str, bytes]], *,
                        where: str = "") -> tuple[str, dict[str, bytes]]:
    """[(name, data)] of one sample -> (key, {ext: data}); all members must share one key."""
    if not members:
        raise TarFormatError(f"{where}: empty sample".lstrip(": "))
    key = split_name(members[0][0])[0]
    out: dict[str, bytes] = {}
    for name, data in members:
        k, ext = split_name(name)
        if k != key:
            raise TarFormatError(f"{where}: sample {key}: member {name!r} belongs to key {k} "
                                 f"(samples must be contiguous)".lstrip(": "), key)
        if ext in out:
            raise TarFormatError(f"{where}: sample {key}: duplicate member .{ext}".lstrip(": "),
                                 key)
        out[ext] = data
    return key, out


def sample_bytes(key: str, fields: dict[str, bytes]) -> bytes:
    """The contiguous tar bytes of one sample, members in MEMBER_ORDER."""
    unknown = set(fields) - set(MEMBER_ORDER)
    if unknown:
        raise ValueError(f"sample {key}: unexpected member types {sorted(unknown)}")
    return b"".join(member(f"{key}.{ext}", fields[ext]) for ext in MEMBER_ORDER if ext in fields)


def key_at(first_key: str, i: int) -> str:
    """The i-th key of a shard whose keys are consecutive zero-padded integers."""
    return str(int(first_key) + i).zfill(len(first_key))
