"""Kubeflow component: register the generators in MLflow if they beat the champion."""

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    params: str,
    overrides: list,
    mlflow_tracking_uri: str,
    s3_endpoint: str,
    model: Input[Model],
    eval_metrics: Input[Metrics],
    result: Output[Metrics],
) -> None:
    """Register ``model`` (scored by ``eval_metrics``' eval.json); register.json goes to
    ``result``. The library still compares with the current champion."""
    import shutil
    from pathlib import Path

    from components import log_metrics, out_dir, stage_config
    from cyclegan.paths import Paths
    from cyclegan.registry import register as register_model

    cfg = stage_config(params, overrides, {"mlflow.tracking_uri": mlflow_tracking_uri}, s3_endpoint)
    # register.json is written beside the eval.json it reads; inputs are not ours to write.
    shutil.copytree(eval_metrics.path, out_dir(result), dirs_exist_ok=True)
    paths = Paths(model=Path(model.path), metrics=Path(result.path))
    log_metrics(result, register_model(cfg, paths))
