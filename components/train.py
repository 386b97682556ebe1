"""Kubeflow component: train CycleGAN on one node (one process, or torchrun over its GPUs)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from cyclegan_kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    params: str,
    overrides: list,
    mlflow_tracking_uri: str,
    s3_endpoint: str,
    gpus: int,
    variant: list,
    prepared: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    plots: Output[Artifact],
    summary: Output[Markdown],
) -> None:
    """Train on ``prepared``; the generators go to ``model``, train.json to ``metrics``, and
    ``summary`` links the MLflow run.

    The same library call as ``cyclegan train`` (the command ``dvc repro`` runs): one process,
    or DDP ranks over the pod's GPUs when ``gpus`` > 1.
    """
    import tempfile
    from pathlib import Path

    from cyclegan import tracking
    from cyclegan.paths import Paths
    from cyclegan.train import launch
    from cyclegan_kfp.components import (
        log_metrics,
        markdown_table,
        out_dir,
        stage_config,
        write_markdown,
    )

    settings = {"mlflow.tracking_uri": mlflow_tracking_uri, "train.nproc_per_node": gpus or None}
    cfg = stage_config(params, overrides, settings, s3_endpoint, variant)
    with tempfile.TemporaryDirectory(prefix="cyclegan-train-") as tmp:
        paths = Paths(
            prepared=Path(prepared.path),
            checkpoints=Path(tmp) / "checkpoints",  # the pod's own: a new step starts afresh
            model=out_dir(model),
            metrics=out_dir(metrics),
            plots=out_dir(plots),
        )
        result = launch.run(cfg, paths)
    log_metrics(metrics, result)
    run = tracking.read_run_file(paths.run_file) or {}
    link = tracking.run_link(tracking.tracking_uri(cfg.mlflow), run)
    write_markdown(
        summary,
        f"## Training\n\nVariant: `{' '.join(variant) or 'baseline'}`\n\n"
        f"MLflow run: {link}\n\n{markdown_table(result)}\n",
    )
