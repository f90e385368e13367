"""The loader on local shards: order, resume, rank-count changes, workers, hflip, faults."""
from __future__ import annotations

import io
import json
import os
import time
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from etsdm_dist.data import loader as L
from etsdm_dist.data import order as S
from etsdm_dist.config import DataConfig

RES = 8


def sample_image(gid: int, channels: int = 3) -> np.ndarray:
    """A small image that identifies its sample and is not mirror-symmetric."""
    rng = np.random.default_rng(gid)
    img = rng.integers(0, 256, size=(RES, RES, channels), dtype=np.uint8)
    img[:, 0] = gid % 256  # left column carries the id
    img[:, -1] = 255 - gid % 256
    return img


def write_shards(dst: str, sizes: list[int], *, channels: int = 3, fmt: str = "png",
                 labels: bool = True, upload=None) -> dict:
    """Shards in the index.json format of storage's shard writer (written here with tarfile).

    Sample keys are the zero-padded running count gid, as `etsdm shard` writes them, and the
    image is sample_image(gid).
    `upload(name, bytes)` stores a file elsewhere (S3); by default files go to the folder dst.
    """
    os.makedirs(dst, exist_ok=True) if upload is None else None
    shards, gid = [], 0
    for s, n in enumerate(sizes):
        bio = io.BytesIO()
        offsets = []
        with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(n):
                key = f"{gid:06d}"
                arr = sample_image(gid, channels)
                pil = Image.fromarray(arr[:, :, 0] if channels == 1 else arr)
                ib = io.BytesIO()
                pil.save(ib, format="PNG" if fmt == "png" else "JPEG", quality=95)
                members = [(f"{key}.{fmt}", ib.getvalue())]
                if labels:
                    members.append((f"{key}.cls", str(gid % 10).encode()))
                members.append((f"{key}.json", json.dumps({"gid": gid}).encode()))
                offsets.append(tf.offset)  # where the sample's first header goes
                for name, data in members:
                    ti = tarfile.TarInfo(name)
                    ti.size, ti.mtime = len(data), 0
                    tf.addfile(ti, io.BytesIO(data))
                gid += 1
            offsets.append(tf.offset)
        data = bio.getvalue()
        name = f"train-{s:06d}.tar"
        _put(dst, name, data, upload)
        shards.append({"name": name, "samples": n, "bytes": len(data), "sha256": "",
                       "offsets": offsets, "first_key": f"{gid - n:06d}" if n else None})
    index = {"format": "etsdm-shards/1", "shards": shards, "total_samples": sum(sizes),
             "resolution": [RES, RES], "channels": channels, "image_format": fmt,
             "label_map": None, "num_classes": 10 if labels else None, "fingerprint": "test"}
    _put(dst, "index.json", json.dumps(index).encode(), upload)
    return index


def _put(dst, name, data, upload):
    if upload is not None:
        upload(name, data)
    else:
        with open(os.path.join(dst, name), "wb") as f:
            f.write(data)


def gid_of(index: dict, shard: int, i: int) -> int:
    return sum(s["samples"] for s in index["shards"][:shard]) + i


def cfg(**kw) -> DataConfig:
    base = DataConfig(url="", hflip=False, num_workers=0, prefetch_factor=2, on_error="raise",
                      skip_budget=1, retries=0, retry_backoff_s=0.0)
    return base.replace(**kw)


def take(ld, n):
    out = [next(ld) for _ in range(n)]
    return out


