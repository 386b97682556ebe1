"""Kubeflow component: FID/KID (+ PSNR/SSIM with ground truth) of the trained generators."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from cyclegan_kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    params: str,
    overrides: list,
    mlflow_tracking_uri: str,
    s3_endpoint: str,
    variant: list,
    prepared: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    plots: Output[Artifact],
    report: Output[HTML],
) -> float:
    """Evaluate ``model`` on the test splits of ``prepared``; eval.json goes to ``metrics``
    (FID, KID, PSNR/SSIM where there is ground truth, shown on the run page) and ``report``
    holds the sample grid and the metrics table.

    Returns 1.0 when ``register.metric`` passes ``register.threshold`` (the library's own
    gate, :func:`cyclegan.registry.threshold_gate`), else 0.0: the pipeline's registration
    condition. A plain float, because kfp.local cannot branch on a NamedTuple output.
    """
    from pathlib import Path

    from cyclegan.evaluate.evaluate import SAMPLES_FILE
    from cyclegan.evaluate.evaluate import evaluate as evaluate_model
    from cyclegan.paths import Paths
    from cyclegan.registry import threshold_gate
    from cyclegan_kfp.components import html_report, log_metrics, out_dir, stage_config

    cfg = stage_config(
        params, overrides, {"mlflow.tracking_uri": mlflow_tracking_uri}, s3_endpoint, variant
    )
    paths = Paths(
        prepared=Path(prepared.path),
        model=Path(model.path),
        metrics=out_dir(metrics),
        plots=out_dir(plots),
    )
    result = evaluate_model(cfg, paths)
    log_metrics(metrics, result)
    title = f"Evaluation: {' '.join(variant) or 'baseline'}"
    Path(report.path).write_text(html_report(title, result, paths.plots / SAMPLES_FILE))
    passed, why = threshold_gate(cfg.register, result)
    if not passed:
        print(f"not registering: {why}")
    return 1.0 if passed else 0.0
