"""The Kubeflow pipeline: prepare -> train (one node, or a TrainJob on several) -> evaluate ->
register if ``register.metric`` passes ``register.threshold`` (the library's gate, which the
register step then completes by comparing with the champion).

A sweep is the ``variants`` parameter: a list of override lists, e.g.
``[["train.lr=0.0001"], ["train.lr=0.0002", "train.lambda_A=5"]]``. Data is prepared once;
each variant is trained, evaluated and offered to the registry in turn (one at a time, so
the champion alias moves only to a model better than the one before: the best of the sweep
ends as champion). The default, ``[[]]``, is one run with no extra overrides.

Evaluate and register appear once per training branch: ``kfp.local`` cannot pick an
artifact out of alternative branches (``dsl.OneOf`` of artifacts), and the same graph must run
locally and on a cluster.
"""

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask
from kfp.dsl.graph_component import GraphComponent
from kfp.dsl.pipeline_channel import PipelineChannel

from cyclegan_kfp.components import IMAGE
from cyclegan_kfp.components.evaluate import evaluate
from cyclegan_kfp.components.launch_trainjob import launch_trainjob
from cyclegan_kfp.components.prepare import prepare
from cyclegan_kfp.components.register import register
from cyclegan_kfp.components.train import train
from cyclegan_kfp.components.trainjob import (
    MLFLOW_SECRET_KEYS,
    S3_SECRET_KEYS,
    SHARED_MOUNT,
    SHM_SIZE,
    TRAIN_CPU,
    TRAIN_MEMORY,
)

PIPELINE_NAME = "cyclegan"


def _credentials(task: PipelineTask, s3_secret: str, mlflow_secret: str) -> PipelineTask:
    """S3 and MLflow credentials as environment variables, from optional secrets (a cluster
    without MLflow authentication needs no MLflow secret)."""
    kubernetes.use_secret_as_env(task, s3_secret, {k: k for k in S3_SECRET_KEYS}, optional=True)
    kubernetes.use_secret_as_env(
        task, mlflow_secret, {k: k for k in MLFLOW_SECRET_KEYS}, optional=True
    )
    return task


def _limits(task: PipelineTask, cpu: str, memory: str) -> PipelineTask:
    return task.set_cpu_limit(cpu).set_memory_limit(memory)


def _retry(task: PipelineTask, retries: int) -> PipelineTask:
    """Retry a step that can fail for passing reasons (downloads, storage, the API server)."""
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="30s", backoff_factor=2.0)
    return task


def _evaluate_and_register(
    model: PipelineChannel,
    prepared: PipelineChannel,
    common: dict,
    s3_secret: str,
    mlflow_secret: str,
    retries: int,
) -> None:
    evaluate_task = evaluate(prepared=prepared, model=model, **common)
    _credentials(_limits(evaluate_task, "4", "16Gi"), s3_secret, mlflow_secret)
    _retry(evaluate_task, retries)
    # evaluate answers the library's threshold gate (1.0 = passes); register then applies the
    # rest of the gate (better than the champion). One rule, in cyclegan.registry.
    with dsl.If(evaluate_task.outputs["Output"] == 1.0, name="metric-passes"):
        register_task = register(
            model=model, eval_metrics=evaluate_task.outputs["metrics"], **common
        )
        _credentials(_limits(register_task, "1", "4Gi"), s3_secret, mlflow_secret)
        register_task.set_caching_options(False)  # registering is a side effect


