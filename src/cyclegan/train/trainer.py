"""``cyclegan train``: the training loop, from params to model folder, checkpoints and MLflow.

Read :func:`train` top to bottom: DDP is decided once (:mod:`cyclegan.train.distributed`),
rank 0 (``master``) alone logs, writes files and talks to MLflow
(:class:`~cyclegan.train.outputs.RunOutputs`, :class:`~cyclegan.tracking.TrainingRun`), the
step itself is :func:`cyclegan.train.step.train_step`, and a checkpoint is
:func:`cyclegan.train.checkpoint.save_state`.

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

import logging
import math
import os
import signal
import time
from typing import Any

import torch

from cyclegan import hardware, tracking
from cyclegan.config import Config, TrainConfig
from cyclegan.data.dataset import UnpairedDataset
from cyclegan.errors import CycleGANError, Stopped
from cyclegan.fsio import remove_stale_temp_files
from cyclegan.paths import Paths
from cyclegan.train import checkpoint as ckpt
from cyclegan.train import distributed
from cyclegan.train.checkpoint import NonFiniteLossError, Progress
from cyclegan.train.distributed import DistInfo
from cyclegan.train.loader import make_loader
from cyclegan.train.outputs import RunOutputs
from cyclegan.train.step import (
    LOSS_NAMES,
    CycleGAN,
    count_step_flops,
    resolve_precision,
    train_step,
)
from cyclegan.train.stop import StopRequest, control_group, stop_on_signals

log = logging.getLogger("cyclegan.train")

__all__ = ["NonFiniteLossError", "train"]


def train(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Train CycleGAN on ``paths.prepared``; resume from ``paths.checkpoints`` if allowed.

    Single process, or one DDP rank under torchrun. Rank 0 writes the model folder
    (``paths.model``), ``metrics/train.json``, ``plots/train_loss.csv``, sample grids and the
    MLflow run. Returns the training summary (what train.json holds) on every rank.
    """
    dist = distributed.setup(cfg.train.device)  # the one place DDP is decided
    try:
        with stop_on_signals() as stop:  # SIGTERM/SIGINT: finish the step, save, exit
            return _train(cfg, paths, dist, stop)
    except RuntimeError as e:
        if dist.enabled and distributed.peer_lost(e):
            # Another rank died (OOM-killed, crashed): its failure is the story, not ours.
            raise CycleGANError(
                f"rank {dist.rank} lost contact with the other ranks ({distributed.first_line(e)})",
                "another rank stopped first; the launcher's message says which and why",
            ) from None
        raise
    finally:
        distributed.teardown(dist)


