"""Training throughput of the real CycleGAN step: img/s, ms/step, peak memory, TFLOP/s, MFU.

Every run also measures the reference-style baseline - fp32, eager, batch 1, contiguous
layout, PyTorch's default math settings (as the reference code runs) - on the same device in
the same process, and reports each configuration's speed as a ratio to it.

The step timed is :func:`cyclegan.train.step.train_step`, the one ``cyclegan train`` runs. FLOPs
are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one step (convolutions and
matmuls, forward and backward; the paper model at 256x256: 1.88 TFLOP per image).

Examples::

    python benchmarks/train_throughput.py                               # paper model, 256px
    python benchmarks/train_throughput.py --precision bf16 --channels-last \\
        --compile reduce-overhead --batch 1 4 16 --json bench.json
    python benchmarks/train_throughput.py --data data/prepared --workers 8   # with loading
    python benchmarks/train_throughput.py --device cpu --size 32 --ngf 8 --steps 5  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch

from cyclegan.config import TrainConfig
from cyclegan.data.dataset import UnpairedDataset
from cyclegan.hardware import resolve_device
from cyclegan.train.distributed import DistInfo
from cyclegan.train.loader import make_loader
from cyclegan.train.step import CycleGAN, count_step_flops, train_step

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (SXM parts; sparsity excluded):
# H100 SXM 989.4 TFLOP/s, H200 the same silicon and clocks, A100 312.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def default_peak(device: torch.device) -> tuple[float | None, str]:
    """The bf16 dense peak of this GPU by name, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None, "none (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops, f"NVIDIA datasheet, {key} dense bf16"
    return None, f"unknown GPU {name!r}: pass --peak-tflops"


@dataclasses.dataclass
class Case:
    name: str
    batch: int
    precision: str
    compile: str
    channels_last: bool
    baseline: bool = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(args: argparse.Namespace, cfg: TrainConfig, dist: DistInfo) -> Iterator[Any]:
    """Endless batches: random tensors, or the real DataLoader over --data."""
    if args.data is None:
        gen = torch.Generator().manual_seed(0)
        a = torch.rand(cfg.batch_size, 3, args.size, args.size, generator=gen) * 2 - 1
        b = torch.rand(cfg.batch_size, 3, args.size, args.size, generator=gen) * 2 - 1
        while True:
            yield {"A": a, "B": b}
    dataset = UnpairedDataset(args.data, crop_size=args.size, flip=True, seed=0)
    loader, sampler, _ = make_loader(
        dataset, dist, batch_size=cfg.batch_size, num_workers=args.workers, seed=0
    )
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def run_case(args: argparse.Namespace, case: Case, device: torch.device) -> dict[str, Any]:
    """Build the model for ``case``, warm up, time ``args.steps`` steps."""
    cfg = TrainConfig(
        batch_size=case.batch,
        crop_size=args.size,
        netG="resnet_9blocks" if args.blocks == 9 else "resnet_6blocks",
        ngf=args.ngf,
        ndf=args.ndf,
        n_layers_D=args.layers_d,
        precision=case.precision,  # type: ignore[arg-type]
        compile=case.compile,  # type: ignore[arg-type]
        channels_last=case.channels_last,
    )
    if device.type == "cuda":
        # The baseline keeps PyTorch's defaults (as the reference code runs); the fast
        # configurations let cuDNN pick algorithms for the fixed shapes.
        torch.backends.cudnn.benchmark = not case.baseline
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = psutil.Process().memory_info().rss
    dist = DistInfo(device=device)
    model = CycleGAN(cfg, dist)
    batches = _batches(args, cfg, dist)

    def step() -> torch.Tensor:
        batch = next(batches)
        return train_step(model, model.to_input(batch["A"]), model.to_input(batch["B"]))

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        losses = step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses = step()
    _sync(device)
    seconds = time.perf_counter() - t0
    finite = bool(torch.isfinite(losses).all())
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = (psutil.Process().memory_info().rss - rss_before) / 2**20
    flops = count_step_flops(cfg, case.batch, args.size)
    tflops = flops * args.steps / seconds / 1e12
    return {
        **dataclasses.asdict(case),
        "img_per_s": case.batch * args.steps / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        "warmup_s": warmup_s,
        "peak_memory_mb": peak_mb,
        "flops_per_step": flops,
        "tflops_per_s": tflops,
        "losses_finite": finite,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="crop side (default 256)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch size(s) per step")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument(
        "--compile", choices=["none", "default", "reduce-overhead", "max-autotune"], default="none"
    )
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    p.add_argument("--ngf", type=int, default=64, help="generator width (paper: 64)")
    p.add_argument("--ndf", type=int, default=64, help="discriminator width (paper: 64)")
    p.add_argument("--blocks", type=int, choices=[6, 9], default=9, help="residual blocks")
    p.add_argument("--layers-d", type=int, default=3, help="PatchGAN depth (3 = 70x70)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--data", type=Path, default=None, help="prepared dataset: time with loading")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers with --data")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: by GPU)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    peak, peak_source = default_peak(device)
    if args.peak_tflops is not None:
        peak, peak_source = args.peak_tflops, "--peak-tflops"

    cases = [Case("baseline fp32 eager", 1, "fp32", "none", False, baseline=True)]
    for b in args.batch:
        label = f"{args.precision} {args.compile}" + (" cl" if args.channels_last else "")
        cases.append(Case(label, b, args.precision, args.compile, args.channels_last))
    rows = [run_case(args, c, device) for c in cases]
    base = rows[0]["img_per_s"]
    for r in rows:
        r["speedup"] = r["img_per_s"] / base
        r["mfu"] = r["tflops_per_s"] / peak if peak else None

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{device_name}, {args.size}x{args.size}, ngf {args.ngf}, {args.blocks} blocks, "
        f"{'data ' + str(args.data) if args.data else 'synthetic tensors'}, "
        f"{rows[0]['flops_per_step'] / 1e9:.4g} GFLOP per image-step"
    )
    head = f"{'config':<28}{'batch':>6}{'img/s':>10}{'ms/step':>10}{'peak MB':>10}"
    print(head + f"{'TFLOP/s':>10}{'MFU':>8}{'x base':>8}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(
            f"{r['name']:<28}{r['batch']:>6}{r['img_per_s']:>10.2f}{r['ms_per_step']:>10.1f}"
            f"{r['peak_memory_mb']:>10.0f}{r['tflops_per_s']:>10.2f}{mfu:>8}{r['speedup']:>8.2f}"
        )
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "peak_tflops": peak,
        "peak_source": peak_source,
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["losses_finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
