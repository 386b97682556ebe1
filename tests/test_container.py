"""The project image, built and run for real.

``scripts/build_image.sh`` builds the image from the repository's Dockerfile, once per test
session, on a base made on this machine (``scripts/make_base.sh``: Debian, Python, a CPU
torch), since no image registry may be reachable. Then, in containers of that image:

- the image starts as its non-root user and the ``cyclegan`` CLI works;
- prepare -> train -> evaluate -> register, one container per stage with the project folder
  mounted at its own path (as kfp.local mounts the pipeline root), without network: the
  outputs land in the folder and the champion loads on the host;
- the Kubeflow pipeline under kfp.local's DockerRunner (through podman's Docker-compatible
  socket), logging to a real MLflow server, registers a champion whose weights are the train
  step's;
- the image holds no credentials, tests, data, .git or virtual environment of the checkout.

Without a usable engine every test here is skipped with the reason. Set
``CYCLEGAN_TEST_BASE=IMAGE`` to build on an existing base (Python, pip, torch) instead of
making one (which needs root for debootstrap).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.servers import MlflowServer
from tests.train_support import PIPELINE_TINY

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
BUILD = SCRIPTS / "build_image.sh"
TAG = "localhost/cyclegan-pipeline:test"
IMAGE_UID = 1000  # the Dockerfile's user
# What the Dockerfile leaves in /opt/cyclegan: the packaging files and the code it installed.
PROJECT_FILES = {
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "constraints.txt",
    "constraints-image.txt",
}
PROJECT_FILES |= {"src", "components", "pipeline"}

TINY = PIPELINE_TINY


@dataclass
class Engine:
    """podman or docker, with the environment the project's scripts give it."""

    exe: str
    env: dict[str, str] = field(repr=False)

    @property
    def is_podman(self) -> bool:
        return Path(self.exe).name == "podman"

    def __call__(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [self.exe, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and r.returncode != 0:
            raise AssertionError(f"{self.exe} {' '.join(args)[:300]}\n{r.stdout}\n{r.stderr}")
        return r


@dataclass
class Image:
    tag: str
    base: str
    engine: Engine


def clean_env() -> dict[str, str]:
    """This environment without MLflow/AWS settings (a step must get its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    return env


def report(request: pytest.FixtureRequest, line: str) -> None:
    """A line in pytest's terminal output, captured or not (build time, image size)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or terminal is None:
        print(f"[container] {line}")
        return
    with capture.global_and_fixture_disabled():
        terminal.ensure_newline()
        terminal.write_line(f"[container] {line}")


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def engine() -> Engine:
    """A container engine that can run containers here, or a skip saying why not."""
    env = clean_env()
    name = env.get("CONTAINER_ENGINE") or next(
        (n for n in ("podman", "docker") if shutil.which(n)), None
    )
    if name is None or not shutil.which(name):
        pytest.skip("no container engine: install podman and runc (CI does: see .ci/run)")
    exe = shutil.which(name)
    assert exe
    if Path(exe).name == "podman" and "CONTAINERS_CONF" not in env:
        if not shutil.which("runc"):
            pytest.skip("podman with scripts/containers.conf needs runc (apt-get install runc)")
        env["CONTAINERS_CONF"] = str(SCRIPTS / "containers.conf")
    info = subprocess.run([exe, "info"], env=env, capture_output=True, text=True, timeout=120)
    if info.returncode != 0:
        pytest.skip(f"{name} cannot run containers here: {last_line(info.stderr)[:200]}")
    return Engine(exe=exe, env=env)


@pytest.fixture(scope="session")
def image(engine: Engine, request: pytest.FixtureRequest, tmp_path_factory) -> Image:
    """The project image, built once per session with the documented script."""
    base = os.environ.get("CYCLEGAN_TEST_BASE", "local")
    if base == "local" and os.geteuid() != 0:
        pytest.skip("making the local base needs root (debootstrap); set CYCLEGAN_TEST_BASE")
    log = tmp_path_factory.mktemp("build") / "build.log"
    started = time.monotonic()
    with log.open("w") as fh:
        r = subprocess.run(
            ["bash", str(BUILD), "--base", base, "--tag", TAG],
            env=engine.env,
            stdout=subprocess.PIPE,
            stderr=fh,
            text=True,
            timeout=2000,
        )
    seconds = time.monotonic() - started
    text = log.read_text()
    assert r.returncode == 0, f"build failed:\n{text[-6000:]}"
    assert r.stdout.strip().splitlines()[-1] == TAG
    for line in text.splitlines():
        if line.startswith(
            ("make_base.sh: made", "make_base.sh: localhost/", "build_image.sh: built")
        ):
            report(request, line)
    size = int(engine("image", "inspect", "--format", "{{.Size}}", TAG).stdout)
    report(request, f"{TAG}: {size / 1e6:.0f} MB, build_image.sh took {seconds:.0f} s")
    (used_base,) = re.findall(r"build_image\.sh: built \S+ on (\S+) in", text)
    return Image(tag=TAG, base=used_base, engine=engine)


def writable_for_image(path: Path) -> list[str]:
    """Let the image's user write in ``path`` (a bind mount keeps the host's owners): as root,
    hand the folder to uid 1000; otherwise run the container as this user. Returns the extra
    ``run`` arguments."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        for p in [path, *path.rglob("*")]:
            os.chown(p, IMAGE_UID, IMAGE_UID)
        return []
    if os.geteuid() == IMAGE_UID:
        return []
    return ["--user", f"{os.geteuid()}:{os.getegid()}"]


def run_in(
    image: Image,
    command: Sequence[str],
    mount: Path | None = None,
    extra: Sequence[str] = (),
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """``command`` in a fresh container of the image, no network; ``mount`` (if given) at its
    own path and as the working directory."""
    args = ["run", "--rm", "--network", "none", *extra]
    if mount is not None:
        args += ["--volume", f"{mount}:{mount}", "--workdir", str(mount)]
    return image.engine(*args, image.tag, *command, timeout=timeout, check=check)


# ---------------------------------------------------------------------------------------------
# the image itself
# ---------------------------------------------------------------------------------------------


def test_image_starts_as_its_user_and_the_cli_works(image: Image) -> None:
    assert run_in(image, ["id", "-u"]).stdout.strip() == str(IMAGE_UID)
    default = image.engine("run", "--rm", "--network", "none", image.tag).stdout  # CMD
    assert "prepare" in default and "register" in default and "pipeline" in default
    params = yaml.safe_load(run_in(image, ["cyclegan", "params"]).stdout)
    assert {"data", "train", "evaluate", "register", "mlflow"} <= set(params)
    # The default params.yaml sits in the working directory, which the user may write.
    r = run_in(image, ["sh", "-c", "pwd && ls && touch probe && echo ok"])
    assert r.stdout.split() == ["/workspace", "params.paper.yaml", "params.yaml", "ok"]


def test_image_holds_no_credentials_tests_data_git_or_venv(image: Image) -> None:
    find = ["find", "/", "-xdev", "-not", "-path", "/proc/*"]
    base_files = set(image.engine("run", "--rm", image.base, *find).stdout.split("\n"))
    files = run_in(image, find, extra=["--user", "0"]).stdout.split("\n")  # root sees all
    added = [f for f in files if f and f not in base_files]
    assert any(f.startswith("/opt/cyclegan/src/cyclegan/") for f in added)  # the listing works

    # What the project put in: its packaging files and code, the default params, nothing else.
    top = {f.split("/")[3] for f in added if f.startswith("/opt/cyclegan/") and f.count("/") > 2}
    assert top == PROJECT_FILES, top
    workspace = {f for f in added if f.startswith("/workspace/")}
    assert workspace == {"/workspace/params.yaml", "/workspace/params.paper.yaml"}

    banned_parts = {".git", ".venv", "venv", ".dvc", ".cyclegan", "mlruns", ".pytest_cache"}
    ours = [f for f in added if f.startswith(("/opt/cyclegan", "/workspace", "/home", "/root"))]
    assert not [f for f in ours if banned_parts & set(f.split("/"))]
    assert not [f for f in added if f.endswith("pyvenv.cfg")]  # no venv beyond the base's
    outside_packages = [f for f in files if "/site-packages/" not in f]  # docker/credentials/
    secret_names = re.compile(
        r"/(\.aws|\.netrc|\.git-credentials|\.docker/config\.json|id_rsa[^/]*|id_ed25519[^/]*"
        r"|config\.local|\.env|credentials(\.json)?|\.pypirc|\.kube/config)$"
    )
    assert not [f for f in outside_packages if secret_names.search(f)]

    # Nothing secret in the image's settings or its history, and the machine's pip settings
    # (CA bundle, index) mounted during the build left the base's files as they were.
    inspect = json.loads(image.engine("image", "inspect", image.tag).stdout)[0]
    env = inspect["Config"]["Env"] if "Config" in inspect else inspect["ContainerConfig"]["Env"]
    assert not [
        e for e in env if re.match(r"(AWS_|MLFLOW_TRACKING_(USERNAME|PASSWORD)|.*TOKEN)", e)
    ]
    history = image.engine("history", "--no-trunc", image.tag).stdout
    assert not re.search(r"AKIA[0-9A-Z]{12,}|SECRET_ACCESS_KEY=|PASSWORD=", history)
    digest = ["sh", "-c", "cat /etc/pip.conf /etc/ssl/certs/ca-certificates.crt | sha256sum"]
    in_base = image.engine("run", "--rm", "--network", "none", image.base, *digest).stdout
    assert run_in(image, digest).stdout == in_base


# ---------------------------------------------------------------------------------------------
# the stages, one container each
# ---------------------------------------------------------------------------------------------


def test_stages_run_in_containers_on_the_mounted_project_folder(
    image: Image, tmp_path: Path
) -> None:
    import io

    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from PIL import Image as PILImage

    project = tmp_path / "project"
    project.mkdir()
    name = "cyclegan-container-stages"
    (project / "params.yaml").write_text(yaml.safe_dump({**TINY, "register": {"model_name": name}}))
    user = writable_for_image(project)
    for stage in ("prepare", "train", "evaluate", "register"):
        r = run_in(image, ["cyclegan", stage], mount=project, extra=user, check=False)
        assert r.returncode == 0, f"cyclegan {stage}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

    prepared = project / "data" / "prepared"
    assert len(list((prepared / "trainA").iterdir())) == 8
    assert len(list((prepared / "testB").iterdir())) == 4
    assert (project / "models/cyclegan/G_A.safetensors").is_file()
    metrics = json.loads((project / "metrics/eval.json").read_text())
    assert metrics["num_images_A2B"] == 4 and metrics["fid_A2B"] > 0
    decision = json.loads((project / "metrics/register.json").read_text())
    assert decision["registered"] and decision["version"] == 1, decision

    # The store and the model's files are in the project folder, usable from the host.
    uri = f"sqlite:///{project / 'mlruns.db'}"
    champion = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
        name, "champion"
    )
    assert champion.run_id == decision["run_id"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        buf = io.BytesIO()
        PILImage.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(buf, format="PNG")
        out = model.predict(pd.DataFrame({"image": [buf.getvalue()]}))
    finally:
        mlflow.set_tracking_uri("")
        mlflow.set_registry_uri("")
    assert PILImage.open(io.BytesIO(out["image"][0])).size == (30, 20)


# ---------------------------------------------------------------------------------------------
# the Kubeflow pipeline under kfp.local's container runner
# ---------------------------------------------------------------------------------------------

# kfp.local with its DockerRunner: every step a container of the image. Host networking lets
# the steps reach the MLflow server on loopback.
PIPELINE_RUN = """
import sys
from kfp import local
from cyclegan_kfp.pipeline import build_pipeline

root, params, uri, user = sys.argv[1:5]
run_args = {"network_mode": "host", **({"user": user} if user else {})}
local.init(runner=local.DockerRunner(**run_args), pipeline_root=root)
build_pipeline(retries=0)(
    params=open(params).read(), mlflow_tracking_uri=uri, num_nodes=1, gpus_per_node=0
)
"""


@pytest.fixture(scope="session")
def docker_host(engine: Engine, tmp_path_factory) -> Iterator[str]:
    """A Docker API endpoint for the docker SDK that kfp.local uses: podman's
    Docker-compatible service on a private socket, or the docker daemon's own."""
    import docker

    if not engine.is_podman:
        yield engine.env.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return
    sock = tmp_path_factory.mktemp("podman") / "podman.sock"
    url = f"unix://{sock}"
    log = sock.with_suffix(".log")
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [engine.exe, "system", "service", "--time=0", url],
            env=engine.env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"podman system service exited:\n{log.read_text()[-2000:]}")
            try:
                docker.DockerClient(base_url=url).ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_pipeline(
    image: Image, docker_host: str, root: Path, params: dict, uri: str
) -> subprocess.CompletedProcess:
    user = writable_for_image(root)
    params_file = root.parent / f"{root.name}-params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    env = {**clean_env(), "CYCLEGAN_IMAGE": image.tag, "DOCKER_HOST": docker_host}
    return subprocess.run(
        [sys.executable, "-c", PIPELINE_RUN, str(root), str(params_file), uri, ":".join(user[1:])],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def test_pipeline_runs_under_kfp_docker_runner_and_registers_a_champion(
    image: Image, docker_host: str, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    name = "cyclegan-container-pipeline"
    root = tmp_path / "pipeline_root"
    r = run_pipeline(
        image, docker_host, root, {**TINY, "register": {"model_name": name}}, mlflow_server.uri
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    assert f"Found image '{image.tag}'" in out  # the local image, not a pull

    (eval_json,) = root.rglob("evaluate*/metrics/eval.json")
    metrics = json.loads(eval_json.read_text())
    assert metrics["num_images_A2B"] == 4 and metrics["fid_A2B"] > 0
    (register_json,) = root.rglob("register*/result/register.json")
    assert json.loads(register_json.read_text())["registered"]
    (weights,) = root.rglob("train/model/G_A.safetensors")
    if os.geteuid() == 0:
        assert eval_json.stat().st_uid == IMAGE_UID  # written in a container, as its user
    assert not list(root.rglob("launch-trainjob*"))  # the single-node branch only

    c = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    champion = c.get_model_version_by_alias(name, "champion")
    assert c.get_run(champion.run_id).data.metrics["fid_A2B"] == pytest.approx(metrics["fid_A2B"])
    # The model's files went to the server's artifact store, not into a container's disk.
    got = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=c.get_model_version_download_uri(name, champion.version),
            dst_path=str(tmp_path / "champion"),
            tracking_uri=mlflow_server.uri,
        )
    )
    assert (got / "artifacts/generators/G_A.safetensors").read_bytes() == weights.read_bytes()


def test_a_failing_step_fails_the_run_under_the_docker_runner(
    image: Image, docker_host: str, tmp_path: Path
) -> None:
    # kfp.local meets a step that fails quickly in one of two ways under podman: the container
    # is gone before kfp reads its log (an API error ends the run), or before kfp asks for its
    # exit code (kfp assumes 0; the next step, missing its input, ends the run). Either way the
    # run fails and nothing downstream runs; the step's own message may not be in the output.
    root = tmp_path / "pipeline_root"
    params = {**TINY, "data": {**TINY["data"], "source": "/no-such-dataset"}}
    r = run_pipeline(image, docker_host, root, params, f"sqlite:///{root}/mlruns.db")
    assert r.returncode != 0, (r.stdout + r.stderr)[-4000:]
    assert not list(root.rglob("train/model/*")) and not list(root.rglob("register*/result/*"))


# ---------------------------------------------------------------------------------------------
# bad input to the build script
# ---------------------------------------------------------------------------------------------


def script_env(path: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CONTAINER_ENGINE", "CONTAINERS_CONF")}
    return {**env, "PATH": path, **extra}


def test_no_engine_installed_is_one_clear_line(tmp_path: Path) -> None:
    # A PATH with the tools the script uses but neither podman nor docker.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "basename", "sed", "head", "tail", "grep", "cut", "tr"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    r = subprocess.run(
        [shutil.which("bash") or "bash", str(BUILD)],
        env=script_env(str(bin_dir)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "build_image.sh: error: no container engine: neither podman nor docker is installed "
        "(install one: apt-get install podman runc; or set CONTAINER_ENGINE)"
    ]
    r = subprocess.run(
        ["bash", str(BUILD)],
        env=script_env(os.environ["PATH"], CONTAINER_ENGINE="nerdctl"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == "build_image.sh: error: CONTAINER_ENGINE=nerdctl: expected podman or docker"
    )


def test_a_base_image_without_python_is_refused_before_building(image: Image) -> None:
    # make_base.sh's Debian layer: python3 only, no `python` or `pip` as the Dockerfile needs.
    debian = image.base.replace("/cyclegan-base:", "/cyclegan-debian:")
    if image.engine("image", "inspect", debian, check=False).returncode != 0:
        pytest.skip(f"{debian} is not here (the base was not made by scripts/make_base.sh)")
    r = subprocess.run(
        ["bash", str(BUILD), "--base", debian, "--tag", "localhost/cyclegan-pipeline:refused"],
        env=image.engine.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    line = last_line(r.stderr)
    assert line == (
        f"build_image.sh: error: the base image {debian} has no usable Python (no 'python' on "
        "PATH); use an image with Python 3.11+, pip and PyTorch (the default "
        "pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime) or --base local"
    ), line
    assert image.engine(
        "image", "inspect", "localhost/cyclegan-pipeline:refused", check=False
    ).returncode


def test_a_failing_build_names_the_failing_step(image: Image, tmp_path: Path) -> None:
    # A copy of the checkout whose package cannot be imported: the Dockerfile's check fails.
    # The dependency layer is unchanged, so the engine's cache makes this quick.
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "constraints.txt"):
        shutil.copy2(REPO / name, copy / name)
    for name in ("README.md", "LICENSE", "params.yaml", "params.paper.yaml"):
        shutil.copy2(REPO / name, copy / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("src", "components", "pipeline", "scripts"):
        shutil.copytree(REPO / folder, copy / folder, ignore=ignore)
    init = copy / "src/cyclegan/__init__.py"
    init.write_text(init.read_text() + '\nraise ImportError("deliberately broken package")\n')
    r = subprocess.run(
        [
            "bash",
            str(copy / "scripts/build_image.sh"),
            "--base",
            image.base,
            "--tag",
            "localhost/cyclegan-pipeline:broken",
        ],
        env=image.engine.env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    line = last_line(r.stderr)
    assert re.match(
        r"build_image\.sh: error: the build of localhost/cyclegan-pipeline:broken failed at "
        r"(STEP \d+/\d+:|\[[^]]*\d+/\d+\]) RUN pip install --no-cache-dir --no-deps \.",
        line,
    ), line
    assert "the whole log is in" in line
    log = Path(line.rsplit("the whole log is in ", 1)[1])
    assert "deliberately broken package" in log.read_text()
