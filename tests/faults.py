"""Helpers for the reliability battery (tests/test_reliability_*.py); no tests here.

Everything runs as a user would: the ``cyclegan`` console script in a subprocess, in a fresh
folder, with an environment free of the parent's MLFLOW_* and AWS_* variables, and faults
that come from outside (real signals, a real ``mlflow server`` killed or frozen, a real full
filesystem). Synchronisation is on observable conditions (a log line, a file, a port) with
a deadline, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.train_support import TINY, make_prepared, sets

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]

# A short, fast training: 8 steps per epoch at batch 1, every step logged every 2.
QUICK = (*TINY, "train.num_threads=1", "mlflow.system_metrics=false")


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: the venv's bin first, no MLflow or AWS settings from
    the parent (so the default store ``sqlite:///mlruns.db`` in the cwd is used), torch on one
    thread (bit-identical comparisons need a fixed thread count), unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"
    )
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def run(
    args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``cyclegan <args>`` to completion, output captured."""
    return subprocess.run(
        ["cyclegan", *args],
        cwd=cwd,
        env=env or user_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_line(stderr: str, command: str) -> str:
    """The one line a failing command prints: asserts there is exactly one (apart from the
    training's own progress lines before it) and no traceback; returns it."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "no error message"
    errors = [ln for ln in lines if ln.startswith(f"cyclegan {command}: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr
    return errors[0]


def only_line(stderr: str, command: str) -> str:
    """The whole stderr is one ``cyclegan COMMAND: error: ...`` line."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"cyclegan {command}: error: "), stderr
    return lines[0]


def wait_until(cond: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``cond`` until it returns something truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Cli:
    """A running ``cyclegan`` command whose stderr and stdout are collected line by line."""

    def __init__(
        self, args: Sequence[str], cwd: Path, env: dict[str, str], new_session: bool = True
    ) -> None:
        self.args = list(args)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            ["cyclegan", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=new_session,  # like a shell job: its own process group
        )
        self.pid = self.proc.pid
        self.err: list[tuple[float, str]] = []
        self.out: list[str] = []
        self._cv = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, False), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream, is_err: bool) -> None:
        for line in stream:
            with self._cv:
                if is_err:
                    self.err.append((time.monotonic(), line))
                else:
                    self.out.append(line)
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    @property
    def stderr(self) -> str:
        with self._cv:
            return "".join(line for _, line in self.err)

    @property
    def stdout(self) -> str:
        with self._cv:
            return "".join(self.out)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """The first stderr line matching the regex ``pattern`` (seen so far or to come).
        Fails, showing the output, if the process exits or the deadline passes first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for _, line in self.err:
                    if m := rx.search(line):
                        return m
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._readers):
                    raise AssertionError(
                        f"exited with {self.proc.returncode} before {pattern!r}:\n"
                        + "".join(ln for _, ln in self.err)[-4000:]
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {pattern!r} after {timeout:.0f}s:\n"
                        + "".join(ln for _, ln in self.err)[-4000:]
                    )
                self._cv.wait(min(left, 0.5))

    def when(self, pattern: str) -> float | None:
        """When (time.monotonic) a stderr line matching ``pattern`` arrived."""
        rx = re.compile(pattern)
        with self._cv:
            return next((t for t, line in self.err if rx.search(line)), None)

    def send(self, sig: int) -> float:
        """Send ``sig`` to the process; returns when."""
        os.kill(self.pid, sig)
        return time.monotonic()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP for the block, then SIGCONT: a signal sent meanwhile is taken at a known
        point of the run (the step the log line named), whatever the machine's load."""
        os.kill(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.pid, signal.SIGCONT)

    def wait(self, timeout: float = 180) -> int:
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(10)
        return rc

    def kill(self) -> None:
        """SIGKILL the process and what it started (idempotent)."""
        import psutil

        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            for child in psutil.Process(self.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.wait(30)


@contextlib.contextmanager
def started(args: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> Iterator[Cli]:
    """A :class:`Cli` that is killed at the end of the block if still running."""
    cli = Cli(args, cwd, env or user_env())
    try:
        yield cli
    finally:
        if cli.proc.poll() is None:
            cli.kill()


def project(root: Path, store: Path | None = None, n_a: int = 8, n_b: int = 6) -> Path:
    """A fresh project folder with a tiny prepared dataset (and a copy of an initialised,
    empty MLflow store as ``mlruns.db``, which saves each test MLflow's migrations)."""
    make_prepared(root / "data/prepared", n_a=n_a, n_b=n_b)
    if store is not None:
        shutil.copyfile(store, root / "mlruns.db")
    return root


def train_args(*overrides: str) -> list[str]:
    """``train`` with the QUICK settings and ``overrides``."""
    return ["train", *sets(*QUICK, *overrides)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_status(db: Path, run_id: str | None = None) -> dict[str, str]:
    """``{run_id: status}`` from an MLflow SQLite store, read with sqlite3 directly."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT run_uuid, status FROM runs").fetchall()
    finally:
        con.close()
    found = dict(rows)
    return {run_id: found.get(run_id, "")} if run_id else found


def find_secret(secret: str, *roots: Path) -> list[str]:
    """Every file under ``roots`` whose bytes contain ``secret`` (as text, URL-quoted or
    base64 in a Basic auth header)."""
    import base64
    from urllib.parse import quote

    needles = {secret.encode(), quote(secret).encode()}
    needles.add(base64.b64encode(f"alice:{secret}".encode()))
    hits = []
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            try:
                data = f.read_bytes()
            except OSError:
                continue
            if any(n in data for n in needles):
                hits.append(str(f))
    return hits


# ---------------------------------------------------------------------------------------------
# A real `mlflow server` that the tests may kill, freeze and restart
# ---------------------------------------------------------------------------------------------


class OwnMlflowServer:
    """``mlflow server`` on a fixed loopback port with a SQLite backend and local artifact
    storage (``--serve-artifacts``): restarting it brings back the same server, the same
    store. Its job runner is off (it starts a pool of workers that the tests do not need)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.backend = root / "mlflow.db"
        self.artifacts = root / "artifacts"
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uri_with(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        cmd = [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.backend}",
            "--artifacts-destination",
            str(self.artifacts),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with self.log.open("a") as fh:
            self.proc = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        self.starts += 1
        wait_until(self._healthy, timeout, f"mlflow server on port {self.port}")

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"mlflow server exited:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server and its workers: an outage, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        # The port is free again once nothing listens on it.
        wait_until(lambda: not _listening(self.port), 30, f"port {self.port} to close")

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP the whole server for the block: connections are accepted by the kernel,
        never answered (a hung server), then SIGCONT."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


_SHARED: dict[str, object] = {}


def _shared(key: str, make: Callable[[], object]) -> object:
    """One instance per test session even when several modules import the fixture."""
    if key not in _SHARED:
        _SHARED[key] = make()
    return _SHARED[key]


@pytest.fixture(scope="session", name="own_mlflow")
def own_mlflow_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnMlflowServer]:
    """A real ``mlflow server`` of this battery's own (tests may kill and restart it; each
    leaves it running)."""

    def make() -> OwnMlflowServer:
        server = OwnMlflowServer(tmp_path_factory.mktemp("own-mlflow"))
        server.start()
        return server

    server = _shared("mlflow", make)
    assert isinstance(server, OwnMlflowServer)
    server.ensure_running()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


@pytest.fixture(scope="session", name="empty_store")
def empty_store_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its tables created (MLflow's migrations, once per session),
    to copy into each project folder as ``mlruns.db``."""

    def make() -> Path:
        db = tmp_path_factory.mktemp("store") / "mlruns.db"
        code = (
            "import sys; from mlflow.tracking import MlflowClient; "
            "c = MlflowClient(tracking_uri=sys.argv[1], registry_uri=sys.argv[1]); "
            "c.search_experiments(); c.search_registered_models()"
        )
        subprocess.run(
            [sys.executable, "-c", code, f"sqlite:///{db}"],
            env=user_env(),
            cwd=db.parent,
            check=True,
            capture_output=True,
            timeout=300,
        )
        return db

    db = _shared("store", make)
    assert isinstance(db, Path)
    return db


def metric_history(db: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one metric of a run in an MLflow SQLite store."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT step, value FROM metrics WHERE run_uuid = ? AND key = ? ORDER BY step",
            (run_id, key),
        ).fetchall()
    finally:
        con.close()
    return [(int(s), float(v)) for s, v in rows]


def temp_files(*folders: Path) -> list[Path]:
    """Leftover temporary files of atomic writes (``.<name>.<pid>.tmp``) in ``folders``."""
    return [p for f in folders if f.is_dir() for p in f.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# A real HTTP file server on loopback (dataset downloads)
# ---------------------------------------------------------------------------------------------


class FileServer:
    """Serves ``files`` (name -> bytes) with a Content-Length, and ``/stream/<n>``: ``n``
    bytes with no Content-Length (the body ends when the connection closes). Records how
    many bytes each request got out before the client went away."""

    def __init__(self) -> None:
        import http.server

        self.files: dict[str, bytes] = {}
        self.sent: list[tuple[str, int]] = []
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0].lstrip("/")
                server.requests.append(path)
                if path.startswith("stream/"):
                    self._stream(int(path.split("/")[1]))
                elif path in server.files:
                    body = server.files[path]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self._write(path, [body])
                else:
                    self.send_error(404)

            def _stream(self, n: int) -> None:
                self.close_connection = True
                self.send_response(200)
                self.end_headers()
                block = b"\0" * 65536
                self._write(f"stream/{n}", (block[: min(65536, n - i)] for i in range(0, n, 65536)))

            def _write(self, name: str, blocks) -> None:
                done = 0
                try:
                    for b in blocks:
                        self.wfile.write(b)
                        done += len(b)
                except OSError:  # the client hung up
                    pass
                server.sent.append((name, done))

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.protocol_version = "HTTP/1.0"
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(name="file_server")
def file_server_fixture() -> Iterator[FileServer]:
    """A :class:`FileServer` for the test."""
    server = FileServer()
    try:
        yield server
    finally:
        server.close()


def dataset_zip(root: Path) -> bytes:
    """A zip of a tiny dataset in the reference layout (trainA/ trainB/ testA/ testB/)."""
    import io
    import zipfile

    src = make_prepared(root / "zip-src")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(src.rglob("*.png")):
            z.write(p, f"tiny/{p.relative_to(src)}")
    return buf.getvalue()


def dead_pid() -> int:
    """The pid of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str, readonly: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``600k``) mounted at ``path``: a real full disk (or, with
    ``readonly``, a read-only mount, which even root cannot write). Skips the test where
    mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full disk here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def hung_server() -> Iterator[str]:
    """A TCP port that accepts connections (the kernel's backlog) and never answers: a hung
    server. Yields its http:// URL."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()
