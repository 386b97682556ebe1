"""``cyclegan train``: the training loop, from params to model folder, checkpoints and MLflow.

Read :func:`train` top to bottom: DDP is decided once (:mod:`cyclegan.train.distributed`),
rank 0 (``master``) alone logs, writes files and talks to MLflow, and the step itself is
:func:`cyclegan.train.step.train_step`.

Definitions used everywhere (logs, MLflow, CSV, checkpoints):

* **step** - one iteration: one Adam step for the generators and one for the
  discriminators, on ``train.batch_size`` images per rank (``batch_size x world_size``
  images in all). Step 1 is the first iteration.
* **epoch** - one pass of the sampler over ``max(|A|, |B|)`` items, split across ranks; the
  last incomplete batch of each rank is dropped (none at batch size 1).
* **loss values** - the mean over the ``train.log_every`` steps before a log point and over
  all ranks, read back from the device only at log points (the one host sync of the loop).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cyclegan import tracking
from cyclegan.config import Config, TrainConfig
from cyclegan.data.dataset import UnpairedDataset
from cyclegan.errors import ConfigError, CycleGANError
from cyclegan.log import progress_enabled
from cyclegan.models import GeneratorSpec, save_generators
from cyclegan.paths import Paths
from cyclegan.train import checkpoint as ckpt
from cyclegan.train import distributed
from cyclegan.train.distributed import DistInfo
from cyclegan.train.loader import make_loader
from cyclegan.train.outputs import (
    append_loss_row,
    sample_batch,
    save_png,
    translation_grid,
    write_json,
    write_loss_csv,
)
from cyclegan.train.step import LOSS_NAMES, NET_NAMES, CycleGAN, train_step

log = logging.getLogger("cyclegan.train")

SAMPLE_ROWS = 4


class NonFiniteLossError(CycleGANError):
    """A loss became NaN or infinite: training stopped, the last good checkpoint kept."""


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0  # 0-based epoch in progress
    batches_done: int = 0  # batches of that epoch already trained (per rank)
    train_seconds: float = 0.0  # time spent in the loop, all sessions together
    history: list[list[float]] = field(default_factory=list)  # loss CSV rows
    last: dict[str, float] = field(default_factory=dict)  # values at the last log point


def train(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Train CycleGAN on ``paths.prepared``; resume from ``paths.checkpoints`` if allowed.

    Single process, or one DDP rank under torchrun. Rank 0 writes the model folder
    (``paths.model``), ``metrics/train.json``, ``plots/train_loss.csv``, sample grids and the
    MLflow run. Returns the training summary (what train.json holds) on every rank.
    """
    tc = cfg.train
    _validate(tc)
    dist = distributed.setup(tc.device)  # the one place DDP is decided
    try:
        return _train(cfg, paths, dist)
    finally:
        distributed.teardown(dist)