def build_pipeline(retries: int = 2) -> GraphComponent:
    """The pipeline, with ``retries`` retries of prepare and evaluate (a local run takes 0: its
    failures do not pass by themselves)."""

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="CycleGAN: prepare unpaired data, train with DDP on one or several GPU nodes, "
        "evaluate FID/KID, register the generators in MLflow if they pass.",
    )
    def cyclegan_pipeline(
        params: str = "",
        overrides: list = [],  # noqa: B006 - KFP reads parameter defaults from the signature
        data_source: str = "",
        mlflow_tracking_uri: str = "",
        s3_endpoint: str = "",
        s3_secret: str = "cyclegan-s3",
        mlflow_secret: str = "cyclegan-mlflow",
        image: str = IMAGE,
        num_nodes: int = 1,
        gpus_per_node: int = 1,
        pvc_name: str = "",
        variants: list = [[]],  # noqa: B006 - as above
    ) -> None:
        """Parameters:

        params: a params.yaml document ("" = the built-in defaults).
        overrides: ``section.key=value`` strings applied on top (every step).
        data_source: overrides ``data.source`` (a dataset name, an https URL, s3://bucket/prefix).
        mlflow_tracking_uri: the MLflow server every step logs to.
        s3_endpoint: an S3-compatible endpoint for data and MLflow artifacts ("" = AWS).
        s3_secret / mlflow_secret: secrets with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY /
            MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD (both optional).
        image: the project image for the TrainJob nodes (steps use the image compiled in).
        num_nodes: training nodes; > 1 runs a Kubeflow Trainer TrainJob and needs pvc_name.
        gpus_per_node: GPUs per training node (one DDP rank each; 0 = CPU).
        pvc_name: a ReadWriteMany PVC shared by the launcher and the TrainJob nodes.
        variants: a sweep, as a list of override lists (``[["train.lr=0.0001"], ...]``);
            each is trained, evaluated and offered to the registry in turn. ``[[]]``: one run.

        The registration gate is the params' ``register`` section (``metric``, ``threshold``,
        ``greater_is_better``), e.g. ``--arg overrides=register.threshold=80``.
        """
        common = {
            "params": params,
            "overrides": overrides,
            "mlflow_tracking_uri": mlflow_tracking_uri,
            "s3_endpoint": s3_endpoint,
        }
        prepare_task = prepare(
            params=params, overrides=overrides, data_source=data_source, s3_endpoint=s3_endpoint
        )
        _credentials(_limits(prepare_task, "4", "16Gi"), s3_secret, mlflow_secret)
        _retry(prepare_task, retries)
        prepared = prepare_task.outputs["prepared"]

        # One variant at a time (parallelism=1): each registration compares with the champion
        # the one before left, so the sweep's best ends as champion.
        with dsl.ParallelFor(variants, parallelism=1, name="variants") as variant:
            per_variant = {**common, "variant": variant}
            with dsl.If(num_nodes > 1, name="multi-node"):
                launch_task = launch_trainjob(
                    prepared=prepared,
                    image=image,
                    num_nodes=num_nodes,
                    gpus_per_node=gpus_per_node,
                    pvc_name=pvc_name,
                    s3_secret=s3_secret,
                    mlflow_secret=mlflow_secret,
                    run_id=dsl.PIPELINE_TASK_ID_PLACEHOLDER,  # one staging folder per variant
                    **per_variant,
                )
                _limits(launch_task, "2", "4Gi").set_caching_options(False)
                kubernetes.mount_pvc(launch_task, pvc_name=pvc_name, mount_path=SHARED_MOUNT)
                _evaluate_and_register(
                    launch_task.outputs["model"],
                    prepared,
                    per_variant,
                    s3_secret,
                    mlflow_secret,
                    retries,
                )

            with dsl.Else(name="single-node"):
                train_task = train(prepared=prepared, gpus=gpus_per_node, **per_variant)
                _credentials(_limits(train_task, TRAIN_CPU, TRAIN_MEMORY), s3_secret, mlflow_secret)
                train_task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(
                    gpus_per_node
                )
                kubernetes.empty_dir_mount(
                    train_task,
                    volume_name="dshm",
                    mount_path="/dev/shm",
                    medium="Memory",
                    size_limit=SHM_SIZE,
                )
                train_task.set_caching_options(False)
                _evaluate_and_register(
                    train_task.outputs["model"],
                    prepared,
                    per_variant,
                    s3_secret,
                    mlflow_secret,
                    retries,
                )

    return cyclegan_pipeline


cyclegan_pipeline = build_pipeline()
"""The pipeline as compiled and submitted."""
