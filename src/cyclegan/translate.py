"""Apply a trained generator to images of any size: the one translation core.

``cyclegan evaluate``, ``cyclegan translate`` and the registered MLflow model all translate
through :func:`translate_arrays`, so padding, batching and quantisation are written once:

- The generator halves the resolution twice and doubles it twice, so a side must be a multiple
  of 4 (and at least 8) to come back at its own size. Other sizes are padded on the
  bottom/right by reflection (the reference pads with reflection inside the network too) and
  the output is cropped back.
- Output in [-1, 1] becomes uint8 by rounding ``(y + 1) * 127.5`` (the reference truncates,
  which darkens by half a grey level on average).
- Images of the same size are batched; a size change starts a new batch.

``translate(model, ...)`` is ``cyclegan translate``: ``model`` is a model folder
(``models/cyclegan``), a training checkpoint (``checkpoints/step_*.pt``: a ``torch.save`` of
plain containers whose generators' state dicts sit under ``G_A``/``G_B``, at most two levels
down, e.g. ``model.nets.G_A``; read with ``weights_only=True``), one generator's
``.safetensors`` file, or an MLflow URI (``models:/NAME@champion``, ``models:/NAME/3``,
``runs:/RUN_ID/registered_model``) whose files are downloaded and read as safetensors. No
pickle is executed in any case. Outputs are PNG (lossless) named after the input's stem:
``photo.jpg`` -> ``photo.png``; when two inputs share a stem, ``photo.png`` keeps its name and
the other gets its full name plus ``.png`` (``photo.jpg.png``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from cyclegan.config import MlflowConfig
from cyclegan.data.dataset import list_images
from cyclegan.errors import InputError, ModelError
from cyclegan.fsio import atomic_write
from cyclegan.hardware import resolve_device
from cyclegan.log import progress_enabled, redact
from cyclegan.models.io import GeneratorSpec, load_generator
from cyclegan.models.networks import ResnetGenerator

log = logging.getLogger("cyclegan.translate")

MULTIPLE = 4  # two stride-2 downsamplings
# The bottleneck (a quarter of the side) must stay >= 2 pixels: the residual blocks reflect-pad
# by 1 and instance norm needs more than one value.
MIN_SIDE = 8
DIRECTIONS = ("A2B", "B2A")
URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")


# ---------------------------------------------------------------------------------------------
# The core: tensors and arrays
# ---------------------------------------------------------------------------------------------


def pad_to_multiple(
    x: torch.Tensor, multiple: int = MULTIPLE, minimum: int = MIN_SIDE
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``N x C x H x W`` on the bottom/right to sides divisible by ``multiple`` and at least
    ``minimum`` long. Returns the padded tensor and the original ``(H, W)`` to crop back to.

    Reflection padding, like the network's own (the edge row is not repeated); sides too short
    to reflect are padded by replication. Written as one index gather per side, with no
    branch on the size, so that the ONNX export (:mod:`cyclegan.export`) captures this very
    rule for every size: a branch would be frozen to the example's case.
    """
    h, w = x.shape[-2], x.shape[-1]
    jh = _padded_range(h, multiple, minimum, x.device)
    jw = _padded_range(w, multiple, minimum, x.device)
    # Row j past the end is row 2(n - 1) - j when reflecting, row n - 1 when replicating;
    # reflection needs both pads shorter than their side (the last row's mirror still inside).
    mirror_h, mirror_w = 2 * (h - 1) - jh, 2 * (w - 1) - jw
    reflect = (mirror_h[-1] >= 0) & (mirror_w[-1] >= 0)
    ih = torch.where(reflect, torch.where(jh < h, jh, mirror_h), jh.clamp(max=h - 1))
    iw = torch.where(reflect, torch.where(jw < w, jw, mirror_w), jw.clamp(max=w - 1))
    return x.index_select(2, ih).index_select(3, iw), (h, w)


