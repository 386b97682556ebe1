"""What training leaves behind for people and for DVC: the log lines, sample grids, the loss
CSV, train.json, the model folder, and what the MLflow run receives of them. Rank 0 alone
calls :class:`RunOutputs`."""

from __future__ import annotations

import csv
import io
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cyclegan import tracking
from cyclegan.config import Config
from cyclegan.data.dataset import list_images, load_rgb, to_tensor
from cyclegan.fsio import atomic_write, write_json
from cyclegan.log import progress_enabled
from cyclegan.models import GeneratorSpec, save_generators
from cyclegan.paths import Paths
from cyclegan.train import checkpoint as ckpt
from cyclegan.train.checkpoint import Progress
from cyclegan.train.step import LOSS_NAMES, CycleGAN

log = logging.getLogger("cyclegan.train")

SAMPLE_ROWS = 4

CSV_COLUMNS = ("step", "epoch", *LOSS_NAMES, "lr", "img_per_s")


def write_loss_csv(path: str | Path, rows: Sequence[Sequence[float]]) -> None:
    """The whole loss history, one row per log point (rewritten, e.g. after a resume)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    w.writerows(_fmt(r) for r in rows)
    atomic_write(path, buf.getvalue())


def append_loss_row(path: str | Path, row: Sequence[float]) -> None:
    """Add one log point to the CSV written by :func:`write_loss_csv`."""
    with open(path, "a", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerow(_fmt(row))


def _fmt(row: Sequence[float]) -> list[str]:
    return [str(int(row[0])), *(f"{v:.6g}" for v in row[1:])]


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
    return atomic_write(path, lambda fh: Image.fromarray(image).save(fh, format="PNG"))


# ---------------------------------------------------------------------------------------------
# Rank 0's outputs during and after training
# ---------------------------------------------------------------------------------------------


@dataclass
class RunOutputs:
    """Everything rank 0 writes or shows, for one training run."""

    cfg: Config
    paths: Paths
    steps_per_epoch: int
    global_batch: int
    target: int
    world_size: int = 1
    fingerprint: str = ""
    tflop_per_step: float = 0.0  # all ranks together
    peak_tflops: float | None = None  # all ranks together; None: MFU is not reported
    run: tracking.TrainingRun | None = None
    samples: tuple[torch.Tensor, ...] | None = None
    bar: Any = None

    def start(self, progress: Progress) -> None:
        """Before the first step: the fixed sample images, the loss CSV so far, a progress
        bar on a terminal."""
        self.samples = sample_batch(self.paths.prepared, self.cfg.train.crop_size, SAMPLE_ROWS)
        write_loss_csv(self.paths.plots / "train_loss.csv", progress.history)
        if progress_enabled():
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.target, initial=progress.step, unit="step", dynamic_ncols=True
            )

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log_point(self, progress: Progress, values: dict[str, float]) -> None:
        """One log point: the CSV row, the MLflow metrics, the log line or the bar."""
        epoch = progress.epoch + progress.batches_done / self.steps_per_epoch
        row = [float(progress.step), epoch, *(values[k] for k in (*LOSS_NAMES, "lr", "img_per_s"))]
        progress.history.append(row)
        progress.last = dict(values)
        append_loss_row(self.paths.plots / "train_loss.csv", row)
        if self.run is not None:
            self.run.logger.log_metrics(progress.step, values)
        losses = {k.removeprefix("loss_"): v for k, v in values.items() if k.startswith("loss_")}
        speed = f"{values['img_per_s']:.3g} img/s"
        if "mfu" in values:
            speed += f", MFU {values['mfu']:.1%}"
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)
            self.bar.set_description(speed, refresh=False)
        else:
            log.info(
                "step %d/%s epoch %.2f  %s  lr %.3g  %s",
                progress.step,
                self.target,
                epoch,
                " ".join(f"{k} {v:.4g}" for k, v in losses.items()),
                values["lr"],
                speed,
            )

    def sample(self, model: CycleGAN, step: int) -> None:
        """Write a translation grid; queue it for MLflow under samples/."""
        if self.samples is None:
            self.samples = sample_batch(self.paths.prepared, self.cfg.train.crop_size, SAMPLE_ROWS)
        grid = translation_grid(model, *self.samples)
        save_png(grid, self.paths.plots / "train_samples.png")
        if self.run is not None:
            tmp = save_png(grid, Path(self.run.tmpdir.name) / f"step_{step:08d}.png")
            self.run.logger.log_artifacts([(tmp, "samples")], remove_after=True)

    def stopped_message(self, signum: int, step: int) -> str:
        where = ckpt.checkpoint_path(self.paths.checkpoints, step)
        return (
            f"stopped by {signal.Signals(signum).name} at step {step} of {self.target}; the "
            f"full state is saved in {where}: run the same command to resume"
        )

    def summary(self, progress: Progress) -> dict[str, Any]:
        """What metrics/train.json holds (numbers only, for ``dvc metrics``)."""
        images = progress.step * self.global_batch
        seconds = progress.train_seconds
        out: dict[str, Any] = {
            "steps": progress.step,
            "target_steps": self.target,
            "epochs": round(progress.step / self.steps_per_epoch, 4),
            "images_seen": images,
            "global_batch": self.global_batch,
            "world_size": self.world_size,
            "train_seconds": round(seconds, 2),
            "img_per_s": round(images / seconds, 3) if seconds > 0 else 0.0,
        }
        if self.peak_tflops and seconds > 0:
            out["mfu"] = round(progress.step * self.tflop_per_step / seconds / self.peak_tflops, 5)
        out.update({k: v for k, v in progress.last.items() if k not in ("img_per_s", "mfu")})
        return out

    def write_final(self, model: CycleGAN, progress: Progress, mlflow_ids: dict[str, str]) -> None:
        """The model folder, run.json, train.json, the loss CSV and the last sample grid; with
        an open MLflow run, also the final grid and the model folder as artifacts."""
        spec = GeneratorSpec.from_train_config(self.cfg.train)
        extra = {
            "train": self.cfg.to_dict()["train"],
            "run_id": mlflow_ids.get("run_id"),
            "step": progress.step,
            "fingerprint": self.fingerprint,
        }
        save_generators(self.paths.model, model.nets["G_A"], model.nets["G_B"], spec, extra=extra)
        if mlflow_ids.get("run_id"):
            tracking.write_run_file(
                self.paths.run_file,
                mlflow_ids["run_id"],
                mlflow_ids.get("experiment_id", ""),
                mlflow_ids.get("tracking_uri", ""),
            )
        write_json(self.paths.metrics / "train.json", self.summary(progress))
        write_loss_csv(self.paths.plots / "train_loss.csv", progress.history)
        self.sample(model, progress.step)
        if self.run is not None:
            self.run.logger.log_artifacts([(self.paths.model, "model")])
