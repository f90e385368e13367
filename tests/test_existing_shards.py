"""Webdataset tars written by other tools: `etsdm index` (headers-only scan), loading them fitted
to the training resolution, `etsdm verify`, FID sources, 2-rank training with exact resume; our
own shards read by webdataset; images refused from their header before decoding."""
from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import train_harness as H
from etsdm_dist import cli
from etsdm_dist.data import loader as L
from etsdm_dist.data import storage, tar_scan, tarformat
from etsdm_dist.data.decode import ImageRefused, decode_fit

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def encode(arr: np.ndarray, ext: str) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, FORMATS[ext], **({"quality": 95} if ext == "jpg" else {}))
    return b.getvalue()


def photo(i: int, h: int, w: int) -> np.ndarray:
    """A smooth gradient with an id: lossy codecs keep it recognisable, every size differs."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1),
                     np.full((h, w), (37 * i) % 256)], -1)
    return base.astype(np.uint8)


def write_wds(pattern: str, n: int, per_shard: int, seed: int = 0) -> dict:
    """n samples with webdataset's own ShardWriter (pax headers, members sorted by extension):
    mixed jpg/png/webp of random sizes, a .cls, a .json with a `label` field, a caption."""
    rng = np.random.default_rng(seed)
    originals = {}
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as w:
        for i in range(n):
            h, wd = (int(v) for v in rng.integers(12, 90, 2))
            ext = ("jpg", "png", "webp")[i % 3]
            data = encode(photo(i, h, wd), ext)
            key = f"s{i:05d}"
            w.write({"__key__": key, ext: data, "cls": str(i % 5), "json": {"label": (i + 1) % 5},
                     "txt": f"caption {i}"})
            originals[key] = (ext, data, i % 5)
    return originals


# --------------------------------------------------------------------------- decoding bound


def bomb_png(side: int) -> bytes:
    """A grayscale PNG of side x side zeros: ~140 KB on disk for 12000, 144 MB decoded."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    c = zlib.compressobj(9)
    row = bytes(side + 1)
    idat = b"".join(c.compress(row) for _ in range(side)) + c.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


MEASURE = r"""
import resource, sys
from etsdm_dist.data import loader as L
idx = L.load_index(sys.argv[1])
ds = L.ShardStream(idx, seed=0, start_position=0, batch_images=4, world_size=1, rank=0,
                   micro_batch_images=4, on_error="raise")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    next(iter(ds))
    print("NO ERROR")
except L.ShardDataError as e:
    print("ERROR", e)
print("RSS_GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_huge_image_is_refused_from_its_header_before_decoding(tmp_path):
    """A 12000x12000 PNG in an 8x8 shard set: a bad sample named by its key, and the process
    never holds its pixels (old code decoded it first: 144 MB, 432 MB as RGB)."""
    body = b""
    offsets = [0]
    small = encode(np.zeros((8, 8, 3), np.uint8), "png")
    for i in range(4):
        body += tarformat.sample_bytes(f"{i:06d}", {"png": bomb_png(12000) if i == 2 else small})
        offsets.append(len(body))
    body += tarformat.end_of_archive(len(body))
    (tmp_path / "train-000000.tar").write_bytes(body)
    (tmp_path / "index.json").write_text(json.dumps({
        "format": "etsdm-shards/1", "total_samples": 4, "resolution": [8, 8], "channels": 3,
        "image_format": "png", "label_map": None, "num_classes": None, "fingerprint": "t",
        "shards": [{"name": "train-000000.tar", "samples": 4, "bytes": len(body), "offsets": offsets,
                    "first_key": "000000"}]}))
    r = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True,
                       timeout=120, env=H.base_env())
    assert r.returncode == 0, r.stderr
    assert "ERROR" in r.stdout and "key 000002" in r.stdout and "12000x12000" in r.stdout, r.stdout
    growth_mb = int(r.stdout.split("RSS_GROWTH_KB")[1]) / 1024
    assert growth_mb < 60, f"peak memory grew by {growth_mb:.0f} MB: the image was decoded"
    # the fit path (other tools' shards) bounds the pixel count from the target resolution
    with pytest.raises(ImageRefused, match="above the bound"):
        decode_fit(bomb_png(12000), 3, 32, "center-crop")


# --------------------------------------------------------------------------- scan, local


def _tar(path, members, fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1700000000.5  # float mtime: a pax header per member
            tf.addfile(ti, io.BytesIO(data))


@pytest.fixture
def bad_set(tmp_path):
    """Three tars of other tools' kind with the problems the scan must list and leave out."""
    img = {k: encode(photo(k, 20 + k, 30), "png") for k in range(12)}
    _tar(tmp_path / "a.tar", [("k0.png", img[0]), ("k0.cls", b"1"), ("k1.jpg", encode(photo(1, 40, 25), "jpg")),
                              ("k2.json", b"{}"), ("k2.cls", b"2"),  # no image member
                              ("k3.png", img[3]), ("k3.txt", b"x"), ("k4.webp", encode(photo(4, 9, 50), "webp"))])
    _tar(tmp_path / "b.tar", [("k5.png", img[5]), ("k6.png", img[6]), ("k5.cls", b"0"),  # k5 split
                              ("k7.png", img[7])])
    _tar(tmp_path / "c.tar", [(f"k{i}.png", img[i]) for i in (8, 9, 10)], fmt=tarfile.USTAR_FORMAT)
    data = (tmp_path / "c.tar").read_bytes()
    cut = data.index(b"k10.png") + 512 + 100  # inside k10's image data
    (tmp_path / "c.tar").write_bytes(data[:cut])
    return tmp_path


