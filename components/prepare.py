"""Kubeflow component: fetch, validate and prepare the unpaired dataset."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from cyclegan_kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(
    params: str,
    overrides: list,
    data_source: str,
    s3_endpoint: str,
    prepared: Output[Dataset],
) -> None:
    """Prepare ``data.source`` (or ``data_source`` if set) into the ``prepared`` dataset:
    trainA/ trainB/ testA/ testB/ (+ ground truth) and manifest.json."""

    import tempfile
    from pathlib import Path

    from cyclegan.data.prepare import prepare as prepare_data
    from cyclegan.paths import Paths
    from cyclegan_kfp.components import out_dir, stage_config

    cfg = stage_config(params, overrides, {"data.source": data_source}, s3_endpoint)
    with tempfile.TemporaryDirectory(prefix="cyclegan-raw-") as raw:  # downloads, not kept
        prepare_data(cfg, Paths(raw=Path(raw), prepared=out_dir(prepared)))
