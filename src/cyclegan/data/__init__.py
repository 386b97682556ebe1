"""Unpaired data: sources, the built-in synthetic dataset, preparation and training input.

- :mod:`cyclegan.data.sources` — ``data.source`` resolved and fetched into ``data/raw``;
- :mod:`cyclegan.data.synthetic` — the built-in dataset with ground truth;
- :mod:`cyclegan.data.images` — decode, validate, convert one image;
- :mod:`cyclegan.data.prepare` — the ``prepare`` stage (layout + ``manifest.json``);
- :mod:`cyclegan.data.dataset` — :class:`UnpairedDataset` for training.

The dataset classes are imported lazily so that ``cyclegan prepare`` does not pay for torch.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "UnpairedDataset": "cyclegan.data.dataset",
    "ImageFolderDataset": "cyclegan.data.dataset",
    "list_images": "cyclegan.data.dataset",
    "load_rgb": "cyclegan.data.dataset",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cyclegan.data' has no attribute {name!r}")
