"""Translation of images of any size, from a model folder, a checkpoint or an MLflow URI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cyclegan.errors import CycleGANError
from cyclegan.models import GeneratorSpec, init_weights, save_generators
from cyclegan.models.io import load_generator
from cyclegan.translate import (
    load_translator,
    pad_to_multiple,
    run_generator,
    spec_from_state_dict,
    translate,
    translate_arrays,
)

SPEC = GeneratorSpec(ngf=8, n_blocks=2)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    nets = [SPEC.build(), SPEC.build()]
    for net in nets:
        init_weights(net, generator=g)
    return save_generators(tmp_path / "models" / "cyclegan", nets[0], nets[1], SPEC)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("hw", [(37, 53), (1, 1), (2, 7), (64, 64)])
def test_any_size_is_padded_and_cropped_back(model_dir: Path, hw: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *hw) * 2 - 1
    padded, orig = pad_to_multiple(x)
    assert orig == hw and padded.shape[-2] % 4 == 0 and padded.shape[-1] % 4 == 0
    assert torch.equal(padded[..., : hw[0], : hw[1]], x)  # padding only adds, never shifts
    net = load_generator(model_dir, "A2B")
    assert run_generator(net, x).shape == x.shape


def test_translate_arrays_keeps_order_and_batches_by_size(model_dir: Path) -> None:
    net = load_generator(model_dir, "A2B")
    images = [_rgb(20, 30, 0), _rgb(20, 30, 1), _rgb(13, 9, 2), _rgb(20, 30, 3)]
    batched = list(translate_arrays(net, images, "cpu", batch_size=8))
    one_by_one = [next(translate_arrays(net, [img], "cpu")) for img in images]
    assert [o.shape for o in batched] == [img.shape for img in images]
    assert all(o.dtype == np.uint8 for o in batched)
    for a, b in zip(batched, one_by_one, strict=True):
        # Instance norm makes each image independent of its batch mates (up to round-off).
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_checkpoint_and_safetensors_load_the_same_generator(
    model_dir: Path, tmp_path: Path
) -> None:
    folder_net = load_generator(model_dir, "B2A")
    # The training checkpoint's layout: plain containers, generators under model.nets.
    sd = {f"module.{k}": v for k, v in folder_net.state_dict().items()}  # DDP-style keys
    ckpt = tmp_path / "step_00000010.pt"
    torch.save({"model": {"nets": {"G_A": {}, "G_B": sd}, "opt_G": {}}, "step": 10}, ckpt)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    expected = run_generator(folder_net, x)
    assert torch.equal(run_generator(load_translator(ckpt, "B2A", "cpu"), x), expected)
    single = load_translator(model_dir / "G_B.safetensors", "A2B", "cpu")  # one generator
    assert torch.equal(run_generator(single, x), expected)
    assert spec_from_state_dict(folder_net.state_dict()) == SPEC


def test_code_carrying_checkpoints_and_bad_models_are_clear_errors(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # would run code under a plain pickle load
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"G_A": Evil()}, evil)
    with pytest.raises(CycleGANError, match="not a readable checkpoint"):
        load_translator(evil, "A2B", "cpu")
    with pytest.raises(CycleGANError, match="does not exist"):
        load_translator(tmp_path / "nope", "A2B", "cpu")
    with pytest.raises(CycleGANError, match="unsupported model URI"):
        load_translator("ftp://host/model", "A2B", "cpu")
    with pytest.raises(CycleGANError, match="direction"):
        load_translator(tmp_path, "X2Y", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CycleGANError, match="not a model folder"):
        load_translator(tmp_path / "empty", "A2B", "cpu")


def test_translate_function_keeps_names_and_skips_bad_files(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_rgb(200, 300)).save(src / "wide.jpg")
    Image.fromarray(_rgb(20, 20)).save(src / "wide.png")  # same stem: kept apart
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    result = translate(model_dir, "A2B", src, out, device="cpu")
    assert result["translated"] == 2 and result["failed"] == [str(src / "broken.png")]
    assert sorted(p.name for p in out.iterdir()) == ["wide.jpg.png", "wide.png"]
    with Image.open(out / "wide.png") as im:
        assert im.size == (20, 20)
    with Image.open(out / "wide.jpg.png") as im:
        assert im.size == (300, 200)
    assert "broken.png" in caplog.text
    with pytest.raises(CycleGANError, match="no image could be translated"):
        translate(model_dir, "A2B", src / "broken.png", tmp_path / "out2", device="cpu")


@pytest.mark.slow
def test_cli_translates_a_folder_with_a_corrupt_file(
    model_dir: Path, tmp_path: Path, cli_env: dict[str, str], cyclegan_exe: str
) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(_rgb(200, 300)).save(src / "horse.png")
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "translated"
    cmd = [cyclegan_exe, "translate", "--model", str(model_dir), "--direction", "B2A"]
    proc = subprocess.run(
        [*cmd, "--input", str(src), "--output", str(out), "--device", "cpu"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "corrupt.jpg" in proc.stderr and "1 skipped" in proc.stderr
    with Image.open(out / "horse.png") as im:
        assert im.size == (300, 200)
    # Nothing translatable: a one-line error and a non-zero exit.
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"nope")
    proc = subprocess.run(
        [*cmd, "--input", str(only_bad), "--output", str(tmp_path / "o2"), "--device", "cpu"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2  # bad input
    assert "no image could be translated" in proc.stderr.splitlines()[-1]


@pytest.mark.slow
def test_cli_translates_with_the_registered_champion_from_a_sqlite_store(
    tmp_path: Path, cli_env: dict[str, str], cyclegan_exe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cyclegan import tracking
    from cyclegan.registry import register
    from tests.test_registry import config, make_candidate

    monkeypatch.chdir(tmp_path)
    uri = cli_env["MLFLOW_TRACKING_URI"]  # the same SQLite store the subprocess will read
    paths = make_candidate(tmp_path / "run", uri, fid=42.0, seed=5)
    assert register(config(uri, "cyclegan"), paths)["registered"] == 1
    run_id = tracking.read_run_file(paths.run_file)["run_id"]

    src = tmp_path / "in"
    src.mkdir()
    image = _rgb(200, 300, seed=9)
    Image.fromarray(image).save(src / "field.png")
    expected = next(translate_arrays(load_generator(paths.model, "A2B"), [image], "cpu"))
    base = [cyclegan_exe, "translate", "--input", str(src), "--device", "cpu"]
    # As a user runs it: no MLflow variable at all; the store is the default ./mlruns.db,
    # which models:/ must resolve in (MLflow resolves it through the *registry* URI).
    user_env = {k: v for k, v in cli_env.items() if not k.startswith("MLFLOW_")}
    assert uri == f"sqlite:///{tmp_path / 'mlruns.db'}"
    for i, model in enumerate(["models:/cyclegan@champion", f"runs:/{run_id}/registered_model"]):
        out = tmp_path / f"out{i}"
        proc = subprocess.run(
            [*base, "--model", model, "--output", str(out)],
            env=user_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr
        assert np.array_equal(np.asarray(Image.open(out / "field.png")), expected)
    proc = subprocess.run(
        [*base, "--model", "models:/cyclegan@nosuchalias", "--output", str(tmp_path / "o")],
        env=cli_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2  # a model URI that does not resolve is bad input
    assert "could not download models:/cyclegan@nosuchalias" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no stray default store
