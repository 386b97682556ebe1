"""Multi-node training through a Kubeflow Trainer TrainJob, without a cluster.

No Kubernetes API server can run here, so the manifests are checked against the TrainJob CRD
schema of Kubeflow Trainer v2.3.0 (what the API server would apply), and the launcher's wait
and clean-up logic runs against a fake API that replays status sequences.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cyclegan.config import Config
from cyclegan.paths import Paths
from cyclegan_kfp.components.trainjob import (
    RUN_LABEL,
    SHARED_MOUNT,
    TrainJobError,
    TrainJobFailed,
    TrainJobSpec,
    build_trainjob,
    run_trainjob,
    trainjob_state,
    wait_for_trainjob,
)

# Vendored from Kubeflow Trainer v2.3.0 (Apache-2.0): see tests/k8s/README.md.
CRD = Path(__file__).parent / "k8s/kubeflow-trainer-v2.3.0/trainer.kubeflow.org_trainjobs.yaml"


# ---------------------------------------------------------------------------------------------
# The CRD schema as a JSON schema
# ---------------------------------------------------------------------------------------------


def crd_json_schema(crd: dict[str, Any], version: str = "v1alpha1") -> dict[str, Any]:
    """The CRD's openAPIV3Schema as a JSON schema: ``x-kubernetes-*`` extensions are dropped
    (CEL rules and list-map semantics cannot be checked offline), an int-or-string becomes
    ``anyOf`` integer/string, and objects with declared properties refuse unknown fields, as
    ``kubectl`` and clients with strict field validation see them."""
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: convert(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        preserve = node.get("x-kubernetes-preserve-unknown-fields")
        if "properties" in out and "additionalProperties" not in out and not preserve:
            out["additionalProperties"] = False
        return out

    return convert(ver["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = crd_json_schema(yaml.safe_load(CRD.read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def errors(validator: jsonschema.Draft7Validator, manifest: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(manifest)
    ]


def spec(**kw: Any) -> TrainJobSpec:
    base: dict[str, Any] = {
        "name": "cyclegan-0a1b2c3d",
        "image": "registry.example/cyclegan:1.0",
        "command": ["cyclegan", "train", "--params", f"{SHARED_MOUNT}/runs/r1/params.yaml"],
        "num_nodes": 2,
        "gpus_per_node": 4,
        "namespace": "team-a",
        "pvc_name": "cyclegan-shared",
        "s3_secret": "cyclegan-s3",
        "mlflow_secret": "cyclegan-mlflow",
        "env": {"AWS_ENDPOINT_URL": "http://minio:9000"},
        "cpu": "8",
        "memory": "32Gi",
        "shm_size": "8Gi",
        "labels": {RUN_LABEL: "r1"},
    }
    base.update(kw)
    return TrainJobSpec(**base)


# ---------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"gpus_per_node": 0, "cpu": None, "memory": None, "num_nodes": 3},  # CPU nodes
        {"pvc_name": "", "shm_size": None, "s3_secret": "", "mlflow_secret": ""},  # minimal
        {"deadline_s": 86400, "namespace": None},
    ],
)
def test_manifests_pass_the_trainjob_crd_schema(validator, kw) -> None:
    manifest = build_trainjob(spec(**kw))
    assert errors(validator, manifest) == []
    # What the API server would store is what we built: JSON-clean, nothing pruned.
    assert json.loads(json.dumps(manifest)) == manifest


def test_manifest_runs_cyclegan_train_on_n_nodes_with_gpus_secrets_and_shared_volume() -> None:
    m = build_trainjob(spec())
    assert m["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and m["kind"] == "TrainJob"
    assert m["spec"]["runtimeRef"]["name"] == "torch-distributed"
    t = m["spec"]["trainer"]
    assert t["command"][:2] == ["cyclegan", "train"]
    assert t["image"] == "registry.example/cyclegan:1.0"
    assert (t["numNodes"], t["numProcPerNode"]) == (2, 4)
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    env = {e["name"]: e for e in t["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "cyclegan-s3"
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "cyclegan-mlflow"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    (patch,) = m["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "cyclegan-shared"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    (container,) = pod["containers"]
    mounts = {v["mountPath"] for v in container["volumeMounts"]}
    assert mounts == {SHARED_MOUNT, "/dev/shm"}
    # The patch targets the runtime's own job and container names.
    runtime_file = CRD.parent / "torch_distributed_runtime.yaml"
    runtime = yaml.safe_load(runtime_file.read_text())
    (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == rjob["name"]
    assert (
        container["name"] == rjob["template"]["spec"]["template"]["spec"]["containers"][0]["name"]
    )


def _break(manifest: dict[str, Any], how: str) -> dict[str, Any]:
    m = copy.deepcopy(manifest)
    if how == "numNodes as a string":
        m["spec"]["trainer"]["numNodes"] = "two"
    elif how == "misspelt field":
        m["spec"]["trainer"]["numNode"] = m["spec"]["trainer"].pop("numNodes")
    elif how == "no runtimeRef":
        del m["spec"]["runtimeRef"]
    elif how == "bad GPU quantity":
        m["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] = "four"
    elif how == "zero deadline":
        m["spec"]["activeDeadlineSeconds"] = 0
    elif how == "env without name":
        m["spec"]["trainer"]["env"].append({"value": "x"})
    return m


@pytest.mark.parametrize(
    ("how", "where"),
    [
        ("numNodes as a string", "spec.trainer.numNodes"),
        ("misspelt field", "'numNode' was unexpected"),
        ("no runtimeRef", "'runtimeRef' is a required property"),
        ("bad GPU quantity", "limits.nvidia.com/gpu"),
        ("zero deadline", "activeDeadlineSeconds"),
        ("env without name", "'name' is a required property"),
    ],
)
def test_broken_manifests_fail_the_schema(validator, how, where) -> None:
    # Proves the validator can fail: each deliberate defect is caught, at its place.
    found = errors(validator, _break(build_trainjob(spec()), how))
    assert len(found) == 1 and where in found[0], found


def test_impossible_specs_are_refused_before_the_cluster_sees_them() -> None:
    with pytest.raises(TrainJobError, match="num_nodes"):
        build_trainjob(spec(num_nodes=0))
    with pytest.raises(TrainJobError, match="gpus_per_node"):
        build_trainjob(spec(gpus_per_node=-1))


# ---------------------------------------------------------------------------------------------
# Status -> done / failed with reason
# ---------------------------------------------------------------------------------------------


def job(*conditions: tuple[str, str, str, str], jobs: list | None = None) -> dict[str, Any]:
    """A TrainJob object with ``(type, status, reason, message)`` conditions."""
    conds = [{"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conditions]
    status: dict[str, Any] = {"conditions": conds}
    if jobs is not None:
        status["jobsStatus"] = jobs
    return {"metadata": {"name": "tj"}, "status": status}


def test_status_mapping() -> None:
    assert trainjob_state({"metadata": {}})[0] == "running"  # no status yet
    assert trainjob_state(job(("Created", "True", "JobsCreationSucceeded", "")))[0] == "running"
    running = job(jobs=[{"name": "node", "active": 2, "ready": 2}])
    assert trainjob_state(running) == ("running", "node: active 2, ready 2")
    assert trainjob_state(job(("Suspended", "True", "Suspended", "")))[1].startswith("suspended")
    assert trainjob_state(job(("Complete", "True", "JobsSucceeded", "done")))[0] == "succeeded"
    failed = job(("Failed", "True", "JobsFailed", "jobset failed: node-0 exit code 1"))
    assert trainjob_state(failed) == ("failed", "JobsFailed: jobset failed: node-0 exit code 1")
    # A condition that is present but False does not count.
    assert trainjob_state(job(("Failed", "False", "", ""), ("Complete", "False", "", "")))[0] == (
        "running"
    )


class Replay:
    """``get()`` answers with the next item of a status sequence (an exception is raised)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def test_wait_returns_when_complete_and_retries_api_errors() -> None:
    get = Replay(
        job(),
        ConnectionResetError("api server restarting"),
        job(jobs=[{"name": "node", "active": 2}]),
        job(("Complete", "True", "JobsSucceeded", "TrainJob completed")),
    )
    sleeps: list[float] = []
    assert wait_for_trainjob(get, "tj", poll_s=5, sleep=sleeps.append) == "TrainJob completed"
    assert get.calls == 4 and sleeps == [5, 5, 5]


