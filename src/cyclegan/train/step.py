"""The CycleGAN training step, as the reference does it, plus the state it works on.

:class:`CycleGAN` holds the four networks, the two optimizers and schedulers and the two image
pools; :func:`train_step` is one iteration, readable top to bottom. The trainer and
``benchmarks/train_throughput.py`` both call this same function.

Speed options change how the maths runs, not the maths: bf16 autocast around the network
passes (losses stay float32), channels_last memory layout, ``torch.compile`` of each network
(mode ``reduce-overhead`` adds CUDA graphs; the pools and all Python randomness stay outside
the compiled regions), fused Adam on CUDA. Nothing in the step reads a value back to the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from cyclegan.config import TrainConfig
from cyclegan.models import GeneratorSpec, PatchDiscriminator, init_weights
from cyclegan.train.distributed import DistInfo
from cyclegan.train.losses import GANLoss, l1
from cyclegan.train.pool import ImagePool
from cyclegan.train.schedule import lr_multiplier

# The contract's loss names (the MLflow metrics docs/training.md lists), in train_step's order.
LOSS_NAMES = (
    "loss_G",
    "loss_G_A",
    "loss_G_B",
    "loss_D_A",
    "loss_D_B",
    "loss_cycle_A",
    "loss_cycle_B",
    "loss_idt_A",
    "loss_idt_B",
)
NET_NAMES = ("G_A", "G_B", "D_A", "D_B")


class CycleGAN:
    """G_A: A->B, G_B: B->A, D_A judges domain B (real B vs G_A's fakes), D_B judges domain A.

    ``nets`` are the plain modules (weights, checkpoints, samples). ``G_A``... are what the
    step calls: compiled if asked and, under DDP, wrapped so gradients are averaged over
    ranks. ``D_A_local``/``D_B_local`` are the discriminators without the DDP wrapper, for the
    generator step, where they are frozen and have no gradients to average.
    """

    def __init__(self, cfg: TrainConfig, dist: DistInfo | None = None) -> None:
        dist = dist or DistInfo()
        self.cfg, self.device = cfg, dist.device
        self.channels_last = cfg.channels_last
        # Every rank builds the same weights from the seed (DDP would broadcast rank 0's
        # anyway); reference init N(0, 0.02), biases 0, in the reference's order.
        init_rng = torch.Generator().manual_seed(cfg.seed)
        spec = GeneratorSpec.from_train_config(cfg)
        self.nets: dict[str, nn.Module] = {
            "G_A": spec.build(),
            "G_B": spec.build(),
            "D_A": PatchDiscriminator(ndf=cfg.ndf, n_layers=cfg.n_layers_D),
            "D_B": PatchDiscriminator(ndf=cfg.ndf, n_layers=cfg.n_layers_D),
        }
        for name in NET_NAMES:
            init_weights(self.nets[name], 0.02, generator=init_rng)
            self.nets[name].to(self.device)
            if self.channels_last:
                self.nets[name].to(memory_format=torch.channels_last)

        local = {name: self._compiled(net) for name, net in self.nets.items()}
        run = {name: self._ddp(net, dist) for name, net in local.items()}
        self.G_A, self.G_B, self.D_A, self.D_B = (run[n] for n in NET_NAMES)
        self.D_A_local, self.D_B_local = local["D_A"], local["D_B"]

        fused = self.device.type == "cuda" or None  # one kernel per step, not several per tensor
        betas = (cfg.beta1, cfg.beta2)
        self.opt_G = torch.optim.Adam(
            self._params("G_A", "G_B"), lr=cfg.lr, betas=betas, fused=fused
        )
        self.opt_D = torch.optim.Adam(
            self._params("D_A", "D_B"), lr=cfg.lr, betas=betas, fused=fused
        )
        schedule = lambda epoch: lr_multiplier(epoch, cfg.epochs, cfg.epochs_decay)  # noqa: E731
        self.sched_G = torch.optim.lr_scheduler.LambdaLR(self.opt_G, schedule)
        self.sched_D = torch.optim.lr_scheduler.LambdaLR(self.opt_D, schedule)

        # Each rank has its own pools with its own random stream.
        self.pool_fake_A = ImagePool(cfg.pool_size, seed=_pool_seed(cfg.seed, dist.rank, 0))
        self.pool_fake_B = ImagePool(cfg.pool_size, seed=_pool_seed(cfg.seed, dist.rank, 1))
        self.gan_loss = GANLoss(cfg.gan_mode)
        self.bf16 = resolve_precision(cfg, self.device)[0] == "bf16"
        self.cuda_graphs = cfg.compile == "reduce-overhead" and self.device.type == "cuda"

    def _compiled(self, net: nn.Module) -> nn.Module:
        if self.cfg.compile == "none":
            return net
        mode = None if self.cfg.compile == "default" else self.cfg.compile
        return torch.compile(net, mode=mode)  # type: ignore[return-value]

    def _ddp(self, net: nn.Module, dist: DistInfo) -> nn.Module:
        if not dist.enabled:
            return net
        # Instance norm keeps no running statistics, so there are no buffers to broadcast.
        ids = [self.device.index] if self.device.type == "cuda" else None
        with warnings.catch_warnings():
            # torch 2.14 deprecates broadcast_buffers but its replacement still syncs at init;
            # with no buffers at all, either is correct.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)
            return DDP(net, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True)

    def _params(self, *names: str) -> Iterator[nn.Parameter]:
        return itertools.chain.from_iterable(self.nets[n].parameters() for n in names)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast for network passes when ``precision: bf16``; a no-op otherwise."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """A CPU batch as the networks want it: on the device, in their memory format."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def lr(self) -> float:
        """The current learning rate (host value; no device sync)."""
        return float(self.opt_G.param_groups[0]["lr"])

    def end_epoch(self) -> None:
        """Advance the learning-rate schedule: once per epoch, as the reference."""
        self.sched_G.step()
        self.sched_D.step()

    def state_dict(self) -> dict[str, Any]:
        """Networks, optimizers and schedulers (the pools are per rank: see pool_state)."""
        return {
            "nets": {
                n: {k: v.detach().cpu() for k, v in self.nets[n].state_dict().items()}
                for n in NET_NAMES
            },
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "sched_G": self.sched_G.state_dict(),
            "sched_D": self.sched_D.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (onto this model's device)."""
        for n in NET_NAMES:
            self.nets[n].load_state_dict(state["nets"][n])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.sched_G.load_state_dict(state["sched_G"])
        self.sched_D.load_state_dict(state["sched_D"])

    def pool_state(self) -> dict[str, Any]:
        """This rank's image pools (images on the CPU, generator states)."""
        return {"fake_A": self.pool_fake_A.state_dict(), "fake_B": self.pool_fake_B.state_dict()}

    def load_pool_state(self, state: dict[str, Any]) -> None:
        self.pool_fake_A.load_state_dict(state["fake_A"], self.device)
        self.pool_fake_B.load_state_dict(state["fake_B"], self.device)

    def weights_finite(self) -> bool:
        """True if no network weight is NaN or inf (one host sync: call rarely)."""
        norms = [torch.linalg.vector_norm(p.detach().float()) for p in self._params(*NET_NAMES)]
        return bool(torch.isfinite(torch.stack(norms)).all())

    def weights_digest(self) -> str:
        """sha256 over the four networks' weights: equal on every rank, or DDP went wrong."""
        h = hashlib.sha256()
        for name in NET_NAMES:
            for key, t in self.nets[name].state_dict().items():
                h.update(f"{name}.{key}".encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


# precision: auto on a CPU with native bf16 (AVX512-BF16/AMX) pays from this crop size on:
# measured on an AVX512-BF16 CPU (docs/benchmarks.md), bf16 over fp32 was 1.03x at 32 px,
# 1.19x at 64, 1.45x at 128 and 1.64x at 256 (ngf 32, 6 blocks, batch 1).
BF16_CPU_MIN_CROP = 64


def resolve_precision(cfg: TrainConfig, device: torch.device) -> tuple[str, str]:
    """``train.precision`` with ``auto`` decided for ``device``: the precision and why."""
    from cyclegan.hardware import native_bf16

    if cfg.precision != "auto":
        return cfg.precision, "set explicitly"
    if device.type == "meta":
        return "fp32", "meta device"
    if not native_bf16(device.type):
        return "fp32", f"auto: no native bf16 on this {device.type.upper()}"
    if device.type == "cuda":
        return "bf16", "auto: the GPU computes bf16 natively"
    if cfg.crop_size < BF16_CPU_MIN_CROP:
        return "fp32", f"auto: bf16 does not pay on a CPU below {BF16_CPU_MIN_CROP} px crops"
    return "bf16", "auto: native bf16 on this CPU pays at this crop size"


def _pool_seed(seed: int, rank: int, which: int) -> int:
    # Distinct, reproducible streams per (seed, rank, pool), far from the init seed.
    return (seed * 1_000_003 + 2 * rank + which + 1) % (2**63)


def set_requires_grad(nets: tuple[nn.Module, ...], flag: bool) -> None:
    """Freeze (False) or unfreeze (True) every parameter of ``nets``."""
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def train_step(m: CycleGAN, real_A: torch.Tensor, real_B: torch.Tensor) -> torch.Tensor:
    """One CycleGAN iteration in the reference's order; returns the losses (``LOSS_NAMES``
    order) as one detached device tensor, so the caller decides when to sync."""
    cfg = m.cfg
    if m.cuda_graphs:
        # A new iteration: outputs of the previous step's CUDA graphs may now be reused.
        torch.compiler.cudagraph_mark_step_begin()

    # 1. Forward both cycles: A -> B -> A and B -> A -> B.
    with m.autocast():
        fake_B = m.G_A(real_A)
        rec_A = m.G_B(fake_B)
        fake_A = m.G_B(real_B)
        rec_B = m.G_A(fake_A)

    # 2. Generators: one Adam step for G_A and G_B together. The discriminators are frozen:
    #    gradients flow through them to the fakes, but their weights get none.
    set_requires_grad((m.nets["D_A"], m.nets["D_B"]), False)
    m.opt_G.zero_grad(set_to_none=True)
    with m.autocast():
        if cfg.lambda_identity > 0:  # G_A should leave a B image alone, G_B an A image
            idt_A = m.G_A(real_B)
            idt_B = m.G_B(real_A)
        pred_fake_B = m.D_A_local(fake_B)
        pred_fake_A = m.D_B_local(fake_A)
    if cfg.lambda_identity > 0:
        loss_idt_A = l1(idt_A, real_B) * cfg.lambda_B * cfg.lambda_identity
        loss_idt_B = l1(idt_B, real_A) * cfg.lambda_A * cfg.lambda_identity
    else:
        loss_idt_A = loss_idt_B = torch.zeros((), device=real_A.device)
    loss_G_A = m.gan_loss(pred_fake_B, True)
    loss_G_B = m.gan_loss(pred_fake_A, True)
    loss_cycle_A = l1(rec_A, real_A) * cfg.lambda_A
    loss_cycle_B = l1(rec_B, real_B) * cfg.lambda_B
    loss_G = loss_G_A + loss_G_B + loss_cycle_A + loss_cycle_B + loss_idt_A + loss_idt_B
    loss_G.backward()
    m.opt_G.step()

    # 3. Discriminators: one Adam step for D_A and D_B, each on real images and on fakes
    #    drawn from the history pool (detached: no gradient back into the generators).
    set_requires_grad((m.nets["D_A"], m.nets["D_B"]), True)
    m.opt_D.zero_grad(set_to_none=True)
    old_fake_B = m.pool_fake_B.query(fake_B.detach().float())
    old_fake_A = m.pool_fake_A.query(fake_A.detach().float())
    with m.autocast():
        pred_real_B, pred_old_B = m.D_A(real_B), m.D_A(old_fake_B)
        pred_real_A, pred_old_A = m.D_B(real_A), m.D_B(old_fake_A)
    loss_D_A = 0.5 * (m.gan_loss(pred_real_B, True) + m.gan_loss(pred_old_B, False))
    loss_D_B = 0.5 * (m.gan_loss(pred_real_A, True) + m.gan_loss(pred_old_A, False))
    (loss_D_A + loss_D_B).backward()
    m.opt_D.step()

    return torch.stack(
        [
            loss_G,
            loss_G_A,
            loss_G_B,
            loss_D_A,
            loss_D_B,
            loss_cycle_A,
            loss_cycle_B,
            loss_idt_A,
            loss_idt_B,
        ]
    ).detach()


def count_step_flops(cfg: TrainConfig, batch_size: int, size: int) -> int:
    """FLOPs of one :func:`train_step` (every convolution and matmul, forward and backward)
    at ``batch_size`` images of ``size`` x ``size``, counted by ``FlopCounterMode`` on the meta
    device: exact shapes, no arithmetic, no memory."""
    from torch.utils.flop_counter import FlopCounterMode

    plain = dataclasses.replace(cfg, compile="none", precision="fp32")
    model = CycleGAN(plain, DistInfo(device=torch.device("meta")))
    real_A = torch.empty(batch_size, 3, size, size, device="meta")
    real_B = torch.empty(batch_size, 3, size, size, device="meta")
    with FlopCounterMode(display=False) as counter:
        train_step(model, real_A, real_B)
    return int(counter.get_total_flops())
