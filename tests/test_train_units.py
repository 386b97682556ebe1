"""Training building blocks: losses, history pool, LR schedule, the step against an independent
reference implementation, checkpoints and the resume policy, the torchrun launcher."""

from __future__ import annotations

import copy
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cyclegan import tracking
from cyclegan.config import TrainConfig, load_config
from cyclegan.errors import CheckpointError
from cyclegan.spool import Spool
from cyclegan.train import checkpoint as ckpt
from cyclegan.train.launch import torchrun_command
from cyclegan.train.losses import GANLoss
from cyclegan.train.pool import ImagePool
from cyclegan.train.schedule import lr_multiplier
from cyclegan.train.step import LOSS_NAMES, CycleGAN, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------- losses


def test_lsgan_is_mse_to_one_or_zero() -> None:
    pred = torch.tensor([[0.5, 2.0], [-1.0, 0.0]])
    loss = GANLoss("lsgan")
    assert loss(pred, True).item() == pytest.approx(((pred - 1) ** 2).mean().item())
    assert loss(pred, False).item() == pytest.approx((pred**2).mean().item())


def test_vanilla_is_bce_on_logits() -> None:
    pred = torch.tensor([0.3, -2.0, 4.0])
    p = torch.sigmoid(pred)
    loss = GANLoss("vanilla")
    assert loss(pred, True).item() == pytest.approx(-torch.log(p).mean().item(), rel=1e-6)
    assert loss(pred, False).item() == pytest.approx(-torch.log(1 - p).mean().item(), rel=1e-6)


def test_losses_are_float32_for_bf16_predictions() -> None:
    pred = torch.randn(1, 1, 4, 4).bfloat16()
    assert GANLoss()(pred, True).dtype == torch.float32


# --------------------------------------------------------------------------------- pool


def _img(v: float) -> torch.Tensor:
    return torch.full((1, 3, 2, 2), v)


def test_pool_fills_then_swaps_half_the_time() -> None:
    pool = ImagePool(3, seed=1)
    # While filling, every image is stored and returned unchanged.
    for v in range(3):
        assert torch.equal(pool.query(_img(v)), _img(v))
    stored = {float(im[0, 0, 0, 0]) for im in pool.images}
    assert stored == {0.0, 1.0, 2.0}
    returned_old = 0
    for v in range(3, 403):
        out = float(pool.query(_img(v))[0, 0, 0, 0])
        if out != v:  # an older image came back; the new one took its place
            returned_old += 1
            assert out < v
            assert v in {float(im[0, 0, 0, 0]) for im in pool.images}
    assert 150 < returned_old < 250  # p = 1/2
    assert len(pool.images) == 3


def test_pool_per_image_in_a_batch_and_size_zero() -> None:
    pool = ImagePool(2, seed=0)
    batch = torch.cat([_img(1), _img(2), _img(3)])
    assert torch.equal(pool.query(batch)[:2], batch[:2])
    assert ImagePool(0).query(batch) is batch


def test_pool_state_roundtrip_continues_identically() -> None:
    a = ImagePool(4, seed=7)
    for v in range(10):
        a.query(_img(v))
    b = ImagePool(4, seed=999)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for v in range(10, 40):
        assert torch.equal(a.query(_img(v)), b.query(_img(v)))


# --------------------------------------------------------------------------------- schedule


def test_lr_schedule_constant_then_linear_decay() -> None:
    assert [lr_multiplier(e, 3, 3) for e in range(6)] == [1, 1, 1, 0.75, 0.5, 0.25]
    # The paper: 100 + 100 epochs; epoch 101 (1-based) is the first below 1.
    assert lr_multiplier(99, 100, 100) == 1.0
    assert lr_multiplier(100, 100, 100) == pytest.approx(100 / 101)
    assert lr_multiplier(199, 100, 100) == pytest.approx(1 / 101)


def test_model_schedulers_step_once_per_epoch() -> None:
    m = CycleGAN(TrainConfig(ngf=4, ndf=4, epochs=3, epochs_decay=3, lr=0.1))
    seen = []
    for _ in range(6):
        seen.append(m.lr())
        m.end_epoch()
    assert seen == pytest.approx([0.1, 0.1, 0.1, 0.075, 0.05, 0.025])
    assert m.opt_D.param_groups[0]["lr"] == m.opt_G.param_groups[0]["lr"]