def test_scan_lists_bad_samples_and_indexes_the_rest(bad_set, capsys):
    assert cli.main(["index", str(bad_set), "--resolution", "16", "--no-progress", "--workers", "2"]) == 0
    index = json.loads((bad_set / "index.json").read_text())
    keys = {(s["name"], k) for s in index["shards"] for k in s["keys"]}
    assert keys == {("a.tar", "k0"), ("a.tar", "k1"), ("a.tar", "k3"), ("a.tar", "k4"),
                    ("b.tar", "k6"), ("b.tar", "k7"), ("c.tar", "k8"), ("c.tar", "k9")}
    # a sample left out inside a tar splits it into entries of adjacent samples
    assert [s["keys"] for s in index["shards"] if s["name"] == "a.tar"] == [["k0", "k1"], ["k3", "k4"]]
    assert index["image_format"] == "mixed" and index["total_samples"] == 8
    skipped = (bad_set / tar_scan.SKIPPED).read_text()
    assert "a.tar\tk2\tno image member" in skipped
    assert "b.tar\tk5\tmembers of this key are not contiguous" in skipped
    assert "c.tar\tk10\t" in skipped and "truncated" in skipped
    assert "left out" in capsys.readouterr().err
    # every indexed range is exactly one sample: its key, its image member
    for s in index["shards"]:
        data = (bad_set / s["name"]).read_bytes()
        for i, (key, ext) in enumerate(zip(s["keys"], s["images"])):
            got, fields = tar_scan.parse_members(data[s["offsets"][i]:s["offsets"][i + 1]])
            assert got == key and ext in fields
    assert cli.main(["verify", str(bad_set)]) == 0
    # the loader reads each kept sample once per epoch, fitted to 16x16
    ld = L.make_loader(_cfg(), str(bad_set), seed=3, start_position=0, batch_images=8, world_size=1,
                       rank=0, micro_batch_images=8, num_workers=0)
    mb = next(iter(ld))
    assert sorted(mb["keys"]) == sorted(k for _, k in keys) and bool(mb["valid"].all())
    assert mb["images"].shape == (8, 3, 16, 16)


def test_scan_resumes_and_rescans_changed_tars(bad_set, capsys):
    args = [str(bad_set), "--resolution", "16", "--no-progress"]
    assert cli.main(["index", *args]) == 0
    results = bad_set / tar_scan.SCAN_DIR
    stamp = {n: os.stat(results / f"{n}.json").st_mtime_ns for n in ("a.tar", "b.tar", "c.tar")}
    (results / "b.tar.json").unlink()
    with open(bad_set / "a.tar", "ab") as f:  # changed since its scan: must be scanned again
        f.write(b"\0" * 1024)
    capsys.readouterr()
    assert cli.main(["index", *args]) == 2  # index.json exists
    assert cli.main(["index", *args, "--overwrite"]) == 0
    assert "resuming: 1 of 3 tars already scanned" in capsys.readouterr().err
    assert os.stat(results / "c.tar.json").st_mtime_ns == stamp["c.tar"]
    assert os.stat(results / "a.tar.json").st_mtime_ns != stamp["a.tar"]
    index = json.loads((bad_set / "index.json").read_text())
    assert {s["bytes"] for s in index["shards"] if s["name"] == "a.tar"} == {(bad_set / "a.tar").stat().st_size}
    assert index["total_samples"] == 8


