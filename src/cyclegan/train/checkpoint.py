"""Full-state checkpoints: written atomically, the last K kept, loaded without executing code.

A checkpoint is a ``torch.save`` of plain containers and tensors only (so
``torch.load(weights_only=True)`` reads it): the four networks, both optimizers and
schedulers, the image pools of every rank, every RNG state, the position in the data
(epoch and batches done in it), the loss history, the config, the MLflow run id and the
*fingerprint* of the settings that define the training run.

The fingerprint decides whether a checkpoint may be resumed: it covers every ``train`` key
that changes what is trained (model, losses, optimiser, schedule, data order and
augmentation, seed), the number of ranks (the global batch and the data split) and the
identity of the prepared data. It leaves out how the same maths is computed (``device``,
``precision``, ``tf32``, ``channels_last``, ``compile``, ``num_workers``) and bookkeeping
(``max_steps``, ``log_every``, ``sample_every``, ``checkpoint_every``, ``keep_checkpoints``,
``resume``, ``nproc_per_node`` - the resolved world size is in).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cyclegan.config import Config
from cyclegan.data.dataset import list_images
from cyclegan.errors import CheckpointError, CycleGANError
from cyclegan.fsio import atomic_write
from cyclegan.log import redact_values
from cyclegan.train import distributed

if TYPE_CHECKING:
    from cyclegan.train.distributed import DistInfo
    from cyclegan.train.step import CycleGAN

log = logging.getLogger("cyclegan.train")

FORMAT = 1
_NAME = re.compile(r"^step_(\d{8,})\.pt$")

# train keys that do not change the trajectory, only how or how verbosely it is computed.
NOT_FINGERPRINTED = frozenset(
    {
        "max_steps",
        "device",
        "precision",
        "tf32",
        "channels_last",
        "compile",
        "nproc_per_node",
        "num_workers",
        "log_every",
        "sample_every",
        "checkpoint_every",
        "keep_checkpoints",
        "resume",
    }
)


class NonFiniteLossError(CycleGANError):
    """A loss became NaN or infinite: training stopped, the last good checkpoint kept."""


# ---------------------------------------------------------------------------------------------
# What a checkpoint holds
# ---------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0  # 0-based epoch in progress
    batches_done: int = 0  # batches of that epoch already trained (per rank)
    train_seconds: float = 0.0  # time spent in the loop, all sessions together
    history: list[list[float]] = field(default_factory=list)  # loss CSV rows
    last: dict[str, float] = field(default_factory=dict)  # values at the last log point
    steps_since_log: int = 0  # steps in the open loss window (a stop mid-window)


@dataclass
class Resumed:
    """What a checkpoint gives back besides the model's own state."""

    progress: Progress
    rng: dict[str, Any]  # this rank's random states, set just before the first step
    loss_sum: torch.Tensor | None  # this rank's open loss window (None in older checkpoints)
    mlflow: dict[str, str]  # the run to continue
    threads: int | None  # intra-op threads it was written with


def restore(model: CycleGAN, state: dict[str, Any], rank: int) -> Resumed:
    """Load ``state`` into ``model`` (networks, optimizers, schedulers, this rank's pools);
    return the rest."""
    model.load_state_dict(state["model"])
    mine = state["ranks"][rank]
    model.load_pool_state(mine["pools"])
    return Resumed(
        progress=Progress(**state["progress"]),
        rng=mine["rng"],
        loss_sum=mine.get("loss_sum"),
        mlflow=dict(state.get("mlflow") or {}),
        threads=state.get("threads"),
    )


def save_state(
    folder: str | Path,
    model: CycleGAN,
    progress: Progress,
    loss_sum: torch.Tensor,
    dist: DistInfo,
    *,
    cfg: Config,
    settings: dict[str, Any],
    mlflow_ids: dict[str, str],
    threads: int,
) -> Path | None:
    """Save the full training state at ``progress.step``: every rank contributes its pools,
    RNG and open loss window; rank 0 writes the file and keeps the newest
    ``train.keep_checkpoints``. Every rank must call it (it has collectives). NaN or inf in the
    losses or weights is refused by all ranks together: the newest checkpoint stays good."""
    ok = torch.isfinite(loss_sum).all().float() * float(model.weights_finite())
    if distributed.all_reduce_mean(dist, ok.reshape(1)).item() < 1.0:
        raise NonFiniteLossError(
            f"NaN or inf in the losses or weights at step {progress.step}: training stopped; "
            "the last good checkpoint is kept",
            "lower train.lr, or use precision fp32",
        )
    per_rank = distributed.gather(
        dist,
        {
            "pools": model.pool_state(),
            "rng": rng_state(),
            "loss_sum": loss_sum.detach().cpu().clone(),
        },
    )
    if not dist.master_process:
        return None
    state = {
        "format": FORMAT,
        "fingerprint": fingerprint(settings),
        "settings": settings,
        "config": redact_values(cfg.to_dict()),  # data.source may be a signed URL
        "model": model.state_dict(),
        "ranks": per_rank,
        "progress": asdict(progress),
        "mlflow": dict(mlflow_ids),
        # Exact resume needs the same intra-op thread count (float reduction order).
        "threads": threads,
    }
    path = save(state, checkpoint_path(folder, progress.step))
    prune(folder, cfg.train.keep_checkpoints)
    log.debug("checkpoint %s", path)
    return path


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------


