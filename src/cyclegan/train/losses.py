"""The CycleGAN objectives: adversarial (LSGAN or vanilla) plus L1 cycle and identity terms.

Every loss is computed in float32, whatever precision the networks ran in: the network
outputs are cast up first, so bf16 autocast changes only the convolutions.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

GanMode = Literal["lsgan", "vanilla"]


class GANLoss:
    """Adversarial loss on a PatchGAN's logit map against an all-real or all-fake target.

    ``lsgan``: mean squared error to 1 (real) or 0 (fake), the paper's choice.
    ``vanilla``: binary cross-entropy on the logits (the original GAN objective).
    """

    def __init__(self, mode: GanMode = "lsgan") -> None:
        if mode not in ("lsgan", "vanilla"):
            raise ValueError(f"gan_mode must be 'lsgan' or 'vanilla', got {mode!r}")
        self.mode = mode

    def __call__(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        prediction = prediction.float()
        # full_like rather than a cached tensor: the target follows the prediction's shape,
        # device and memory format, and costs nothing next to the discriminator.
        target = torch.full_like(prediction, 1.0 if target_is_real else 0.0)
        if self.mode == "lsgan":
            return F.mse_loss(prediction, target)
        return F.binary_cross_entropy_with_logits(prediction, target)


def l1(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in float32 (cycle and identity losses)."""
    return F.l1_loss(output.float(), target.float())