def loader(url, *, c=None, seed=0, start=0, B=4, W=1, r=0, b=None, workers=0, **kw):
    c = c or cfg()
    return L.make_loader(c, url, seed=seed, start_position=start, batch_images=B, world_size=W,
                         rank=r, micro_batch_images=b or B // W, num_workers=workers, **kw)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shards"))
    idx = write_shards(d, [5, 3, 7, 1, 4])  # 20 samples, uneven
    return d, idx


def test_batches_follow_the_plan_and_decode_exactly(shards_dir):
    d, idx = shards_dir
    ld = loader(d, B=6)
    plan = S.ShardPlan([s["samples"] for s in idx["shards"]], 0)
    for k, batch in enumerate(take(ld, 8)):  # 48 positions: 2.4 epochs, straddling boundaries
        assert batch["images"].shape == (6, 3, RES, RES) and batch["images"].dtype == torch.uint8
        assert batch["positions"].tolist() == list(range(6 * k, 6 * k + 6))
        assert batch["valid"].all()
        for slot, p in enumerate(batch["positions"].tolist()):
            _, shard, i = plan.locate(p)
            gid = gid_of(idx, shard, i)
            assert batch["keys"][slot] == f"{gid:06d}"
            assert batch["labels"][slot].item() == gid % 10
            expect = torch.from_numpy(sample_image(gid)).permute(2, 0, 1)
            assert torch.equal(batch["images"][slot], expect)
    assert ld.state_dict() == {"seed": 0, "position": 48}


def test_resume_at_cursor_equals_uninterrupted(shards_dir):
    d, _ = shards_dir
    kw = dict(c=cfg(hflip=True), seed=3, B=4, W=2, b=1)  # A = 2 micro-steps per rank
    full = take(loader(d, r=1, **kw), 12)
    first = loader(d, r=1, **kw)
    part = take(first, 6)  # 3 complete global batches
    state = first.state_dict()
    assert state == {"seed": 3, "position": 12}
    rest = take(loader(d, r=1, start=state["position"], **kw), 6)
    for x, y in zip(full, part + rest):
        assert torch.equal(x["positions"], y["positions"])
        assert torch.equal(x["images"], y["images"])
        assert torch.equal(x["labels"], y["labels"])


def test_resume_with_more_ranks_sees_the_rest_of_the_epoch_once(shards_dir):
    d, idx = shards_dir
    n, B = idx["total_samples"], 6
    seen = []
    # 2 ranks (b=3), 2 global batches, then 3 ranks (b=1, A=2) from the cursor
    two = [loader(d, seed=1, B=B, W=2, r=r, b=3) for r in range(2)]
    for _ in range(2):
        for ld in two:
            seen += next(ld)["keys"]
    cursor = two[0].state_dict()["position"]
    assert cursor == two[1].state_dict()["position"] == 2 * B
    three = [loader(d, seed=1, start=cursor, B=B, W=3, r=r, b=1) for r in range(3)]
    while len(seen) < n:
        for ld in three:
            batch = next(ld)
            seen += [k for k, p in zip(batch["keys"], batch["positions"].tolist()) if p < n]
    assert len(seen) == n
    assert sorted(seen) == [f"{g:06d}" for g in range(n)]


def test_workers_give_identical_output(shards_dir):
    d, _ = shards_dir
    kw = dict(c=cfg(hflip=True), seed=2, B=4, W=2, r=0, b=2)
    base = take(loader(d, workers=0, **kw), 7)
    ld = loader(d, workers=2, **kw)
    try:
        par = take(ld, 7)
    finally:
        ld.close()
    for x, y in zip(base, par):
        assert torch.equal(x["positions"], y["positions"])
        assert torch.equal(x["images"], y["images"])


def test_hflip_reproducible_and_by_position(shards_dir):
    d, idx = shards_dir
    a = take(loader(d, c=cfg(hflip=True), seed=4, B=5), 4)
    b = take(loader(d, c=cfg(hflip=True), seed=4, B=5), 4)
    plain = take(loader(d, seed=4, B=5), 4)
    flipped = 0
    for x, y, z in zip(a, b, plain):
        assert torch.equal(x["images"], y["images"])
        for slot, p in enumerate(x["positions"].tolist()):
            want = z["images"][slot].flip(-1) if S.hflip(4, p) else z["images"][slot]
            assert torch.equal(x["images"][slot], want)
            flipped += S.hflip(4, p)
    assert 0 < flipped < 20


def test_to_model_input_range_and_layout(shards_dir):
    x = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8)
    y = L.to_model_input(x, "cpu", torch.float32)
    assert y.dtype == torch.float32
    assert y.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    images = next(loader(shards_dir[0], B=3))["images"]
    assert images.is_contiguous(memory_format=torch.channels_last)  # HWC pixels: one memcpy each
    y = L.to_model_input(images, "cpu", torch.float32)
    assert y.is_contiguous() and torch.equal(y, images.float() / 127.5 - 1)
    y = L.to_model_input(images, "cpu", torch.bfloat16, memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.bfloat16


def test_grayscale_and_decode_false(tmp_path):
    idx = write_shards(str(tmp_path), [3, 2], channels=1, labels=False)
    batch = next(loader(str(tmp_path), B=5))
    assert batch["images"].shape == (5, 1, RES, RES)
    assert batch["labels"].tolist() == [-1] * 5
    raw = next(loader(str(tmp_path), B=5, decode=False))
    assert "images" not in raw and raw["encoded_offsets"].shape == (6,)
    plan = S.ShardPlan([3, 2], 0)
    offs = raw["encoded_offsets"].tolist()
    for slot in range(5):
        data = raw["encoded"][offs[slot]:offs[slot + 1]].numpy().tobytes()
        _, s, i = plan.locate(slot)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), sample_image(gid_of(idx, s, i), 1)[:, :, 0])