# --------------------------------------------------------------------------------- the step


def _reference_iteration(G_A, G_B, D_A, D_B, opt_G, opt_D, real_A, real_B, lam_A, lam_B, lam_i):
    """The reference's optimize_parameters (LSGAN, no pool), written out independently."""
    fake_B = G_A(real_A)
    rec_A = G_B(fake_B)
    fake_A = G_B(real_B)
    rec_B = G_A(fake_A)
    for p in [*D_A.parameters(), *D_B.parameters()]:
        p.requires_grad = False
    opt_G.zero_grad()
    loss_idt_A = (G_A(real_B) - real_B).abs().mean() * lam_B * lam_i
    loss_idt_B = (G_B(real_A) - real_A).abs().mean() * lam_A * lam_i
    loss_G_A = ((D_A(fake_B) - 1) ** 2).mean()
    loss_G_B = ((D_B(fake_A) - 1) ** 2).mean()
    loss_cyc_A = (rec_A - real_A).abs().mean() * lam_A
    loss_cyc_B = (rec_B - real_B).abs().mean() * lam_B
    loss_G = loss_G_A + loss_G_B + loss_cyc_A + loss_cyc_B + loss_idt_A + loss_idt_B
    loss_G.backward()
    opt_G.step()
    for p in [*D_A.parameters(), *D_B.parameters()]:
        p.requires_grad = True
    opt_D.zero_grad()
    loss_D_A = 0.5 * (((D_A(real_B) - 1) ** 2).mean() + (D_A(fake_B.detach()) ** 2).mean())
    loss_D_A.backward()
    loss_D_B = 0.5 * (((D_B(real_A) - 1) ** 2).mean() + (D_B(fake_A.detach()) ** 2).mean())
    loss_D_B.backward()
    opt_D.step()
    return [loss_G, loss_G_A, loss_G_B, loss_D_A, loss_D_B, loss_cyc_A, loss_cyc_B,
            loss_idt_A, loss_idt_B]  # fmt: skip


def test_step_matches_an_independent_reference_implementation() -> None:
    cfg = TrainConfig(ngf=4, ndf=4, n_layers_D=2, pool_size=0, lambda_A=7.0, lambda_B=3.0)
    m = CycleGAN(cfg)
    nets = {k: copy.deepcopy(v) for k, v in m.nets.items()}
    opt_G = torch.optim.Adam([*nets["G_A"].parameters(), *nets["G_B"].parameters()],
                             lr=cfg.lr, betas=(0.5, 0.999))  # fmt: skip
    opt_D = torch.optim.Adam([*nets["D_A"].parameters(), *nets["D_B"].parameters()],
                             lr=cfg.lr, betas=(0.5, 0.999))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        a = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
        b = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
        ours = train_step(m, a, b)
        ref = _reference_iteration(*nets.values(), opt_G, opt_D, a, b, 7.0, 3.0, 0.5)
        torch.testing.assert_close(ours, torch.stack(ref).detach(), rtol=1e-5, atol=1e-6)
    for name, net in nets.items():
        for (k, p), q in zip(
            net.state_dict().items(), m.nets[name].state_dict().values(), strict=True
        ):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=f"{name}.{k}")
    assert all(p.requires_grad for p in m.nets["D_A"].parameters())


def test_step_returns_named_losses_and_no_identity_when_off() -> None:
    m = CycleGAN(TrainConfig(ngf=4, ndf=4, n_layers_D=2, lambda_identity=0.0))
    out = train_step(m, torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16))
    losses = dict(zip(LOSS_NAMES, out.tolist(), strict=True))
    assert losses["loss_idt_A"] == losses["loss_idt_B"] == 0.0
    parts = ("loss_G_A", "loss_G_B", "loss_cycle_A", "loss_cycle_B")
    assert losses["loss_G"] == pytest.approx(sum(losses[k] for k in parts), rel=1e-6)


# --------------------------------------------------------------------------------- checkpoints


def _settings(*overrides: str) -> dict:
    return ckpt.fingerprint_settings(load_config(None, list(overrides)), 1, "data0")