def _train(cfg: Config, paths: Paths, dist: DistInfo) -> dict[str, Any]:
    tc = cfg.train
    master = dist.master_process
    hooks = _TestHooks.from_env(dist.rank)

    # -- The tracking store is checked before any work, so a wrong URI fails in seconds. --
    uri = tracking.tracking_uri(cfg.mlflow)
    if master:
        tracking.ensure_reachable(uri)
    _configure_torch(tc, dist.device)

    # -- Data: every rank reads its own share; the order is a function of (seed, epoch). --
    dataset = UnpairedDataset(paths.prepared, crop_size=tc.crop_size, flip=tc.flip, seed=tc.seed)
    loader, sampler, steps_per_epoch = make_loader(
        dataset, dist, batch_size=tc.batch_size, num_workers=tc.num_workers, seed=tc.seed
    )
    global_batch = tc.batch_size * dist.world_size
    if tc.epochs + tc.epochs_decay > 0:
        total_epochs = tc.epochs + tc.epochs_decay
    else:  # max_steps alone (the config allows it): as many epochs as that takes
        total_epochs = math.ceil(tc.max_steps / steps_per_epoch)  # type: ignore[operator]
    target = total_epochs * steps_per_epoch
    if tc.max_steps is not None:
        target = min(target, tc.max_steps)

    # -- Resume or start fresh: rank 0 decides and sends the checkpoint to every rank. --
    settings = ckpt.fingerprint_settings(cfg, dist.world_size, ckpt.data_identity(paths.prepared))
    fingerprint = ckpt.fingerprint(settings)
    state = ckpt.resolve_resume(paths.checkpoints, tc.resume, settings) if master else None
    state = distributed.broadcast(dist, state)

    # Nothing in training draws from the global generators (the init, the pools and the data
    # order have their own), but seeding them keeps any incidental use reproducible too.
    ckpt.seed_everything(tc.seed + dist.rank)
    model = CycleGAN(tc, dist)
    progress = Progress()
    mlflow_ids: dict[str, str] = {}
    rng = None
    if state is not None:
        model.load_state_dict(state["model"])
        model.load_pool_state(state["ranks"][dist.rank]["pools"])
        rng = state["ranks"][dist.rank]["rng"]
        progress = Progress(**state["progress"])
        mlflow_ids = dict(state.get("mlflow") or {})
    del state  # the optimizers hold copies; free the rest

    run_ctx = _RunContext(
        cfg, paths, dist, fingerprint, settings, steps_per_epoch, global_batch, target
    )
    if progress.step >= target:
        # Finished before with these settings: re-emit the outputs, train nothing.
        if master:
            log.info("training already complete at step %d; writing its outputs", progress.step)
            run_ctx.write_outputs(model, progress, mlflow_ids)
        return run_ctx.summary(progress)

    # -- MLflow (rank 0): a new run, or the same run again when resuming. --
    run = _MlflowRun.open(cfg, paths, uri, mlflow_ids, fingerprint) if master else None
    if run is not None:
        mlflow_ids = run.ids
        tracking.write_run_file(paths.run_file, run.run_id, run.experiment_id, uri)
    samples = sample_batch(paths.prepared, tc.crop_size, SAMPLE_ROWS) if master else None
    if master:
        if progress.step:
            log.info("resuming from step %d (epoch %d)", progress.step, progress.epoch + 1)
        write_loss_csv(paths.plots / "train_loss.csv", progress.history)
        log.info(
            "training %d steps (%d per epoch, %d epochs) on %s x %d, %d image(s) per step",
            target - progress.step,
            steps_per_epoch,
            total_epochs,
            dist.device,
            dist.world_size,
            global_batch,
        )

    # -- The loop. --
    if rng is not None:  # last, so that nothing in the set-up above draws from it
        ckpt.set_rng_state(rng)
    loss_sum = torch.zeros(len(LOSS_NAMES), device=dist.device)
    steps_since_log = 0
    session_start = t_log = time.perf_counter()
    seconds_before = progress.train_seconds
    start_step = progress.step
    bar = _progress_bar(target, progress.step) if master else None
    last_saved = progress.step
    try:
        while progress.step < target:
            sampler.set_epoch(progress.epoch, skip=progress.batches_done * tc.batch_size)
            for batch in loader:
                real_A, real_B = model.to_input(batch["A"]), model.to_input(batch["B"])
                loss_sum += train_step(model, real_A, real_B)
                progress.step += 1
                progress.batches_done += 1
                steps_since_log += 1
                step = progress.step
                hooks.after_step(step)
                if bar is not None:
                    bar.update(1)

                if step % tc.log_every == 0 or step == target:
                    # The only host sync: mean losses over the interval and over all ranks.
                    means = distributed.all_reduce_mean(dist, loss_sum / steps_since_log)
                    values = dict(zip(LOSS_NAMES, means.tolist(), strict=True))
                    now = time.perf_counter()
                    values["lr"] = model.lr()
                    values["img_per_s"] = steps_since_log * global_batch / max(now - t_log, 1e-9)
                    bad = [k for k, v in values.items() if not math.isfinite(v)]
                    if bad:
                        raise NonFiniteLossError(
                            f"{bad[0]} is {values[bad[0]]} at step {step}: training stopped; "
                            f"the last good checkpoint (step {last_saved}) is kept",
                            "lower train.lr, or use precision fp32",
                        )
                    loss_sum.zero_()
                    steps_since_log, t_log = 0, now
                    if master:
                        run_ctx.log_point(progress, values, run, bar)

                if master and step % tc.sample_every == 0 and step != target:
                    run_ctx.sample(model, samples, run, step)

                end_of_epoch = progress.batches_done == steps_per_epoch
                if step % tc.checkpoint_every == 0 and not end_of_epoch and step != target:
                    progress.train_seconds = seconds_before + time.perf_counter() - session_start
                    run_ctx.checkpoint(model, progress, loss_sum, mlflow_ids)
                    last_saved = step
                if step >= target:
                    break

            if progress.batches_done == steps_per_epoch:
                model.end_epoch()  # the learning-rate schedule moves once per epoch
                progress.epoch += 1
                progress.batches_done = 0
            progress.train_seconds = seconds_before + time.perf_counter() - session_start
            # A checkpoint at every epoch end and at the last step.
            run_ctx.checkpoint(model, progress, loss_sum, mlflow_ids)
            last_saved = progress.step
        if bar is not None:
            bar.close()

        # -- The end: every rank must hold the same weights; rank 0 writes the outputs. --
        session_seconds = time.perf_counter() - session_start
        run_ctx.check_ranks_agree(model, hooks)
        if master:
            images = (progress.step - start_step) * global_batch
            log.info(
                "trained %d steps in %.1fs (%.1f img/s)",
                progress.step - start_step,
                session_seconds,
                images / max(session_seconds, 1e-9),
            )
            run_ctx.write_outputs(model, progress, mlflow_ids, samples=samples, run=run)
    except BaseException as e:
        if bar is not None:
            bar.close()
        if run is not None:
            run.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if run is not None:
        run.end("FINISHED")
    return run_ctx.summary(progress)


