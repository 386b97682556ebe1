"""The fast path on CPU: bf16 autocast + channels_last, and torch.compile, give the same
losses as the plain fp32 eager step on a tiny model (within bf16 rounding where bf16 is used)."""

from __future__ import annotations

import pytest
import torch

from cyclegan.config import TrainConfig
from cyclegan.train.step import CycleGAN, train_step

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(ngf=4, ndf=4, n_layers_D=2, crop_size=16, pool_size=2)


def _losses(steps: int = 3, **options) -> tuple[torch.Tensor, CycleGAN]:
    m = CycleGAN(TrainConfig(**TINY, **options))
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        a = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
        b = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
        out.append(train_step(m, m.to_input(a), m.to_input(b)))
    return torch.stack(out), m


def test_bf16_channels_last_tracks_fp32() -> None:
    ref, _ = _losses()
    fast, m = _losses(precision="bf16", channels_last=True)
    assert fast.dtype == torch.float32  # losses in fp32 whatever the networks ran in
    assert m.nets["G_A"].model[1].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, ref, rtol=0.05, atol=0.05)
    # Same maths, different rounding: not bit-equal, but close.
    assert not torch.equal(fast, ref)


@pytest.mark.slow
def test_compile_default_matches_eager() -> None:
    """Inductor on CPU. The first run on a machine generates and compiles C++ kernels (about
    two minutes on 2 busy cores); later runs hit the inductor cache (seconds)."""
    ref, _ = _losses(steps=2)
    compiled, _ = _losses(steps=2, compile="default")
    torch.testing.assert_close(compiled, ref, rtol=1e-4, atol=1e-5)