def test_index_errors(tmp_path):
    with pytest.raises(L.ShardIndexError, match=r"index\.json.*etsdm shard"):
        L.load_index(str(tmp_path / "nowhere"))
    write_shards(str(tmp_path), [2])
    good = json.loads((tmp_path / "index.json").read_text())
    for field, value, pattern in [("format", "other/9", "format"),
                                  ("channels", 4, "channels"),
                                  ("total_samples", 5, "total_samples"),
                                  ("resolution", [8], "resolution")]:
        bad = dict(good, **{field: value})
        (tmp_path / "index.json").write_text(json.dumps(bad))
        with pytest.raises(L.ShardIndexError, match=pattern):
            L.load_index(str(tmp_path))
    bad = json.loads(json.dumps(good))
    bad["shards"][0]["offsets"] = bad["shards"][0]["offsets"][:-1]
    (tmp_path / "index.json").write_text(json.dumps(bad))
    with pytest.raises(L.ShardIndexError, match=r"shards\[0\]\.offsets"):
        L.load_index(str(tmp_path))


# --------------------------------------------------------------------------- faults (local)


def damaged_copy(src_idx: dict, d, how: str, shard: int):
    """A shard set with one shard truncated mid-sample / corrupted / deleted. Returns the index."""
    idx = write_shards(str(d), [s["samples"] for s in src_idx["shards"]])
    path = d / idx["shards"][shard]["name"]
    offs = idx["shards"][shard]["offsets"]
    if how == "truncate":  # cut inside sample 2's image: samples 0, 1 survive
        path.write_bytes(path.read_bytes()[: offs[2] + 700])
    elif how == "corrupt":  # garble sample 1's image data, keep the tar headers
        data = bytearray(path.read_bytes())
        data[offs[1] + 512 + 20: offs[1] + 512 + 60] = b"\x00" * 40
        path.write_bytes(bytes(data))
    elif how == "missing":
        path.unlink()
    return idx


def run_epoch(url, c, n_batches, B=4):
    ld = loader(url, c=c, B=B)
    return ld, take(ld, n_batches)


@pytest.mark.parametrize("how,bad", [("truncate", {2, 3, 4, 5, 6}), ("corrupt", {1}),
                                     ("missing", set(range(7)))])
def test_faults_raise_and_skip(tmp_path, shards_dir, how, bad):
    _, src = shards_dir
    idx = damaged_copy(src, tmp_path, how, shard=2)
    name = idx["shards"][2]["name"]
    with pytest.raises(L.ShardDataError) as ei:
        run_epoch(str(tmp_path), cfg(on_error="raise"), 5)
    msg = str(ei.value)
    assert str(tmp_path / name) in msg
    assert f"key {gid_of(idx, 2, min(bad)):06d}" in msg
    ld, batches = run_epoch(str(tmp_path), cfg(on_error="skip"), 5)
    plan = S.ShardPlan([s["samples"] for s in idx["shards"]], 0)
    invalid = set()
    for batch in batches:
        assert batch["images"].shape == (4, 3, RES, RES)
        for p, v, img in zip(batch["positions"].tolist(), batch["valid"].tolist(), batch["images"]):
            if not v:
                invalid.add(plan.locate(p)[1:])
                assert img.abs().sum() == 0
    assert invalid == {(2, i) for i in bad}
    assert ld.error_counts() == {name: len(bad)}


