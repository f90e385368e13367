"""Shard bytes -> uint8 image batches, in the global order of order.py, from any start position.

The assembly step of loading: the IterableDataset that turns one rank's positions into
micro-batches, the DataLoader around it, and the ShardLoader that checks their order and counts
bad shards. The steps it assembles live beside it: index.json -> ShardIndex (shard_index.py),
which byte ranges to read and keeping them in flight (reads.py), bytes -> pixels (decode.py).

Each rank reads only its own samples, by byte range, using the per-sample offsets of index.json
(reads.py: only exactly adjacent runs coalesce, so no byte of another rank's or worker's samples
is read). So there is no W-fold read amplification, and a resume starts at the exact sample without
reading or decoding anything before it. This is why the loader does not use webdataset's
sequential tar iteration (the shards stay plain webdataset tars, readable by it; registering its
s3:// opener is storage.py's business).

Batches are dicts: `images` uint8 [b,C,H,W] (channels_last memory), `labels` int64 [b] (-1 without .cls), `positions`
int64 [b] (global positions), `valid` bool [b] (False: a sample of a bad shard, zeros, mask it
out of the loss), `errors` (shards newly failed in this batch, with sample counts). Under
on_error=skip every rank still yields the same number of same-shaped batches, so the ranks stay
in lock-step. Conversion to float happens on the GPU (`to_model_input`): 4x less traffic.
"""
from __future__ import annotations

import collections
import weakref
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from etsdm_dist.data import order as S
from etsdm_dist.data import storage
# The training loop, tests and bench/loader.py reach these through the loader (to_model_input,
# ShardIndexError, load_index, decode_image, Extent): they stay importable from here.
from etsdm_dist.data.decode import (  # noqa: F401
    PIL_FORMATS, decode_fit, decode_image, image_member, key_from_header, pixel_bound, to_model_input)
from etsdm_dist.data.reads import MAX_READ_BYTES, Extent, ReadAhead
from etsdm_dist.data.shard_index import (  # noqa: F401 - ShardIndexError: re-exported
    IMAGE_EXTS, ShardIndex, ShardIndexError, load_index)
from etsdm_dist.data.tar_scan import label_from_json, parse_members, scan_settings
from etsdm_dist.data.tarformat import key_at, parse_label, parse_sample


class ShardDataError(OSError):
    """A shard could not be read or decoded (on_error=raise); names the shard URL and sample key."""


class DataBudgetExceeded(RuntimeError):
    """More distinct bad shards than data.skip_budget; names them."""


# --------------------------------------------------------------------------- dataset

