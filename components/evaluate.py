"""Kubeflow component: FID/KID (+ PSNR/SSIM with ground truth) of the trained generators."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    params: str,
    overrides: list,
    mlflow_tracking_uri: str,
    s3_endpoint: str,
    prepared: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    plots: Output[Artifact],
) -> float:
    """Evaluate ``model`` on the test splits of ``prepared``; eval.json goes to ``metrics``.

    Returns the gating metric (``register.metric``, default ``fid_A2B``) as a plain float, the
    pipeline's registration condition.
    """
    from pathlib import Path

    from components import log_metrics, out_dir, stage_config
    from cyclegan.evaluate.evaluate import evaluate as evaluate_model
    from cyclegan.paths import Paths

    cfg = stage_config(params, overrides, {"mlflow.tracking_uri": mlflow_tracking_uri}, s3_endpoint)
    paths = Paths(
        prepared=Path(prepared.path),
        model=Path(model.path),
        metrics=out_dir(metrics),
        plots=out_dir(plots),
    )
    result = evaluate_model(cfg, paths)
    log_metrics(metrics, result)
    return float(result[cfg.register.metric])
