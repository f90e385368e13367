"""`etsdm shard` and `etsdm verify` on real data (Fashion-MNIST idx files, generated photos),
to a local folder and to a real S3 server."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from etsdm_dist.data import shard_writer
from etsdm_dist.data import storage
from etsdm_dist.data import tarformat
from etsdm_dist.data import verify


def shard(*argv) -> int:
    return shard_writer.main([*map(str, argv), "--no-progress"])


def load_idx(d, split="t10k", n=None):
    with gzip.open(os.path.join(d, f"{split}-images-idx3-ubyte.gz")) as f:
        _, count, h, w = struct.unpack(">IIII", f.read(16))
        n = count if n is None else n
        images = np.frombuffer(f.read(n * h * w), np.uint8).reshape(n, h, w)
    with gzip.open(os.path.join(d, f"{split}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(8 + n)[8:], np.uint8)
    return images, labels


def read_samples(dst):
    """What the loader does: index offsets -> range reads -> parse_sample_members."""
    index = storage.read_json(storage.join(dst, "index.json"))
    out = []
    for s in index["shards"]:
        url = storage.join(dst, s["name"])
        for a, b in zip(s["offsets"], s["offsets"][1:]):
            members = tarformat.parse_sample_members(storage.read_range(url, a, b), where=s["name"])
            out.append(tarformat.sample_from_members(members))
    return index, out


def files(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))
            if n.endswith(".tar")}


# --------------------------------------------------------------------------- tar format


def test_tar_format_roundtrip_and_errors():
    a = tarformat.sample_bytes("000000007", {"json": b"{}", "png": b"P" * 600, "cls": b"3"})
    b = tarformat.sample_bytes("000000008", {"png": b"Q" * 10, "json": b"{}"})
    body = a + b
    blob = body + tarformat.end_of_archive(len(body))
    assert len(blob) % tarformat.RECORD == 0
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:  # a standard tar reader agrees
        assert tf.getnames() == ["000000007.png", "000000007.cls", "000000007.json",
                                 "000000008.png", "000000008.json"]
        assert tf.getmember("000000007.png").offset == 0
        assert tf.getmember("000000008.png").offset == len(a)
    members = tarformat.parse_sample_members(a)
    assert tarformat.sample_from_members(members) == (
        "000000007", {"png": b"P" * 600, "cls": b"3", "json": b"{}"})
    bad = bytearray(b)
    bad[3] ^= 0xFF  # inside the name field of the header
    with pytest.raises(tarformat.TarFormatError, match="train-000001.tar: sample 000000008.*checksum"):
        tarformat.parse_sample_members(bytes(bad), key="000000008", where="train-000001.tar")
    with pytest.raises(tarformat.TarFormatError, match="sample 000000007.*truncated"):
        tarformat.parse_sample_members(a[:700])
    with pytest.raises(tarformat.TarFormatError, match="contiguous"):
        tarformat.sample_from_members(tarformat.parse_sample_members(body))


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("where", ["local", "s3"])
def test_fashion_mnist_exact(where, fashion_mnist_dir, tmp_path, request, capsys):
    dst = request.getfixturevalue("s3_bucket") + "/fm" if where == "s3" else str(tmp_path / "fm")
    workers = 2 if where == "s3" else 1  # worker count must not change a byte
    assert shard(fashion_mnist_dir, dst, "--split", "t10k", "--limit", 300,
                 "--max-samples", 100, "--workers", workers) == 0
    assert verify.main([dst]) == 0
    assert "OK" in capsys.readouterr().out
    index, samples = read_samples(dst)
    assert [s["samples"] for s in index["shards"]] == [100, 100, 100]
    assert [s["name"] for s in index["shards"]] == [f"train-{i:06d}.tar" for i in range(3)]
    assert index["total_samples"] == 300 and index["resolution"] == [28, 28]
    assert index["channels"] == 1 and index["num_classes"] == 10 and index["label_map"] is None
    images, labels = load_idx(fashion_mnist_dir, n=300)
    for i, (key, fields) in enumerate(samples):
        assert key == f"{i:09d}"
        got = np.asarray(Image.open(io.BytesIO(fields["png"])))
        assert got.dtype == np.uint8 and np.array_equal(got, images[i])  # png is lossless
        assert int(fields["cls"]) == labels[i]
        assert json.loads(fields["json"]) == {"source": f"t10k-images-idx3-ubyte.gz[{i}]",
                                              "width": 28, "height": 28}
    # Shard bytes are a pure function of inputs and options: local (1 worker) == s3 (2 workers).
    ref = str(tmp_path / "ref")
    assert shard(fashion_mnist_dir, ref, "--split", "t10k", "--limit", 300, "--max-samples", 100) == 0
    assert [s["sha256"] for s in index["shards"]] == \
        [s["sha256"] for s in storage.read_json(ref + "/index.json")["shards"]]


def test_resume_is_byte_identical(fashion_mnist_dir, tmp_path, s3_bucket, monkeypatch, capsys):
    args = ["--split", "t10k", "--limit", 230, "--max-samples", 50, "--shuffle-seed", 7,
            "--max-bytes", 120_000]
    ref = str(tmp_path / "ref")
    assert shard(fashion_mnist_dir, ref, *args) == 0
    dst = s3_bucket + "/resumed"
    write_json_atomic = storage.write_json_atomic

    def die_after_2_shards(path, obj, **kw):  # the job dies right after recording its 2nd shard
        write_json_atomic(path, obj, **kw)
        if path.endswith("/_progress.json") and len(obj["shards"]) == 2:
            raise RuntimeError("injected failure after 2 shards")

    monkeypatch.setattr(storage, "write_json_atomic", die_after_2_shards)
    with pytest.raises(RuntimeError, match="injected failure"):
        shard(fashion_mnist_dir, dst, *args)
    assert not storage.exists(dst + "/index.json")
    assert len(storage.read_json(dst + "/_progress.json")["shards"]) == 2
    monkeypatch.setattr(storage, "write_json_atomic", write_json_atomic)
    capsys.readouterr()
    assert shard(fashion_mnist_dir, dst, *args) == 0
    assert "resuming after 2 shards" in capsys.readouterr().err
    a = storage.read_json(ref + "/index.json")
    b = storage.read_json(dst + "/index.json")
    assert len(a["shards"]) >= 4  # the interruption really was mid-set
    a.pop("created"), b.pop("created")
    assert a == b  # same shards, sha256s, offsets, keys, fingerprint
    for s in a["shards"]:
        assert storage.read_bytes(f"{dst}/{s['name']}") == open(f"{ref}/{s['name']}", "rb").read()
    # The shuffle really shuffled, and keys stay consecutive in the written order.
    _, samples = read_samples(dst)
    sources = [json.loads(f["json"])["source"] for _, f in samples]
    assert sources != sorted(sources, key=lambda s: int(s.split("[")[1][:-1]))
    assert [k for k, _ in samples] == [f"{i:09d}" for i in range(230)]
    # A finished set is left alone; a rerun with other options is refused.
    assert shard(fashion_mnist_dir, dst, *args) == 0
    assert "already complete" in capsys.readouterr().err
    assert shard(fashion_mnist_dir, dst, *args[:-1], 200_000) == 2
    assert "other options" in capsys.readouterr().err


# --------------------------------------------------------------------------- photos


def make_photos(d):
    """Pillow-generated photo-like images: odd sizes, modes and formats, plus broken inputs."""
    os.makedirs(d, exist_ok=True)
    mandel = Image.effect_mandelbrot((300, 200), (-2.0, -1.0, 1.0, 1.0), 200)
    noise = Image.effect_noise((160, 240), 40)
    rgb = Image.merge("RGB", (mandel, mandel.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                              Image.linear_gradient("L").resize((300, 200))))
    rgb.save(os.path.join(d, "mandel.jpg"), quality=90)
    Image.merge("RGB", (noise, noise, noise)).save(os.path.join(d, "noise.png"))
    Image.radial_gradient("L").resize((180, 120)).save(os.path.join(d, "gray.webp"))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    os.makedirs(os.path.join(d, "nested", "deeper"), exist_ok=True)
    rgba.save(os.path.join(d, "nested", "deeper", "alpha.PNG"))
    # Tricolour 200x100: after center-crop only the middle (green) half survives.
    tri = Image.new("RGB", (200, 100), (255, 0, 0))
    tri.paste((0, 255, 0), (50, 0, 150, 100))
    tri.paste((0, 0, 255), (150, 0, 200, 100))
    tri.save(os.path.join(d, "tri.png"))
    Image.new("RGB", (20, 20), (9, 9, 9)).save(os.path.join(d, "tiny.jpg"))
    with open(os.path.join(d, "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    with open(os.path.join(d, "notes.txt"), "w") as f:
        f.write("ignored: not an image extension")


def test_photos_center_crop_jpg(tmp_path, capsys):
    src, dst = tmp_path / "photos", str(tmp_path / "out")
    make_photos(src)
    assert shard(src, dst, "--resolution", 64, "--format", "jpg", "--min-size", 32,
                 "--max-samples", 2, "--workers", 2) == 0
    assert "skipped 2 sources" in capsys.readouterr().err
    assert verify.main([dst]) == 0
    index, samples = read_samples(dst)
    assert index["resolution"] == [64, 64] and index["channels"] == 3
    assert index["image_format"] == "jpg" and index["num_classes"] is None
    assert index["skipped"] == {"count": 2, "list_file": "skipped.txt"}
    skipped = dict(line.split("\t") for line in open(f"{dst}/skipped.txt").read().splitlines())
    assert set(skipped) == {"broken.jpg", "tiny.jpg"}
    assert "cannot decode" in skipped["broken.jpg"] and "too small" in skipped["tiny.jpg"]
    by_source = {json.loads(f["json"])["source"]: f for _, f in samples}
    assert sorted(by_source) == ["gray.webp", "mandel.jpg", "nested/deeper/alpha.PNG",
                                 "noise.png", "tri.png"]
    assert json.loads(by_source["tri.png"]["json"])["width"] == 200
    for f in by_source.values():
        im = Image.open(io.BytesIO(f["jpg"]))
        assert im.format == "JPEG" and im.size == (64, 64) and im.mode == "RGB"
    tri = np.asarray(Image.open(io.BytesIO(by_source["tri.png"]["jpg"])), np.int16)
    assert np.abs(tri[:, 4:-4] - [0, 255, 0]).max() < 40  # only the green middle survives


def test_pad_mode(tmp_path):
    src, dst = tmp_path / "p", str(tmp_path / "out")
    make_photos(src)
    assert shard(src, dst, "--resolution", 32, "--mode", "pad", "--channels", 1) == 0
    _, samples = read_samples(dst)
    tri = [f for _, f in samples if json.loads(f["json"])["source"] == "tri.png"][0]
    px = np.asarray(Image.open(io.BytesIO(tri["png"])))
    assert px.shape == (32, 32)
    assert px[:7].max() == 0 and px[-7:].max() == 0 and px[9:23].min() > 0  # 32x16 band, padded


def test_class_folders_label_map(tmp_path):
    src, dst = tmp_path / "classes", str(tmp_path / "out")
    for cls, color in [("zebra", 200), ("ant", 50), ("moth", 120)]:
        os.makedirs(src / cls / "sub")
        for i in range(2):
            Image.new("RGB", (40 + i, 40), (color, i, 0)).save(src / cls / f"{i}.png")
        Image.new("RGB", (40, 40), (color, 9, 0)).save(src / cls / "sub" / "x.jpg")
    Image.new("RGB", (40, 40)).save(src / "stray.png")
    assert shard(src, dst, "--labels", "folder", "--resolution", 32) == 0
    assert verify.main([dst]) == 0
    index, samples = read_samples(dst)
    assert index["label_map"] == {"ant": 0, "moth": 1, "zebra": 2} and index["num_classes"] == 3
    assert len(samples) == 9 and index["skipped"]["count"] == 1
    assert "stray.png\tnot inside a class subfolder" in open(f"{dst}/skipped.txt").read()
    for _, f in samples:
        folder = json.loads(f["json"])["source"].split("/")[0]
        assert int(f["cls"]) == index["label_map"][folder]


# --------------------------------------------------------------------------- verify


@pytest.fixture(scope="module")
def good_set(tmp_path_factory):
    if not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"):
        pytest.skip("Fashion-MNIST missing")
    d = str(tmp_path_factory.mktemp("good") / "set")
    assert shard("/usr/share/datasets/fashion-mnist/t10k", d, "--limit", 200,
                 "--max-samples", 100) == 0
    return d


def broken_copy(good_set, tmp_path):
    d = str(tmp_path / "broken")
    shutil.copytree(good_set, d)
    return d, storage.read_json(d + "/index.json")


def run_verify(d, capsys, *extra):
    rc = verify.main([d, *extra])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("target", ["image", "header"])
def test_verify_catches_corrupt_byte(good_set, tmp_path, capsys, target):
    d, index = broken_copy(good_set, tmp_path)
    s = index["shards"][1]
    start = s["offsets"][37]
    pos = start + (600 if target == "image" else 20)  # inside the PNG data / the tar header
    with open(f"{d}/{s['name']}", "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x55]))
    for extra in ([], ["--no-decode"]):
        rc, err = run_verify(d, capsys, *extra)
        assert rc == 1
        assert "train-000001.tar: sha256 mismatch" in err
        assert "train-000001.tar: sample 000000137" in err, err


def test_verify_catches_truncated_shard(good_set, tmp_path, capsys):
    d, index = broken_copy(good_set, tmp_path)
    s = index["shards"][0]
    with open(f"{d}/{s['name']}", "r+b") as f:
        f.truncate(s["offsets"][50] + 700)
    rc, err = run_verify(d, capsys, "--no-decode")
    assert rc == 1 and "train-000000.tar" in err and "truncated" in err
    assert "sample 000000050" in err


def test_verify_catches_missing_shard(good_set, tmp_path, capsys):
    d, _ = broken_copy(good_set, tmp_path)
    os.remove(f"{d}/train-000001.tar")
    rc, err = run_verify(d, capsys)
    assert rc == 1 and "train-000001.tar: shard missing (keys 000000100..000000199)" in err


def test_verify_catches_duplicate_key(good_set, tmp_path, capsys):
    """Shard 1 rewritten so its 4th sample reuses key 000000005 of shard 0; the index is
    updated to match (sha256, fingerprint), so only the key check can catch it."""
    d, index = broken_copy(good_set, tmp_path)
    s = index["shards"][1]
    path = f"{d}/{s['name']}"
    data = open(path, "rb").read()
    out = bytearray()
    for i, (a, b) in enumerate(zip(s["offsets"], s["offsets"][1:])):
        key, fields = tarformat.sample_from_members(tarformat.parse_sample_members(data[a:b]))
        out += tarformat.sample_bytes("000000005" if i == 3 else key, fields)
    out += data[s["offsets"][-1]:]
    open(path, "wb").write(out)
    s["sha256"] = hashlib.sha256(out).hexdigest()
    index["fingerprint"] = hashlib.sha256("".join(
        f"{x['name']}:{x['sha256']}\n" for x in index["shards"]).encode()).hexdigest()
    storage.write_json_atomic(d + "/index.json", index)
    rc, err = run_verify(d, capsys, "--no-decode")
    assert rc == 1
    assert "train-000001.tar: sample 000000005: duplicate key (also in train-000000.tar)" in err
    assert "sha256" not in err


# --------------------------------------------------------------------------- bad input


def test_clear_errors(tmp_path, s3, capsys, monkeypatch, fashion_mnist_dir):
    assert shard(tmp_path / "nope", tmp_path / "o") == 2
    assert "nope does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert shard(tmp_path / "empty", tmp_path / "o") == 2
    assert "no images" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert shard(fashion_mnist_dir, tmp_path / "afile" / "out", "--limit", 5) == 2
    assert "cannot write" in capsys.readouterr().err
    assert shard(fashion_mnist_dir, "s3://no-such-bucket-etsdm/x", "--limit", 5) == 2
    err = capsys.readouterr().err
    assert "s3://no-such-bucket-etsdm/x" in err and "bucket does not exist" in err
    # No credentials anywhere: the message says which env vars to set.
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.invalidate()
    try:
        assert shard(fashion_mnist_dir, s3.make_bucket("nocreds") + "/x", "--limit", 5) == 2
        err = capsys.readouterr().err
        assert "s3://nocreds/x" in err and "AWS_ACCESS_KEY_ID" in err, err
    finally:
        storage.invalidate()


def test_real_photos_center_crop_to_s3(photos_dir, tmp_path, s3_bucket):
    """Real photos (from the scikit-image wheel), grey and colour, various sizes, to S3 as JPEG:
    every photo lands once, decodes at the requested size, and keeps its content (the centre
    crop of the source, within JPEG error)."""
    dst = f"{s3_bucket}/photos"
    sources = sorted(p.name for p in photos_dir.iterdir())
    assert len(sources) >= 15
    assert shard(photos_dir, dst, "--resolution", 64, "--mode", "center-crop", "--format", "jpg",
                 "--quality", 95, "--channels", 3, "--max-samples", 8, "--workers", 2) == 0
    assert verify.main([dst]) == 0
    index, samples = read_samples(dst)
    assert index["total_samples"] == len(sources) and len(index["shards"]) == -(-len(sources) // 8)
    by_source = {json.loads(f["json"])["source"]: f for _, f in samples}
    assert sorted(by_source) == sources
    for name, f in by_source.items():
        got = np.asarray(Image.open(io.BytesIO(f["jpg"])), np.float64)
        assert got.shape == (64, 64, 3), name
        src = Image.open(photos_dir / name).convert("RGB")
        w, h = src.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        want = np.asarray(src.crop(box).resize((64, 64), Image.BICUBIC), np.float64)
        # Same region and orientation: close on average (JPEG q95 + resampling differences).
        assert np.abs(got - want).mean() < 12, name