def _padded_range(n: int, multiple: int, minimum: int, device: torch.device) -> torch.Tensor:
    """``0 .. padded - 1`` for a side of ``n``: ``padded = max(minimum, n rounded up to
    multiple)``, written as a count of blocks so an exporter can prove the generator gives
    the same length back."""
    blocks = max(-(-minimum // multiple), (n + multiple - 1) // multiple)
    return torch.arange(blocks * multiple, device=device)


def to_uint8(y: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] (``N x 3 x H x W``) -> ``N x H x W x 3`` uint8, rounded."""
    return ((y.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def from_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``N x H x W x 3`` uint8 -> ``N x 3 x H x W`` float in [-1, 1] (the training scaling)."""
    t = torch.as_tensor(images)
    return t.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


@torch.inference_mode()
def run_generator(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Translate ``N x 3 x H x W`` in [-1, 1], any H and W, to the same shape."""
    padded, (h, w) = pad_to_multiple(x)
    return net(padded)[..., :h, :w]


def translate_arrays(
    net: torch.nn.Module,
    images: Iterable[np.ndarray],
    device: str | torch.device = "cpu",
    batch_size: int = 1,
) -> Iterator[np.ndarray]:
    """``H x W x 3`` uint8 images -> translated ``H x W x 3`` uint8 images, in order.

    Consecutive images of one size go through the network together, up to ``batch_size``.
    """
    device = resolve_device(device)
    batch: list[np.ndarray] = []

    def flush() -> Iterator[np.ndarray]:
        x = from_uint8(np.stack(batch)).to(device)
        yield from to_uint8(run_generator(net, x)).cpu().numpy()
        batch.clear()

    for img in images:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 uint8 image, got {img.dtype} {img.shape}")
        if batch and (img.shape != batch[0].shape or len(batch) >= batch_size):
            yield from flush()
        batch.append(img)
    if batch:
        yield from flush()


# ---------------------------------------------------------------------------------------------
# Loading a generator from a folder, checkpoint, safetensors file or MLflow URI
# ---------------------------------------------------------------------------------------------


def _strip_wrappers(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    # DDP adds "module.", torch.compile "_orig_mod.": the plain network's keys are wanted.
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def spec_from_state_dict(sd: Mapping[str, torch.Tensor]) -> GeneratorSpec:
    """The :class:`GeneratorSpec` a ResnetGenerator state dict was made with (from shapes)."""
    try:
        first = sd["model.1.weight"]  # the 7x7 input conv: ngf x input_nc x 7 x 7
        blocks = {k.split(".")[1] for k in sd if ".conv_block." in k}
        last = max((k for k in sd if k.endswith(".weight")), key=lambda k: int(k.split(".")[1]))
        found = {
            "input_nc": int(first.shape[1]),
            "output_nc": int(sd[last].shape[0]),
            "ngf": int(first.shape[0]),
            "n_blocks": len(blocks),
        }
    except (KeyError, IndexError, ValueError, AttributeError):
        raise ModelError("the weights are not a CycleGAN ResnetGenerator state dict") from None
    return GeneratorSpec.from_json(found, "the weights")  # bounded before anything is built


def generator_from_state_dict(
    sd: Mapping[str, Any], device: str | torch.device = "cpu"
) -> ResnetGenerator:
    """Build a generator matching ``sd`` and load it, in eval mode."""
    sd = _strip_wrappers(sd)
    net = spec_from_state_dict(sd).build()
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise ModelError(f"the generator weights do not fit: {str(e).splitlines()[0]}") from None
    return net.to(resolve_device(device)).eval()


def _find_state_dict(obj: Any, name: str, depth: int = 0) -> Mapping[str, Any] | None:
    """The mapping stored under key ``name`` at most two levels down in a checkpoint."""
    if not isinstance(obj, Mapping) or depth > 2:
        return None
    value = obj.get(name)
    if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
        return value
    for v in obj.values():
        found = _find_state_dict(v, name, depth + 1)
        if found is not None:
            return found
    return None


def _load_checkpoint_generator(path: Path, direction: str, device: str) -> ResnetGenerator:
    key = "G_A" if direction == "A2B" else "G_B"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(
            f"{path} is not a readable checkpoint ({str(e).splitlines()[0][:200]})",
            "pass a model folder, a training checkpoint or an MLflow models:/ URI",
        ) from None
    sd = _find_state_dict(ckpt, key)
    if sd is None:
        raise ModelError(f"{path} holds no {key} generator (the {direction} direction)")
    return generator_from_state_dict(sd, device)


def download_model_folder(
    uri: str, dst: str | Path, mlflow_cfg: MlflowConfig | None = None
) -> Path:
    """Download an MLflow model (``models:/...``, ``runs:/...``) and return the folder inside
    it that holds ``model.json`` and the safetensors. The store is the one every command uses
    (:func:`cyclegan.tracking.use`: params, else $MLFLOW_TRACKING_URI, else mlruns.db)."""
    import mlflow.artifacts

    from cyclegan import tracking

    store = tracking.use(mlflow_cfg or MlflowConfig())
    tracking.ensure_reachable(store)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dst), tracking_uri=store, registry_uri=store
        )
    except Exception as e:
        raise ModelError(
            f"could not download {uri} from MLflow at {redact(store)} "
            f"({redact(str(e).splitlines()[0])[:300]})",
            "check the URI (models:/NAME@champion, models:/NAME/VERSION, runs:/RUN_ID/"
            "registered_model) and the tracking store (MLFLOW_TRACKING_URI or "
            "mlflow.tracking_uri)",
        ) from None
    found = sorted(Path(local).rglob("model.json"), key=lambda p: len(p.parts))
    if not found:
        raise ModelError(f"{uri} is not a CycleGAN model (no model.json in its files)")
    return found[0].parent


def load_translator(
    model: str | Path,
    direction: str = "A2B",
    device: str | torch.device = "auto",
    mlflow_cfg: MlflowConfig | None = None,
) -> ResnetGenerator:
    """The generator for ``direction`` from a model folder, checkpoint, safetensors file or
    MLflow URI (see the module docstring)."""
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be A2B or B2A, got {direction!r}")
    device = resolve_device(device)
    text = str(model)
    if text.startswith(URI_PREFIXES):
        with tempfile.TemporaryDirectory(prefix="cyclegan-model-") as tmp:
            folder = download_model_folder(text, tmp, mlflow_cfg)
            return load_generator(folder, direction, device)  # type: ignore[arg-type]
    if "://" in text:
        raise ModelError(
            f"unsupported model URI {redact(text)!r}",
            "use models:/NAME@ALIAS, models:/NAME/N or runs:/",
        )
    path = Path(model)
    if path.is_dir():
        return load_generator(path, direction, device)  # type: ignore[arg-type]
    if not path.exists():
        raise ModelError(
            f"model {path} does not exist",
            "pass a model folder (models/cyclegan), a checkpoint or models:/NAME@champion",
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        log.info("%s is one generator; --direction does not apply", path.name)
        try:
            sd = load_file(str(path))
        except Exception as e:  # a damaged header
            raise ModelError(
                f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})"
            ) from None
        return generator_from_state_dict(sd, device)
    return _load_checkpoint_generator(path, direction, str(device))


# ---------------------------------------------------------------------------------------------
# cyclegan translate
# ---------------------------------------------------------------------------------------------


def read_image(path: Path) -> np.ndarray:
    """An image file as ``H x W x 3`` uint8, upright (EXIF orientation applied)."""
    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im)
        return np.asarray(upright.convert("RGB"), dtype=np.uint8)


def _output_names(inputs: list[Path]) -> list[str]:
    """``<stem>.png`` per input; on a clash the input already called ``<stem>.png`` keeps it
    and the others get ``<name>.png`` (so the result does not depend on listing order)."""
    wanted = [f"{p.stem}.png" for p in inputs]
    owners = {w: i for i, (w, p) in enumerate(zip(wanted, inputs, strict=True)) if p.name == w}
    used: set[str] = set(owners)
    names = []
    for i, (w, p) in enumerate(zip(wanted, inputs, strict=True)):
        if owners.get(w) == i:
            names.append(w)
            continue
        name = w if w not in used else f"{p.name}.png"
        if name != w:
            log.warning("%s: another input has the stem %r; writing %s", p, p.stem, name)
        used.add(name)
        names.append(name)
    return names


# Written into every PNG that translate produces: how it recognises its own earlier outputs,
# which it may replace; any other file in the output folder it leaves alone.
SOFTWARE_TAG = "cyclegan translate"


def _is_own_output(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software", "").startswith(SOFTWARE_TAG)
    except Exception:  # not an image at all: certainly not ours
        return False


def check_output_folder(
    inputs: list[Path], input_path: Path, output_dir: Path, names: list[str], overwrite: bool
) -> None:
    """Refuse, before anything is written, an output folder that is (or is inside) the input
    folder, and any existing file translate would replace that it did not write itself."""
    out = output_dir.resolve()
    if input_path.is_dir():
        src = input_path.resolve()
        if out == src or src in out.parents:
            where = "the input folder" if out == src else "inside the input folder"
            raise InputError(
                f"--output {output_dir} is {where} {input_path}: translations would mix with "
                "(or replace) the inputs",
                "choose an output folder outside the input folder",
            )
    if overwrite:
        return
    inputs_resolved = {p.resolve() for p in inputs}
    clash = [
        output_dir / n
        for n in names
        if (output_dir / n).exists()
        and ((output_dir / n).resolve() in inputs_resolved or not _is_own_output(output_dir / n))
    ]
    if clash:
        more = f" and {len(clash) - 1} more" if len(clash) > 1 else ""
        raise InputError(
            f"{clash[0]}{more} already exist{'s' if len(clash) == 1 else ''} and "
            f"{'was' if len(clash) == 1 else 'were'} not written by cyclegan translate",
            "choose another --output, or pass --overwrite to replace them",
        )


def translate(
    model: str | Path,
    direction: str = "A2B",
    input_path: str | Path = ".",
    output_dir: str | Path = "translated",
    device: str = "auto",
    batch_size: int = 1,
    overwrite: bool = False,
    mlflow_cfg: MlflowConfig | None = None,
) -> dict[str, Any]:
    """Translate a folder of images (or one image) into ``output_dir`` as PNG files.

    Never writes into the input folder, and never replaces a file it did not write itself
    unless ``overwrite`` (:func:`check_output_folder`, before any work). Unreadable files get
    one warning each and are skipped; a summary line follows. Raises :class:`CycleGANError`
    when the model cannot be loaded, there is no input image, or no image could be
    translated. Returns ``{"translated", "failed", "output_dir"}``.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    input_path, output_dir = Path(input_path), Path(output_dir)
    if input_path.is_dir():
        inputs = list_images(input_path)
        others = sum(
            1 for p in input_path.iterdir() if p.is_file() and not p.name.startswith(".")
        ) - len(inputs)
        if others:
            log.info("%d files in %s are not images by extension; ignored", others, input_path)
    elif input_path.is_file():
        inputs = [input_path]
    else:
        raise InputError(f"input {input_path} does not exist")
    if not inputs:
        raise InputError(f"no images in {input_path}", "expected .png, .jpg, ... files")
    names = _output_names(inputs)
    check_output_folder(inputs, input_path, output_dir, names, overwrite)
    net = load_translator(model, direction, device, mlflow_cfg)
    dev = next(net.parameters()).device
    output_dir.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("Software", f"{SOFTWARE_TAG} {direction} {redact(str(model))}"[:200])

    failed: list[str] = []
    readable: list[str] = []
    bar = None
    if progress_enabled():
        from tqdm import tqdm

        bar = tqdm(total=len(inputs), desc=f"translate {direction}", unit="img")
    seen = 0
    every = max(1, len(inputs) // 10)

    def advance() -> None:
        nonlocal seen
        seen += 1
        if bar is not None:
            bar.update(1)
        elif seen % every == 0:
            log.info("translate %s: %d/%d", direction, seen, len(inputs))

    def images() -> Iterator[np.ndarray]:
        for p, name in zip(inputs, names, strict=True):
            try:
                img = read_image(p)
            except Exception as e:  # PIL raises many types for a damaged file
                log.warning("skipped %s: not a readable image (%s)", p, str(e)[:200])
                failed.append(str(p))
                advance()
                continue
            readable.append(name)
            yield img

    done = 0
    # translate_arrays pulls an image (recording its name) before yielding its translation,
    # so the i-th output belongs to readable[i].
    for i, out in enumerate(translate_arrays(net, images(), dev, batch_size)):
        img = Image.fromarray(out)
        atomic_write(
            output_dir / readable[i], lambda fh, img=img: img.save(fh, "PNG", pnginfo=info)
        )
        done += 1
        advance()
    if bar is not None:
        bar.close()
    summary = f"translated {done} of {len(inputs)} images ({direction}) into {output_dir}"
    if failed:
        summary += f"; {len(failed)} skipped"
    if done == 0:
        raise InputError(
            f"no image could be translated from {input_path} ({len(failed)} unreadable)"
        )
    log.info(summary)
    return {"translated": done, "failed": failed, "output_dir": str(output_dir)}