GROUP_TARGET_BYTES = 8 << 20  # grouped worker items aim for range reads of about this size
MAX_GROUP = 4  # at most this many micro-batches per DataLoader item


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's micro-batches, forever; dataloader worker w of K makes those with
    (j // group) % K == w, yielding `group` of them per item (a list) when group > 1."""

    def __init__(self, index: ShardIndex, *, seed: int, start_position: int, batch_images: int,
                 world_size: int, rank: int, micro_batch_images: int, hflip: bool = False,
                 on_error: str = "raise", retries: int = 8, retry_backoff_s: float = 0.5,
                 use_labels: bool = False, decode: bool = True, read_ahead: int = 2,
                 group: int = 1, max_read_bytes: int = MAX_READ_BYTES, num_classes: int | None = None):
        super().__init__()
        if group < 1 or max_read_bytes < 1:
            raise ValueError(f"group and max_read_bytes must be >= 1, got {group}, {max_read_bytes}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be raise or skip, got {on_error!r}")
        S.check_batch_geometry(batch_images, world_size, micro_batch_images)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if start_position < 0:
            raise ValueError(f"start_position must be >= 0, got {start_position}")
        self.index = index
        self.seed, self.start = int(seed), int(start_position)
        self.B, self.W, self.r, self.b = batch_images, world_size, rank, micro_batch_images
        self.hflip, self.on_error, self.use_labels, self.decode = hflip, on_error, use_labels, decode
        self.retries, self.backoff_s, self.read_ahead = retries, retry_backoff_s, read_ahead
        self.group, self.max_read_bytes = int(group), int(max_read_bytes)
        # Labels must index the network's class embedding (num_classes: network.num_classes) and
        # the classes the shards were written with: the tighter bound names itself in errors.
        bounds = [(n, what) for n, what in ((num_classes, "network.num_classes"),
                                            (index.num_classes, "index.json num_classes")) if n]
        self._label_bound = min(bounds) if bounds else (None, "")
        # Shards of other tools (`etsdm index`): fit any-size images to the index's resolution,
        # labels perhaps from a .json field. The decoder is the one of each image member's type.
        self._fit, self._label_field = scan_settings(index)
        self._shape: tuple[int, int, int] | None = (
            (index.channels, *index.resolution) if index.resolution else None)
        self._aheads: weakref.WeakSet = weakref.WeakSet()  # this process's live read-aheads

    def __getstate__(self):  # to spawned workers: read-aheads belong to one process
        state = dict(self.__dict__)
        state["_aheads"] = weakref.WeakSet()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._aheads = weakref.WeakSet()

    # -- iteration

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        w, k = (0, 1) if info is None else (info.id, info.num_workers)
        if self.group == 1:
            yield from self._micro_batches(w, k)
            return
        items = self._micro_batches(w, k)
        while True:  # one DataLoader item per group of consecutive micro-batches
            yield [next(items) for _ in range(self.group)]

    def _micro_batches(self, w: int, k: int) -> Iterator[dict]:
        plan = S.ShardPlan(self.index.shard_samples, self.seed)
        # Read-ahead: the range reads (extents) of the next `read_ahead` extents beyond those of
        # the micro-batch being assembled are in flight, in threads (sockets and Pillow release
        # the GIL). Object stores give bandwidth to concurrent requests, not to one long stream.
        # An extent covers adjacent spans of several upcoming micro-batches where that is
        # possible (Extent.take): fewer, larger requests, which cost the server far less CPU per
        # byte. Memory: at most (read_ahead + 1) extents of <= max_read_bytes each.
        ahead = ReadAhead(max(1, self.read_ahead))
        self._aheads.add(ahead)
        try:
            schedule = self._schedule(plan, w, k)
            pending: collections.deque = collections.deque()  # (j, parts): extents submitted
            inflight: collections.deque = collections.deque()  # extents submitted, not consumed
            while True:
                while not pending or sum(e.seq > pending[0][1][-1][1].seq
                                         for e in inflight) < ahead.threads:
                    item = next(schedule)
                    if isinstance(item, Extent):
                        item.fut = ahead.submit(self._read_extent, item)
                        inflight.append(item)
                    else:
                        pending.append(item)
                j, parts = pending.popleft()
                first = parts[0][1].seq
                while inflight[0].seq < first:  # every later micro-batch starts at `first` or later
                    inflight.popleft()
                fetched = []
                for sp, ext, lo, hi in parts:
                    got = ext.fut.result()
                    fetched.append((sp, got if isinstance(got, OSError)
                                    else memoryview(got)[lo - ext.lo:hi - ext.lo]))
                del parts
                yield self._assemble(plan, j, fetched)
        finally:
            ahead.close()
            self._aheads.discard(ahead)

    def close_reads(self) -> None:
        """Stop this process's read-ahead now (ShardLoader.close): a suspended generator would
        otherwise keep its reads going until the garbage collector reaches it."""
        for ahead in list(self._aheads):
            ahead.close()

    def _schedule(self, plan: S.ShardPlan, w: int, k: int) -> Iterator:
        """This worker's reads and micro-batches in order, forever: each extent (once it can grow
        no more), then the micro-batches `(j, [(span, extent, lo, hi), ...])` complete with it.
        A micro-batch comes only after every extent it needs."""
        ext: Extent | None = None
        seq = 0
        waiting: list = []  # micro-batches whose last span is in `ext`
        for j in S.worker_micro_batches(w, k, self.group):
            parts = []
            for sp in plan.spans(self._positions(j)):
                offs = self.index.shards[sp.shard].offsets
                lo, hi = offs[sp.first], offs[sp.first + sp.count]
                if ext is None or not ext.take(sp.shard, lo, hi, self.max_read_bytes):
                    if ext is not None:
                        yield ext
                        yield from waiting
                        waiting = []
                    ext = Extent(seq, sp.shard, lo, hi)
                    seq += 1
                parts.append((sp, ext, lo, hi))
            waiting.append((j, parts))

    def _read_extent(self, ext: Extent) -> bytes | OSError:
        try:
            return self._read(self.index.shard_url(ext.shard), ext.lo, ext.hi)
        except OSError as e:  # handled per sample by _samples (salvage / invalid)
            return e

    def micro_batch(self, plan: S.ShardPlan, j: int) -> dict:
        """Rank micro-batch j, read and decoded now (no read-ahead)."""
        return self._assemble(plan, j, self._fetch(plan, j))

    def _positions(self, j: int) -> range:
        return S.rank_micro_batch_positions(self.start, j, self.B, self.W, self.r, self.b)

    def _fetch(self, plan: S.ShardPlan, j: int) -> list[tuple[S.Span, bytes | OSError]]:
        """The I/O of micro-batch j: one range read per span (errors kept, handled later)."""
        out = []
        for sp in plan.spans(self._positions(j)):
            offs = self.index.shards[sp.shard].offsets
            try:
                out.append((sp, self._read(self.index.shard_url(sp.shard), offs[sp.first],
                                           offs[sp.first + sp.count])))
            except OSError as e:
                out.append((sp, e))
        return out

    def _assemble(self, plan: S.ShardPlan, j: int, fetched) -> dict:
        positions = self._positions(j)
        n = len(positions)
        labels = [-1] * n  # Python lists: per-element tensor writes cost microseconds each
        valid = [True] * n
        keys: list[str] = [""] * n
        encoded: list = [b""] * n
        errors: dict[str, int] = {}
        images = pixels = None
        if self.decode:
            c, h, w = self._shape or self._probe_shape(plan)
            # [n,C,H,W] in channels_last memory: decoded HWC pixels land with one plain memcpy;
            # to_model_input makes it contiguous NCHW on the GPU, where that transpose is free.
            nhwc = torch.empty((n, h, w, c), dtype=torch.uint8)  # every slot is written below
            images, pixels = nhwc.permute(0, 3, 1, 2), nhwc.numpy()
        for sp, got in fetched:
            at = sp.position - positions.start
            for i, key, members, err in self._samples(sp, got):
                slot = at + i
                keys[slot] = key
                if err is None:
                    try:
                        self._fill(slot, sp.position + i, members, pixels, labels, encoded)
                    except Exception as e:  # noqa: BLE001 - any decode failure is a bad sample
                        err = f"{type(e).__name__}: {e}"
                if err is not None:
                    url = self.index.shard_url(sp.shard)
                    if self.on_error == "raise":
                        first = self.index.shards[sp.shard].first_key
                        what = (f"key {key}" if key else
                                f"key unknown; the shard's first key is {first}" if first else "key unknown")
                        raise ShardDataError(f"shard {url}: sample {sp.first + i} ({what}): {err}")
                    valid[slot] = False
                    labels[slot] = -1
                    if pixels is not None:
                        pixels[slot] = 0
                    encoded[slot] = b""
                    name = self.index.shards[sp.shard].name
                    errors[name] = errors.get(name, 0) + 1
        out = {"positions": torch.arange(positions.start, positions.stop, dtype=torch.int64),
               "labels": torch.tensor(labels, dtype=torch.int64),
               "valid": torch.tensor(valid, dtype=torch.bool), "keys": keys, "micro_batch": j,
               "errors": sorted(errors.items())}
        if images is not None:
            out["images"] = images
        else:  # encoded bytes packed in one tensor: crosses from a worker by shared memory
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum([len(x) for x in encoded], out=offsets[1:])
            joined = bytearray().join(encoded)  # one C loop of memcpy; writable, no extra copy
            packed = (torch.frombuffer(joined, dtype=torch.uint8) if joined
                      else torch.empty(0, dtype=torch.uint8))
            out["encoded"], out["encoded_offsets"] = packed, torch.from_numpy(offsets)
        return out

    # -- reading

    def _read(self, url: str, start: int, end: int) -> bytes:
        # one request per extent (chunks only past max_read_bytes): a server spends CPU per
        # request, and a transient error re-reads at most one extent
        return storage.read_range(url, start, end, retries=self.retries, backoff_s=self.backoff_s,
                                  chunk_bytes=max(8 << 20, self.max_read_bytes))

    def _samples(self, sp: S.Span, got: bytes | OSError):
        """Yield (i, key, members, error) for each sample of the span from its one range read,
        or, when that failed (missing / truncated shard), per-sample reads of what survives."""
        url = self.index.shard_url(sp.shard)
        offs = self.index.shards[sp.shard].offsets
        if isinstance(got, OSError):
            if getattr(got, "reason", None) == "missing":  # nothing to salvage
                for i in range(sp.count):
                    yield i, self._peek_key(url, None, sp.shard, sp.first + i), None, str(got)
                return
            yield from self._salvage(sp, url, offs, got)
            return
        base = offs[sp.first]
        mv = memoryview(got)
        for i in range(sp.count):
            lo, hi = offs[sp.first + i] - base, offs[sp.first + i + 1] - base
            yield (i, *self._parse_sample(mv[lo:hi]))

    def _salvage(self, sp: S.Span, url: str, offs: Sequence[int], first_error: OSError):
        broken: str | None = None
        for i in range(sp.count):
            s = sp.first + i
            if broken is None:
                try:
                    yield (i, *self._parse_sample(self._read(url, offs[s], offs[s + 1])))
                    continue
                except OSError as e:
                    broken = str(e) or str(first_error)
            # the shard is gone past this point (truncated / missing): don't read further
            yield i, self._peek_key(url, offs[s], sp.shard, s), None, broken

    def _peek_key(self, url: str, offset: int | None, shard: int, sample: int) -> str:
        """The key of a sample we could not read: from the index when keys are consecutive
        integers (what `etsdm shard` writes), else from its tar header if that is readable."""
        first = self.index.shards[shard].first_key
        if first:
            if sample == 0:
                return first
            if first.isdigit():
                return key_at(first, sample)
        if offset is None:
            return ""
        try:
            header = storage.read_range(url, offset, offset + 512, retries=0, backoff_s=0.0)
            return key_from_header(header)
        except Exception:  # noqa: BLE001 - best effort, for the message only
            return ""

    def _parse_sample(self, buf) -> tuple[str, dict | None, str | None]:
        """(key, {ext: bytes}, error) for one sample's tar bytes."""
        try:
            # memoryviews into the read buffer; other tools' tars may carry pax headers
            key, out = parse_members(buf) if self._fit else parse_sample(buf, copy=False)
        except Exception as e:  # noqa: BLE001 - corrupt tar data (TarFormatError names the key)
            key = getattr(e, "key", None) or (
                key_from_header(bytes(buf[:512])) if len(buf) >= 512 else "")
            return key, None, f"corrupt tar data: {e}"
        if image_member(out) is None:
            return key, None, f"no image member (.png/.jpg/.webp) among {sorted(out)}"
        if self._label_field is not None and "cls" not in out and "json" in out:
            try:  # the .json field becomes the .cls the label checks below and in _fill read
                out["cls"] = label_from_json(out["json"], self._label_field)
            except ValueError as e:
                if self.use_labels:
                    return key, None, str(e)
        if self.use_labels and "cls" not in out:
            return key, None, "no .cls member but data.use_labels is true"
        return key, out, None

    def _fill(self, slot: int, position: int, members: dict, pixels, labels, encoded) -> None:
        ext = image_member(members)
        data = members[ext]
        if "cls" in members:
            try:
                labels[slot] = parse_label(members["cls"], *self._label_bound)
            except ValueError:
                if self.use_labels:  # a bad sample (on_error), named by shard and key
                    raise
                labels[slot] = -1  # not fed to the network: the image itself is fine
        if pixels is None:
            encoded[slot] = data
            return
        dst = pixels[slot]  # the batch slot: a contiguous HWC view
        # [H, W, C]; the size is checked from the image header before anything is decoded
        if self._fit is not None:
            arr = decode_fit(data, self.index.channels, dst.shape[0], self._fit, [PIL_FORMATS[ext]])
        else:
            arr = decode_image(data, self.index.channels, [PIL_FORMATS[ext]],
                               expect_hw=dst.shape[:2])
        if arr.shape != dst.shape:
            raise ValueError(f"image is {arr.shape[:2]} with {arr.shape[2]} channels, "
                             f"expected {dst.shape[:2]} with {dst.shape[2]}")
        if self.hflip and S.hflip(self.seed, position):
            arr = arr[:, ::-1]
        np.copyto(dst, arr)  # the one copy out of Pillow's buffer

    def _probe_shape(self, plan: S.ShardPlan) -> tuple[int, int, int]:
        """Index without a resolution: take the shape from the first readable sample."""
        for s, info in enumerate(self.index.shards):
            if info.samples == 0:
                continue
            try:
                key, members, err = self._parse_sample(
                    self._read(self.index.shard_url(s), info.offsets[0], info.offsets[1]))
                if err is None:
                    ext = image_member(members)
                    h, w_, c = decode_image(members[ext], self.index.channels, [PIL_FORMATS[ext]],
                                            max_pixels=pixel_bound(1, 1)).shape
                    self._shape = (c, h, w_)
                    return self._shape
            except Exception:  # noqa: BLE001 - try the next shard
                continue
        raise ShardDataError(f"{self.index.url}: no readable sample to take the image size from "
                             f"(index.json has no resolution)")


# --------------------------------------------------------------------------- loader


class ShardLoader:
    """Iterates one rank's micro-batches in order, forever; keeps error counts.

    `position` (and state_dict()["position"]) is the global position after the complete global
    batches handed out so far: a loader made with start_position=position continues exactly. The
    training loop does not store it: its own image counter is that same number.
    """

    def __init__(self, dataset: ShardStream, dataloader, skip_budget: int):
        self.dataset, self.dataloader, self.skip_budget = dataset, dataloader, skip_budget
        self.micro_batches = 0
        self._errors: dict[str, int] = {}
        self._it = None
        self._group: collections.deque = collections.deque()  # rest of a grouped item

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self.dataloader)
        if not self._group:
            item = next(self._it)
            self._group.extend(item if isinstance(item, list) else (item,))
        batch = self._group.popleft()
        if batch["micro_batch"] != self.micro_batches:  # would break the global order silently
            raise RuntimeError(f"dataloader yielded micro-batch {batch['micro_batch']}, "
                               f"expected {self.micro_batches}")
        self.micro_batches += 1
        for name, n in batch["errors"]:
            self._errors[name] = self._errors.get(name, 0) + n
        if len(self._errors) > self.skip_budget:
            bad = ", ".join(f"{self.dataset.index.url}/{k} ({v} samples)" for k, v in sorted(self._errors.items()))
            raise DataBudgetExceeded(
                f"{len(self._errors)} bad shards exceed data.skip_budget={self.skip_budget}: {bad}. "
                f"Check them with `etsdm verify {self.dataset.index.url}`")
        return batch

    def error_counts(self) -> dict[str, int]:
        """{shard name: samples that failed} seen by this rank so far."""
        return dict(self._errors)

    @property
    def position(self) -> int:
        d = self.dataset
        return S.position_after(d.start, self.micro_batches, d.B, d.W, d.b)

    def state_dict(self) -> dict:
        return {"seed": self.dataset.seed, "position": self.position}

    def close(self) -> None:
        """Stop the worker processes (persistent workers otherwise live as long as the loader)."""
        it, self._it = self._it, None
        self._group.clear()
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.dataset.close_reads()


