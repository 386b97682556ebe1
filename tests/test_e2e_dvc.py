"""`dvc repro` end to end in a temporary git repository made from the project's files.

With tiny settings: all four stages run; a second repro does nothing; a train parameter
change re-runs train, evaluate and register but not prepare; `dvc exp run -S` works and its
MLflow run carries the experiment name; `dvc exp show`, `dvc metrics diff` and
`dvc plots show` give sensible output.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.train_support import copy_project

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {
    "data": {"synthetic": {"n_train_a": 16, "n_train_b": 16, "n_test": 6}},
    "train": {
        "epochs": 1,
        "epochs_decay": 1,
        "ngf": 8,
        "ndf": 8,
        "log_every": 4,
        "sample_every": 16,
        "checkpoint_every": 16,
    },
    "evaluate": {"kid_subsets": 10, "kid_subset_size": 3, "num_samples": 3},
    "register": {"onnx": False},  # attached ONNX files: tests/test_serving.py
}
STAGES = ("prepare", "train", "evaluate", "register")


def user_env() -> dict[str, str]:
    """A user's shell for dvc and git: the venv's bin first, no MLflow, AWS or DVC settings
    from the parent, a git identity, no DVC analytics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
        DVC_NO_ANALYTICS="1",
    )
    return env


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{out[-4000:]}"
    return out


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh git repository holding the project's files (tracked, or new and not ignored),
    with tiny params."""
    work = tmp_path_factory.mktemp("dvc") / "project"
    copy_project(work)
    params = _merge(yaml.safe_load((work / "params.yaml").read_text()), TINY)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = user_env()
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"]):
        _run(cmd, work, env)
    _run(["git", "commit", "-qm", "project"], work, env)
    return work, env


def test_repro_skip_rerun_and_experiments(project: tuple[Path, dict[str, str]]) -> None:
    work, env = project
    dvc = str(BIN / "dvc")

    out = _run([dvc, "repro"], work, env)
    assert _ran(out) == set(STAGES), out[-3000:]
    evals = json.loads((work / "metrics/eval.json").read_text())
    for key in ("fid_A2B", "fid_B2A", "kid_A2B", "kid_B2A", "psnr_A2B", "ssim_B2A"):
        assert isinstance(evals[key], float)
    assert json.loads((work / "metrics/register.json").read_text())["registered"] == 1
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "baseline run"], work, env)

    # Nothing changed: nothing runs.
    out = _run([dvc, "repro"], work, env)
    assert _ran(out) == set(), out[-3000:]

    # A train parameter: train, evaluate and register run again; prepare does not.
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"]["lr"] = 0.0003
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([dvc, "repro"], work, env)
    assert _ran(out) == {"train", "evaluate", "register"}, out[-3000:]

    diff = _run([dvc, "metrics", "diff", "--json"], work, env)
    assert "metrics/eval.json" in json.loads(diff)
    _run(["git", "checkout", "--", "params.yaml"], work, env)

    # An experiment: its MLflow run carries the experiment's name.
    out = _run([dvc, "exp", "run", "-n", "lr-half", "-S", "train.lr=0.0001"], work, env)
    assert "train" in _ran(out), out[-3000:]
    with sqlite3.connect(work / "mlruns.db") as db:
        tags = db.execute("SELECT value FROM tags WHERE key = 'dvc_exp_name'").fetchall()
    assert ("lr-half",) in tags

    shown = json.loads(_run([dvc, "exp", "show", "--json"], work, env))
    assert "lr-half" in json.dumps(shown)
    plots = _run([dvc, "plots", "show", "--json"], work, env)
    assert "plots/train_loss.csv" in plots


def test_a_queued_sweep_lands_in_the_projects_mlflow_store(
    project: tuple[Path, dict[str, str]],
) -> None:
    """The README's sweep, as written: `dvc exp run --queue` over a grid, then `dvc queue
    start`. DVC runs each variant in a temporary copy of the project; their MLflow runs must
    land in the project's own store (named after the experiments), with the best as
    champion, and nothing of the store left in the temporary copies."""
    import time

    work, env = project
    dvc = str(BIN / "dvc")
    _run([dvc, "exp", "run", "--queue", "-S", "train.lr=0.0001,0.0004"], work, env)
    _run([dvc, "queue", "start"], work, env)
    deadline = time.monotonic() + 540
    while True:
        status = _run([dvc, "queue", "status"], work, env)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.monotonic() < deadline, status
        time.sleep(2)  # polling an external queue's status, with a deadline
    assert "Failed" not in status, status
    names = re.findall(r"^\w+\s+(\S+)\s+.*Success", status, flags=re.M)
    assert len(names) == 2, status

    with sqlite3.connect(work / "mlruns.db") as db:
        runs = dict(db.execute("SELECT run_uuid, name FROM runs").fetchall())
        exp_tags = dict(
            db.execute("SELECT run_uuid, value FROM tags WHERE key = 'dvc_exp_name'").fetchall()
        )
        champion = db.execute(
            "SELECT mv.run_id FROM registered_model_aliases a JOIN model_versions mv "
            "ON mv.name = a.name AND mv.version = a.version WHERE a.alias = 'champion'"
        ).fetchone()[0]
        fid = dict(
            db.execute(
                "SELECT run_uuid, value FROM latest_metrics WHERE key = 'fid_A2B'"
            ).fetchall()
        )
    swept = {run for run, name in exp_tags.items() if name in names}
    assert len(swept) == 2 and {runs[r] for r in swept} == set(names)
    assert champion in fid and fid[champion] == min(fid.values())
    assert not list((work / ".dvc" / "tmp").rglob("mlruns.db"))
