"""Graceful stop, as Kubernetes and a terminal deliver it: real SIGTERM / SIGINT from outside.

Guaranteed: training finishes the step it is in, writes a full checkpoint, ends its MLflow run
as KILLED and exits 143 (SIGTERM) or 130 (SIGINT) with one line saying where the state is;
running the same command resumes, bit-identical to a run that was never stopped (at the same
thread count); a second signal exits at once even while MLflow hangs; under DDP every rank
stops at the same step and the launcher reports in one line.

Synchronisation: each test waits for a log line ("step 2/...") and then freezes the process
(SIGSTOP) while it sends the signal, so the signal is taken at a known point of the run
whatever the machine's load; SIGCONT lets it go on.
"""

from __future__ import annotations

import csv
import json
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from cyclegan.train import checkpoint as ckpt
from tests.faults import (  # noqa: F401
    OwnMlflowServer,
    empty_store_fixture,
    error_line,
    metric_history,
    own_mlflow_fixture,
    project,
    run,
    run_status,
    started,
    temp_files,
    train_args,
    user_env,
    wait_until,
)
from tests.test_train_resume import _assert_states_equal

pytestmark = pytest.mark.slow

# 16 images in A: 16 steps per epoch; 2 + 1 epochs = 48 steps. A stop soon after step 2 is
# mid-epoch with a wide margin; a 4-image pool makes its random swaps part of the state.
N_A = 16
STOP = (
    "train.epochs=2",
    "train.epochs_decay=1",
    "train.pool_size=4",
    "train.checkpoint_every=100",  # only epoch ends and the stop itself write checkpoints
    "train.keep_checkpoints=10",
)
TARGET = 48
STOPPED = re.compile(
    r"cyclegan train: stopped by (SIGTERM|SIGINT) at step (\d+) of (\d+); the full state is "
    r"saved in (\S+): run the same command to resume"
)
# Kubernetes sends SIGKILL this long after SIGTERM unless the pod says otherwise.
K8S_GRACE_S = 30


def _run_id(work: Path) -> str:
    return json.loads((work / "models/cyclegan/run.json").read_text())["run_id"]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r.pop("img_per_s")  # wall-clock
    return rows


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> Path:
    """The same training, never interrupted."""
    work = project(tmp_path_factory.mktemp("straight"), empty_store, n_a=N_A)
    r = run(train_args(*STOP), work)
    assert r.returncode == 0, r.stderr
    return work