def test_wait_fails_with_the_jobs_reason() -> None:
    get = Replay(job(), job(("Failed", "True", "DeadlineExceeded", "ran past 3600s")))
    with pytest.raises(TrainJobFailed, match="DeadlineExceeded: ran past 3600s") as e:
        wait_for_trainjob(get, "tj", sleep=lambda s: None)
    assert "jobset-name=tj" in str(e.value)  # where to look next


def test_wait_gives_up_on_timeout_and_persistent_api_errors() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    with pytest.raises(TrainJobError, match="within 60s"):
        wait_for_trainjob(
            Replay(job()), "tj", poll_s=10, timeout_s=60, sleep=sleep, clock=lambda: now[0]
        )
    with pytest.raises(TrainJobError, match="keeps failing"):
        wait_for_trainjob(Replay(OSError("refused")), "tj", max_api_errors=3, sleep=lambda s: None)


# ---------------------------------------------------------------------------------------------
# The launcher step against a fake API
# ---------------------------------------------------------------------------------------------


class FakeJobs:
    """The three calls the launcher makes; a "training" callback plays the nodes' part."""

    def __init__(self, statuses: list[Any], on_create=None) -> None:
        self.statuses = statuses
        self.on_create = on_create
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []

    def create(self, manifest: dict[str, Any]) -> None:
        self.created.append(manifest)
        if self.on_create:
            self.on_create(manifest)

    def get(self, name: str) -> dict[str, Any]:
        answer = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return answer

    def delete(self, name: str) -> None:
        self.deleted.append(name)


