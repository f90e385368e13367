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
import zlib

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


def octal_field(field: bytes, what: str, where: str) -> int:
    """A numeric header field (octal text, or GNU base-256 for huge sizes); TarFormatError naming
    `what` and `where` when it is neither."""
    if field[:1] and field[0] & 0x80:  # GNU base-256 for huge sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"{where}: corrupt tar header ({what} field {field!r})") from None


def header_checksum(hdr) -> int:
    """The ustar checksum of a 512-byte header: the byte sum with the checksum field read as
    8 spaces. zlib.adler32's low half is (1 + byte sum) mod 65521, exact for pieces of at most
    256 bytes (sum <= 65280): three C calls instead of summing 512 Python ints (~10x faster)."""
    a = zlib.adler32
    return ((a(hdr[0:148]) & 0xFFFF) + (a(hdr[156:356]) & 0xFFFF) + (a(hdr[356:512]) & 0xFFFF)
            - 3 + 8 * 32)


_ZERO_BLOCK = bytes(BLOCK)


def _split_or_none(name: str) -> tuple[str, str] | None:
    """split_name, None instead of an error (the caller decides what a bad name means)."""
    try:
        return split_name(name)
    except TarFormatError:
        return None


def _scan(buf, key: str | None, where: str) -> tuple[memoryview, list[tuple[str, int, int]]]:
    """Walk the tar members of one sample's bytes -> (buffer view, [(name, data start, size)]).

    No copies: headers are parsed from 512-byte slices, member data stays in the buffer.
    """
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    n = len(mv)
    out: list[tuple[str, int, int]] = []
    pos = 0
    while pos < n:
        hdr = bytes(mv[pos:pos + BLOCK])
        if len(hdr) < BLOCK:
            raise TarFormatError(f"{_label(where, out, key)}: truncated tar header at byte {pos} "
                                 f"({n - pos} bytes left)", key)
        actual = header_checksum(hdr)
        try:  # octal_field's common case inline; messages (labels) are built only on errors
            stored = int(hdr[148:156].split(b"\0", 1)[0].strip(b" ") or b"0", 8)
        except ValueError:
            stored = -1
        if stored != actual:
            label = _label(where, out, key)
            if hdr == _ZERO_BLOCK:
                raise TarFormatError(f"{label}: end-of-archive block at byte {pos} inside the "
                                     f"sample", key)
            stored = octal_field(hdr[148:156], "checksum", label)  # raises on a corrupt field
            if stored != actual:
                raise TarFormatError(f"{label}: corrupt tar header at byte {pos} (checksum "
                                     f"{stored} != {actual})", key)
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if hdr[345] and hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = f"{prefix}/{name}"
        if hdr[156] not in (0x30, 0):  # b"0" or b"\0": a regular file
            mkey = _member_key(name)
            raise TarFormatError(f"{_label(where, None, mkey)}: member {name!r} is not a regular "
                                 f"file (type {hdr[156:157]!r})", mkey)
        if hdr[124] & 0x80:
            size = octal_field(hdr[124:136], "size", "")  # base-256: cannot fail
        else:
            try:
                size = int(hdr[124:136].split(b"\0", 1)[0].strip(b" ") or b"0", 8)
            except ValueError:
                size = octal_field(hdr[124:136], "size", _label(where, None, _member_key(name)))
        start = pos + BLOCK
        if start + size > n:
            mkey = _member_key(name)
            raise TarFormatError(f"{_label(where, None, mkey)}: member {name!r} needs {size} "
                                 f"bytes, only {n - start} present (truncated)", mkey)
        out.append((name, start, size))
        pos = start + size + (-size % BLOCK)
    return mv, out


def _member_key(name: str) -> str:
    """The key of a member name for messages: the name itself when it has no key.ext form."""
    got = _split_or_none(name) if "." in name.rpartition("/")[2] else None
    return got[0] if got else name


def _label(where: str, members, key: str | None) -> str:
    """'shard: sample KEY' for messages: the key of the last good member, else the expected key."""
    if members:
        key = _member_key(members[-1][0])
    return f"{where}: sample {key or '?'}".lstrip(": ")


def parse_sample_members(buf: bytes, *, key: str | None = None,
                         where: str = "") -> list[tuple[str, bytes]]:
    """Parse the tar members in `buf` (one sample's byte range) -> [(name, data), ...].

    `key` (the key the caller expects) and `where` (e.g. the shard name) only make errors precise.
    Raises TarFormatError naming the key on a bad checksum, a truncated member, a non-file member,
    or an end-of-archive block inside the range.
    """
    mv, members = _scan(buf, key, where)
    return [(name, bytes(mv[a:a + size])) for name, a, size in members]


def parse_sample(buf, *, key: str | None = None, where: str = "",
                 copy: bool = True) -> tuple[str, dict]:
    """sample_from_members(parse_sample_members(buf)) in one pass, with the same checks and
    messages: (key, {ext: data}). copy=False: the data are memoryview slices of `buf` (no copy;
    bytes(...) them where a consumer needs bytes; they keep `buf` alive)."""
    mv, members = _scan(buf, key, where)
    return sample_from_members(
        [(name, bytes(mv[a:a + size]) if copy else mv[a:a + size]) for name, a, size in members],
        where=where)


def sample_from_members(members: list, *, where: str = "") -> tuple[str, dict]:
    """[(name, data)] of one sample -> (key, {ext: data}); all members must share one key."""
    if not members:
        raise TarFormatError(f"{where}: empty sample".lstrip(": "))
    key = None
    out: dict = {}
    for name, data in members:
        got = _split_or_none(name)
        if got is None:
            split_name(name)  # raises its message
        k, ext = got
        if key is None:
            key = k
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


def parse_label(raw, num_classes: int | None, bound_name: str = "num_classes") -> int:
    """A `.cls` member's class: ASCII digits (surrounding whitespace allowed), in
    [0, num_classes) when num_classes is given. ValueError otherwise, saying what is wrong; Python's
    int() alone would also take '-3', '+3' and '1_0', and an out-of-range class would reach the
    network's class embedding as an IndexError."""
    text = bytes(raw).strip()
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise ValueError(f".cls is not a non-negative integer: {bytes(raw)[:20]!r}")
    label = int(text)
    if num_classes is not None and label >= num_classes:
        raise ValueError(f".cls label {label} outside [0, {num_classes}) ({bound_name}={num_classes})")
    return label
