"""One writer per project folder, and a new MLflow store created safely by two processes.

Guaranteed: of two ``cyclegan train`` started at once in one fresh folder, one trains and
ends with only its own checkpoints, model and MLflow run; the other is refused at once in one
line naming the holder (pid, host, command, since when) and writes nothing. A lock left by a
killed holder is taken over with a message saying whose it was. Two first starts on one new
SQLite store (two project folders sharing ``MLFLOW_TRACKING_URI``) both succeed.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import pytest

from cyclegan.train import checkpoint as ckpt
from tests.faults import (  # noqa: F401
    Cli,
    empty_store_fixture,
    only_line,
    project,
    run,
    run_status,
    started,
    train_args,
    user_env,
    wait_until,
)

pytestmark = pytest.mark.slow

LOCKED = re.compile(
    r"cyclegan (\w+): error: another cyclegan command is writing in (\S+) \(pid (\d+) on "
    r"(\S+), `(cyclegan [^`]+)`, since (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\) \(wait for it to "
    r"finish, or stop it; one writer per project folder\)"
)


def test_two_trains_started_at_once_in_a_fresh_folder(tmp_path: Path) -> None:
    """Two ``cyclegan train`` at the same moment in a folder with no store yet: one trains
    (exit 0), the other is refused in one line naming the first's pid and host (exit 1).
    While the first runs, another writer (prepare) is refused too and a reader (params) is
    not. The winner's checkpoints, model and MLflow run are all its own: nothing was moved
    to stale-*, the store holds one run, FINISHED."""
    work = project(tmp_path)  # no mlruns.db: the first start creates the store
    env = user_env()
    args = train_args("train.epochs=2")
    a, b = Cli(args, work, env), Cli(args, work, env)
    try:
        loser, winner = None, None
        # The loser is refused as soon as it has read its parameters; the winner trains.
        wait_until(lambda: a.proc.poll() is not None or b.proc.poll() is not None, 120, "a refusal")
        loser, winner = (a, b) if a.proc.poll() is not None else (b, a)
        assert loser.wait(10) == 1, loser.stderr
        m = LOCKED.fullmatch(only_line(loser.stderr, "train"))
        assert m, loser.stderr
        assert Path(m.group(2)) == work.resolve()
        assert int(m.group(3)) == winner.pid and m.group(4) == socket.gethostname()
        assert m.group(5).startswith("cyclegan train --set")

        winner.wait_for(r"^step 2/")
        with winner.frozen():  # alive and holding the lock, at a known point
            r = run(["prepare"], work, env)
            assert r.returncode == 1 and LOCKED.fullmatch(only_line(r.stderr, "prepare"))
            r = run(["params", *["--set", "train.lr=0.001"]], work, env)
            assert r.returncode == 0, r.stderr
        assert winner.wait(180) == 0, winner.stderr
    finally:
        for cli in (a, b):
            if cli.proc.poll() is None:
                cli.kill()

    assert "OperationalError" not in a.stderr + b.stderr
    assert not list((work / "checkpoints").glob("stale-*"))
    runs = run_status(work / "mlruns.db")
    run_id = json.loads((work / "models/cyclegan/run.json").read_text())["run_id"]
    assert runs == {run_id: "FINISHED"}
    for p in ckpt.list_checkpoints(work / "checkpoints"):
        assert ckpt.load(p)["mlflow"]["run_id"] == run_id
    assert json.loads((work / ".cyclegan/lock").read_text() or "{}") == {}  # released


def test_a_killed_holders_lock_is_taken_over_with_a_message(tmp_path: Path) -> None:
    """SIGKILL a writer while it holds the lock: the next writer takes the lock over and says
    whose it was (pid, command); it is not refused."""
    work = tmp_path
    lock = work / ".cyclegan/lock"
    # A prepare that takes about a minute: long enough to be killed while it holds the lock.
    long = ["prepare", "--set", "data.synthetic.n_train_a=20000", "--set", "data.num_workers=1"]
    with started(long, work) as holder:
        held = wait_until(lambda: lock.is_file() and lock.read_text(), 60, "the lock's holder")
        assert json.loads(str(held))["pid"] == holder.pid
        holder.send(signal.SIGKILL)
        assert holder.wait(30) == -signal.SIGKILL
    r = run(["sync"], work)
    assert r.returncode == 0, r.stderr
    assert f"taking over the project lock left by pid {holder.pid} on {socket.gethostname()}" in (
        r.stderr
    )
    assert "`cyclegan prepare --set data.synthetic.n_train_a=20000" in r.stderr


def test_two_first_starts_on_one_new_sqlite_store_both_succeed(tmp_path: Path) -> None:
    """Two projects share one SQLite store that does not exist yet (``MLFLOW_TRACKING_URI``)
    and start training at the same moment: the store's creation is serialised, both runs
    finish and both are in the store; no migration error."""
    db = tmp_path / "shared" / "mlruns.db"
    db.parent.mkdir()
    env = user_env(MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    works = [project(tmp_path / name) for name in ("one", "two")]
    clis = [Cli(train_args("train.max_steps=2"), w, env) for w in works]
    try:
        codes = [c.wait(240) for c in clis]
    finally:
        for c in clis:
            if c.proc.poll() is None:
                c.kill()
    assert codes == [0, 0], "\n".join(c.stderr for c in clis)
    ids = {json.loads((w / "models/cyclegan/run.json").read_text())["run_id"] for w in works}
    assert len(ids) == 2
    assert run_status(db) == dict.fromkeys(ids, "FINISHED")
    assert not any((w / "mlruns.db").exists() for w in works)
