"""Multi-node training as a Kubeflow Trainer v2 ``TrainJob`` (runtime ``torch-distributed``).

The pipeline's launcher step (``components/launch_trainjob.py``) calls :func:`run_trainjob`:

1. stage the prepared dataset and the effective params.yaml on the shared volume (a
   ReadWriteMany PVC mounted at :data:`SHARED_MOUNT` in the launcher and in every node),
2. create a TrainJob whose nodes run ``cyclegan train`` in the project image; the Trainer gives
   each node ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``... and ``cyclegan train``
   hands them to torchrun, whose ranks train with DDP (rank 0 alone writes the model),
3. poll the TrainJob's conditions until ``Complete`` or ``Failed`` (failing the step with the
   job's reason), then copy the model, train.json and plots into the step's KFP artifacts.

Manifests are plain dicts (validated in the tests against the TrainJob CRD schema of Trainer
v2.3.0); the Kubernetes API is reached with the ``kubernetes`` client, imported lazily.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cyclegan.config import Config
from cyclegan.errors import CycleGANError
from cyclegan.paths import Paths

log = logging.getLogger("cyclegan.trainjob")

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
RUNTIME = "torch-distributed"
NODE = "node"
"""Name of the replicated job and of its container in the torch-distributed runtime."""
SHARED_MOUNT = "/mnt/cyclegan"
"""Where the shared PVC is mounted, in the launcher step and in every training node."""
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
RUN_LABEL = "cyclegan-pipeline/run-id"
TRAIN_CPU = "8"
TRAIN_MEMORY = "32Gi"
SHM_SIZE = "8Gi"
"""Limits of one training pod (single-node step or TrainJob node); /dev/shm counts in memory."""

State = Literal["running", "succeeded", "failed"]


class TrainJobError(CycleGANError):
    """The TrainJob could not be created, or was not seen to finish."""


class TrainJobFailed(TrainJobError):
    """The TrainJob ran and failed, or is gone: nothing is left running."""


# ---------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainJobSpec:
    """What a TrainJob for ``cyclegan train`` needs to know."""

    name: str
    image: str
    command: list[str]
    num_nodes: int
    gpus_per_node: int = 0
    namespace: str | None = None
    pvc_name: str = ""
    s3_secret: str = ""
    mlflow_secret: str = ""
    env: dict[str, str] = field(default_factory=dict)
    cpu: str | None = None
    memory: str | None = None
    shm_size: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    runtime: str = RUNTIME
    deadline_s: int | None = None


def trainjob_name(prefix: str = "cyclegan") -> str:
    """A fresh, DNS-1035-valid name (the JobSet and its pods derive theirs from it)."""
    return f"{prefix}-{secrets.token_hex(4)}"


def secret_env(secret: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Environment variables read from ``secret`` (same key names), optional like the
    pipeline's: a cluster without, e.g., MLflow authentication needs no such secret."""
    if not secret:
        return []
    return [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k, "optional": True}}}
        for k in keys
    ]


def build_trainjob(spec: TrainJobSpec) -> dict[str, Any]:
    """The TrainJob manifest (a dict for ``CustomObjectsApi``) described by ``spec``."""
    if spec.num_nodes < 1:
        raise TrainJobError(f"num_nodes = {spec.num_nodes}: need at least 1 node")
    if spec.gpus_per_node < 0:
        raise TrainJobError(f"gpus_per_node = {spec.gpus_per_node}: must be >= 0")
    limits: dict[str, str] = {}
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    if spec.cpu:
        limits["cpu"] = spec.cpu
    if spec.memory:
        limits["memory"] = spec.memory
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    env += [{"name": k, "value": v} for k, v in spec.env.items()]
    env += secret_env(spec.s3_secret, S3_SECRET_KEYS)
    env += secret_env(spec.mlflow_secret, MLFLOW_SECRET_KEYS)
    trainer: dict[str, Any] = {
        "image": spec.image,
        "command": list(spec.command),
        "numNodes": spec.num_nodes,
        # One rank per GPU; torchrun gets it as PET_NPROC_PER_NODE.
        "numProcPerNode": max(spec.gpus_per_node, 1),
        "env": env,
    }
    if limits:
        trainer["resourcesPerNode"] = {"limits": limits}
    metadata: dict[str, Any] = {
        "name": spec.name,
        "labels": {"app.kubernetes.io/name": "cyclegan", **spec.labels},
    }
    if spec.namespace:
        metadata["namespace"] = spec.namespace
    manifest: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {
                "name": spec.runtime,
                "kind": "ClusterTrainingRuntime",
                "apiGroup": GROUP,
            },
            "trainer": trainer,
        },
    }
    if spec.deadline_s:
        manifest["spec"]["activeDeadlineSeconds"] = spec.deadline_s
    volumes, mounts = _volumes(spec)
    if volumes:
        pod_patch = {"volumes": volumes, "containers": [{"name": NODE, "volumeMounts": mounts}]}
        manifest["spec"]["runtimePatches"] = [
            {
                "manager": "cyclegan-pipeline",
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [
                                {
                                    "name": NODE,
                                    "template": {"spec": {"template": {"spec": pod_patch}}},
                                }
                            ]
                        }
                    }
                },
            }
        ]
    return manifest


