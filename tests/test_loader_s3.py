"""The loader against a real S3 server (SeaweedFS): streaming, faults, a server restart."""
from __future__ import annotations

import collections
import threading
import time

import pytest
import torch

from etsdm_dist.data import loader as L
from etsdm_dist.data import storage
from test_loader import RES, cfg, sample_image, take, write_shards

SIZES = [6, 2, 5, 7]  # 20 samples


def put_shards(url: str, sizes=SIZES) -> dict:
    return write_shards(url, sizes, upload=lambda name, data: storage.write_bytes_atomic(
        storage.join(url, name), data))


def keys_of(idx):
    return {f"{g:06d}" for g in range(idx["total_samples"])}


def epoch_keys(batches, n):
    return [k for b in batches for k, p in zip(b["keys"], b["positions"].tolist()) if p < n]


def test_stream_from_s3_matches_local(s3_bucket, tmp_path):
    idx = put_shards(s3_bucket)
    write_shards(str(tmp_path), SIZES)
    index = L.load_index(s3_bucket)
    assert index.url == s3_bucket and index.total_samples == 20
    c = cfg(hflip=True)
    remote = L.make_loader(c, index, seed=7, start_position=0, batch_images=4, world_size=1, rank=0,
                           micro_batch_images=4, num_workers=2)
    try:
        got = take(remote, 6)
    finally:
        remote.close()
    local = take(L.make_loader(c, str(tmp_path), seed=7, start_position=0, batch_images=4,
                               world_size=1, rank=0, micro_batch_images=4, num_workers=0), 6)
    for x, y in zip(got, local):
        assert torch.equal(x["images"], y["images"]) and x["keys"] == y["keys"]
    assert sorted(epoch_keys(got, 20)) == sorted(keys_of(idx))


def test_missing_index_on_s3_names_the_url(s3_bucket):
    with pytest.raises(L.ShardIndexError, match=f"{s3_bucket}/nothing/index.json.*etsdm shard"):
        L.load_index(f"{s3_bucket}/nothing")


def _damage(url, idx):
    """Shard 0 truncated inside sample 3; shard 2 deleted."""
    name0 = idx["shards"][0]["name"]
    data = storage.read_range(storage.join(url, name0), 0, idx["shards"][0]["bytes"])
    storage.write_bytes_atomic(storage.join(url, name0), data[: idx["shards"][0]["offsets"][3] + 600])
    storage.remove(storage.join(url, idx["shards"][2]["name"]))
    return name0, idx["shards"][2]["name"]


def _run(url, c, n=5, workers=0):
    ld = L.make_loader(c, url, seed=0, start_position=0, batch_images=4, world_size=1, rank=0,
                       micro_batch_images=4, num_workers=workers)
    try:
        return ld, take(ld, n)
    finally:
        ld.close()


def test_truncated_and_missing_shards_on_s3(s3_bucket):
    idx = put_shards(s3_bucket)
    truncated, missing = _damage(s3_bucket, idx)
    # raise: the first bad sample in stream order decides which message; both name URL and key
    with pytest.raises(L.ShardDataError) as ei:
        _run(s3_bucket, cfg(on_error="raise"))
    msg = str(ei.value)
    assert (f"{s3_bucket}/{truncated}" in msg and "key 000003" in msg) or \
           (f"{s3_bucket}/{missing}" in msg and f"key {SIZES[0] + SIZES[1]:06d}" in msg), msg
    # skip: same shapes, invalid samples zeroed, counters per shard summed over 2 workers
    ld, batches = _run(s3_bucket, cfg(on_error="skip", skip_budget=2), workers=2)
    assert all(b["images"].shape == (4, 3, RES, RES) for b in batches)
    bad = collections.Counter()
    for b in batches:
        for k, p, v, img in zip(b["keys"], b["positions"].tolist(), b["valid"].tolist(), b["images"]):
            if not v:
                bad[p] += 1
                assert not img.any()
            else:
                assert 0 <= int(k) < 3 or 6 <= int(k) < 8 or 13 <= int(k) < 20
    assert len(bad) == 3 + 5
    assert ld.error_counts() == {truncated: 3, missing: 5}
    # a budget of one bad shard is exceeded
    with pytest.raises(L.DataBudgetExceeded, match=f"{truncated}.*{missing}|{missing}.*{truncated}"):
        _run(s3_bucket, cfg(on_error="skip", skip_budget=1))


def test_server_restart_mid_epoch_loses_nothing(s3, s3_bucket):
    sizes = [9] * 8  # 72 samples, 36 micro-batches of 2
    idx = put_shards(s3_bucket, sizes)
    n = sum(sizes)
    c = cfg(on_error="raise", retries=10, retry_backoff_s=0.2)
    ld = L.make_loader(c, s3_bucket, seed=1, start_position=0, batch_images=2, world_size=1, rank=0,
                       micro_batch_images=2, num_workers=2)
    batches, waits = [], []
    outage = threading.Thread(target=s3.restart, kwargs={"down_s": 1.0})
    try:
        batches += take(ld, 6)
        outage.start()
        time.sleep(0.2)  # the server is going down while the workers keep prefetching
        while len(batches) < n // 2:
            t0 = time.monotonic()
            batches.append(next(ld))
            waits.append(time.monotonic() - t0)
    finally:
        outage.join()
        ld.close()
    assert max(waits) > 0.8, "the outage never stalled the loader: the test did not test it"
    keys = epoch_keys(batches, n)
    assert len(keys) == n and set(keys) == keys_of(idx)  # nothing lost, nothing twice
    assert all(b["valid"].all() for b in batches)
    for b in batches:
        for k, img in zip(b["keys"], b["images"]):
            assert torch.equal(img, torch.from_numpy(sample_image(int(k))).permute(2, 0, 1))
