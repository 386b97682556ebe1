"""The registered MLflow model: both generators as a pyfunc that loads without pickle.

This file is logged as MLflow "models from code": loading the model runs this file (it ends
with ``mlflow.models.set_model``), and :meth:`CycleGANModel.load_context` reads the weights
from safetensors and the architecture from ``model.json``. No pickle is deserialised.

Input: a pandas DataFrame with

- ``image`` (required): the encoded image file's bytes (PNG, JPEG, ...), any size. Over the
  REST API (``mlflow models serve``) binary columns travel base64-encoded, as MLflow does for
  every ``binary`` column.
- ``direction`` (optional): ``A2B`` (G_A) or ``B2A`` (G_B) per row.

``params={"direction": "B2A"}`` sets the direction for rows without one (default ``A2B``).

Output: a DataFrame with ``image`` (PNG bytes of the translation, same size as the input),
``width``, ``height`` and ``direction``.

Example::

    model = mlflow.pyfunc.load_model("models:/cyclegan@champion")
    out = model.predict(pd.DataFrame({"image": [open("horse.jpg", "rb").read()]}))
    Path("zebra.png").write_bytes(out["image"][0])
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image, ImageOps

from cyclegan.hardware import resolve_device
from cyclegan.models.io import load_generator
from cyclegan.translate import DIRECTIONS, translate_arrays

GENERATORS_ARTIFACT = "generators"  # the artifacts key of the model folder
IMAGE, DIRECTION = "image", "direction"


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> ``H x W x 3`` uint8 (EXIF orientation applied)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)


def encode_png(img: np.ndarray) -> bytes:
    """``H x W x 3`` uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def signature() -> ModelSignature:
    """The model's signature: binary ``image``, optional ``direction``, param ``direction``."""
    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE), ColSpec("string", DIRECTION, required=False)]),
        outputs=Schema(
            [
                ColSpec("binary", IMAGE),
                ColSpec("long", "width"),
                ColSpec("long", "height"),
                ColSpec("string", DIRECTION),
            ]
        ),
        params=ParamSchema([ParamSpec(DIRECTION, "string", "A2B")]),
    )


def _bad_request(message: str) -> Exception:
    """An error the scoring server returns as HTTP 400 with this message (a plain exception
    would reach the client only as a generic message with a stack trace)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class CycleGANModel(PythonModel):
    """CycleGAN's two generators behind ``predict`` (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        folder = Path(context.artifacts[GENERATORS_ARTIFACT])
        self.device = resolve_device("auto")
        self.nets = {d: load_generator(folder, d, self.device) for d in ("A2B", "B2A")}

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or IMAGE not in model_input.columns:
            raise _bad_request(f"expected a DataFrame with an {IMAGE!r} column of image bytes")
        default = (params or {}).get(DIRECTION) or "A2B"
        if DIRECTION in model_input.columns:
            directions = [
                d if isinstance(d, str) and d else default for d in model_input[DIRECTION]
            ]
        else:
            directions = [default] * len(model_input)
        bad = sorted({d for d in directions if d not in DIRECTIONS})
        if bad:
            raise _bad_request(f"direction must be A2B or B2A, got {bad}")
        images = []
        for i, data in enumerate(model_input[IMAGE]):
            if isinstance(data, str):  # base64 text from a caller that skipped the schema
                import base64

                data = base64.b64decode(data)
            try:
                images.append(decode_image(bytes(data)))
            except Exception as e:
                raise _bad_request(f"row {i}: not a readable image ({e})") from None
        outputs: list[np.ndarray | None] = [None] * len(images)
        for d in DIRECTIONS:
            rows = [i for i, di in enumerate(directions) if di == d]
            if rows:
                results = translate_arrays(self.nets[d], (images[i] for i in rows), self.device)
                for i, out in zip(rows, results, strict=True):
                    outputs[i] = out
        return pd.DataFrame(
            {
                IMAGE: [encode_png(o) for o in outputs],  # type: ignore[arg-type]
                "width": [int(o.shape[1]) for o in outputs],  # type: ignore[union-attr]
                "height": [int(o.shape[0]) for o in outputs],  # type: ignore[union-attr]
                DIRECTION: directions,
            }
        )


mlflow.models.set_model(CycleGANModel())