# ---------------------------------------------------------------------------------------------
# Pieces of the loop that only rank 0 runs (and the checkpoint, which every rank joins)
# ---------------------------------------------------------------------------------------------


@dataclass
class _RunContext:
    cfg: Config
    paths: Paths
    dist: DistInfo
    fingerprint: str
    settings: dict[str, Any]
    steps_per_epoch: int
    global_batch: int
    target: int

    def log_point(
        self, progress: Progress, values: dict[str, float], run: _MlflowRun | None, bar: Any
    ) -> None:
        epoch = progress.epoch + progress.batches_done / self.steps_per_epoch
        row = [float(progress.step), epoch, *(values[k] for k in (*LOSS_NAMES, "lr", "img_per_s"))]
        progress.history.append(row)
        progress.last = dict(values)
        append_loss_row(self.paths.plots / "train_loss.csv", row)
        if run is not None:
            run.logger.log_metrics(progress.step, values)
        short = {k.removeprefix("loss_"): v for k, v in values.items() if k != "lr"}
        if bar is not None:
            bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()}, refresh=False)
        else:
            log.info(
                "step %d/%s epoch %.2f  %s  lr %.3g",
                progress.step,
                self.target,
                epoch,
                " ".join(f"{k} {v:.4g}" for k, v in short.items()),
                values["lr"],
            )

    def sample(
        self,
        model: CycleGAN,
        samples: tuple[torch.Tensor, torch.Tensor] | None,
        run: _MlflowRun | None,
        step: int,
    ) -> Path | None:
        """Write a translation grid; queue it for MLflow under samples/."""
        if samples is None:
            return None
        grid = translation_grid(model, *samples)
        path = save_png(grid, self.paths.plots / "train_samples.png")
        if run is not None:
            tmp = save_png(grid, Path(run.tmpdir.name) / f"step_{step:08d}.png")
            run.logger.log_artifacts([(tmp, "samples")], remove_after=True)
        return path

    def checkpoint(
        self,
        model: CycleGAN,
        progress: Progress,
        loss_sum: torch.Tensor,
        mlflow_ids: dict[str, str],
    ) -> None:
        """Save the full state (every rank contributes its pools and RNG; rank 0 writes).

        Refuses to save NaN/inf: the decision is agreed by all ranks (one collective).
        """
        ok = torch.isfinite(loss_sum).all().float() * float(model.weights_finite())
        if distributed.all_reduce_mean(self.dist, ok.reshape(1)).item() < 1.0:
            raise NonFiniteLossError(
                f"NaN or inf in the losses or weights at step {progress.step}: training stopped; "
                "the last good checkpoint is kept",
                "lower train.lr, or use precision fp32",
            )
        per_rank = distributed.gather(
            self.dist, {"pools": model.pool_state(), "rng": ckpt.rng_state()}
        )
        if not self.dist.master_process:
            return
        state = {
            "format": ckpt.FORMAT,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "config": self.cfg.to_dict(),
            "model": model.state_dict(),
            "ranks": per_rank,
            "progress": {
                "step": progress.step,
                "epoch": progress.epoch,
                "batches_done": progress.batches_done,
                "train_seconds": progress.train_seconds,
                "history": [list(r) for r in progress.history],
                "last": dict(progress.last),
            },
            "mlflow": dict(mlflow_ids),
        }
        path = ckpt.save(state, ckpt.checkpoint_path(self.paths.checkpoints, progress.step))
        ckpt.prune(self.paths.checkpoints, self.cfg.train.keep_checkpoints)
        log.debug("checkpoint %s", path)

    def summary(self, progress: Progress) -> dict[str, Any]:
        """What metrics/train.json holds (numbers only, for ``dvc metrics``)."""
        images = progress.step * self.global_batch
        out: dict[str, Any] = {
            "steps": progress.step,
            "target_steps": self.target,
            "epochs": round(progress.step / self.steps_per_epoch, 4),
            "images_seen": images,
            "global_batch": self.global_batch,
            "world_size": self.dist.world_size,
            "train_seconds": round(progress.train_seconds, 2),
            "img_per_s": round(images / progress.train_seconds, 3)
            if progress.train_seconds > 0
            else 0.0,
        }
        out.update({k: v for k, v in progress.last.items() if k != "img_per_s"})
        return out

    def write_outputs(
        self,
        model: CycleGAN,
        progress: Progress,
        mlflow_ids: dict[str, str],
        *,
        samples: tuple[torch.Tensor, torch.Tensor] | None = None,
        run: _MlflowRun | None = None,
    ) -> None:
        """The model folder, run.json, train.json, the loss CSV and the last sample grid; with
        an open MLflow run, also the final grid and the model folder as artifacts."""
        tc, paths = self.cfg.train, self.paths
        spec = GeneratorSpec.from_train_config(tc)
        extra = {
            "train": self.cfg.to_dict()["train"],
            "run_id": mlflow_ids.get("run_id"),
            "step": progress.step,
            "fingerprint": self.fingerprint,
        }
        save_generators(paths.model, model.nets["G_A"], model.nets["G_B"], spec, extra=extra)
        if mlflow_ids.get("run_id"):
            tracking.write_run_file(
                paths.run_file,
                mlflow_ids["run_id"],
                mlflow_ids.get("experiment_id", ""),
                mlflow_ids.get("tracking_uri", ""),
            )
        write_json(paths.metrics / "train.json", self.summary(progress))
        write_loss_csv(paths.plots / "train_loss.csv", progress.history)
        if samples is None:
            samples = sample_batch(paths.prepared, tc.crop_size, SAMPLE_ROWS)
        self.sample(model, samples, run, progress.step)
        if run is not None:
            run.logger.log_artifacts([(paths.model, "model")])

    def check_ranks_agree(self, model: CycleGAN, hooks: _TestHooks) -> None:
        """Every rank must end with the same weights (DDP averages gradients; a difference
        means a bug or bad hardware). Cheap: one digest per rank, once."""
        digest = weights_digest({n: net.state_dict() for n, net in model.nets.items()})
        hooks.write_digest(digest)
        digests = distributed.gather(self.dist, digest)
        if self.dist.master_process and digests and len(set(digests)) > 1:
            raise CycleGANError(f"ranks ended with different weights: {digests}")