def _cfg(**kw):
    from etsdm_dist.config import DataConfig

    return DataConfig(url="", num_workers=0, hflip=False, **kw)


# --------------------------------------------------------------------------- on S3, and training


@pytest.fixture(scope="module")
def wds_set(s3, tmp_path_factory):
    """ShardWriter tars (mixed formats and sizes) on SeaweedFS, indexed at 32x32x1 with labels."""
    local = tmp_path_factory.mktemp("wds")
    originals = write_wds(str(local / "shard-%06d.tar"), 40, 14)
    url = f"{s3.make_bucket(f'wds{os.getpid()}')}/photos"
    for p in sorted(local.glob("*.tar")):
        storage.write_bytes_atomic(storage.join(url, p.name), p.read_bytes())
    rc = cli.main(["index", f"{url}/shard-{{000000..000002}}.tar", "--resolution", "32", "--mode", "pad",
                   "--channels", "1", "--num-classes", "5", "--label-field", "label", "--workers", "2",
                   "--window", "4096", "--no-progress"])
    assert rc == 0
    return url, originals


def test_indexed_s3_set_verifies_loads_fitted_and_feeds_fid(wds_set):
    url, originals = wds_set
    assert cli.main(["verify", url]) == 0
    index = L.load_index(url)
    assert index.total_samples == 40 and index.resolution == (32, 32) and index.channels == 1
    ld = L.make_loader(_cfg(use_labels=True), index, seed=0, start_position=0, batch_images=20,
                       world_size=2, rank=1, micro_batch_images=10, num_workers=1)
    try:
        batches = [next(ld) for _ in range(2)]
    finally:
        ld.close()
    for mb in batches:
        for key, img, label in zip(mb["keys"], mb["images"], mb["labels"].tolist()):
            ext, data, cls = originals[key]
            want = decode_fit(data, 1, 32, "pad")  # exactly `etsdm shard --mode pad` pixels
            assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(want.copy())), key
            assert label == cls  # .cls wins over the .json field where both exist
    from etsdm_dist.eval.sources import ShardSource

    src = ShardSource(url, max_images=6)
    imgs = torch.cat([b for b, _ in src.batches(0, 1, 4)])
    assert imgs.shape == (6, 1, 32, 32) and src.describe()["fingerprint"]


def test_two_ranks_train_on_indexed_tars_and_resume_exactly(wds_set, tmp_path):
    url, _ = wds_set
    over = ("train.total_kimg=0.128", "train.zero_stage=2")
    ref = H.run_train("wds-ref", tmp_path, url, 2, *over)
    assert ref.result.returncodes == [0, 0], ref.result.output()
    run = H.run_train("wds-cut", tmp_path, url, 2, *over,
                      poll_factory=lambda log: H.signal_when(log, 80, signal.SIGKILL, ranks=[1]))
    assert run.result.returncodes[1] == -signal.SIGKILL
    again = H.run_train("wds-cut", tmp_path, url, 2, *over)
    assert again.result.returncodes == [0, 0], again.result.output()
    assert "resuming from" in again.result.outputs[0]
    losses = dict(ref.steps)
    resumed = again.steps[len(run.steps):]
    assert resumed and resumed[-1][0] == 128 and all(loss == losses[i] for i, loss in resumed)
    H.assert_same_weights(again.run_dir, ref.run_dir)


def test_our_shards_read_by_webdataset_from_s3(s3_bucket, tmp_path):
    """The reverse: `etsdm shard` output is plain webdataset, also through s3://."""
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(5):
        Image.fromarray(photo(i, 20, 24)).save(src / f"{i}.png")
    from etsdm_dist.data import shard_writer

    dst = f"{s3_bucket}/ours"
    assert shard_writer.main([str(src), dst, "--resolution", "16", "--no-progress"]) == 0
    storage.register_webdataset_handlers()
    index = L.load_index(dst)
    got = list(wds.WebDataset([index.shard_url(i) for i in range(len(index.shards))],
                              shardshuffle=False, empty_check=False).decode("rgb8"))
    assert [s["__key__"] for s in got] == [f"{i:09d}" for i in range(5)]
    assert all(s["png"].shape == (16, 16, 3) for s in got)