def test_fingerprint_covers_training_settings_only() -> None:
    base = ckpt.fingerprint(_settings())
    for same in ("train.log_every=7", "train.max_steps=3", "train.precision=bf16",
                 "train.compile=default", "train.num_workers=2", "train.resume=never",
                 "train.checkpoint_every=9", "mlflow.experiment=x"):  # fmt: skip
        assert ckpt.fingerprint(_settings(same)) == base, same
    for other in ("train.ngf=8", "train.lr=0.001", "train.seed=1", "train.epochs=3",
                  "train.batch_size=2", "train.gan_mode=vanilla", "train.flip=false"):  # fmt: skip
        assert ckpt.fingerprint(_settings(other)) != base, other
    cfg = load_config(None, [])
    assert ckpt.fingerprint(ckpt.fingerprint_settings(cfg, 2, "data0")) != base
    assert ckpt.fingerprint(ckpt.fingerprint_settings(cfg, 1, "data1")) != base
    assert ckpt.differences(_settings(), _settings("train.ngf=8")) == ["train.ngf: 32 -> 8"]


def _state(settings: dict, step: int = 1) -> dict:
    return {
        "format": ckpt.FORMAT,
        "fingerprint": ckpt.fingerprint(settings),
        "settings": settings,
        "step": step,
        "w": torch.arange(3.0),
        "rng": ckpt.rng_state(),
    }


