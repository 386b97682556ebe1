"""Kubeflow component: train on several nodes through a Kubeflow Trainer ``TrainJob``."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from cyclegan_kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def launch_trainjob(
    params: str,
    overrides: list,
    mlflow_tracking_uri: str,
    s3_endpoint: str,
    image: str,
    num_nodes: int,
    gpus_per_node: int,
    pvc_name: str,
    s3_secret: str,
    mlflow_secret: str,
    run_id: str,
    variant: list,
    prepared: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    plots: Output[Artifact],
) -> None:
    """Run ``cyclegan train`` on ``num_nodes`` x ``gpus_per_node`` GPUs as a TrainJob (data and
    model pass through the shared PVC ``pvc_name``), wait for it, and fail with its reason if
    it fails. Outputs are the same as the single-node ``train`` component's."""
    from pathlib import Path

    from cyclegan.paths import Paths
    from cyclegan_kfp.components import log_metrics, out_dir, stage_config
    from cyclegan_kfp.components.trainjob import run_trainjob

    cfg = stage_config(
        params, overrides, {"mlflow.tracking_uri": mlflow_tracking_uri}, s3_endpoint, variant
    )
    result = run_trainjob(
        cfg,
        prepared=Path(prepared.path),
        outputs=Paths(model=out_dir(model), metrics=out_dir(metrics), plots=out_dir(plots)),
        run_id=run_id,
        image=image,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        pvc_name=pvc_name,
        s3_endpoint=s3_endpoint,
        s3_secret=s3_secret,
        mlflow_secret=mlflow_secret,
    )
    log_metrics(metrics, result)