def test_sigterm_saves_everything_and_resume_is_bit_identical(
    straight: Path, tmp_path: Path, empty_store: Path
) -> None:
    """SIGTERM mid-epoch: the step finishes, the full state (incl. the open loss window and
    the thread count) is saved atomically, the MLflow run ends KILLED, exit 143 within the
    Kubernetes grace period with one line; the same command resumes into the same run and ends
    bit-identical to the uninterrupted run (weights, optimizers, pools, loss CSV, every MLflow
    loss point), the run FINISHED."""
    work = project(tmp_path, empty_store, n_a=N_A)
    with started(train_args(*STOP), work) as cli:
        cli.wait_for(rf"^step 2/{TARGET} ")
        with cli.frozen():
            sent = cli.send(signal.SIGTERM)
        rc = cli.wait(120)
        exited = time.monotonic()
    assert rc == 143, cli.stderr
    m = STOPPED.fullmatch(error_line(cli.stderr, "train"))
    assert m, cli.stderr
    step = int(m.group(2))
    assert m.group(1) == "SIGTERM" and int(m.group(3)) == TARGET and 2 <= step < TARGET
    saved = work / m.group(4)
    assert saved == work / "checkpoints" / f"step_{step:08d}.pt"
    assert [p.name for p in ckpt.list_checkpoints(work / "checkpoints")] == [saved.name]
    assert temp_files(work / "checkpoints") == []
    state = ckpt.load(saved)
    assert state["progress"]["step"] == step
    assert state["progress"]["batches_done"] == step % N_A
    assert state["threads"] == 1  # exact resume needs the same intra-op thread count
    assert state["progress"]["steps_since_log"] == step % 2  # the open loss window is kept
    run_id = _run_id(work)
    assert run_status(work / "mlruns.db", run_id) == {run_id: "KILLED"}
    logged = [s for s, _ in metric_history(work / "mlruns.db", run_id, "loss_G")]
    assert logged == list(range(2, step + 1, 2))
    took = exited - sent
    print(f"\nSIGTERM at step {step}: exit {took:.1f}s later")
    assert took < K8S_GRACE_S, f"exit took {took:.0f}s"

    r = run(train_args(*STOP), work)
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {step}" in r.stderr

    final = f"checkpoints/step_{TARGET:08d}.pt"
    a, b = ckpt.load(straight / final), ckpt.load(work / final)
    _assert_states_equal(a["model"], b["model"], "model")
    _assert_states_equal(a["ranks"], b["ranks"], "ranks")
    for f in ("G_A.safetensors", "G_B.safetensors"):
        assert (straight / "models/cyclegan" / f).read_bytes() == (
            work / "models/cyclegan" / f
        ).read_bytes()
    assert _csv(work / "plots/train_loss.csv") == _csv(straight / "plots/train_loss.csv")
    assert _run_id(work) == run_id
    assert run_status(work / "mlruns.db", run_id) == {run_id: "FINISHED"}
    for key in ("loss_G", "loss_D_A", "loss_cycle_B", "lr"):
        assert metric_history(work / "mlruns.db", run_id, key) == metric_history(
            straight / "mlruns.db", _run_id(straight), key
        ), key


def test_second_ctrl_c_exits_at_once_while_mlflow_hangs(
    tmp_path: Path, empty_store: Path, own_mlflow: OwnMlflowServer
) -> None:
    """Ctrl-C saves the checkpoint, then waits for MLflow to take the run's end; with the
    tracking server hung (frozen), a second Ctrl-C exits 130 at once, the checkpoint
    complete and readable, no temp file left."""
    work = project(tmp_path, empty_store)
    env = user_env(MLFLOW_TRACKING_URI=own_mlflow.uri)
    with started(train_args("train.epochs=50", "train.checkpoint_every=1000"), work, env) as cli:
        cli.wait_for(r"^step 4/")
        with own_mlflow.frozen():
            with cli.frozen():
                cli.send(signal.SIGINT)
            cli.wait_for(r"^SIGINT: stopping after this step")
            saved = wait_until(
                lambda: ckpt.list_checkpoints(work / "checkpoints"), 60, "the stop's checkpoint"
            )
            # Saved; the run's end now waits on the hung server.
            assert cli.proc.poll() is None, cli.stderr
            again = cli.send(signal.SIGINT)
            rc = cli.wait(60)
            took = time.monotonic() - again
    assert rc == 130, cli.stderr
    assert "SIGINT again: exiting now" in cli.stderr
    assert "Traceback" not in cli.stderr
    print(f"\nsecond Ctrl-C while MLflow hangs: exit {took:.1f}s later")
    assert took < 10, f"the second Ctrl-C took {took:.0f}s to exit"
    assert ckpt.load(saved[-1])["progress"]["step"] >= 4
    assert temp_files(work / "checkpoints", work / "models/cyclegan") == []


