"""GPU checks (skipped without CUDA; run by benchmarks/gpu_checks.sh on a GPU machine).

The fast path must not change the maths: bf16 + channels_last + CUDA graphs
(torch.compile "reduce-overhead") track the fp32 eager losses; one-rank NCCL DDP trains.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cyclegan.config import TrainConfig
from cyclegan.train.step import CycleGAN, train_step

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]


def _losses(steps: int, **options) -> torch.Tensor:
    torch.manual_seed(0)
    cfg = TrainConfig(ngf=16, ndf=16, crop_size=64, device="cuda", pool_size=4, **options)
    m = CycleGAN(cfg)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        a = (torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1).cuda()
        b = (torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1).cuda()
        out.append(train_step(m, m.to_input(a), m.to_input(b)))
    return torch.stack(out).float().cpu()


def test_fast_path_tracks_fp32() -> None:
    ref = _losses(6)
    fast = _losses(6, precision="bf16", channels_last=True, compile="reduce-overhead")
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, ref, rtol=0.05, atol=0.05)


def test_nccl_ddp_one_rank(tmp_path: Path) -> None:
    """`cyclegan train` as one NCCL rank under torchrun, on a tiny generated dataset."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for split in ("trainA", "trainB"):
        (tmp_path / "data" / split).mkdir(parents=True)
        for i in range(8):
            px = (torch.rand(32, 32, 3, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(tmp_path / "data" / split / f"{i}.png")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "cyclegan", "train", "--prepared-dir", str(tmp_path / "data"),
        "--model-dir", str(tmp_path / "model"), "--checkpoints-dir", str(tmp_path / "ckpt"),
        "--metrics-dir", str(tmp_path / "metrics"), "--plots-dir", str(tmp_path / "plots"),
        "--set", "train.device=cuda", "--set", "train.max_steps=8", "--set", "train.ngf=8",
        "--set", "train.ndf=8", "--set", "train.log_every=4", "--set", "data.load_size=32",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "model" / "G_A.safetensors").is_file()
