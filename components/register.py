"""Kubeflow component: register the generators in MLflow if they beat the champion."""

from kfp import dsl
from kfp.dsl import Input, Markdown, Metrics, Model, Output

from cyclegan_kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    params: str,
    overrides: list,
    mlflow_tracking_uri: str,
    s3_endpoint: str,
    variant: list,
    model: Input[Model],
    eval_metrics: Input[Metrics],
    result: Output[Metrics],
    decision: Output[Markdown],
) -> None:
    """Register ``model`` (scored by ``eval_metrics``' eval.json) if it beats the champion;
    register.json goes to ``result`` and ``decision`` says what happened and which model
    version (``models:/NAME/VERSION``) holds the alias."""
    import shutil
    from pathlib import Path

    from cyclegan.paths import Paths
    from cyclegan.registry import register as register_model
    from cyclegan_kfp.components import log_metrics, out_dir, stage_config, write_markdown

    cfg = stage_config(
        params, overrides, {"mlflow.tracking_uri": mlflow_tracking_uri}, s3_endpoint, variant
    )
    # register.json is written beside the eval.json it reads; inputs are not ours to write.
    shutil.copytree(eval_metrics.path, out_dir(result), dirs_exist_ok=True)
    paths = Paths(model=Path(model.path), metrics=Path(result.path))
    outcome = register_model(cfg, paths)
    log_metrics(result, outcome)
    name, alias = cfg.register.model_name, cfg.register.alias
    where = f"`models:/{name}/{outcome['version']}`" if outcome.get("version") else "none"
    write_markdown(
        decision,
        f"## Registration: {outcome['decision']}\n\n{outcome['reason']}\n\n"
        f"Variant: `{' '.join(variant) or 'baseline'}`\n\n"
        f"Model version: {where}; `models:/{name}@{alias}` is the champion.\n",
    )
