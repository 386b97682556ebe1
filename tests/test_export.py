"""ONNX export: the graphs take any image size and agree with PyTorch in onnxruntime (CPU)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cyclegan import export as export_mod
from cyclegan.errors import CycleGANError, InputError
from cyclegan.export import PaddedGenerator, export, export_onnx
from cyclegan.models import GeneratorSpec, init_weights, save_generators
from cyclegan.models.io import load_generator
from cyclegan.translate import pad_to_multiple, run_generator, to_uint8, translate_arrays

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SPEC = GeneratorSpec(ngf=8, n_blocks=2)
# Odd, even, smaller than the network's minimum side (8), one-pixel-thin, and 256 x 200.
SIZES = [(37, 53), (7, 9), (256, 200), (3, 5), (1, 40), (64, 64)]
TOLERANCE = 1e-4  # the bar: max abs difference in fp32, output in [-1, 1]


def _model_dir(root: Path, spec: GeneratorSpec = SPEC, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    nets = [spec.build(), spec.build()]
    for net in nets:
        init_weights(net, generator=g)
    return save_generators(root / "models" / "cyclegan", nets[0], nets[1], spec)


def _image(n: int, hw: tuple[int, int], seed: int = 0) -> torch.Tensor:
    # Random content, never one flat colour: on a flat image the network's instance norms
    # amplify rounding noise and no two implementations agree (see cyclegan.export).
    return torch.rand(n, 3, *hw, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["translated"], {"image": x.numpy()})[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, cyclegan_exe: str) -> tuple[Path, Path]:
    """A model folder and the folder `cyclegan export` wrote from it (the real command)."""
    root = tmp_path_factory.mktemp("export")
    model_dir = _model_dir(root)
    out = root / "onnx"
    r = subprocess.run(
        [cyclegan_exe, "export", "--model", str(model_dir), "--format", "onnx", "--output", out],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"G_A": str(out / "G_A.onnx"), "G_B": str(out / "G_B.onnx")}
    return model_dir, out


def test_the_one_padding_rule_is_reflect_else_replicate_at_every_small_size() -> None:
    """pad_to_multiple (which the exported graph runs too) pads the bottom/right to a multiple
    of 4 and at least 8, by reflection, or by replication when a side is too short to reflect:
    checked against torch's own F.pad at every size up to 24 x 24."""
    import torch.nn.functional as F

    for h in range(1, 25):
        for w in range(1, 25):
            x = torch.rand(1, 2, h, w)
            ph, pw = max(8, h + (-h) % 4) - h, max(8, w + (-w) % 4) - w
            mode = "reflect" if ph < h and pw < w else "replicate"
            expected = F.pad(x, (0, pw, 0, ph), mode=mode) if ph or pw else x
            padded, size = pad_to_multiple(x)
            assert size == (h, w) and torch.equal(padded, expected), (h, w)
    # ... and the export's module pads with it.
    x = torch.rand(1, 3, 5, 9)
    assert torch.equal(PaddedGenerator(torch.nn.Identity()).pad(x), pad_to_multiple(x)[0])


def test_the_export_module_is_translates_path_in_pytorch() -> None:
    net = SPEC.build().eval()
    init_weights(net, generator=torch.Generator().manual_seed(3))
    module = PaddedGenerator(net).eval()
    for hw in SIZES:
        x = _image(2, hw)
        with torch.inference_mode():
            assert torch.equal(module(x), run_generator(net, x)), hw


def test_files_declare_float_nchw_with_dynamic_batch_height_and_width(
    exported: tuple[Path, Path],
) -> None:
    _, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["G_A.onnx", "G_B.onnx"]  # no external data
    for name in ("G_A.onnx", "G_B.onnx"):
        model = onnx.load(str(out / name))
        onnx.checker.check_model(model, full_check=True)
        assert {o.domain: o.version for o in model.opset_import}[""] == export_mod.OPSET
        for value in (model.graph.input[0], model.graph.output[0]):
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == ["batch", 3, "height", "width"], (name, value.name, dims)
        assert [model.graph.input[0].name, model.graph.output[0].name] == ["image", "translated"]


@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_onnxruntime_matches_pytorch_at_any_size(exported: tuple[Path, Path], hw) -> None:
    model_dir, out = exported
    for direction, name in (("A2B", "G_A.onnx"), ("B2A", "G_B.onnx")):
        net = load_generator(model_dir, direction)
        x = _image(2, hw, seed=len(name) + hw[0])
        expected = run_generator(net, x).numpy()
        got = _run_onnx(out / name, x)
        assert got.shape == expected.shape == (2, 3, *hw)
        assert np.abs(got - expected).max() <= TOLERANCE, (name, hw)