def _launch(tmp_path: Path, jobs: FakeJobs, **kw: Any) -> dict[str, Any]:
    prepared = tmp_path / "prepared"
    (prepared / "trainA").mkdir(parents=True)
    (prepared / "manifest.json").write_text("{}")
    shared = tmp_path / "pvc"
    shared.mkdir()
    outputs = Paths(
        model=tmp_path / "out/model", metrics=tmp_path / "out/metrics", plots=tmp_path / "out/plots"
    )
    args: dict[str, Any] = {
        "prepared": prepared,
        "outputs": outputs,
        "run_id": "run-1",
        "image": "img:1",
        "num_nodes": 2,
        "gpus_per_node": 1,
        "pvc_name": "pvc",
        "shared": shared,
        "jobs": jobs,
        "poll_s": 0,
    }
    args.update(kw)
    return run_trainjob(Config(), **args)


def _fake_training(manifest: dict[str, Any]) -> None:
    """What rank 0 leaves on the shared volume: the command's own --model-dir/--metrics-dir."""
    cmd = manifest["spec"]["trainer"]["command"]
    opt = {cmd[i]: cmd[i + 1] for i in range(2, len(cmd) - 1, 2)}
    assert Path(opt["--prepared-dir"], "manifest.json").is_file()  # staged before creation
    assert Path(opt["--params"]).is_file()
    Path(opt["--model-dir"]).mkdir(parents=True)
    Path(opt["--model-dir"], "G_A.safetensors").write_bytes(b"w")
    Path(opt["--metrics-dir"]).mkdir(parents=True)
    Path(opt["--metrics-dir"], "train.json").write_text(json.dumps({"steps": 4, "loss_G": 1.5}))


def test_launcher_stages_data_waits_and_returns_the_model(tmp_path) -> None:
    jobs = FakeJobs([job(), job(("Complete", "True", "JobsSucceeded", ""))], _fake_training)
    result = _launch(tmp_path, jobs)
    assert result == {"steps": 4, "loss_G": 1.5}
    assert (tmp_path / "out/model/G_A.safetensors").read_bytes() == b"w"
    assert (tmp_path / "out/metrics/train.json").is_file()
    (manifest,) = jobs.created
    assert manifest["metadata"]["labels"][RUN_LABEL] == "run-1"
    assert jobs.deleted == []  # a finished job is left for inspection


def test_launcher_fails_with_reason_and_cleans_up_only_what_still_runs(tmp_path) -> None:
    failed = FakeJobs([job(("Failed", "True", "JobsFailed", "node-1 OOMKilled"))], _fake_training)
    with pytest.raises(TrainJobFailed, match="node-1 OOMKilled"):
        _launch(tmp_path / "a", failed)
    assert failed.deleted == []
    stuck = FakeJobs([job(jobs=[{"name": "node", "active": 1}])], _fake_training)
    with pytest.raises(TrainJobError, match="did not finish"):
        _launch(tmp_path / "b", stuck, timeout_s=-1)
    assert stuck.deleted == [stuck.created[0]["metadata"]["name"]]  # no orphaned GPUs


def test_launcher_without_shared_volume_says_what_to_set(tmp_path) -> None:
    with pytest.raises(TrainJobError, match="pvc_name"):
        _launch(tmp_path, FakeJobs([job()]), pvc_name="")
