"""Training input: unpaired A/B images with the reference's augmentation.

Like the reference's ``unaligned`` dataset: length ``max(|A|, |B|)``, item ``i`` takes
``A[i % |A|]`` and a B image drawn at random, each randomly cropped to ``crop_size`` and
flipped, scaled to [-1, 1]. The prepared data is already at ``load_size``, so nothing is
resized here.

Randomness comes from a generator seeded by ``(seed, epoch, index)``, not from global state,
so an item is the same whatever worker process or DDP rank loads it: a run is reproducible
for a seed and resumes exactly. Call :meth:`set_epoch` at each epoch (as with
``DistributedSampler``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cyclegan.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# Decoded images are kept in memory when the split is at most this large (the embedded
# dataset is a few MB); bigger datasets are decoded per item by the loader workers.
PRELOAD_LIMIT_BYTES = 1 << 30


def list_images(folder: str | Path) -> list[Path]:
    """Image files of ``folder`` in sorted order (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def load_rgb(path: str | Path) -> np.ndarray:
    """An image as an ``HxWx3`` uint8 array. Callers read prepared data, which ``prepare``
    validated: a file that no longer reads was damaged or replaced since (a DataError)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises many types for a damaged file
        raise DataError(
            f"{path} is not a readable image ({(str(e).splitlines() or [''])[0][:120]})",
            "restore it or re-run `cyclegan prepare`, which checks every image",
        ) from None


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """``HxWx3`` uint8 -> ``3xHxW`` float in [-1, 1] (the reference's Normalize(0.5, 0.5))."""
    # A copy: crops and flips are views of cached (read-only) arrays.
    t = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()
    return t.div_(127.5).sub_(1.0)


class UnpairedDataset(Dataset):
    """``root/{phase}A`` and ``root/{phase}B`` as unpaired training items.

    Items are dicts ``{"A": 3xHxW, "B": 3xHxW, "A_path": str, "B_path": str}``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        crop_size: int,
        flip: bool = True,
        seed: int = 0,
        phase: str = "train",
        preload: bool | None = None,
    ) -> None:
        root = Path(root)
        self.a_paths = list_images(root / f"{phase}A")
        self.b_paths = list_images(root / f"{phase}B")
        for name, paths in ((f"{phase}A", self.a_paths), (f"{phase}B", self.b_paths)):
            if not paths:
                raise DataError(
                    f"no images in {root / name}",
                    "run `cyclegan prepare` (or check --prepared-dir)",
                )
        self.crop_size, self.flip, self.seed = crop_size, flip, seed
        self.epoch = 0
        if preload is None:
            first = load_rgb(self.a_paths[0])
            est = first.nbytes * (len(self.a_paths) + len(self.b_paths))
            preload = est <= PRELOAD_LIMIT_BYTES
        self._a_cache: list[np.ndarray] | None = None
        self._b_cache: list[np.ndarray] | None = None
        if preload:
            self._a_cache = [load_rgb(p) for p in self.a_paths]
            self._b_cache = [load_rgb(p) for p in self.b_paths]
        self._check_size(self._a_cache[0] if self._a_cache else load_rgb(self.a_paths[0]))

    def _check_size(self, img: np.ndarray) -> None:
        h, w = img.shape[:2]
        if min(h, w) < self.crop_size:
            raise DataError(
                f"prepared images are {w}x{h}, smaller than train.crop_size={self.crop_size}",
                "lower train.crop_size or raise data.load_size and re-run prepare",
            )

    def __len__(self) -> int:
        return max(len(self.a_paths), len(self.b_paths))

    def set_epoch(self, epoch: int) -> None:
        """Vary crops, flips and B draws per epoch, reproducibly."""
        self.epoch = epoch

    def _image(self, which: str, i: int) -> np.ndarray:
        cache = self._a_cache if which == "A" else self._b_cache
        if cache is not None:
            return cache[i]
        paths = self.a_paths if which == "A" else self.b_paths
        return load_rgb(paths[i])

    def _augment(self, img: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        h, w = img.shape[:2]
        c = self.crop_size
        top = int(rng.integers(0, h - c + 1))
        left = int(rng.integers(0, w - c + 1))
        img = img[top : top + c, left : left + c]
        if self.flip and rng.random() < 0.5:
            img = img[:, ::-1]
        return to_tensor(img)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        ia = index % len(self.a_paths)
        ib = int(rng.integers(0, len(self.b_paths)))
        return {
            "A": self._augment(self._image("A", ia), rng),
            "B": self._augment(self._image("B", ib), rng),
            "A_path": str(self.a_paths[ia]),
            "B_path": str(self.b_paths[ib]),
        }


class ImageFolderDataset(Dataset):
    """Every image of one folder, whole, as ``(3xHxW in [-1,1], file name)`` (evaluation)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        p = self.paths[index]
        return to_tensor(load_rgb(p)), p.name