def _as_is(item):
    return item


def auto_group(index: ShardIndex, world_size: int, micro_batch_images: int, workers: int) -> int:
    """Micro-batches per DataLoader item. With one rank, a worker's consecutive micro-batches are
    adjacent bytes in the shards, so a group of them is one range read of ~GROUP_TARGET_BYTES
    instead of several small ones (with more ranks they are not adjacent: 1). The DataLoader
    output order stays exact: items are groups of consecutive micro-batches, polled round-robin."""
    if world_size != 1 or workers < 1:
        return 1
    mean = sum(s.offsets[-1] - s.offsets[0] for s in index.shards) / max(1, index.total_samples)
    return max(1, min(MAX_GROUP, -(-GROUP_TARGET_BYTES // max(1, int(mean * micro_batch_images)))))


def make_loader(cfg_data, index: ShardIndex | str | None = None, *, seed: int, start_position: int,
                batch_images: int, world_size: int, rank: int, micro_batch_images: int,
                num_workers: int | None = None, decode: bool = True, read_ahead: int = 2,
                multiprocessing_context: str | None = None, group: int | None = None,
                max_read_bytes: int = MAX_READ_BYTES, num_classes: int | None = None) -> ShardLoader:
    """The rank's loader: an IterableDataset in a DataLoader (batch_size=None, workers polled
    round-robin, so micro-batches come out in order j = 0, 1, 2, ...). `group`: micro-batches
    per worker item (None: auto_group). `num_classes`: network.num_classes when labels feed the
    network; under data.use_labels a .cls outside it (or the index's) is a bad sample."""
    if index is None or isinstance(index, str):
        index = load_index(index or cfg_data.url)
    workers = cfg_data.num_workers if num_workers is None else num_workers
    if group is None:
        group = auto_group(index, world_size, micro_batch_images, workers)
    ds = ShardStream(index, seed=seed, start_position=start_position, batch_images=batch_images,
                     world_size=world_size, rank=rank, micro_batch_images=micro_batch_images,
                     hflip=cfg_data.hflip, on_error=cfg_data.on_error, retries=cfg_data.retries,
                     retry_backoff_s=cfg_data.retry_backoff_s, use_labels=cfg_data.use_labels,
                     decode=decode, read_ahead=read_ahead, group=group,
                     max_read_bytes=max_read_bytes, num_classes=num_classes)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=cfg_data.prefetch_factor,
                      multiprocessing_context=multiprocessing_context)
    # collate_fn: the items are already tensors; torch's default_convert would only walk them
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                     pin_memory=torch.cuda.is_available(), **kwargs)
    return ShardLoader(ds, dl, cfg_data.skip_budget)
