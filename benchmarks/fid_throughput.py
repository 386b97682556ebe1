"""FID feature extraction speed, and whether reduced precision keeps FID's agreement.

Measures img/s of the FID Inception (the packaged standard weights) in float32, and with
bf16 / fp16 autocast, on the same images; reports the relative FID difference of each reduced
precision against float32 (the evaluation issue's bar is 1e-3). ``cyclegan evaluate`` keeps
float32 unless this shows the agreement holds.

    python benchmarks/fid_throughput.py --device cuda --n 1000 --json fid_bench.json
    python benchmarks/fid_throughput.py --device cpu --n 16 --size 64      # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
import torch

from cyclegan.evaluate.fid import fid_from_features
from cyclegan.evaluate.inception import FIDInception


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    # Smooth random images (blurred noise) look more like photos to Inception than white noise.
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 8, size // 8, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=500, help="images per set (two sets)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    net = FIDInception.load(device=args.device)
    a, b = _images(args.n, args.size, 0), _images(args.n, args.size, 1)
    dtypes: dict[str, torch.dtype | None] = {"fp32": None}
    if args.device.startswith("cuda"):
        dtypes.update(bf16=torch.bfloat16, fp16=torch.float16)
    else:
        dtypes.update(bf16=torch.bfloat16)
    rows, ref_fid = [], None
    for name, dtype in dtypes.items():
        ctx = (
            torch.autocast(device_type=torch.device(args.device).type, dtype=dtype)
            if dtype
            else contextlib.nullcontext()
        )
        with ctx:
            net.features(a[: args.batch], batch_size=args.batch)  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fa = net.features(a, batch_size=args.batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            fb = net.features(b, batch_size=args.batch)
        fid = fid_from_features(fa, fb)
        ref_fid = fid if ref_fid is None else ref_fid
        rows.append(
            {
                "precision": name,
                "img_per_s": args.n / dt,
                "fid": fid,
                "rel_diff_vs_fp32": abs(fid - ref_fid) / max(abs(ref_fid), 1e-12),
                "finite": bool(np.isfinite(fa).all()),
            }
        )
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"FID Inception on {device_name}, {args.n} images of {args.size}px, batch {args.batch}")
    print(f"{'precision':10} {'img/s':>9} {'FID':>10} {'rel diff':>10}")
    for r in rows:
        print(
            f"{r['precision']:10} {r['img_per_s']:9.1f} {r['fid']:10.4f} "
            f"{r['rel_diff_vs_fp32']:10.2e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": device_name, "n": args.n, "size": args.size, "rows": rows}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
