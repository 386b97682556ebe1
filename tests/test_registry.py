"""The registry gate, against a real ``mlflow server`` (SQLite + S3 artifacts in moto), and the
registered model loaded back with pickle disallowed."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cyclegan import registry, tracking
from cyclegan.config import Config
from cyclegan.errors import ConfigError, CycleGANError
from cyclegan.models import GeneratorSpec, init_weights, save_generators
from cyclegan.models.io import load_generator
from cyclegan.paths import Paths
from cyclegan.translate import translate_arrays

SPEC = GeneratorSpec(ngf=8, n_blocks=1)


def make_candidate(root: Path, uri: str | None, fid: float, seed: int) -> Paths:
    """What train + evaluate leave behind: a model folder, run.json, metrics/eval.json."""
    paths = Paths(prepared=root / "prepared", model=root / "model", metrics=root / "metrics")
    g = torch.Generator().manual_seed(seed)
    nets = [SPEC.build(), SPEC.build()]
    for net in nets:
        init_weights(net, generator=g)
    save_generators(paths.model, nets[0], nets[1], SPEC)
    if uri is not None:
        c = tracking.client(uri)
        exp = tracking.get_or_create_experiment(c, "cyclegan")
        run = c.create_run(exp, tags={"data_version": f"data-{seed}", "git_commit": "c0ffee"})
        c.set_terminated(run.info.run_id)
        tracking.write_run_file(paths.run_file, run.info.run_id, exp, uri)
    paths.metrics.mkdir(parents=True)
    metrics = {"fid_A2B": fid, "fid_B2A": fid + 1, "kid_A2B": 0.1, "num_images_A2B": 4}
    (paths.metrics / "eval.json").write_text(json.dumps(metrics))
    return paths


def config(uri: str, name: str, **register: object) -> Config:
    cfg = Config()
    cfg.mlflow.tracking_uri = uri
    cfg.register.model_name = name
    cfg.register.onnx = False  # attached ONNX files are tested in test_serving.py
    for k, v in register.items():
        setattr(cfg.register, k, v)
    return cfg


def png(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# The gate's rules (no server)
# ----------------------------------------------------------------------------------------------


def test_direction_of_better_is_inferred_or_configured() -> None:
    assert registry.greater_is_better("fid_A2B") is False
    assert registry.greater_is_better("kid_B2A") is False
    assert registry.greater_is_better("psnr_A2B") is True
    assert registry.greater_is_better("ssim_B2A") is True
    assert registry.greater_is_better("fid_A2B", True) is True
    with pytest.raises(ConfigError, match="greater_is_better"):
        registry.greater_is_better("num_images_A2B")
    assert registry.passes_threshold(30.0, 40.0, higher_better=False)
    assert not registry.passes_threshold(30.0, 20.0, higher_better=False)
    assert registry.passes_threshold(25.0, 20.0, higher_better=True)
    assert registry.passes_threshold(99.0, None, higher_better=False)
    assert not registry.beats(10.0, 10.0, higher_better=False)  # a tie keeps the champion


def test_threshold_rejection_needs_no_server_and_is_recorded(tmp_path: Path) -> None:
    paths = make_candidate(tmp_path, None, fid=80.0, seed=0)
    cfg = config("http://127.0.0.1:9", "m", threshold=50.0)  # nothing listens there
    result = registry.register(cfg, paths)
    assert result["registered"] == 0 and result["decision"] == "rejected"
    assert "threshold" in result["reason"]
    on_disk = json.loads((paths.metrics / "register.json").read_text())
    assert on_disk == result and on_disk["value"] == 80.0


def test_missing_eval_or_metric_is_a_clear_error(tmp_path: Path) -> None:
    paths = Paths(metrics=tmp_path / "metrics", model=tmp_path / "model")
    with pytest.raises(CycleGANError, match="cyclegan evaluate"):
        registry.register(config("sqlite:///x.db", "m"), paths)
    paths = make_candidate(tmp_path / "c", None, fid=1.0, seed=0)
    with pytest.raises(ConfigError, match="fid_A2B"):
        registry.register(config("sqlite:///x.db", "m", metric="psnr_A2B"), paths)


# ----------------------------------------------------------------------------------------------
# Against a real mlflow server
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gate_champion_alias_and_pickle_free_loading(mlflow_server, tmp_path: Path) -> None:
    import mlflow

    uri = mlflow_server.uri
    name = f"cyclegan-{uuid.uuid4().hex[:8]}"
    cfg = config(uri, name)
    c = tracking.client(uri)

    def versions() -> list:
        return c.search_model_versions(f"name='{name}'")

    def champion() -> str:
        return c.get_model_version_by_alias(name, "champion").version

    first = make_candidate(tmp_path / "r1", uri, fid=50.0, seed=1)
    r1 = registry.register(cfg, first)
    assert (r1["registered"], r1["created"], r1["decision"]) == (1, 1, "registered")
    assert champion() == "1"
    mv = c.get_model_version(name, "1")
    run1 = tracking.read_run_file(first.run_file)["run_id"]
    assert mv.tags["run_id"] == run1 and mv.run_id == run1
    assert mv.tags["data_version"] == "data-1" and mv.tags["git_commit"] == "c0ffee"
    assert float(mv.tags["fid_A2B"]) == 50.0 and float(mv.tags["kid_A2B"]) == 0.1

    # Re-running for the same run registers nothing new.
    again = registry.register(cfg, first)
    assert (again["registered"], again["created"]) == (1, 0)
    assert len(versions()) == 1

    # A worse run: no version, the alias stays.
    worse = make_candidate(tmp_path / "r2", uri, fid=60.0, seed=2)
    r2 = registry.register(cfg, worse)
    assert (r2["registered"], r2["decision"]) == (0, "rejected")
    assert r2["champion_version"] == 1 and r2["champion_value"] == 50.0
    assert champion() == "1" and len(versions()) == 1
    assert json.loads((worse.metrics / "register.json").read_text())["registered"] == 0

    # A better run: a new version takes the alias.
    better = make_candidate(tmp_path / "r3", uri, fid=40.0, seed=3)
    r3 = registry.register(cfg, better)
    assert (r3["registered"], r3["version"]) == (1, 2)
    assert champion() == "2" and len(versions()) == 2

    # The champion loads and translates any size with no pickle executed.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle deserialisation attempted")

    image = png(200, 300)
    with (
        mock.patch("pickle.load", refuse),
        mock.patch("pickle.loads", refuse),
        mock.patch("cloudpickle.load", refuse),
        mock.patch("cloudpickle.loads", refuse),
        mock.patch("torch.load", refuse),
    ):
        tracking.use_uri(uri)  # models:/ resolves through MLflow's registry URI
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        out = model.predict(
            pd.DataFrame({"image": [image, image], "direction": ["A2B", None]}),
            params={"direction": "B2A"},
        )
    assert list(out["direction"]) == ["A2B", "B2A"]
    assert list(out["width"]) == [300, 300] and list(out["height"]) == [200, 200]
    got = [np.asarray(Image.open(io.BytesIO(b))) for b in out["image"]]
    src = np.asarray(Image.open(io.BytesIO(image)))
    for direction, result in zip(("A2B", "B2A"), got, strict=True):
        net = load_generator(better.model, direction)  # the champion's own weights
        assert np.array_equal(result, next(translate_arrays(net, [src], "cpu")))
