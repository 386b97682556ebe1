"""``cyclegan evaluate`` with a cold feature cache, then again after a retrain (warm cache).

In a fresh project folder: ``cyclegan prepare`` with the repository's params.yaml (the
default dataset: 64 test images per domain at 32 px, with ground truth), a very short
``cyclegan train``, a timed ``cyclegan evaluate`` (cold cache), a second short training with
another seed (new generator weights, as a retrain leaves), and a second timed evaluate. The
evaluation's cost does not depend on how long the model trained, so a few steps suffice;
``--retrain init`` skips training altogether and writes freshly initialised generators of the
configured architecture instead (the evaluation then opens its own MLflow run, in both runs).
Prints both times, their ratio (the target is <= 0.35) and what each run embedded, with the
Inception img/s the stage recorded (the machine may be shared: compare at similar img/s).

    python benchmarks/eval_cache.py                  # in a temporary folder, removed after
    python benchmarks/eval_cache.py --workdir /tmp/bench --json eval_cache.json
    python benchmarks/eval_cache.py --retrain init   # without training
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("cyclegan"))
TARGET_RATIO = 0.35


def _cyclegan(workdir: Path, env: dict[str, str], *args: str) -> float:
    """Run one CLI command in ``workdir``; its wall time in seconds (raises if it fails)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [CLI, *args], cwd=workdir, env=env, capture_output=True, text=True, check=False
    )
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"cyclegan {' '.join(args)} failed with exit code {proc.returncode}")
    return dt


def _weights_digest(workdir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted((workdir / "models" / "cyclegan").glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _train(workdir: Path, env: dict[str, str], steps: int, seed: int) -> float:
    return _cyclegan(
        workdir,
        env,
        "train",
        "--set",
        f"train.max_steps={steps}",
        "--set",
        f"train.seed={seed}",
        "--set",
        "train.resume=never",
    )


def _init_model(workdir: Path, env: dict[str, str], steps: int, seed: int) -> float:
    """New generator weights without training: the params' architecture, random init."""
    import torch

    from cyclegan.config import load_config
    from cyclegan.models import GeneratorSpec, init_weights, save_generators

    t0 = time.perf_counter()
    cfg = load_config(workdir / "params.yaml", [], required=True)
    spec = GeneratorSpec.from_train_config(cfg.train)
    g = torch.Generator().manual_seed(seed)
    nets = [spec.build(), spec.build()]
    for net in nets:
        init_weights(net, generator=g)
    save_generators(workdir / "models" / "cyclegan", nets[0], nets[1], spec, extra={"step": 0})
    return time.perf_counter() - t0


def _evaluate(workdir: Path, env: dict[str, str]) -> dict:
    seconds = _cyclegan(workdir, env, "evaluate")
    details = json.loads((workdir / "metrics" / "eval_details.json").read_text())
    return {
        "seconds": round(seconds, 2),
        "images": details["inception_images"],
        "inception_img_per_s": details["inception_img_per_s"],
        "stage_seconds": details["seconds"],
        "weights": _weights_digest(workdir),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--steps", type=int, default=10, help="training steps per (re)train")
    p.add_argument(
        "--retrain",
        choices=("train", "init"),
        default="train",
        help="train: `cyclegan train` for --steps; init: new random generators, no training",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="eval_cache_"))
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", workdir / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlruns.db'}"
    retrain = _train if args.retrain == "train" else _init_model
    try:
        _cyclegan(workdir, env, "prepare")
        retrain(workdir, env, args.steps, seed=0)
        first = _evaluate(workdir, env)  # a fresh folder: the feature cache is cold
        retrain(workdir, env, args.steps, seed=1)
        second = _evaluate(workdir, env)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if first["weights"] == second["weights"]:
        raise SystemExit("the retrain left the same generator weights: nothing was measured")

    ratio = second["seconds"] / first["seconds"]
    for name, r in (("first (cold cache)", first), ("after retrain (warm)", second)):
        im = r["images"]
        print(
            f"{name:22} {r['seconds']:7.2f} s  embedded {im['embedded']:4d}, "
            f"from cache {im['from_cache']:4d}, Inception {r['inception_img_per_s']} img/s, "
            f"stage {r['stage_seconds']}"
        )
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(f"ratio {ratio:.3f} ({verdict} the target <= {TARGET_RATIO})")
    if args.json:
        args.json.write_text(
            json.dumps({"first": first, "second": second, "ratio": ratio}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