@pytest.mark.slow
def test_one_sigterm_fits_the_grace_period_while_mlflow_hangs(
    tmp_path: Path, empty_store: Path, own_mlflow: OwnMlflowServer
) -> None:
    """Kubernetes sends SIGTERM once and SIGKILL 30 s later. With the tracking server hung,
    the stop still ends well inside that: the checkpoint is written, the run's last records
    and its end (KILLED) wait in the spool instead of in memory, exit 143."""
    work = project(tmp_path, empty_store)
    env = user_env(MLFLOW_TRACKING_URI=own_mlflow.uri)
    with started(train_args("train.epochs=50", "train.checkpoint_every=1000"), work, env) as cli:
        cli.wait_for(r"^step 4/")
        with own_mlflow.frozen():
            sent = cli.send(signal.SIGTERM)
            rc = cli.wait(60)
            took = time.monotonic() - sent
    assert rc == 143, cli.stderr
    print(f"\none SIGTERM while MLflow hangs: exit {took:.1f}s later")
    assert took < 25, f"the stop took {took:.0f}s: a pod would be SIGKILLed at 30 s"
    assert ckpt.list_checkpoints(work / "checkpoints")
    pending = [json.loads(line) for f in (work / ".cyclegan/spool").glob("*.jsonl")
               for line in f.read_text().splitlines()]  # fmt: skip
    assert any(op["op"] == "terminate" and op["status"] == "KILLED" for op in pending), pending


def _ranks(cli_pid: int) -> dict[int, psutil.Process]:
    ranks = {}
    for p in psutil.Process(cli_pid).children(recursive=True):
        rank = p.environ().get("RANK")
        if rank is not None:
            ranks[int(rank)] = p
    return ranks


def test_ddp_sigterm_stops_every_rank_at_one_step_and_a_dead_rank_is_one_line(
    tmp_path: Path, empty_store: Path
) -> None:
    """Two gloo ranks launched by ``cyclegan train``: SIGTERM to the launcher (PID 1 of a
    pod) reaches every rank once; all stop at the same step and one checkpoint holds both
    ranks' state; exit 143 with one line and none of torchrun's reports. Resumed, the job
    trains on under DDP; a rank killed by the kernel (SIGKILL, as the OOM killer does) ends the
    job with exit 1, no traceback, and a last line naming that rank and its signal (the
    surviving rank may say in one line that it lost its peer)."""
    work = project(tmp_path, empty_store, n_a=N_A)
    args = train_args("train.nproc_per_node=2", "train.epochs=50", "train.checkpoint_every=1000")
    with started(args, work) as cli:
        cli.wait_for(r"^step 4/")
        ranks = _ranks(cli.pid)
        assert sorted(ranks) == [0, 1]
        sent = cli.send(signal.SIGTERM)
        rc = cli.wait(120)
        took = time.monotonic() - sent
    assert rc == 143, cli.stderr
    m = STOPPED.fullmatch(error_line(cli.stderr, "train"))
    assert m and m.group(1) == "SIGTERM", cli.stderr
    step = int(m.group(2))
    print(f"\nDDP SIGTERM at step {step}: exit {took:.1f}s later")
    assert took < K8S_GRACE_S, f"exit took {took:.0f}s"
    for noise in ("Traceback", "ChildFailedError", "elastic", "SignalException"):
        assert noise not in cli.stderr, cli.stderr
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks.values())
    state = ckpt.load(work / m.group(4))
    # One checkpoint, written at the step every rank agreed on, with both ranks' pools and RNG.
    assert state["progress"]["step"] == step and state["settings"]["world_size"] == 2
    assert len(state["ranks"]) == 2

    with started(args, work) as cli:
        cli.wait_for(rf"resuming from step {step} ")
        cli.wait_for(rf"^step {step + 2 - step % 2}/")  # trained past the checkpoint
        _ranks(cli.pid)[1].send_signal(signal.SIGKILL)
        rc = cli.wait(120)
    assert rc == 1, cli.stderr
    assert "Traceback" not in cli.stderr and "elastic" not in cli.stderr, cli.stderr
    # The launcher's line names the cause; a surviving rank may first say it lost its peer.
    lines = [ln for ln in cli.stderr.splitlines() if ln.startswith("cyclegan train: error: ")]
    assert lines[-1].startswith("cyclegan train: error: training failed: rank 1 was killed by "
                                "SIGKILL"), cli.stderr  # fmt: skip
    assert all("lost contact with the other ranks" in ln for ln in lines[:-1]), cli.stderr