def test_save_is_atomic_pruned_and_loads_weights_only(tmp_path) -> None:
    s = _settings()
    for step in (1, 2, 3, 10):
        ckpt.save(_state(s, step), ckpt.checkpoint_path(tmp_path, step))
    ckpt.prune(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step_00000003.pt",
        "step_00000010.pt",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert ckpt.load(ckpt.checkpoint_path(tmp_path, 10))["step"] == 10
    # A checkpoint that would run code on load is refused.
    torch.save({"format": ckpt.FORMAT, "evil": random.Random(0)}, tmp_path / "step_00000011.pt")
    with pytest.raises(CheckpointError, match="cannot read"):
        ckpt.load(tmp_path / "step_00000011.pt")
    # ... and the resume logic skips it in favour of the newest readable one.
    assert ckpt.latest_readable(tmp_path)["step"] == 10


def test_rng_state_roundtrip_through_a_file(tmp_path) -> None:
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    ckpt.save({"format": ckpt.FORMAT, "rng": ckpt.rng_state()}, tmp_path / "r.pt")
    expect = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(ckpt.load(tmp_path / "r.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], again[0])
    assert np.array_equal(expect[1], again[1]) and expect[2] == again[2]


def test_resume_policy(tmp_path) -> None:
    old, new = _settings(), _settings("train.ngf=8")
    folder = tmp_path / "ck"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.resolve_resume(folder, "always", old)
    assert ckpt.resolve_resume(folder, "auto", old) is None

    ckpt.save(_state(old, 5), ckpt.checkpoint_path(folder, 5))
    assert ckpt.resolve_resume(folder, "auto", old)["step"] == 5
    assert ckpt.resolve_resume(folder, "always", old)["step"] == 5
    with pytest.raises(CheckpointError, match=r"train\.ngf: 32 -> 8"):
        ckpt.resolve_resume(folder, "always", new)
    assert ckpt.list_checkpoints(folder)  # a refusal moves nothing

    assert ckpt.resolve_resume(folder, "auto", new) is None  # changed: fresh, old kept aside
    stale = folder / f"stale-{ckpt.fingerprint(old)}-1"
    assert [p.name for p in stale.iterdir()] == ["step_00000005.pt"]
    assert not ckpt.list_checkpoints(folder)

    ckpt.save(_state(new, 2), ckpt.checkpoint_path(folder, 2))
    assert ckpt.resolve_resume(folder, "never", new) is None  # never: always fresh
    assert (folder / f"stale-{ckpt.fingerprint(new)}-1/step_00000002.pt").is_file()
    assert stale.is_dir()  # nothing overwritten


# --------------------------------------------------------------------------------- launcher


def test_torchrun_command(monkeypatch) -> None:
    for v in ("RANK", "WORLD_SIZE", "PET_NNODES", "PET_NPROC_PER_NODE"):
        monkeypatch.delenv(v, raising=False)
    argv = ["train", "--set", "train.lr=0.1"]
    assert torchrun_command(load_config(None, []), argv) is None
    cmd = torchrun_command(load_config(None, ["train.nproc_per_node=2"]), argv)
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", "2", "-m", "cyclegan", *argv]  # fmt: skip
    if not torch.cuda.is_available():  # auto = the GPUs; on a CPU host one process
        assert torchrun_command(load_config(None, ["train.nproc_per_node=auto"]), argv) is None
    # Already a rank: never launch again.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert torchrun_command(load_config(None, ["train.nproc_per_node=2"]), argv) is None
    # A Kubeflow TrainJob pod: torchrun takes nodes and ranks from PET_*.
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("PET_NPROC_PER_NODE", "4")
    cmd = torchrun_command(load_config(None, []), argv)
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "-m", "cyclegan", *argv]


def test_gan_loss_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError):
        GANLoss("wgan")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- tracking


class _FlakyClient:
    """An MLflow client whose server is down for the first ``down`` calls (all if None).

    A stand-in for the server inside one process: the real-server outage (killed and
    restarted mid-run) is tests/test_reliability_mlflow.py."""

    def __init__(self, down: int | None) -> None:
        self.down, self.calls, self.metrics, self.ended = down, 0, [], []

    def _call(self) -> None:
        self.calls += 1
        if self.down is None or self.calls <= self.down:
            raise ConnectionError("connection refused")

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._call()
        self.metrics.extend(metrics)

    def set_terminated(self, run_id, status, end_time=None):
        self._call()
        self.ended.append(status)


def test_lost_tracking_server_never_blocks_and_everything_is_kept(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    spool = Spool(tmp_path / "spool", "run", uri)
    logger = tracking.BackgroundLogger(_FlakyClient(down=None), "run", spool, uri)
    start = time.monotonic()
    for step in range(100):
        logger.log_metrics(step, {"loss_G": 1.0, "lr": 2e-4})
    assert time.monotonic() - start < 0.5  # the training loop only enqueues
    logger.terminate("FINISHED")
    pending = logger.close()
    assert pending is not None
    assert (pending.metrics, pending.status) == (200, "FINISHED")
    # ... and the next command sends it once the server answers.
    client = _FlakyClient(down=0)
    assert Spool(tmp_path / "spool", "run", uri).replay(client)
    assert len(client.metrics) == 200 and client.ended == ["FINISHED"]
    assert Spool(tmp_path / "spool", "run", uri).empty()


def test_tracking_server_back_after_an_outage_gets_everything(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = _FlakyClient(down=1)
    spool = Spool(tmp_path / "spool", "run", uri)
    logger = tracking.BackgroundLogger(client, "run", spool, uri, probe_every=0.05)
    for step in range(50):
        logger.log_metrics(step, {"loss_G": float(step)})
    logger.terminate("FINISHED")
    assert logger.close() is None  # the probe found the store again and the spool was sent
    assert sorted(m.step for m in client.metrics) == list(range(50))
    assert client.ended == ["FINISHED"]


def test_precision_auto_is_bf16_only_where_the_hardware_runs_it_and_it_pays() -> None:
    """auto: fp32 at the embedded 32 px on any CPU; bf16 at 256 px on a CPU with AVX512-BF16
    or AMX (measured to pay from 64 px), fp32 on one without; an explicit setting wins."""
    from cyclegan.hardware import native_bf16
    from cyclegan.train.step import BF16_CPU_MIN_CROP, resolve_precision

    cpu = torch.device("cpu")
    small = load_config(None, ["train.precision=auto"]).train
    big = load_config(
        None, ["train.precision=auto", "data.load_size=256", "train.crop_size=256"]
    ).train
    assert resolve_precision(small, cpu)[0] == "fp32"
    assert small.crop_size < BF16_CPU_MIN_CROP
    assert resolve_precision(big, cpu)[0] == ("bf16" if native_bf16("cpu") else "fp32")
    forced = load_config(None, ["train.precision=bf16"]).train
    assert resolve_precision(forced, cpu) == ("bf16", "set explicitly")