@dataclass
class _MlflowRun:
    client: Any
    run_id: str
    experiment_id: str
    uri: str
    logger: tracking.BackgroundLogger
    tmpdir: tempfile.TemporaryDirectory
    monitor: Any = None

    @property
    def ids(self) -> dict[str, str]:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "tracking_uri": tracking.redact_uri(self.uri),
        }

    @classmethod
    def open(
        cls, cfg: Config, paths: Paths, uri: str, previous: dict[str, str], fingerprint: str
    ) -> _MlflowRun:
        """A new run with every parameter and the provenance tags, or, on resume, the run
        the checkpoint names (if this store still has it)."""
        c = tracking.client(uri)
        exp_id = tracking.get_or_create_experiment(c, cfg.mlflow.experiment)
        run_id, existing = previous.get("run_id"), None
        if run_id:
            try:
                existing = c.get_run(run_id)
                if existing.info.lifecycle_stage == "deleted":
                    existing = None
            except Exception:
                existing = None
            if existing is None:
                log.warning(
                    "MLflow run %s of the checkpoint is not in %s; starting a new run",
                    run_id,
                    tracking.redact_uri(uri),
                )
        tags = {**tracking.provenance_tags(paths.prepared), "cyclegan.fingerprint": fingerprint}
        params = tracking.params_of(cfg)
        if existing is None:
            run = c.create_run(exp_id, run_name=cfg.mlflow.run_name, tags=tags)
            run_id = run.info.run_id
            tracking.log_params(c, run_id, params)
            resumed = False
        else:
            run_id = existing.info.run_id
            exp_id = existing.info.experiment_id
            c.update_run(run_id, status="RUNNING")
            for k, v in tags.items():
                c.set_tag(run_id, k, v)
            # MLflow refuses to change a logged param: add only new ones (the changed ones
            # are bookkeeping settings outside the fingerprint, e.g. log_every).
            old = existing.data.params
            tracking.log_params(c, run_id, {k: v for k, v in params.items() if k not in old})
            resumed = True
        log.info("MLflow run %s in %s", run_id, tracking.redact_uri(uri))
        monitor = None
        if cfg.mlflow.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, tracking_uri=uri, resume_logging=resumed)
            monitor.start()
        return cls(
            client=c,
            run_id=run_id,
            experiment_id=exp_id,
            uri=uri,
            logger=tracking.BackgroundLogger(c, run_id),
            tmpdir=tempfile.TemporaryDirectory(prefix="cyclegan-samples-"),
            monitor=monitor,
        )

    def end(self, status: str) -> None:
        """Mark the run ended, send what is queued, report what could not be sent."""
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self.monitor.finish()
        self.logger.call(lambda: self.client.set_terminated(self.run_id, status), "end run")
        lost = self.logger.close(unhealthy_timeout=30.0 if status == "FINISHED" else 5.0)
        if any(lost.values()):
            log.warning("MLflow: not everything was recorded (%s)", lost)
        self.tmpdir.cleanup()


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _validate(tc: TrainConfig) -> None:
    if tc.crop_size % 4:
        raise ConfigError(
            f"train.crop_size = {tc.crop_size} is not a multiple of 4",
            "the generator downsamples twice by 2; use e.g. 32, 128 or 256",
        )
    smallest = min_crop_for_discriminator(tc.n_layers_D)
    if tc.crop_size < smallest:
        raise ConfigError(
            f"train.crop_size = {tc.crop_size} is too small for a PatchGAN with "
            f"n_layers_D = {tc.n_layers_D}",
            f"use train.crop_size >= {smallest} or fewer discriminator layers",
        )


