"""Streaming feature statistics across ranks: images -> Inception features -> float64 sums,
all-reduced; plus the rows KID needs. The in-process API a sampling job uses:

    stats = FeatureStats(Inception(device=dev))
    for images, indices in my_batches:      # uint8 [N, C, H, W], global image indices [N]
        stats.add(images, indices)
    stats.all_reduce()                      # collective: every rank calls it once
    fid = stats.fid(reference)              # reference: fid.load_reference(path)

Each rank keeps n, the float64 sum of its feature rows and the float64 sum of their outer
products (2048 + 2048^2 doubles = 32 MiB, independent of N); all_reduce sums them, so no image or
PNG ever leaves its rank and the result does not depend on how images were split among ranks.

KID needs feature rows, not sums: each rank also keeps the rows of the images with the smallest
global indices, at most `kid_rows` of them (2048 float32 = 8 KiB per image: 5000 rows = 41 MB);
all_reduce gathers them and keeps the `kid_rows` smallest indices overall, so the same images are
kept for any number of ranks. Pass global indices (image numbers of the sampling job, positions
of the data set): without them rows are numbered per rank, which is still correct for FID, and for
KID only changes which rows are kept when N > kid_rows and their order. kid_rows=0 keeps none.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from etsdm_dist import dist
from etsdm_dist.eval import metrics
from etsdm_dist.eval.inception import FEATURE_DIM, PROTOCOL, RESOLUTION, Inception

DEFAULT_KID_ROWS = 5000
_RANK_STRIDE = 1 << 40  # default indices: rank * stride + local count


class ProtocolMismatch(ValueError):
    """Two statistics were made under different preprocessing protocols or networks."""


@dataclass
class Statistics:
    """Merged statistics of one image set, as stored in a reference .npz."""

    n: int
    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D], unbiased (np.cov)
    features: np.ndarray | None = None  # float32 [k, D]: KID rows, by increasing image index
    meta: dict = field(default_factory=dict)  # {} for a pytorch-fid / clean-fid file


def check_compatible(a: dict, b: dict, a_name: str = "samples", b_name: str = "reference") -> list[str]:
    """Refuse to compare statistics made under different protocols, resolutions or networks.
    Returns warnings (e.g. a file without metadata, which we can only assume matches)."""
    notes = []
    for meta, name in ((a, a_name), (b, b_name)):
        if not meta.get("protocol"):
            notes.append(f"{name} statistics carry no metadata (a pytorch-fid / clean-fid file?): "
                         f"assuming they were made like ours ({PROTOCOL}, TF FID Inception); "
                         f"their preprocessing may differ, and FID with it")
    if a.get("protocol") and b.get("protocol"):
        for key in ("protocol", "resolution"):
            if a.get(key) != b.get(key):
                raise ProtocolMismatch(
                    f"{a_name} were made with {key} {a.get(key)!r}, {b_name} with {b.get(key)!r}: "
                    f"FID across preprocessing protocols is meaningless; recompute the "
                    f"{b_name} with `etsdm fid-ref` of this version ({PROTOCOL})")
        sa, sb = (a.get("network") or {}).get("sha256"), (b.get("network") or {}).get("sha256")
        if sa and sb and sa != sb:
            raise ProtocolMismatch(
                f"{a_name} features come from network sha256 {sa[:12]}... "
                f"({(a.get('network') or {}).get('source')}), {b_name} from {sb[:12]}... "
                f"({(b.get('network') or {}).get('source')}): use the same --inception for both")
    return notes


class FeatureStats:
    """Per-rank streaming statistics of Inception features (see the module docstring)."""

    def __init__(self, network: Inception | None = None, *, dim: int | None = None,
                 kid_rows: int = DEFAULT_KID_ROWS, device: torch.device | str | None = None):
        if kid_rows < 0:
            raise ValueError(f"kid_rows must be >= 0, got {kid_rows}")
        self.network = network
        self.dim = int(dim or FEATURE_DIM)
        self.kid_rows = int(kid_rows)
        dev = torch.device(device) if device is not None else (
            network.device if network is not None else torch.device("cpu"))
        # The sums live where the features are made: a GPU does float64 matmuls far faster than
        # the host, and the features need not cross to it.
        self.n = 0
        self.total = torch.zeros(self.dim, dtype=torch.float64, device=dev)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=dev)
        self._kid_idx: list[np.ndarray] = []
        self._kid_feat: list[np.ndarray] = []
        self._kid_count = 0
        self._local = 0
        self.reduced = False

    # -- accumulation

    def add(self, images: torch.Tensor, indices: Sequence[int] | torch.Tensor | None = None) -> None:
        """uint8 [N, C, H, W] (C = 1 or 3) -> features (inception.PROTOCOL) -> statistics."""
        if self.network is None:
            raise RuntimeError("FeatureStats was made without a network: use add_features")
        self.add_features(self.network.features(images), indices)

    def add_features(self, feats: torch.Tensor, indices: Sequence[int] | torch.Tensor | None = None) -> None:
        """Feature rows [N, D] (any float dtype) with their global image indices [N]."""
        if self.reduced:
            raise RuntimeError("statistics were already all-reduced; adding more would count "
                               "the other ranks' images twice at the next all_reduce")
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got {tuple(feats.shape)}")
        n = feats.shape[0]
        if indices is None:
            idx = np.arange(self._local, self._local + n, dtype=np.int64) + dist.rank() * _RANK_STRIDE
        else:
            idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
            if idx.shape != (n,):
                raise ValueError(f"indices must be [{n}], got shape {idx.shape}")
        self._local += n
        if n == 0:
            return
        f64 = feats.detach().to(self.total.device, torch.float64)
        self.n += n
        self.total += f64.sum(0)
        self.outer.addmm_(f64.T, f64)
        if self.kid_rows:
            self._keep_kid_rows(idx, feats.detach().float().cpu().numpy())

    def _keep_kid_rows(self, idx: np.ndarray, rows: np.ndarray) -> None:
        self._kid_idx.append(idx)
        self._kid_feat.append(rows)
        self._kid_count += len(idx)
        if self._kid_count > 2 * self.kid_rows:  # amortised: trim only now and then
            self._trim_kid()

    def _trim_kid(self) -> None:
        if not self._kid_idx:
            return
        idx, rows = np.concatenate(self._kid_idx), np.concatenate(self._kid_feat)
        order = np.argsort(idx, kind="stable")[: self.kid_rows]
        self._kid_idx, self._kid_feat = [idx[order]], [rows[order]]
        self._kid_count = len(order)

    # -- merging

    def all_reduce(self) -> None:
        """Merge every rank's statistics (collective: all ranks call it). Afterwards every rank
        holds the statistics of all images. Without a process group this only tidies up."""
        if self.reduced:
            raise RuntimeError("all_reduce called twice on the same statistics")
        self._trim_kid()
        if dist.initialized() and dist.world_size() > 1:
            n = dist.all_reduce(torch.tensor([self.n], dtype=torch.int64))
            # gloo cannot reduce CUDA tensors; dist.all_reduce moves host tensors to the GPU on nccl
            total, outer = self.total.cpu(), self.outer.cpu()
            dist.all_reduce(total)
            dist.all_reduce(outer)
            self.n = int(n.item())
            self.total.copy_(total)
            self.outer.copy_(outer)
            if self.kid_rows:
                mine = (self._kid_idx[0], self._kid_feat[0]) if self._kid_idx else (
                    np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32))
                parts = dist.all_gather_object(mine)
                self._kid_idx = [np.concatenate([p[0] for p in parts])]
                self._kid_feat = [np.concatenate([p[1] for p in parts])]
                self._trim_kid()
        self.reduced = True  # on one rank too: the same calls are errors for any rank count

    # -- results

    def kid_features(self) -> np.ndarray | None:
        """The kept rows (float32 [k, D]) ordered by image index, or None when kid_rows=0."""
        if not self.kid_rows:
            return None
        self._trim_kid()
        return self._kid_feat[0] if self._kid_feat else np.zeros((0, self.dim), np.float32)

    def base_meta(self) -> dict:
        meta = {"protocol": PROTOCOL, "resolution": RESOLUTION, "n": self.n,
                "kid_rows": 0 if not self.kid_rows else len(self.kid_features())}
        if self.network is not None:
            meta["network"] = self.network.info.as_dict()
        return meta

    def statistics(self, meta: dict | None = None) -> Statistics:
        if dist.initialized() and dist.world_size() > 1 and not self.reduced:
            raise RuntimeError("call all_reduce() on every rank before reading the statistics")
        mu, sigma = metrics.moments_from_sums(self.n, self.total.cpu().numpy(), self.outer.cpu().numpy())
        return Statistics(self.n, mu, sigma, self.kid_features(), {**self.base_meta(), **(meta or {})})

    def fid(self, ref: Statistics) -> float:
        return compare(self.statistics(), ref)["fid"]

    def kid(self, ref: Statistics, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> dict | None:
        return compare(self.statistics(), ref, kid_subsets=subsets, kid_subset_size=subset_size,
                       seed=seed)["kid"]


def compare(samples: Statistics, ref: Statistics, *, kid_subsets: int = 100,
            kid_subset_size: int = 1000, seed: int = 0, warn: bool = True) -> dict:
    """FID and KID of samples vs reference, after check_compatible. KID is None (with a note)
    when either side has fewer than 2 stored feature rows."""
    notes = check_compatible(samples.meta, ref.meta)
    if warn:
        for note in notes:
            warnings.warn(note, stacklevel=2)
    out = {"fid": metrics.frechet_distance(samples.mu, samples.sigma, ref.mu, ref.sigma),
           "kid": None, "notes": notes}
    have = [0 if s.features is None else len(s.features) for s in (samples, ref)]
    if min(have) >= 2:
        out["kid"] = metrics.kid(samples.features, ref.features, kid_subsets, kid_subset_size, seed)
    else:
        out["notes"] = notes + [f"KID not computed: feature rows stored for samples / reference: "
                                f"{have[0]} / {have[1]} (a reference needs `etsdm fid-ref --kid-rows` > 1)"]
    return out
