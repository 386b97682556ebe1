"""What training leaves behind for people and for DVC: sample grids, the loss CSV, train.json."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cyclegan.data.dataset import list_images, load_rgb, to_tensor
from cyclegan.train.step import LOSS_NAMES, CycleGAN

CSV_COLUMNS = ("step", "epoch", *LOSS_NAMES, "lr", "img_per_s")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file and rename (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_loss_csv(path: str | Path, rows: Sequence[Sequence[float]]) -> None:
    """The whole loss history, one row per log point (rewritten, e.g. after a resume)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    w.writerows(_fmt(r) for r in rows)
    atomic_write_text(path, buf.getvalue())


def append_loss_row(path: str | Path, row: Sequence[float]) -> None:
    """Add one log point to the CSV written by :func:`write_loss_csv`."""
    with open(path, "a", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerow(_fmt(row))


def _fmt(row: Sequence[float]) -> list[str]:
    return [str(int(row[0])), *(f"{v:.6g}" for v in row[1:])]


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Pretty, sorted JSON, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Sample translation grids
# ---------------------------------------------------------------------------------------------


def sample_batch(prepared: str | Path, crop_size: int, n: int = 4) -> tuple[torch.Tensor, ...]:
    """Fixed images for the grids: the first ``n`` of testA/testB (trainA/trainB if there is
    no test split), centre-cropped to ``crop_size``, as two ``n x 3 x H x W`` batches."""
    prepared = Path(prepared)
    out = []
    for domain in ("A", "B"):
        files = list_images(prepared / f"test{domain}") or list_images(prepared / f"train{domain}")
        imgs = []
        for p in files[:n]:
            img = load_rgb(p)
            h, w = img.shape[:2]
            top, left = (h - crop_size) // 2, (w - crop_size) // 2
            imgs.append(to_tensor(img[top : top + crop_size, left : left + crop_size]))
        out.append(torch.stack(imgs))
    k = min(len(out[0]), len(out[1]))
    return out[0][:k], out[1][:k]


@torch.no_grad()
def translation_grid(model: CycleGAN, real_A: torch.Tensor, real_B: torch.Tensor) -> np.ndarray:
    """One row per sample: A, G_A(A), G_B(G_A(A)) | B, G_B(B), G_A(G_B(B)), as uint8 HxWx3.

    Uses the plain networks (not the compiled or DDP-wrapped ones): no recompilation for a
    new batch size, and no collective that the other ranks would have to join.
    """
    G_A, G_B = model.nets["G_A"], model.nets["G_B"]
    real_A, real_B = model.to_input(real_A), model.to_input(real_B)
    with model.autocast():
        fake_B = G_A(real_A)
        rec_A = G_B(fake_B)
        fake_A = G_B(real_B)
        rec_B = G_A(fake_A)
    cols = [real_A, fake_B, rec_A, real_B, fake_A, rec_B]
    tiles = torch.stack([c.float().cpu() for c in cols], 1)  # n x 6 x 3 x H x W
    n, k, _, h, w = tiles.shape
    pad = 2
    grid = torch.ones(3, n * (h + pad) + pad, k * (w + pad) + pad)
    for i in range(n):
        for j in range(k):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y : y + h, x : x + w] = tiles[i, j]
    img = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(1, 2, 0).numpy()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an HxWx3 uint8 array as PNG (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
