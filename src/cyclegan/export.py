"""``cyclegan export``: the generators as ONNX graphs that take any image size.

``export_onnx(model, output_dir)`` writes ``G_A.onnx`` (A -> B) and ``G_B.onnx`` (B -> A) from
anything ``cyclegan translate --model`` accepts (model folder, training checkpoint, MLflow
URI; one ``.safetensors`` generator gives one file named after it).

What each graph takes and returns (opset 18, weights inside the file, no external data):

- input ``image``: float32, ``N x 3 x H x W`` (NCHW, RGB), values in [-1, 1], i.e.
  ``pixel / 127.5 - 1`` for uint8 pixels. ``N``, ``H`` and ``W`` are dynamic: any batch and
  any size from 1 x 1 up, odd sizes included.
- output ``translated``: float32, ``N x 3 x H x W``, the same size as the input, values in
  [-1, 1] (the tanh output); ``round((y + 1) * 127.5)`` clipped to 0..255 gives the pixels
  ``cyclegan translate`` writes.

The graph pads and crops by itself, with :func:`cyclegan.translate.pad_to_multiple` itself
(each side padded on the bottom/right to a multiple of 4 and at least 8; by reflection, or by
replication when a side is too short to reflect), so a caller feeds the image as it is. That
function is written as index gathers with no branch on the size because of the export: with
Python branches (``F.pad`` in one mode or the other) ``torch.export`` refuses dynamic sizes and
both ONNX exporters (dynamo and TorchScript) freeze the example's branch; measured in torch
2.14, those graphs then fail in onnxruntime on sides <= 4.

Every export is checked before it is kept: onnxruntime (when installed) runs the graph on a
37 x 53 image and it must agree with PyTorch to 1e-4. One limit is the network's, not the
export's: on an image of one flat colour (every 1 x 1 image is one) each instance norm divides
rounding noise by sqrt(1e-5), so the output is noise that differs between any two
implementations (PyTorch fp32 against fp64: up to 0.7).

PyTorch's ExportedProgram (``.pt2``) is not offered: ``torch.export.load`` unpickles, with
``weights_only=False``, any entry the archive marks as pickled, so a ``.pt2`` received from
elsewhere can run code when loaded; the project loads no pickle.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cyclegan.config import MlflowConfig
from cyclegan.errors import CycleGANError, InputError
from cyclegan.translate import (
    DIRECTIONS,
    URI_PREFIXES,
    download_model_folder,
    load_translator,
    pad_to_multiple,
    run_generator,
)

log = logging.getLogger("cyclegan.export")

# Pinned, so the graph does not change with torch's default (20 in torch 2.14); older runtimes
# (onnxruntime 1.14 and newer) run opset 18.
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "translated"
OUTPUT_FILES: dict[str, str] = {"A2B": "G_A.onnx", "B2A": "G_B.onnx"}
PARITY_TOLERANCE = 1e-4  # max abs difference from PyTorch, fp32, on the [-1, 1] output
_CHECK_SIZE = (37, 53)  # odd on both sides: the padding and the crop are both exercised
_MAX_SIDE, _MAX_BATCH = 16384, 1024  # the ranges declared to the exporter for H, W and N


class PaddedGenerator(nn.Module):
    """A generator with translation's padding and cropping inside: any ``H x W`` in, the same
    ``H x W`` out (see the module docstring for the tensors it takes and returns)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded by :func:`cyclegan.translate.pad_to_multiple` (the one padding rule)."""
        return pad_to_multiple(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        y = self.net(self.pad(x))
        # A gather, not y[..., :h, :w]: slicing by a symbolic size makes the exporter ask
        # whether the slice is the whole tensor, which it cannot decide for every size.
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        return y.index_select(2, rows).index_select(3, cols)


def _require(module: str) -> None:
    try:
        __import__(module)
    except ModuleNotFoundError:
        raise CycleGANError(
            f"ONNX export needs the {module!r} package, which is not installed",
            "pip install 'cyclegan-pipeline[onnx]' (or: pip install -c constraints.txt "
            "onnx onnxscript onnxruntime)",
        ) from None


def _generators(
    model_source: str | Path, tmp: Path, mlflow_cfg: MlflowConfig | None
) -> dict[str, tuple[nn.Module, str]]:
    """``{direction: (generator on CPU, output file name)}`` for ``model_source``."""
    text = str(model_source)
    if text.startswith(URI_PREFIXES):
        # One download for both generators (load_translator would fetch the model twice).
        model_source = download_model_folder(text, tmp, mlflow_cfg)
    elif Path(text).suffix == ".safetensors" and Path(text).is_file():
        # One generator whose direction the file does not say: named after the file.
        net = load_translator(text, "A2B", "cpu")
        return {"A2B": (net, f"{Path(text).stem}.onnx")}
    return {d: (load_translator(model_source, d, "cpu"), OUTPUT_FILES[d]) for d in DIRECTIONS}


def _to_onnx(net: nn.Module, path: Path, opset: int) -> None:
    import onnx
    import onnxscript  # noqa: F401  (torch's exporter needs it; imported for a clear error)

    module = PaddedGenerator(net).eval()
    example = torch.rand(2, 3, *_CHECK_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    dims = {
        0: torch.export.Dim("batch", min=1, max=_MAX_BATCH),
        2: torch.export.Dim("height", min=1, max=_MAX_SIDE),
        3: torch.export.Dim("width", min=1, max=_MAX_SIDE),
    }
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        dynamic_shapes={"x": dims},
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        external_data=False,
        verbose=False,
    )
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    proto.doc_string = (
        f"CycleGAN generator. Input {INPUT_NAME!r}: float32 N x 3 x H x W (RGB) in [-1, 1] "
        f"(pixel / 127.5 - 1), any N, H, W. Output {OUTPUT_NAME!r}: float32 N x 3 x H x W in "
        "[-1, 1]; pixels = round((y + 1) * 127.5) clipped to 0..255."
    )
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, str(path))


def parity(net: nn.Module, onnx_path: str | Path, size: tuple[int, int] = _CHECK_SIZE) -> float:
    """Max abs difference between PyTorch's translation path
    (:func:`cyclegan.translate.run_generator`) and the ONNX graph in onnxruntime (CPU), on one
    random ``size`` image in [-1, 1]."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, *size, generator=g) * 2 - 1
    expected = run_generator(net, x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    if got.shape != expected.shape:
        return float("inf")
    return float(np.abs(got - expected).max())


def export_onnx(
    model_source: str | Path,
    output_dir: str | Path,
    *,
    opset: int = OPSET,
    verify: bool = True,
    mlflow_cfg: MlflowConfig | None = None,
) -> dict[str, Path]:
    """Export the generators of ``model_source`` to ONNX in ``output_dir``.

    ``model_source`` is anything ``cyclegan translate --model`` accepts (an MLflow URI
    resolves in the store ``mlflow_cfg`` names, as for translate). Writes ``G_A.onnx``
    and ``G_B.onnx`` (or ``<stem>.onnx`` for one ``.safetensors`` generator), replacing them
    together once all are written and checked; the tensors they take and return are in the
    module docstring. With ``verify`` and onnxruntime installed, each graph must match PyTorch
    to :data:`PARITY_TOLERANCE` on a 37 x 53 image, else :class:`CycleGANError` and nothing
    is written. Returns ``{file stem: path}``, e.g. ``{"G_A": .../G_A.onnx, "G_B": ...}``.
    """
    _require("onnx")
    _require("onnxscript")
    output_dir = Path(output_dir)
    staged: dict[Path, Path] = {}  # final path -> file written beside it, moved when all pass
    try:
        with tempfile.TemporaryDirectory(prefix="cyclegan-export-") as tmp:
            nets = _generators(model_source, Path(tmp), mlflow_cfg)
            output_dir.mkdir(parents=True, exist_ok=True)
            for net, name in nets.values():
                final = output_dir / name
                staged[final] = output_dir / f".{name}.tmp"
                _to_onnx(net, staged[final], opset)
                if verify:
                    _verify(net, staged[final], name)
        for final, part in staged.items():
            os.replace(part, final)
            log.info("wrote %s", final)
    finally:
        for part in staged.values():
            part.unlink(missing_ok=True)
    return {final.stem: final for final in staged}


def _verify(net: nn.Module, path: Path, name: str) -> None:
    try:
        import onnxruntime  # noqa: F401
    except ModuleNotFoundError:
        log.warning("onnxruntime is not installed: %s was not checked against PyTorch", name)
        return
    diff = parity(net, path)
    log.info("%s: max abs difference from PyTorch at %dx%d: %.2g", name, *_CHECK_SIZE, diff)
    if not diff <= PARITY_TOLERANCE:
        raise CycleGANError(
            f"the exported {name} differs from PyTorch by {diff:.3g} (allowed "
            f"{PARITY_TOLERANCE:g}); it was not kept",
            "this is a bug in the export: please report it with your torch and onnx versions",
        )


FORMATS: dict[str, Callable[..., dict[str, Path]]] = {"onnx": export_onnx}


def export(
    model_source: str | Path,
    output_dir: str | Path,
    fmt: str = "onnx",
    mlflow_cfg: MlflowConfig | None = None,
) -> dict[str, Path]:
    """``cyclegan export``: the generators of ``model_source`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise InputError(
            f"unknown export format {fmt!r}", f"use --format {' or '.join(sorted(FORMATS))}"
        )
    return FORMATS[fmt](model_source, output_dir, mlflow_cfg=mlflow_cfg)