def min_crop_for_discriminator(n_layers: int) -> int:
    """The smallest multiple of 4 whose PatchGAN maps keep more than one element at every
    instance norm (the norm is undefined on a single value)."""
    crop = 4
    while True:
        side = crop
        for _ in range(n_layers):  # stride-2 convs, kernel 4, padding 1
            side = (side - 2) // 2 + 1
        if side - 1 >= 2:  # the stride-1 conv's normed map, then the 1-channel output
            return crop
        crop += 4


def _configure_torch(tc: TrainConfig, device: torch.device) -> None:
    if device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest convolution algorithms once.
        torch.backends.cudnn.benchmark = True
        # TF32 for float32 convolutions/matmuls only when asked: fp32 stays fp32 by default.
        torch.backends.cudnn.allow_tf32 = tc.tf32
        torch.backends.cuda.matmul.allow_tf32 = tc.tf32


def _progress_bar(total: int, initial: int) -> Any:
    if not progress_enabled():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)


def weights_digest(nets: dict[str, dict[str, torch.Tensor]]) -> str:
    """sha256 over the four networks' state dicts (``{"G_A": state_dict, ...}``)."""
    h = hashlib.sha256()
    for name in NET_NAMES:
        for key, t in nets[name].items():
            h.update(f"{name}.{key}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class _TestHooks:
    """Test-only fault injection, driven by environment variables that no user sets:

    * ``CYCLEGAN_TEST_FAIL_AT=RANK:STEP`` - that rank raises after that step (DDP failure test);
    * ``CYCLEGAN_TEST_KILL_AT_STEP=STEP`` - the process SIGKILLs itself after that step
      (kill-and-resume test, without a race against a polling test);
    * ``CYCLEGAN_TEST_DIGEST_DIR=DIR`` - every rank writes its final weights' digest there
      (to check that all ranks end identical).
    """

    rank: int
    fail_step: int | None = None
    kill_step: int | None = None
    digest_dir: str | None = None

    @classmethod
    def from_env(cls, rank: int) -> _TestHooks:
        hooks = cls(rank=rank, digest_dir=os.environ.get("CYCLEGAN_TEST_DIGEST_DIR"))
        fail = os.environ.get("CYCLEGAN_TEST_FAIL_AT")
        if fail:
            fail_rank, fail_step = (int(x) for x in fail.split(":"))
            hooks.fail_step = fail_step if fail_rank == rank else None
        kill = os.environ.get("CYCLEGAN_TEST_KILL_AT_STEP")
        hooks.kill_step = int(kill) if kill else None
        return hooks

    def after_step(self, step: int) -> None:
        if step == self.fail_step:
            raise RuntimeError(f"test-injected failure on rank {self.rank} at step {step}")
        if step == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def write_digest(self, digest: str) -> None:
        if self.digest_dir:
            Path(self.digest_dir, f"rank{self.rank}.sha256").write_text(digest)
