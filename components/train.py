"""Kubeflow component: train CycleGAN on one node (one process, or torchrun over its GPUs)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    params: str,
    overrides: list,
    mlflow_tracking_uri: str,
    s3_endpoint: str,
    gpus: int,
    prepared: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    plots: Output[Artifact],
) -> None:
    """Train on ``prepared``; the generators go to ``model``, train.json to ``metrics``.

    Runs ``cyclegan train`` (the command ``dvc repro`` runs), which starts torchrun itself
    when ``gpus`` > 1.
    """
    import tempfile
    from pathlib import Path

    from components import log_metrics, out_dir, read_json, stage_config, train_argv, write_params
    from cyclegan.cli import main
    from cyclegan.paths import Paths

    settings = {"mlflow.tracking_uri": mlflow_tracking_uri, "train.nproc_per_node": gpus or None}
    cfg = stage_config(params, overrides, settings, s3_endpoint)
    with tempfile.TemporaryDirectory(prefix="cyclegan-train-") as tmp:
        paths = Paths(
            prepared=Path(prepared.path),
            checkpoints=Path(tmp) / "checkpoints",  # the pod's own: a new step starts afresh
            model=out_dir(model),
            metrics=out_dir(metrics),
            plots=out_dir(plots),
        )
        code = main(train_argv(write_params(cfg, Path(tmp) / "params.yaml"), paths))
    if code != 0:
        raise RuntimeError(f"cyclegan train failed with exit code {code} (see the log above)")
    log_metrics(metrics, read_json(paths.metrics / "train.json"))