def _train(cfg: Config, paths: Paths, dist: DistInfo, stop: StopRequest) -> dict[str, Any]:
    tc, master = cfg.train, dist.master_process

    # -- 1. The process: tracking store (checked first: a wrong URI fails in seconds),
    #       threads, precision, leftovers of a killed write. --
    uri = tracking.use(cfg.mlflow)
    if master:
        tracking.ensure_reachable(uri)
    threads = hardware.apply_threads(
        tc.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), tc.num_workers
    )
    _configure_torch(tc, dist.device)
    precision, why = resolve_precision(tc, dist.device)
    if master:
        log.info("precision %s (%s)", precision, why)
        for folder in (paths.checkpoints, paths.model):
            remove_stale_temp_files(folder)  # we hold the project lock
    control = control_group(dist)

    # -- 2. Data: every rank reads its own share; the order is a function of (seed, epoch). --
    dataset = UnpairedDataset(paths.prepared, crop_size=tc.crop_size, flip=tc.flip, seed=tc.seed)
    loader, sampler, steps_per_epoch = make_loader(
        dataset, dist, batch_size=tc.batch_size, num_workers=tc.num_workers, seed=tc.seed
    )
    # max_steps alone (no epochs) trains as many epochs as that takes.
    total_epochs = tc.epochs + tc.epochs_decay or math.ceil((tc.max_steps or 1) / steps_per_epoch)
    target = total_epochs * steps_per_epoch
    if tc.max_steps is not None:
        target = min(target, tc.max_steps)
    global_batch = tc.batch_size * dist.world_size

    # -- 3. Resume or start fresh: rank 0 decides and sends the checkpoint to every rank. --
    settings = ckpt.fingerprint_settings(cfg, dist.world_size, ckpt.data_identity(paths.prepared))
    fingerprint = ckpt.fingerprint(settings)
    state = ckpt.resolve_resume(paths.checkpoints, tc.resume, settings) if master else None
    state = distributed.broadcast(dist, state)
    # Nothing in training draws from the global generators (the init, the pools and the data
    # order have their own), but seeding them keeps any incidental use reproducible too.
    ckpt.seed_everything(tc.seed + dist.rank)
    model = CycleGAN(tc, dist)
    loss_sum = torch.zeros(len(LOSS_NAMES), device=dist.device)
    progress, mlflow_ids, rng = Progress(), {}, None
    if state is not None:
        resumed = ckpt.restore(model, state, dist.rank)
        progress, mlflow_ids, rng = resumed.progress, resumed.mlflow, resumed.rng
        if resumed.loss_sum is not None:
            loss_sum += resumed.loss_sum.to(dist.device)
        if master and resumed.threads not in (None, threads) and dist.device.type == "cpu":
            log.warning(
                "resuming with %d CPU threads; the checkpoint was written with %d: float "
                "reductions run in another order, so the weights will not be bit-identical to "
                "an uninterrupted run (set train.num_threads=%d for that)",
                threads,
                resumed.threads,
                resumed.threads,
            )
    del state  # the optimizers hold copies; free the rest

    peak, peak_source = hardware.peak_tflops(dist.device.type, threads, precision == "bf16")
    out = RunOutputs(
        cfg,
        paths,
        steps_per_epoch,
        global_batch,
        target,
        world_size=dist.world_size,
        fingerprint=fingerprint,
        tflop_per_step=count_step_flops(tc, tc.batch_size, tc.crop_size) * dist.world_size / 1e12,
        peak_tflops=peak * dist.world_size if peak else None,
    )

    def save() -> None:  # every rank joins: pools, RNG and loss windows come from all
        ckpt.save_state(
            paths.checkpoints,
            model,
            progress,
            loss_sum,
            dist,
            cfg=cfg,
            settings=settings,
            mlflow_ids=mlflow_ids,
            threads=threads,
        )

    if progress.step >= target:
        # Finished before with these settings: re-emit the outputs, train nothing.
        if master:
            log.info("training already complete at step %d; writing its outputs", progress.step)
            out.write_final(model, progress, mlflow_ids)
        return out.summary(progress)

    # -- 4. MLflow (rank 0): a new run, or the same run again when resuming. --
    if master:
        out.run = tracking.TrainingRun.open(cfg, paths, uri, mlflow_ids, fingerprint)
    try:
        if out.run is not None:
            mlflow_ids = out.run.ids
            tracking.write_run_file(paths.run_file, out.run.run_id, out.run.experiment_id, uri)
        if master:
            out.start(progress)
            if progress.step:
                log.info("resuming from step %d (epoch %d)", progress.step, progress.epoch + 1)
            log.info(
                "training %d steps (%d per epoch, %d epochs) on %s x %d, %d image(s) per step, "
                "%.3g GFLOP per step; MFU against %s",
                target - progress.step,
                steps_per_epoch,
                total_epochs,
                dist.device,
                dist.world_size,
                global_batch,
                out.tflop_per_step * 1e3,
                f"{out.peak_tflops:.3g} TFLOP/s ({peak_source})" if peak else "no known peak",
            )

        # -- 5. The loop. --
        if rng is not None:  # last, so that nothing in the set-up above draws from it
            ckpt.set_rng_state(rng)
        session_start = t_log = time.perf_counter()
        seconds_before, start_step = progress.train_seconds, progress.step
        last_saved = progress.step
        if signum := stop.agreed(dist, control):
            raise Stopped(f"stopped by {signal.Signals(signum).name} before the first step", signum)
        while progress.step < target:
            sampler.set_epoch(progress.epoch, skip=progress.batches_done * tc.batch_size)
            for batch in loader:
                real_A, real_B = model.to_input(batch["A"]), model.to_input(batch["B"])
                loss_sum += train_step(model, real_A, real_B)
                progress.step += 1
                progress.batches_done += 1
                progress.steps_since_log += 1
                step = progress.step
                if master:
                    out.step_done()

                if step % tc.log_every == 0 or step == target:
                    # The only host sync: mean losses over the interval and over all ranks.
                    n = progress.steps_since_log
                    means = distributed.all_reduce_mean(dist, loss_sum / n)
                    now = time.perf_counter()
                    values = dict(zip(LOSS_NAMES, means.tolist(), strict=True))
                    values["lr"] = model.lr()
                    values["img_per_s"] = n * global_batch / max(now - t_log, 1e-9)
                    if out.peak_tflops:
                        tflops = n * out.tflop_per_step / max(now - t_log, 1e-9)
                        values["mfu"] = tflops / out.peak_tflops
                    if bad := [k for k, v in values.items() if not math.isfinite(v)]:
                        raise NonFiniteLossError(
                            f"{bad[0]} is {values[bad[0]]} at step {step}: training stopped; "
                            f"the last good checkpoint (step {last_saved}) is kept",
                            "lower train.lr, or use precision fp32",
                        )
                    loss_sum.zero_()
                    progress.steps_since_log, t_log = 0, now
                    if master:
                        out.log_point(progress, values)

                if master and step % tc.sample_every == 0 and step != target:
                    out.sample(model, step)

                end_of_epoch = progress.batches_done == steps_per_epoch
                progress.train_seconds = seconds_before + time.perf_counter() - session_start
                signum = stop.agreed(dist, control)  # every rank stops at the same step
                if signum and not end_of_epoch and step < target:
                    save()
                    raise Stopped(out.stopped_message(signum, step), signum)
                if step % tc.checkpoint_every == 0 and not end_of_epoch and step != target:
                    save()
                    last_saved = step
                if step >= target:
                    break

            if progress.batches_done == steps_per_epoch:
                model.end_epoch()  # the learning-rate schedule moves once per epoch
                progress.epoch += 1
                progress.batches_done = 0
            progress.train_seconds = seconds_before + time.perf_counter() - session_start
            save()  # a checkpoint at every epoch end and at the last step
            last_saved = progress.step
            if (signum := stop.agreed(dist, control)) and progress.step < target:
                raise Stopped(out.stopped_message(signum, progress.step), signum)

        # -- 6. The end: every rank must hold the same weights; rank 0 writes the outputs. --
        if master:
            out.close()
        seconds = time.perf_counter() - session_start
        digests = distributed.gather(dist, model.weights_digest())
        if master and digests and len(set(digests)) > 1:  # DDP averages: a bug or bad hardware
            raise CycleGANError(f"ranks ended with different weights: {digests}")
        if master:
            images = (progress.step - start_step) * global_batch
            log.info(
                "trained %d steps in %.1fs (%.3g img/s)",
                progress.step - start_step,
                seconds,
                images / max(seconds, 1e-9),
            )
            out.write_final(model, progress, mlflow_ids)
    except BaseException as e:
        out.close()
        if out.run is not None:
            out.run.end("KILLED" if isinstance(e, (Stopped, KeyboardInterrupt)) else "FAILED")
        raise
    if out.run is not None:
        out.run.end("FINISHED")
    return out.summary(progress)


def _configure_torch(tc: TrainConfig, device: torch.device) -> None:
    if device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest convolution algorithms once.
        torch.backends.cudnn.benchmark = True
        # TF32 for float32 convolutions/matmuls only when asked: fp32 stays fp32 by default.
        torch.backends.cudnn.allow_tf32 = tc.tf32
        torch.backends.cuda.matmul.allow_tf32 = tc.tf32