def _volumes(spec: TrainJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if spec.pvc_name:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": spec.pvc_name}})
        mounts.append({"name": "shared", "mountPath": SHARED_MOUNT})
    if spec.shm_size:
        # Data-loader workers pass batches through /dev/shm; the container default is 64 MiB.
        volumes.append(
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}
        )
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


# ---------------------------------------------------------------------------------------------
# Status and waiting
# ---------------------------------------------------------------------------------------------


def trainjob_state(obj: Mapping[str, Any]) -> tuple[State, str]:
    """Map a TrainJob object to ``(state, detail)``: ``failed`` carries the job's reason and
    message, ``running`` a short description of where it is."""
    conditions = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or [] if c}

    def true(kind: str) -> Mapping[str, Any] | None:
        c = conditions.get(kind)
        return c if c and c.get("status") == "True" else None

    if c := true("Failed"):
        reason, message = c.get("reason") or "Failed", (c.get("message") or "").strip()
        return "failed", f"{reason}: {message}" if message else reason
    if c := true("Complete"):
        return "succeeded", c.get("message") or "complete"
    if c := true("Suspended"):
        return "running", f"suspended ({c.get('reason') or 'waiting for resources'})"
    jobs = (obj.get("status") or {}).get("jobsStatus") or []
    if jobs:
        parts = [
            f"{j.get('name')}: "
            + ", ".join(
                f"{k} {j[k]}" for k in ("active", "ready", "succeeded", "failed") if j.get(k)
            )
            for j in jobs
        ]
        return "running", "; ".join(parts)
    return "running", "created" if true("Created") else "pending"


