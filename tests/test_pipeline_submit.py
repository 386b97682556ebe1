"""``cyclegan pipeline submit`` against a recording HTTP endpoint.

No KFP API server can run here (it needs Kubernetes, MySQL and object storage), so a real
HTTP server on 127.0.0.1 answers the four calls ``kfp.Client`` makes for a submission, the way
the KFP v2beta1 REST API does, and records what it was sent.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cyclegan.errors import ConfigError, CycleGANError
from cyclegan_kfp.cli import parse_arguments, pipeline_parameters, resolve_token, submit


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeKfp:
    url: str
    requests: list[Request] = field(default_factory=list)
    fail_runs: bool = False

    def posted(self, path: str) -> Request:
        (req,) = [r for r in self.requests if r.method == "POST" and r.path == path]
        return req


def _handler(api: FakeKfp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            body = json.loads(raw) if raw else None
            headers = {k.lower(): v for k, v in self.headers.items()}
            api.requests.append(Request(self.command, self.path, headers, body))
            path = self.path.split("?")[0]
            status, answer = 200, {}
            if path == "/apis/v2beta1/healthz":
                answer = {"multi_user": False}
            elif path == "/apis/v2beta1/experiments" and self.command == "GET":
                answer = {}  # no experiment of that name yet
            elif path == "/apis/v2beta1/experiments":
                answer = {"experiment_id": "exp-1", "display_name": body["display_name"]}
            elif path == "/apis/v2beta1/runs" and api.fail_runs:
                status, answer = 500, {"error": "database is down", "code": 13}
            elif path == "/apis/v2beta1/runs":
                answer = {"run_id": "run-42", "display_name": body["display_name"]}
            else:
                status = 404
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def kfp_api() -> Iterator[FakeKfp]:
    api = FakeKfp(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield api
    server.shutdown()
    server.server_close()


def test_submit_sends_the_compiled_pipeline_and_typed_arguments(kfp_api, tmp_path, capsys):
    params = tmp_path / "params.paper.yaml"
    params.write_text("train:\n  epochs: 100\n")
    url = submit(
        host=kfp_api.url,
        experiment="cyclegan-exp",
        run_name="nightly",
        token="secret-token",
        arguments=[
            "num_nodes=2",
            "gpus_per_node=4",
            "pvc_name=shared",
            "overrides=register.threshold=80.5",
            "overrides=train.lr=0.0001",
            "overrides=train.batch_size=4",
            f"params=@{params}",
            "mlflow_tracking_uri=http://mlflow.mlflow:5000",
        ],
    )
    assert url == f"{kfp_api.url}/#/runs/details/run-42"
    assert capsys.readouterr().out.strip().endswith(url)
    assert kfp_api.posted("/apis/v2beta1/experiments").body["display_name"] == "cyclegan-exp"
    run = kfp_api.posted("/apis/v2beta1/runs")
    assert run.headers["authorization"] == "Bearer secret-token"
    assert run.body["display_name"] == "nightly" and run.body["experiment_id"] == "exp-1"
    spec = run.body["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "cyclegan"
    assert {"prepare", "for-loop-1"} <= set(spec["root"]["dag"]["tasks"])  # the variants loop
    assert "platform_spec" in run.body["pipeline_spec"]  # secrets, PVC, /dev/shm travel too
    assert run.body["runtime_config"]["parameters"] == {
        "num_nodes": 2,
        "gpus_per_node": 4,
        "pvc_name": "shared",
        "overrides": ["register.threshold=80.5", "train.lr=0.0001", "train.batch_size=4"],
        "params": "train:\n  epochs: 100\n",
        "mlflow_tracking_uri": "http://mlflow.mlflow:5000",
    }


def test_image_argument_also_sets_the_steps_image(kfp_api) -> None:
    submit(host=kfp_api.url, token="t", arguments=["image=registry.example/cg:2"])
    body = kfp_api.posted("/apis/v2beta1/runs").body
    executors = body["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/cg:2"}
    assert body["runtime_config"]["parameters"] == {"image": "registry.example/cg:2"}


def test_server_error_is_one_actionable_line(kfp_api) -> None:
    kfp_api.fail_runs = True
    with pytest.raises(CycleGANError, match=f"submitting to {kfp_api.url} failed") as e:
        submit(host=kfp_api.url, token="t")
    assert "\n" not in str(e.value)


def test_unknown_and_mistyped_arguments_fail_before_any_request(
    cyclegan_exe, kfp_api, cli_env
) -> None:
    r = subprocess.run(
        [cyclegan_exe, "pipeline", "submit", "--host", kfp_api.url, "--arg", "nodes=2"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "nodes" in line and "num_nodes" in line and "gpus_per_node" in line  # allowed names
    assert kfp_api.requests == []
    types = pipeline_parameters()
    for bad, expected in [
        ("num_nodes=two", "integer"),
        ("gpus_per_node=1.5", "integer"),
        ("overrides=[1,", "JSON list"),
        ("novalue", "NAME=VALUE"),
        ("params=@/nonexistent/params.yaml", "cannot read"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            parse_arguments([bad], types)
    with pytest.raises(ConfigError, match="pvc_name"):
        submit(host=kfp_api.url, token="t", arguments=["num_nodes=3"])
    assert kfp_api.requests == []


def test_list_arguments_take_json_too() -> None:
    args = parse_arguments(['overrides=["a.b=1", "c.d=2"]'], pipeline_parameters())
    assert args == {"overrides": ["a.b=1", "c.d=2"]}


def test_token_from_flag_env_or_service_account(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "missing"))
    assert resolve_token(None) is None
    sa = tmp_path / "token"
    sa.write_text("sa-token\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(sa))
    assert resolve_token(None) == "sa-token"
    monkeypatch.setenv("KFP_TOKEN", "env-token")
    assert resolve_token(None) == "env-token"
    assert resolve_token("flag-token") == "flag-token"
