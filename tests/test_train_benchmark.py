"""FLOPs of a training step and the throughput benchmark script (tiny, on CPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cyclegan.config import TrainConfig
from cyclegan.train.step import CycleGAN, count_step_flops, train_step
from tests.train_support import make_prepared

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
PAPER = TrainConfig(netG="resnet_9blocks", ngf=64, ndf=64, crop_size=256)


def test_paper_step_costs_1_88_tflop_per_image() -> None:
    # One training step of the paper model at 256x256 is 1.88 TFLOP per image (measured on an
    # H200 with the reference code and counted with FlopCounterMode: docs/training.md).
    assert count_step_flops(PAPER, 1, 256) == pytest.approx(1.88e12, rel=0.005)
    # Convolution cost scales with the area: 64x64 x 16 is within 1% (border effects).
    assert 16 * count_step_flops(PAPER, 1, 64) == pytest.approx(1.88e12, rel=0.01)
    assert count_step_flops(PAPER, 4, 64) == 4 * count_step_flops(PAPER, 1, 64)


def test_meta_count_equals_a_real_step() -> None:
    cfg = TrainConfig(ngf=4, ndf=4, n_layers_D=2, crop_size=16)
    m = CycleGAN(cfg)
    x = torch.zeros(2, 3, 16, 16)
    with FlopCounterMode(display=False) as counter:
        train_step(m, x, x)
    assert counter.get_total_flops() == count_step_flops(cfg, 2, 16)


def _bench():
    spec = importlib.util.spec_from_file_location(
        "train_throughput", REPO / "benchmarks/train_throughput.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_runs_on_cpu_with_its_baseline(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--size", "16", "--ngf", "4", "--ndf", "4", "--layers-d", "2",
            "--blocks", "6", "--steps", "2", "--warmup", "1", "--batch", "1", "2",
            "--precision", "bf16", "--channels-last", "--json", str(out)]  # fmt: skip
    assert _bench().main(args) == 0
    result = json.loads(out.read_text())
    base, b1, b2 = result["rows"]
    assert base["baseline"] and base["precision"] == "fp32" and base["compile"] == "none"
    assert base["batch"] == 1 and base["speedup"] == 1.0
    assert (b1["batch"], b2["batch"], b2["precision"], b2["channels_last"]) == (1, 2, "bf16", True)
    assert b2["flops_per_step"] == 2 * b1["flops_per_step"] == 2 * base["flops_per_step"]
    for r in result["rows"]:
        assert r["img_per_s"] > 0 and r["ms_per_step"] > 0 and r["mfu"] is None
    assert result["peak_tflops"] is None  # no peak on a CPU
    table = capsys.readouterr().out
    assert "baseline fp32 eager" in table and "x base" in table


def test_benchmark_end_to_end_with_the_data_loader(tmp_path: Path) -> None:
    make_prepared(tmp_path / "prepared", n_a=4, n_b=4)
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--size", "16", "--ngf", "4", "--ndf", "4", "--layers-d", "2",
            "--blocks", "6", "--steps", "6", "--warmup", "1", "--data", str(tmp_path / "prepared"),
            "--workers", "0", "--json", str(out)]  # fmt: skip
    assert _bench().main(args) == 0
    assert json.loads(out.read_text())["args"]["data"] == str(tmp_path / "prepared")