def test_onnx_output_gives_translates_pixels(exported: tuple[Path, Path]) -> None:
    # The documented recipe: pixel / 127.5 - 1 in, round((y + 1) * 127.5) out.
    model_dir, out = exported
    pixels = np.random.default_rng(5).integers(0, 256, (29, 31, 3), dtype=np.uint8)
    expected = next(translate_arrays(load_generator(model_dir, "A2B"), [pixels], "cpu"))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    got = to_uint8(torch.from_numpy(_run_onnx(out / "G_A.onnx", x)))[0].numpy()
    # fp32 differences of ~1e-6 can flip a value that sits on a rounding boundary by one.
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert (got == expected).mean() > 0.99


def test_export_from_a_checkpoint_and_from_one_safetensors_file(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, seed=7)
    g_b = load_generator(model_dir, "B2A")
    # The training checkpoint's layout, with DDP's key prefix.
    ckpt = tmp_path / "step_00000010.pt"
    nets = {
        "G_A": {f"module.{k}": v for k, v in load_generator(model_dir, "A2B").state_dict().items()},
        "G_B": {f"module.{k}": v for k, v in g_b.state_dict().items()},
    }
    torch.save({"model": {"nets": nets}, "step": 10}, ckpt)
    files = export_onnx(ckpt, tmp_path / "from_ckpt")
    assert sorted(files) == ["G_A", "G_B"]
    x = _image(1, (13, 21))
    assert np.abs(_run_onnx(files["G_B"], x) - run_generator(g_b, x).numpy()).max() <= TOLERANCE

    # One generator file does not say its direction: one graph, named after the file.
    single = tmp_path / "zebra.safetensors"
    single.write_bytes((model_dir / "G_B.safetensors").read_bytes())
    files = export_onnx(single, tmp_path / "from_file")
    assert files == {"zebra": tmp_path / "from_file" / "zebra.onnx"}
    assert np.abs(_run_onnx(files["zebra"], x) - run_generator(g_b, x).numpy()).max() <= TOLERANCE


def test_an_export_that_disagrees_with_pytorch_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injected from here: the graph pads with zeros instead of reflecting, the kind of
    # silent drift users of the reference code report (#748, #1534). The check must catch it.
    def zero_pad(self: PaddedGenerator, x: torch.Tensor) -> torch.Tensor:
        padded, _ = pad_to_multiple(x)
        return F.pad(x, (0, padded.shape[-1] - x.shape[-1], 0, padded.shape[-2] - x.shape[-2]))

    model_dir = _model_dir(tmp_path)
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "G_A.onnx").write_bytes(b"an earlier export")
    monkeypatch.setattr(PaddedGenerator, "pad", zero_pad)
    with pytest.raises(CycleGANError, match="differs from PyTorch"):
        export_onnx(model_dir, out)
    assert sorted(p.name for p in out.iterdir()) == ["G_A.onnx"]  # nothing new, nothing half
    assert (out / "G_A.onnx").read_bytes() == b"an earlier export"


def test_bad_input_is_one_clear_line(tmp_path: Path, cyclegan_exe: str, cli_env) -> None:
    model_dir = _model_dir(tmp_path)
    with pytest.raises(InputError, match="unknown export format 'tflite'"):
        export(model_dir, tmp_path / "out", fmt="tflite")
    with pytest.raises(CycleGANError, match="does not exist"):
        export(tmp_path / "missing", tmp_path / "out")
    cases = [
        (["--model", str(model_dir), "--format", "tflite"], 2, "unknown export format 'tflite'"),
        (["--model", "models:/no-such-model@champion"], None, "models:/no-such-model@champion"),
    ]
    for args, code, needle in cases:
        r = subprocess.run(
            [cyclegan_exe, "export", *args, "--output", str(tmp_path / "out")],
            capture_output=True,
            text=True,
            env=cli_env,
            cwd=tmp_path,
            timeout=120,
        )
        errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
        assert r.returncode != 0 and (code is None or r.returncode == code), r.stderr
        assert len(errors) == 1 and errors[0].startswith("cyclegan export: error: "), r.stderr
        assert needle in errors[0], r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
