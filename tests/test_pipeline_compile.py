"""``cyclegan pipeline compile``: the YAML a Kubeflow Pipelines server would run."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cyclegan_kfp.cli import compile_pipeline

STAGES = ("prepare", "train", "evaluate", "register")
S3_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
MLFLOW_ENV = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline spec, kubernetes platform spec) of the compiled pipeline."""
    path = compile_pipeline(tmp_path_factory.mktemp("compile") / "pipeline.yaml")
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def dags(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every DAG (root and condition branches) by component name: its tasks."""
    out = {"root": spec["root"]["dag"]["tasks"]}
    out.update({k: c["dag"]["tasks"] for k, c in spec["components"].items() if "dag" in c})
    return out


def tasks(spec: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every task by name: (the DAG it is in, its definition)."""
    return {name: (dag, t) for dag, ts in dags(spec).items() for name, t in ts.items()}


def executor(spec: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    comp = spec["components"][task["componentRef"]["name"]]
    return spec["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]


def enclosing(spec: dict[str, Any], dag: str) -> tuple[str, dict[str, Any]]:
    """The task that runs DAG ``dag`` (a condition), and the DAG it sits in."""
    for parent, ts in dags(spec).items():
        for t in ts.values():
            if t["componentRef"]["name"] == dag:
                return parent, t
    raise KeyError(dag)


def ancestors(spec: dict[str, Any], dag: str) -> list[tuple[str, dict[str, Any]]]:
    """(DAG, task) from the task running ``dag`` up to the one in the root."""
    chain = []
    while dag != "root":
        parent, task = enclosing(spec, dag)
        chain.append((parent, task))
        dag = parent
    return chain


def test_sweep_variants_run_one_at_a_time_around_training(compiled) -> None:
    """Every variant trains, evaluates and registers in turn: one loop over the ``variants``
    parameter, sequential, so each registration compares with the champion before it."""
    spec, _ = compiled
    all_tasks = tasks(spec)
    loops = {
        id(task): task
        for trainer in ("train", "launch-trainjob")
        for _, task in ancestors(spec, all_tasks[trainer][0])
        if "parameterIterator" in task
    }
    (loop,) = loops.values()
    assert loop["iteratorPolicy"]["parallelismLimit"] == 1
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--variants"
    default = spec["root"]["inputDefinitions"]["parameters"]["variants"]["defaultValue"]
    assert default == [[]]  # one run, no extra overrides
    for name in ("train", "evaluate-2", "register-2", "launch-trainjob", "evaluate", "register"):
        variant = all_tasks[name][1]["inputs"]["parameters"]["variant"]
        assert variant["componentInputParameter"].startswith("pipelinechannel--variants-loop-")


def test_compile_command_writes_the_pipeline(cyclegan_exe, tmp_path, cli_env) -> None:
    out = tmp_path / "p.yaml"
    r = subprocess.run(
        [cyclegan_exe, "pipeline", "compile", "-o", str(out)],
        env={**cli_env, "CYCLEGAN_IMAGE": "registry.example/cg:7"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["pipelineInfo"]["name"] == "cyclegan"
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/cg:7"}  # $CYCLEGAN_IMAGE at compile time


def test_four_stages_in_order_on_both_training_paths(compiled) -> None:
    spec, _ = compiled
    all_tasks = tasks(spec)
    assert "prepare" in dags(spec)["root"]
    for trainer, evaluate, register in (
        ("train", "evaluate-2", "register-2"),
        ("launch-trainjob", "evaluate", "register"),
    ):
        dag, t = all_tasks[trainer]
        # train runs after prepare: the sweep's loop around it depends on prepare, and it reads
        # prepare's data.
        chain = ancestors(spec, dag)
        assert [name for name, _ in chain][-1] == "root"
        loop = next(task for name, task in chain if "parameterIterator" in task)
        assert "prepare" in loop["dependentTasks"]
        assert t["inputs"]["artifacts"]["prepared"]["componentInputArtifact"]
        edag, e = all_tasks[evaluate]
        assert edag == dag and e["dependentTasks"] == [trainer]
        assert e["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == trainer
        rdag, r = all_tasks[register]
        # ... and registers the model that this branch trained.
        model_in = r["inputs"]["artifacts"]["model"]["componentInputArtifact"]
        assert model_in == f"pipelinechannel--{trainer}-model"
        gate_dag, gate = enclosing(spec, rdag)
        assert gate_dag == dag and evaluate in gate["dependentTasks"]
        # register is gated on evaluate's plain float output: the library's threshold gate.
        condition = gate["triggerPolicy"]["condition"]
        assert condition == f"inputs.parameter_values['pipelinechannel--{evaluate}-Output'] == 1.0"
    for name in STAGES:
        assert any(n == name or n.startswith(name + "-") for n in all_tasks), name


def test_node_count_chooses_between_train_and_the_trainjob_launcher(compiled) -> None:
    spec, _ = compiled
    all_tasks = tasks(spec)
    single, _ = enclosing(spec, all_tasks["train"][0])
    multi, _ = enclosing(spec, all_tasks["launch-trainjob"][0])
    _, single_branch = enclosing(spec, all_tasks["train"][0])
    _, multi_branch = enclosing(spec, all_tasks["launch-trainjob"][0])
    assert single == multi  # one If/Else group
    assert multi_branch["triggerPolicy"]["condition"].endswith(
        "['pipelinechannel--num_nodes']) > 1"
    )
    assert single_branch["triggerPolicy"]["condition"].startswith("!(")


def test_training_requests_gpus_shm_limits_and_no_caching(compiled) -> None:
    spec, platform = compiled
    _, t = tasks(spec)["train"]
    res = executor(spec, t)["resources"]
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert (
        res["accelerator"]["resourceCount"]
        == "{{$.inputs.parameters['pipelinechannel--gpus_per_node']}}"
    )
    assert res["resourceCpuLimit"] and res["resourceMemoryLimit"]
    assert not t["cachingOptions"].get("enableCache")
    (shm,) = platform["exec-train"]["emptyDirMounts"]
    assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
    _, launch = tasks(spec)["launch-trainjob"]
    assert not launch["cachingOptions"].get("enableCache")
    (pvc,) = platform["exec-launch-trainjob"]["pvcMount"]
    assert pvc["mountPath"] == "/mnt/cyclegan"
    assert pvc["pvcNameParameter"]["componentInputParameter"] == "pipelinechannel--pvc_name"


def test_retries_on_prepare_and_evaluate(compiled) -> None:
    spec, _ = compiled
    all_tasks = tasks(spec)
    for name in ("prepare", "evaluate", "evaluate-2"):
        assert all_tasks[name][1]["retryPolicy"]["maxRetryCount"] >= 1, name


def test_credentials_come_from_secrets_named_by_parameters(compiled) -> None:
    spec, platform = compiled
    for name in ("prepare", "train", "evaluate", "evaluate-2", "register", "register-2"):
        label = spec["components"][tasks(spec)[name][1]["componentRef"]["name"]]["executorLabel"]
        by_param = {
            s["secretNameParameter"]["componentInputParameter"].split("--")[-1]: {
                k["envVar"] for k in s["keyToEnv"]
            }
            for s in platform[label]["secretAsEnv"]
        }
        assert by_param == {"s3_secret": S3_ENV, "mlflow_secret": MLFLOW_ENV}, name


def test_cluster_parameters(compiled) -> None:
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    expected = {
        "params": "STRING",
        "overrides": "LIST",
        "data_source": "STRING",
        "mlflow_tracking_uri": "STRING",
        "s3_endpoint": "STRING",
        "s3_secret": "STRING",
        "mlflow_secret": "STRING",
        "image": "STRING",
        "num_nodes": "NUMBER_INTEGER",
        "gpus_per_node": "NUMBER_INTEGER",
        "pvc_name": "STRING",
        "variants": "LIST",
    }
    assert {k: v["parameterType"] for k, v in params.items()} == expected


def test_components_run_the_project_image_without_installing(compiled) -> None:
    spec, _ = compiled
    for name, ex in spec["deploymentSpec"]["executors"].items():
        script = " ".join(ex["container"]["command"])
        assert "pip install" not in script, name  # everything is in the image


def test_image_option_rewrites_every_step_and_the_trainjob_default(tmp_path) -> None:
    path = compile_pipeline(tmp_path / "p.yaml", image="registry.example/cg:9")
    spec, platform = yaml.safe_load_all(path.read_text())
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {
        "registry.example/cg:9"
    }
    assert spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == (
        "registry.example/cg:9"
    )
    assert "platforms" in platform  # the kubernetes settings survive the rewrite


def test_compiled_yaml_loads_back_into_kfp(tmp_path) -> None:
    from kfp import components

    path = compile_pipeline(Path(tmp_path / "p.yaml"), image="registry.example/cg:9")
    loaded = components.load_component_from_file(str(path))
    assert set(loaded.component_spec.inputs) >= {"num_nodes", "gpus_per_node", "overrides"}
