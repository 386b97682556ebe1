"""How a pipeline step turns its parameters into the library's Config (components/__init__)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import yaml

from cyclegan.config import Config, load_config, write_params
from cyclegan.errors import ConfigError
from cyclegan.paths import Paths
from cyclegan.train.launch import rank_argv
from cyclegan_kfp.components import log_metrics, stage_config


@pytest.fixture(autouse=True)
def _isolated(monkeypatch) -> None:
    # A step configures logging for its own process; not for pytest's.
    monkeypatch.setattr("cyclegan.log.setup_logging", lambda *a, **k: None)
    for var in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)


def test_params_overrides_and_pipeline_settings_in_that_order() -> None:
    params = "train:\n  lr: 0.001\n  epochs: 3\nmlflow:\n  tracking_uri: sqlite:///a.db\n"
    cfg = stage_config(
        params,
        ["train.epochs=5", "mlflow.tracking_uri=sqlite:///b.db"],
        {"mlflow.tracking_uri": "http://mlflow:5000", "data.source": ""},
    )
    assert cfg.train.lr == 0.001  # from params
    assert cfg.train.epochs == 5  # the override wins over params
    assert cfg.mlflow.tracking_uri == "http://mlflow:5000"  # a set pipeline parameter wins
    assert cfg.data.source == "synthetic"  # an empty one is ignored


def test_empty_params_are_the_built_in_defaults() -> None:
    assert stage_config("", []) == Config()


def test_setting_values_keep_their_type() -> None:
    # "yes" would be a boolean if pasted into YAML unquoted; a data source named so is not.
    assert stage_config("", [], {"data.source": "yes"}).data.source == "yes"
    assert stage_config("", [], {"train.nproc_per_node": 4}).train.nproc_per_node == 4
    assert stage_config("", [], {"train.nproc_per_node": None}).train.nproc_per_node == 1


def test_s3_endpoint_reaches_boto3_mlflow_and_the_data_config() -> None:
    cfg = stage_config("", [], s3_endpoint="http://minio.minio:9000")
    assert cfg.data.s3_endpoint_url == "http://minio.minio:9000"
    assert os.environ["AWS_ENDPOINT_URL"] == "http://minio.minio:9000"
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.minio:9000"


def test_bad_parameters_fail_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.lr"):
        stage_config("", ["train.lr=fast"])
    with pytest.raises(ConfigError, match="trian"):
        stage_config("trian:\n  lr: 0.1\n", [])
    with pytest.raises(ConfigError, match="appears twice"):  # the same strict YAML as files
        stage_config("train:\n  lr: 0.1\n  lr: 0.2\n", [])


def test_written_params_and_argv_reproduce_the_config(tmp_path) -> None:
    cfg = stage_config("", ["train.lr=0.0005", "data.load_size=64", "train.crop_size=48"])
    path = write_params(cfg, tmp_path / "sub" / "params.yaml")
    assert load_config(path, required=True) == cfg
    argv = rank_argv(path, Paths(prepared=tmp_path / "p", model=tmp_path / "m"))
    assert argv[:3] == ["train", "--params", str(path)]
    assert argv[argv.index("--model-dir") + 1] == str(tmp_path / "m")
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 0.0005


def test_only_numbers_are_logged_as_kfp_metrics() -> None:
    logged: dict[str, float] = {}
    metrics = SimpleNamespace(log_metric=lambda k, v: logged.__setitem__(k, v))
    log_metrics(metrics, {"fid_A2B": 80.5, "num_images_A2B": 64, "ok": True, "name": "x"})
    assert logged == {"fid_A2B": 80.5, "num_images_A2B": 64.0}