def data_identity(prepared: str | Path) -> str:
    """A short hash naming the training data: its manifest if ``prepare`` wrote one, else the
    names and sizes of the trainA/trainB files."""
    prepared = Path(prepared)
    h = hashlib.sha256()
    manifest = prepared / "manifest.json"
    if manifest.is_file():
        h.update(manifest.read_bytes())
    else:
        for split in ("trainA", "trainB"):
            for p in list_images(prepared / split):
                h.update(f"{split}/{p.name}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def fingerprint_settings(cfg: Config, world_size: int, data_id: str) -> dict[str, Any]:
    """The settings a checkpoint must share with the current run to be resumed."""
    settings = {
        f"train.{k}": v for k, v in cfg.to_dict()["train"].items() if k not in NOT_FINGERPRINTED
    }
    settings["world_size"] = world_size
    settings["data"] = data_id
    return settings


def fingerprint(settings: dict[str, Any]) -> str:
    """12 hex digits identifying ``settings``."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["train.ngf: 8 -> 16", ...]`` for the settings that differ."""
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}"
        for k in keys
        if old.get(k) != new.get(k)
    ]


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def checkpoint_path(folder: str | Path, step: int) -> Path:
    """``folder/step_00001234.pt``."""
    return Path(folder) / f"step_{step:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files directly in ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`cyclegan.fsio.atomic_write`): a crash
    at any moment leaves either the previous file or the complete new one; a full disk is a
    one-line error that keeps the previous checkpoints."""
    return atomic_write(path, lambda fh: torch.save(state, fh))


def prune(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of this run (stale-* folders untouched)."""
    for p in list_checkpoints(folder)[:-keep]:
        p.unlink(missing_ok=True)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without executing any code from it (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this version (format {FORMAT})")
    return state


def move_aside(folder: str | Path, old_fingerprint: str) -> Path:
    """Move this folder's checkpoints into ``folder/stale-<fingerprint>-<n>/`` (a new n each
    time: nothing is ever overwritten or deleted)."""
    folder = Path(folder)
    n = 1
    while (dest := folder / f"stale-{old_fingerprint}-{n}").exists():
        n += 1
    dest.mkdir()
    for p in list_checkpoints(folder):
        shutil.move(str(p), dest / p.name)
    return dest


# ---------------------------------------------------------------------------------------------
# The resume decision
# ---------------------------------------------------------------------------------------------


def latest_readable(folder: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads (an unreadable one is reported and skipped)."""
    for p in reversed(list_checkpoints(folder)):
        try:
            return load(p)
        except CheckpointError as e:
            log.warning("skipping %s", e)
    return None


def resolve_resume(
    folder: str | Path, mode: str, settings: dict[str, Any]
) -> dict[str, Any] | None:
    """Apply ``train.resume`` to the checkpoints in ``folder``.

    Returns the checkpoint to resume from, or None to start fresh. ``auto``: the newest
    checkpoint if its fingerprint matches, else the old checkpoints go to ``stale-*/``;
    ``never``: always fresh (old ones moved aside); ``always``: resume or raise
    :class:`CheckpointError` naming what differs.
    """
    folder = Path(folder)
    want = fingerprint(settings)
    if not list_checkpoints(folder):
        if mode == "always":
            raise CheckpointError(
                f"train.resume=always but there is no checkpoint in {folder}",
                "train once first, or set train.resume=auto",
            )
        return None
    state = latest_readable(folder)
    have = state["fingerprint"] if state else "unreadable"
    if state is not None and mode != "never" and have == want:
        return state
    if mode == "always":
        diff = differences(state["settings"], settings) if state else ["checkpoint unreadable"]
        raise CheckpointError(
            f"train.resume=always but the checkpoint in {folder} was made with other settings "
            f"({'; '.join(diff)})",
            "restore those settings, or set train.resume=auto to start fresh",
        )
    dest = move_aside(folder, have)
    why = "train.resume=never" if mode == "never" else "settings changed"
    if state is not None and mode != "never":
        why += f" ({'; '.join(differences(state['settings'], settings))})"
    log.info("%s: starting fresh; earlier checkpoints kept in %s", why, dest)
    return None


# ---------------------------------------------------------------------------------------------
# RNG state (as tensors and lists, for weights_only loading)
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global random state: torch CPU (and CUDA), numpy, Python."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def seed_everything(seed: int) -> None:
    """Seed the global torch (CPU and CUDA), numpy and Python generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