def wait_for_trainjob(
    get: Callable[[], Mapping[str, Any]],
    name: str,
    *,
    poll_s: float = 15.0,
    timeout_s: float | None = None,
    max_api_errors: int = 8,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Poll ``get()`` (the TrainJob object) until it completes; return its detail.

    Raises :class:`TrainJobFailed` with the job's reason when it fails or is gone, and
    :class:`TrainJobError` after ``timeout_s`` or ``max_api_errors`` consecutive API errors
    (single errors, such as an API server restart, are retried).
    """
    start = clock()
    errors = 0
    last = ""
    while True:
        try:
            obj = get()
            errors = 0
        except TrainJobError:
            raise
        except Exception as e:
            errors += 1
            if errors >= max_api_errors:
                raise TrainJobError(f"TrainJob {name}: Kubernetes API keeps failing ({e})") from e
            log.warning("TrainJob %s: status request failed (%s); retrying", name, e)
        else:
            state, detail = trainjob_state(obj)
            if state == "succeeded":
                log.info("TrainJob %s: complete", name)
                return detail
            if state == "failed":
                raise TrainJobFailed(
                    f"TrainJob {name} failed: {detail}",
                    f"see the node logs: kubectl logs -l jobset.sigs.k8s.io/jobset-name={name}",
                )
            if detail != last:
                log.info("TrainJob %s: %s", name, detail)
                last = detail
        if timeout_s is not None and clock() - start > timeout_s:
            raise TrainJobError(f"TrainJob {name} did not finish within {timeout_s:.0f}s")
        sleep(poll_s)


# ---------------------------------------------------------------------------------------------
# The Kubernetes API
# ---------------------------------------------------------------------------------------------

_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubeTrainJobs:
    """Create, read and delete TrainJobs in one namespace (in-cluster credentials, else
    ~/.kube/config)."""

    def __init__(self, namespace: str | None = None) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.api = client.CustomObjectsApi()
        if namespace:
            self.namespace = namespace
        elif _SA_NAMESPACE.is_file():
            self.namespace = _SA_NAMESPACE.read_text().strip()
        else:
            self.namespace = "default"

    def create(self, manifest: Mapping[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, dict(manifest)
            )
        except ApiException as e:
            hint = (
                "is Kubeflow Trainer v2 installed, and may this step's service account create "
                "trainjobs.trainer.kubeflow.org? (see docs/kubeflow.md)"
            )
            raise TrainJobError(
                f"could not create TrainJob in namespace {self.namespace}: "
                f"{e.status} {e.reason}: {_api_message(e)}",
                hint,
            ) from None

    def get(self, name: str) -> Mapping[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as e:
            if e.status == 404:
                raise TrainJobFailed(f"TrainJob {name} no longer exists (deleted?)") from None
            raise

    def delete(self, name: str) -> None:
        self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)


def _api_message(e: Any) -> str:
    import json

    try:
        return json.loads(e.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return str(e.body or "")[:500]


# ---------------------------------------------------------------------------------------------
# The launcher step
# ---------------------------------------------------------------------------------------------


def run_trainjob(
    cfg: Config,
    *,
    prepared: Path,
    outputs: Paths,
    run_id: str,
    image: str,
    num_nodes: int,
    gpus_per_node: int,
    pvc_name: str,
    s3_endpoint: str = "",
    s3_secret: str = "",
    mlflow_secret: str = "",
    shared: Path = Path(SHARED_MOUNT),
    jobs: Any = None,
    poll_s: float = 15.0,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Train on ``num_nodes`` x ``gpus_per_node`` through a TrainJob; copy the model, train.json
    and plots into ``outputs``; return train.json's content."""
    from cyclegan.config import write_params
    from cyclegan.train.launch import rank_argv
    from cyclegan_kfp.components import read_json

    if not pvc_name or not shared.is_dir():
        raise TrainJobError(
            f"multi-node training needs a shared volume at {shared}",
            "set the pipeline parameter pvc_name to a ReadWriteMany PVC in this namespace",
        )
    work = shared / "runs" / run_id
    # Every node reads the data; rank 0 writes checkpoints and the model, here, for all.
    staged = Paths(
        prepared=work / "prepared",
        checkpoints=work / "checkpoints",
        model=work / "model",
        metrics=work / "metrics",
        plots=work / "plots",
    )
    log.info("staging the prepared dataset in %s", staged.prepared)
    shutil.copytree(prepared, staged.prepared, dirs_exist_ok=True)
    params = write_params(cfg, work / "params.yaml")
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    spec = TrainJobSpec(
        name=trainjob_name(),
        image=image,
        command=["cyclegan", *rank_argv(params, staged)],
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        pvc_name=pvc_name,
        s3_secret=s3_secret,
        mlflow_secret=mlflow_secret,
        env={k: v for k, v in env.items() if v},
        labels={RUN_LABEL: run_id[:63]},
        cpu=TRAIN_CPU,
        memory=TRAIN_MEMORY,
        shm_size=SHM_SIZE,
    )
    jobs = jobs if jobs is not None else KubeTrainJobs()
    jobs.create(build_trainjob(spec))
    log.info("created TrainJob %s: %d node(s) x %d GPU(s)", spec.name, num_nodes, gpus_per_node)
    _wait_or_delete(jobs, spec.name, poll_s=poll_s, timeout_s=timeout_s)
    for src, dst in (
        (staged.model, outputs.model),
        (staged.metrics, outputs.metrics),
        (staged.plots, outputs.plots),
    ):
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
    return read_json(staged.metrics / "train.json")


def _wait_or_delete(jobs: Any, name: str, *, poll_s: float, timeout_s: float | None) -> None:
    """Wait for the TrainJob; if this step is stopped or gives up first, delete the job so its
    GPUs are not left running for nobody."""

    def stop(signum: int, frame: Any) -> None:
        raise TrainJobError(f"the launcher was stopped (signal {signum})")

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: no handler, the caller owns signals
        previous = None
    finished = False
    try:
        wait_for_trainjob(lambda: jobs.get(name), name, poll_s=poll_s, timeout_s=timeout_s)
        finished = True
    except TrainJobFailed:
        finished = True
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if not finished:
            try:
                jobs.delete(name)
                log.warning("deleted TrainJob %s", name)
            except Exception as e:
                log.warning("could not delete TrainJob %s (%s)", name, e)
