"""The registered champion served by the real ``mlflow models serve``, called as a client would.

A tiny project goes through the real ``cyclegan prepare/train/evaluate/register`` commands in a
temporary folder (local SQLite store, no MLFLOW_* or AWS_* variable inherited). The README's
"Export and serving" commands are then run as they are written, only the port changed to a free
one, and the replies are compared with ``cyclegan translate`` and with the ONNX export. The
KServe manifest in docs/serving.md is checked here too.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.servers import BIN, free_port, stop, wait_http
from tests.train_support import TINY, sets

REPO = Path(__file__).resolve().parents[1]
README_PORT = "5001"
RUN = (
    *TINY,
    "data.synthetic.image_size=16",
    "data.synthetic.n_train_a=6",
    "data.synthetic.n_train_b=6",
    "data.synthetic.n_test=4",
    "mlflow.system_metrics=false",
)


def _readme_commands() -> list[str]:
    """The shell commands of README's "Export and serving" block, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Export and serving", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's Export and serving section has no bash block"
    commands, current = [], ""
    for line in block.group(1).splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def _one(commands: list[str], start: str) -> str:
    found = [c for c in commands if c.startswith(start)]
    assert len(found) == 1, (start, commands)
    return found[0]


def _png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@dataclass
class Served:
    work: Path
    env: dict[str, str]
    port: int
    commands: list[str]

    def bash(self, command: str) -> subprocess.CompletedProcess[str]:
        """A README command as written, in the project folder, on this test's port."""
        command = command.replace(README_PORT, str(self.port))
        return subprocess.run(
            ["bash", "-c", command],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def post(self, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def translate(self, image: Path, direction: str) -> np.ndarray:
        out = self.work / f"translated_{direction}"
        r = subprocess.run(
            [
                *("cyclegan", "translate", "--model", "models:/cyclegan@champion"),
                *("--direction", direction, "--input", str(image), "--output", str(out)),
            ],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        return _png_pixels((out / f"{image.stem}.png").read_bytes())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A champion registered by the real commands, served by README's own command line."""
    work = tmp_path_factory.mktemp("serving")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the venv's cyclegan, mlflow, python
    # One thread for the stages only: on 2 shared cores OpenMP's spinning slows training badly.
    stage_env = {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for stage in ("prepare", "train", "evaluate", "register"):
        r = subprocess.run(
            ["cyclegan", stage, *sets(*RUN)],
            cwd=work,
            env=stage_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, f"cyclegan {stage}:\n{r.stdout}\n{r.stderr}"
    assert json.loads((work / "metrics/register.json").read_text())["registered"] == 1

    commands = _readme_commands()
    serve = _one(commands, "MLFLOW_TRACKING_URI=")
    assert serve.endswith("&"), serve
    port = free_port()
    log = work / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            ["bash", "-c", serve.removesuffix("&").replace(README_PORT, str(port))],
            cwd=work,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop() ends bash, mlflow and its workers as one group
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=300, log=log)
        yield Served(work=work, env=env, port=port, commands=commands)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def horse(served: Served) -> Path:
    """The README's horse.png: odd-sized, with content (not one flat colour)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:37, 0:53]
    img = np.stack([xx * 4, yy * 6, (xx + yy) * 3], axis=-1) + rng.integers(0, 40, (37, 53, 3))
    path = served.work / "horse.png"
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_readme_curl_gets_the_translation_cyclegan_translate_writes(
    served: Served, horse: Path
) -> None:
    request = _one(served.commands, "printf ")
    call = _one(served.commands, "curl ")
    r = served.bash(f"set -eo pipefail\n{request}\n{call}")
    assert r.returncode == 0, r.stderr
    got = _png_pixels((served.work / "zebra.png").read_bytes())
    expected = served.translate(horse, "A2B")
    assert got.shape == expected.shape == (37, 53, 3)
    assert np.array_equal(got, expected)  # the same code, weights and input: the same pixels
    assert not np.array_equal(got, _png_pixels(horse.read_bytes()))


@pytest.mark.slow
def test_a_direction_column_picks_the_generator(served: Served, horse: Path) -> None:
    data = base64.b64encode(horse.read_bytes()).decode()
    status, reply = served.post(
        {"dataframe_split": {"columns": ["image", "direction"], "data": [[data, "B2A"]]}}
    )
    assert status == 200, reply
    (row,) = reply["predictions"]
    assert (row["direction"], row["width"], row["height"]) == ("B2A", 53, 37)
    got = _png_pixels(base64.b64decode(row["image"]))
    assert np.array_equal(got, served.translate(horse, "B2A"))


@pytest.mark.slow
def test_a_request_without_an_image_is_a_clear_400(served: Served, horse: Path) -> None:
    status, reply = served.post({"dataframe_split": {"columns": ["direction"], "data": [["A2B"]]}})
    assert status == 400
    assert "missing inputs ['image']" in reply["message"], reply
    not_an_image = base64.b64encode(b"not an image").decode()
    status, reply = served.post(
        {"dataframe_split": {"columns": ["image"], "data": [[not_an_image]]}}
    )
    assert status == 400
    # MLflow words the message itself; the model's reason travels in the message or the trace.
    assert "not a readable image" in reply["message"] + reply.get("stack_trace", ""), reply
    # The server is still there for the next client.
    data = base64.b64encode(horse.read_bytes()).decode()
    status, _ = served.post({"dataframe_split": {"columns": ["image"], "data": [[data]]}})
    assert status == 200


@pytest.mark.slow
def test_the_champions_onnx_export_gives_the_served_pixels(served: Served, horse: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    r = served.bash(_one(served.commands, "cyclegan export "))
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(r.stdout)) == ["G_A", "G_B"]
    pixels = _png_pixels(horse.read_bytes())
    x = (pixels.transpose(2, 0, 1)[None].astype(np.float32) / 127.5) - 1
    session = ort.InferenceSession(
        str(served.work / "exported/G_A.onnx"), providers=["CPUExecutionProvider"]
    )
    y = session.run(["translated"], {"image": x})[0][0]
    got = np.clip(np.round((y + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    expected = served.translate(horse, "A2B")
    # fp32 differences of ~1e-6 can move a value across a rounding boundary: one grey level.
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert (got == expected).mean() > 0.99


@pytest.mark.slow
def test_the_registered_version_carries_its_onnx_files(served: Served, horse: Path) -> None:
    """`cyclegan register` attaches G_A.onnx and G_B.onnx to the version (register.onnx), so
    the registry alone gives a runtime-independent model; they translate like the server."""
    import mlflow

    ort = pytest.importorskip("onnxruntime")
    mlflow.set_tracking_uri(f"sqlite:///{served.work / 'mlruns.db'}")
    mlflow.set_registry_uri(f"sqlite:///{served.work / 'mlruns.db'}")
    local = Path(mlflow.artifacts.download_artifacts("models:/cyclegan@champion"))
    files = sorted(p.name for p in local.rglob("*.onnx"))
    assert files == ["G_A.onnx", "G_B.onnx"]
    (g_a,) = local.rglob("G_A.onnx")
    pixels = _png_pixels(horse.read_bytes())
    x = (pixels.transpose(2, 0, 1)[None].astype(np.float32) / 127.5) - 1
    y = ort.InferenceSession(str(g_a), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    got = np.clip(np.round((y[0][0] + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    assert np.abs(got.astype(int) - served.translate(horse, "A2B").astype(int)).max() <= 1


def test_kserve_manifest_is_a_valid_inference_service_running_the_tested_server() -> None:
    from kubernetes.client import ApiClient

    text = (REPO / "docs/serving.md").read_text()
    (manifest,) = [
        m
        for m in (yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S))
        if isinstance(m, dict) and m.get("kind") == "InferenceService"
    ]
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(manifest["spec"]) == {"predictor"}
    predictor = manifest["spec"]["predictor"]
    # KServe v1beta1 PredictorSpec keys used here (its CRD schema is not on PyPI, see the docs).
    assert set(predictor) <= {"minReplicas", "maxReplicas", "containers", "serviceAccountName"}
    (container,) = predictor["containers"]

    class Response:  # ApiClient.deserialize reads an HTTP response's .data
        data = json.dumps(container)

    # The Kubernetes API's own V1Container model: a misspelt or misplaced key does not survive
    # the round trip, a missing required one raises.
    model = ApiClient().deserialize(Response(), "V1Container")
    assert ApiClient().sanitize_for_serialization(model) == container

    # It runs the command the tests above serve with, on the port it declares and probes.
    argv = [*container["command"], *container["args"]]
    assert argv[:3] == ["mlflow", "models", "serve"]
    assert argv[argv.index("--env-manager") + 1] == "local"
    assert argv[argv.index("-m") + 1] == "models:/cyclegan@champion"
    port = int(argv[argv.index("-p") + 1])
    assert container["ports"][0]["containerPort"] == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": port}
    assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in container["env"])
