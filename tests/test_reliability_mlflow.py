"""A real ``mlflow server`` killed and restarted under a running training, credentials in the
tracking URI, and secrets searched for in everything the project writes.

Guaranteed: an outage of the tracking server never stops training and never loses the run's
record. What cannot be sent is kept in ``.cyclegan/spool`` and sent when the server answers
again - within the run (the run then ends complete and FINISHED) or by the next ``cyclegan``
command in that folder, or ``cyclegan sync`` - and the user is told what is pending. A
user:password in the URI connects (the reachability check sends it as MLflow does) and is
printed nowhere: not on stdout/stderr, not in any file of the project folder, the server's
database, its artifacts or its log.

The server runs with system metrics on (the default), as a user's would.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from tests.faults import (  # noqa: F401
    QUICK,
    FileServer,
    OwnMlflowServer,
    dataset_zip,
    file_server_fixture,
    find_secret,
    only_line,
    own_mlflow_fixture,
    project,
    run,
    started,
    train_args,
    user_env,
)
from tests.train_support import sets

pytestmark = pytest.mark.slow

SECRET = "pw-Zq8v1x7LkT3"  # the password in the URI; must appear nowhere
WITH_METRICS = ("mlflow.system_metrics=true",)


def _run_id(work: Path) -> str:
    return json.loads((work / "models/cyclegan/run.json").read_text())["run_id"]


def _csv_steps(work: Path) -> list[int]:
    with open(work / "plots/train_loss.csv") as fh:
        return [int(float(r["step"])) for r in csv.DictReader(fh)]


def _spooled(work: Path) -> list[Path]:
    return sorted((work / ".cyclegan/spool").glob("*.jsonl"))


def _assert_no_secret(server: OwnMlflowServer, work: Path, *outputs: str) -> None:
    for text in outputs:
        assert SECRET not in text
    assert find_secret(SECRET, work, server.root) == []


def _assert_complete(server: OwnMlflowServer, work: Path, run_id: str, steps: int) -> None:
    """The server's run is FINISHED with every loss point of the local CSV, the sample grids
    and the model folder (byte for byte)."""
    c = server.client()
    run_ = c.get_run(run_id)
    assert run_.info.status == "FINISHED"
    history = c.get_metric_history(run_id, "loss_G")
    assert sorted(m.step for m in history) == _csv_steps(work) == list(range(2, steps + 1, 2))
    samples = {f.path for f in c.list_artifacts(run_id, "samples")}
    assert {f"samples/step_{s:08d}.png" for s in range(4, steps + 1, 4)} <= samples
    local = Path(c.download_artifacts(run_id, "model", str(work.parent / f"dl-{run_id}")))
    for f in ("G_A.safetensors", "G_B.safetensors", "model.json"):
        assert (local / f).read_bytes() == (work / "models/cyclegan" / f).read_bytes()


def test_server_killed_and_restarted_mid_run_the_run_ends_complete(
    own_mlflow: OwnMlflowServer, tmp_path: Path
) -> None:
    """The server is SIGKILLed at step 2 and restarted (same port, same store) while
    training goes on: training never stops; the records of the outage are spooled and sent
    before the command ends; the run ends FINISHED with all 32 loss points, every sample grid
    and the model; nothing is left pending.

    MLflow's client retries a refused connection for about 13 s before giving up; with
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` (a user's setting, which the project keeps) the
    outage is noticed at the next log point, while training still has steps to run, so the
    test can freeze it there and restart the server."""
    work = project(tmp_path / "p", n_a=16)
    env = user_env(
        MLFLOW_TRACKING_URI=own_mlflow.uri_with("alice", SECRET),
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
    )
    args = train_args(*WITH_METRICS, "train.epochs=3", "train.epochs_decay=1")
    with started(args, work, env) as cli:
        cli.wait_for(r"^step 2/64 ")
        with cli.frozen():
            own_mlflow.kill()
        cli.wait_for(r"^MLflow .* failed \(")  # the outage was noticed, training goes on
        with cli.frozen():
            assert not cli.when(r"^trained \d+ steps"), "training ended before the restart"
            own_mlflow.start()
        rc = cli.wait(240)
    assert rc == 0, cli.stderr
    assert "answers again; the kept records were sent" in cli.stderr
    assert "did not answer" not in cli.stderr and _spooled(work) == []
    _assert_complete(own_mlflow, work, _run_id(work), 64)
    _assert_no_secret(own_mlflow, work, cli.stderr, cli.stdout)


def test_server_down_at_the_end_the_next_command_sends_the_run(
    own_mlflow: OwnMlflowServer, tmp_path: Path
) -> None:
    """The server dies at step 2 and stays down: training still ends (exit 0) and says what
    waits in the spool; ``cyclegan sync`` says, within seconds, that it is still pending
    (exit 1); once the server is back, the next command in the folder (translate) sends it:
    the run, RUNNING until then, ends FINISHED with all its loss points and the model; a
    later sync has nothing to do."""
    work = project(tmp_path / "p")
    env = user_env(MLFLOW_TRACKING_URI=own_mlflow.uri_with("alice", SECRET))
    outputs = []
    with started(train_args(*WITH_METRICS, "train.epochs=2"), work, env) as cli:
        cli.wait_for(r"^step 2/24 ")
        with cli.frozen():
            own_mlflow.kill()
        rc = cli.wait(240)
    outputs += [cli.stderr, cli.stdout]
    assert rc == 0, cli.stderr
    run_id = _run_id(work)
    assert f"MLflow at http://***@127.0.0.1:{own_mlflow.port} did not answer: " in cli.stderr, (
        cli.stderr
    )
    assert f"of run {run_id} wait in .cyclegan/spool" in cli.stderr
    assert "the run's end (FINISHED)" in cli.stderr
    assert [p.name for p in _spooled(work)] == [f"{run_id}.jsonl"]

    start = time.monotonic()
    r = run(["sync"], work, env)
    took = time.monotonic() - start
    outputs += [r.stderr, r.stdout]
    assert r.returncode == 1, r.stderr
    assert f"run {run_id} still has" in r.stderr and "metric values" in r.stderr
    assert took < 20, f"sync took {took:.0f}s against a dead server"

    own_mlflow.start()
    assert own_mlflow.client().get_run(run_id).info.status == "RUNNING"  # as the outage left it
    r = run(
        ["translate", "--model", "models/cyclegan", "--input", "data/prepared/testA",
         "--output", "translated"],
        work,
        env,
    )  # fmt: skip
    outputs += [r.stderr, r.stdout]
    assert r.returncode == 0, r.stderr
    assert _spooled(work) == []
    _assert_complete(own_mlflow, work, run_id, 24)
    r = run(["sync"], work, env)
    outputs += [r.stderr, r.stdout]
    assert r.returncode == 0 and "nothing pending" in r.stderr, r.stderr
    _assert_no_secret(own_mlflow, work, *outputs)


def test_credentials_in_the_uri_connect_and_are_never_printed(
    own_mlflow: OwnMlflowServer, tmp_path: Path
) -> None:
    """With user:password in an http tracking URI: a model URI the registry does not have is
    one line (exit 2) that names the server without the password (it was printed twice
    before); the same URI on a port where nothing listens fails in seconds in one line, also
    without it."""
    work = tmp_path
    (work / "in").mkdir()
    base = ["translate", "--model", "models:/cyclegan@champion", "--input", "in",
            "--output", "out"]  # fmt: skip
    from PIL import Image

    Image.new("RGB", (8, 8)).save(work / "in" / "a.png")
    r = run(base, work, user_env(MLFLOW_TRACKING_URI=own_mlflow.uri_with("alice", SECRET)))
    assert r.returncode == 2, r.stderr
    line = only_line(r.stderr, "translate")
    assert f"http://***@127.0.0.1:{own_mlflow.port}" in line

    from tests.faults import free_port

    dead = f"http://alice:{SECRET}@127.0.0.1:{free_port()}"
    start = time.monotonic()
    r2 = run(base, work, user_env(MLFLOW_TRACKING_URI=dead))
    took = time.monotonic() - start
    assert r2.returncode == 1, r2.stderr
    assert "is unreachable" in only_line(r2.stderr, "translate")
    assert took < 20, f"took {took:.0f}s"
    _assert_no_secret(own_mlflow, work, r.stderr, r.stdout, r2.stderr, r2.stdout)


def test_a_signed_dataset_url_leaves_its_signature_nowhere(
    file_server: FileServer, tmp_path: Path
) -> None:
    """``data.source`` a presigned URL (the signature and credential in its query string):
    prepare downloads it and training logs the run to the default SQLite store; the
    signature is in no output, no file of the project (manifest, downloads, the store), no
    file name, not the lock file while training holds it."""
    work = tmp_path / "p"
    work.mkdir()
    file_server.files["tiny.zip"] = dataset_zip(tmp_path)
    url = f"{file_server.url}/tiny.zip?X-Amz-Credential=AKIAX&X-Amz-Signature={SECRET}"
    outputs = []
    r = run(["prepare", *sets(*QUICK, f"data.source={url}")], work)
    outputs += [r.stderr, r.stdout]
    assert r.returncode == 0, r.stderr
    args = ["train", "--set", f"data.source={url}", *train_args("train.max_steps=8")[1:]]
    with started(args, work) as cli:
        cli.wait_for(r"^step 2/")
        with cli.frozen():  # the lock file names the holder's command line while it runs
            holder = json.loads((work / ".cyclegan/lock").read_text())
            assert holder["pid"] == cli.pid and "X-Amz-Signature=***" in holder["command"]
        assert cli.wait(120) == 0, cli.stderr
    outputs += [cli.stderr, cli.stdout]
    assert (work / "mlruns.db").is_file()
    for text in outputs:
        assert SECRET not in text
    assert find_secret(SECRET, work) == []
    assert not [p for p in work.rglob("*") if SECRET in p.name]