def test_skip_budget_exceeded_names_the_shards(tmp_path, shards_dir):
    _, src = shards_dir
    idx = write_shards(str(tmp_path), [s["samples"] for s in src["shards"]])
    for s in (0, 3):
        (tmp_path / idx["shards"][s]["name"]).unlink()
    with pytest.raises(L.DataBudgetExceeded) as ei:
        run_epoch(str(tmp_path), cfg(on_error="skip", skip_budget=1), 5)
    for s in (0, 3):
        assert idx["shards"][s]["name"] in str(ei.value)
    ld, batches = run_epoch(str(tmp_path), cfg(on_error="skip", skip_budget=2), 5)
    assert sum((~b["valid"]).sum().item() for b in batches) == 6  # shards of 5 and 1 samples


# --------------------------------------------------------------------------- coalesced reads


def _record_reads(monkeypatch):
    """Record every storage.read_range call the loader makes (in this process)."""
    from etsdm_dist.data import storage
    calls, real = [], storage.read_range

    def spy(path, start, end, **kw):
        calls.append((os.path.basename(path), start, end))
        return real(path, start, end, **kw)

    monkeypatch.setattr(storage, "read_range", spy)
    return calls


def _same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x["micro_batch"] == y["micro_batch"] and x["keys"] == y["keys"]
        assert torch.equal(x["positions"], y["positions"]) and torch.equal(x["labels"], y["labels"])
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["valid"], y["valid"])


def test_one_rank_coalesces_adjacent_micro_batches(shards_dir, monkeypatch):
    d, idx = shards_dir
    calls = _record_reads(monkeypatch)
    kw = dict(c=cfg(hflip=True), seed=5, B=2)
    plain = take(loader(d, max_read_bytes=1, **kw), 25)  # 50 positions, 2.5 epochs
    assert len(calls) > 25  # one read per span at least
    calls.clear()
    got = take(loader(d, **kw), 25)
    _same(plain, got)
    # one read per shard visit (+ read-ahead of the next): the shards are far below max_read_bytes
    assert len(calls) <= 3 * len(idx["shards"]) + 3
    for name, lo, hi in calls:
        s = next(s for s in idx["shards"] if s["name"] == name)
        assert lo in s["offsets"] and hi in s["offsets"]
    # max_read_bytes bounds every read that covers more than one span
    calls.clear()
    limit = 3 * max(b - a for s in idx["shards"] for a, b in zip(s["offsets"], s["offsets"][1:]))
    _same(plain, take(loader(d, max_read_bytes=limit, **kw), 25))
    assert all(hi - lo <= limit for _, lo, hi in calls)


@pytest.mark.parametrize("W,r,b", [(2, 0, 2), (2, 1, 1), (3, 2, 2)])
def test_reads_never_touch_other_ranks_samples(shards_dir, monkeypatch, W, r, b):
    d, idx = shards_dir
    calls = _record_reads(monkeypatch)
    B = 2 * W * b  # A = 2
    ld = loader(d, seed=1, B=B, W=W, r=r, b=b)
    mine = set()
    plan = S.ShardPlan([s["samples"] for s in idx["shards"]], 1)
    for batch in take(ld, 12):
        mine |= {plan.locate(p)[1:] for p in batch["positions"].tolist()}
    ld.close()  # stop read-ahead threads, so the reads checked are the ones issued so far
    reads = list(calls)
    for j in range(12, 20):  # what read-ahead may have fetched already
        mine |= {plan.locate(p)[1:] for p in S.rank_micro_batch_positions(0, j, B, W, r, b)}
    for name, lo, hi in reads:
        s = [i for i, x in enumerate(idx["shards"]) if x["name"] == name][0]
        offs = idx["shards"][s]["offsets"]
        for i in range(offs.index(lo), offs.index(hi)):
            assert (s, i) in mine, f"read sample {i} of shard {s}, which is another rank's"


def test_close_stops_read_ahead(shards_dir, monkeypatch):
    """After close() returns no read starts: queued read-ahead is cancelled and running reads
    are waited for. (Reads of a closed loader used to go on in its threads and land in the
    next test's spy: the once-flaky test above.)"""
    from etsdm_dist.data import storage
    d, _ = shards_dir
    real, calls = storage.read_range, []

    def slow(path, start, end, **kw):
        calls.append(start)
        time.sleep(0.05)
        return real(path, start, end, **kw)

    monkeypatch.setattr(storage, "read_range", slow)
    ld = loader(d, seed=1, B=4, W=2, r=1, b=1, read_ahead=4)
    take(ld, 3)
    ld.close()
    n = len(calls)
    time.sleep(0.4)
    assert len(calls) == n


