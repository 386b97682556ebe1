"""Training img/s on the CPU: quiet, beside busy co-tenants and beside other training jobs.

Runs the real CycleGAN training step (``train_step`` on the embedded default model of
params.yaml unless told otherwise) in a fresh process per case, so each thread setting and
OpenMP wait policy applies from the start, and prints one table, all cases from the same run:

    setting        quiet   2 busy   ratio   2 jobs   ratio
    torch default  14.1    3.4      0.24    0.35     0.02
    auto           ...

* ``torch default``: what PyTorch does by itself (as many threads as cores).
* ``auto``: ``train.num_threads: auto`` as ``cyclegan train`` applies it
  (:func:`cyclegan.hardware.apply_threads`), decided when the process starts.
* fixed counts, and any of them with ``OMP_WAIT_POLICY=PASSIVE``.

Co-tenants: ``busy`` processes each spin one core (a pure-Python loop); ``jobs`` are other
training processes running this same step with PyTorch's default threads, as other users'
jobs on a shared machine would. The ratio is img/s beside them over img/s quiet, same setting.
Where the quiet case is not quiet (another program on the machine), the table says so.

    python benchmarks/cpu_threads.py                 # the embedded default (32 px)
    python benchmarks/cpu_threads.py --crop 128 --ngf 64 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One measurement, run in its own process: set-up, warm-up, then timed steps.
_WORKER = r"""
import json, os, sys, time
import torch
from cyclegan.config import load_config
from cyclegan.hardware import apply_threads
from cyclegan.train.step import CycleGAN, train_step

threads, steps, warmup, overrides = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
if threads == "auto":
    apply_threads("auto")
elif threads != "default":
    torch.set_num_threads(int(threads))
cfg = load_config(os.environ.get("PARAMS") or None, overrides).train
model = CycleGAN(cfg)
g = torch.Generator().manual_seed(0)
b, s = cfg.batch_size, cfg.crop_size
a = torch.rand(b, 3, s, s, generator=g) * 2 - 1
c = torch.rand(b, 3, s, s, generator=g) * 2 - 1
for _ in range(warmup):
    train_step(model, a, c)
t = time.perf_counter()
for _ in range(steps):
    train_step(model, a, c).sum().item()
dt = time.perf_counter() - t
print(json.dumps({"img_per_s": steps * b / dt, "threads": torch.get_num_threads()}))
"""

_BUSY = "while True: pass"
_JOB = _WORKER.replace("for _ in range(steps):", "while True:")


def _env(policy: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(ROOT / "src")
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    return env


def measure(threads: str, policy: str | None, args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, threads, str(args.steps), str(args.warmup), *args.set],
        env=_env(policy),
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_tenants(kind: str, n: int, args: argparse.Namespace) -> list[subprocess.Popen]:
    procs = []
    for _ in range(n):
        code = _BUSY if kind == "busy" else _JOB
        cmd = [sys.executable, "-c", code]
        if kind == "jobs":
            cmd += ["default", "0", "1", *args.set]
        procs.append(subprocess.Popen(cmd, env=_env(None), cwd=ROOT, stdout=subprocess.DEVNULL))
    time.sleep(args.settle)  # let them reach their steady state before we start
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tenants", type=int, default=2, help="co-tenant processes")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before measuring")
    p.add_argument(
        "--settings",
        default="default,auto,1,2,2:PASSIVE,auto:PASSIVE",
        help="comma-separated THREADS[:WAIT_POLICY] (THREADS: default, auto or a number)",
    )
    p.add_argument("--conditions", default="quiet,busy,jobs")
    p.add_argument("--set", action="append", default=[], help="section.key=value (params)")
    p.add_argument("--crop", type=int, default=None, help="shortcut for train.crop_size")
    p.add_argument("--ngf", type=int, default=None, help="shortcut for train.ngf and ndf")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.crop:
        args.set += [f"train.crop_size={args.crop}", f"data.load_size={args.crop}"]
    if args.ngf:
        args.set += [f"train.ngf={args.ngf}", f"train.ndf={args.ngf}"]

    settings = [(*s.split(":"), None)[:2] for s in args.settings.split(",")]
    conditions = args.conditions.split(",")
    results: dict[str, dict[str, dict[str, float]]] = {}
    load = os.getloadavg()[0]
    for condition in conditions:
        tenants = [] if condition == "quiet" else start_tenants(condition, args.tenants, args)
        try:
            for threads, policy in settings:
                name = threads + (f" {policy.lower()}" if policy else "")
                results.setdefault(name, {})[condition] = measure(threads, policy, args)
        finally:
            stop(tenants)

    head = f"{'setting':<16}" + "".join(
        f"{c:>10}" + ("" if c == "quiet" else f"{'ratio':>8}") for c in conditions
    )
    print(f"CycleGAN train step img/s, {os.cpu_count()} CPUs, load average {load:.1f} at start")
    print(f"(co-tenants: {args.tenants} busy loops / {args.tenants} default-thread jobs)")
    print(head)
    for name, row in results.items():
        quiet = row.get("quiet", {}).get("img_per_s")
        line = f"{name:<16}"
        for c in conditions:
            v = row[c]["img_per_s"]
            line += f"{v:>7.2f}/{row[c]['threads']:<2.0f}"
            if c != "quiet":
                line += f"{v / quiet:>8.2f}" if quiet else f"{'':>8}"
        print(line)
    base = results.get("default", {}).get("quiet", {}).get("img_per_s")
    if base:
        print(
            "quiet img/s over torch default, quiet: "
            + ", ".join(
                f"{n} {r['quiet']['img_per_s'] / base:.2f}"
                for n, r in results.items()
                if "quiet" in r
            )
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