def test_grouped_worker_items_keep_the_order_and_resume(shards_dir):
    d, _ = shards_dir
    kw = dict(c=cfg(hflip=True), seed=6, B=3)
    base = take(loader(d, **kw), 14)
    for workers, group in [(2, 3), (2, 1), (2, None)]:
        ld = loader(d, workers=workers, group=group, **kw)
        try:
            _same(base, take(ld, 14))
            assert ld.state_dict() == {"seed": 6, "position": 42}
        finally:
            ld.close()
    # a resume from the cursor of a grouped loader continues exactly
    ld = loader(d, workers=2, group=3, **kw)
    try:
        take(ld, 5)
        pos = ld.state_dict()["position"]
    finally:
        ld.close()
    _same(base[5:], [dict(x, micro_batch=x["micro_batch"] + 5) for x in
                     take(loader(d, start=pos, **kw), 9)])


def test_auto_group_only_for_one_rank_with_workers(shards_dir):
    index = L.load_index(shards_dir[0])
    assert L.auto_group(index, 1, 4, 0) == 1
    assert L.auto_group(index, 2, 4, 2) == 1
    assert 1 < L.auto_group(index, 1, 4, 2) <= L.MAX_GROUP


@pytest.mark.parametrize("workers,group", [(0, 1), (2, 2)])
def test_truncated_shard_with_coalesced_reads(tmp_path, shards_dir, workers, group):
    """A read that covers several micro-batches fails: still exactly the lost samples invalid."""
    _, src = shards_dir
    idx = damaged_copy(src, tmp_path, "truncate", shard=2)
    name = idx["shards"][2]["name"]
    ld = loader(str(tmp_path), c=cfg(on_error="skip"), B=2, workers=workers, group=group)
    try:
        batches = take(ld, 10)
        counts = ld.error_counts()
    finally:
        ld.close()
    plan = S.ShardPlan([s["samples"] for s in idx["shards"]], 0)
    invalid = {plan.locate(p)[1:] for b in batches
               for p, v in zip(b["positions"].tolist(), b["valid"].tolist()) if not v}
    assert invalid == {(2, i) for i in range(2, 7)}
    assert counts == {name: 5}


# --------------------------------------------------------------------------- tar parsing


def test_fast_tar_parsing_matches_the_reference():
    from etsdm_dist.data import tarformat as T
    rng = np.random.default_rng(0)
    for _ in range(200):  # the checksum: adler32 pieces == the plain byte sum
        hdr = bytes(rng.integers(0, 256, 512, dtype=np.uint8))
        assert T.header_checksum(hdr) == sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
    assert T.header_checksum(b"\xff" * 512) == 255 * 504 + 256
    a = T.sample_bytes("000000007", {"png": b"P" * 600, "cls": b"3", "json": b"{}"})
    b = T.sample_bytes("000000008", {"png": b"Q" * 10})
    for buf in (a, memoryview(a), bytearray(a)):
        key, fields = T.parse_sample(buf, copy=False)
        assert (key, {k: bytes(v) for k, v in fields.items()}) == \
            T.sample_from_members(T.parse_sample_members(a))
        assert all(isinstance(v, bytes) for v in T.parse_sample(buf)[1].values())
    bad = bytearray(a)
    bad[5] ^= 1  # checksum
    cases = [bytes(bad), a[:700], a + b, a[:-512] + bytes(512) + a[-512:], a + bytes(300)]
    for buf in cases:
        with pytest.raises(T.TarFormatError) as ref:
            T.sample_from_members(T.parse_sample_members(buf, key="000000007", where="s.tar"),
                                  where="s.tar")
        with pytest.raises(T.TarFormatError) as fast:
            T.parse_sample(buf, key="000000007", where="s.tar")
        assert str(fast.value) == str(ref.value) and fast.value.key == ref.value.key
        assert "s.tar" in str(fast.value) and "000000007" in str(fast.value)
