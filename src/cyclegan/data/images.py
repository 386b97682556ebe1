"""Decode, validate and convert one image file: the per-file work of ``cyclegan prepare``.

Every file is decoded completely (``Image.load()``), so a truncated download fails here and
not in the middle of training. What comes out is always an 8-bit RGB array:

- grayscale (``1``, ``L``, ``I``, ``I;16``) is replicated to three channels; 16-bit values
  are scaled to 8 bits as ``round(v * 255 / 65535)`` (not clipped). 16-bit RGB(A) PNGs are
  reduced to 8 bits by Pillow's decoder (the high byte, within 1 of exact scaling);
- images with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent index) are
  composited on **white**, as image viewers show them. Dropping the alpha channel instead
  would expose whatever colour the hidden pixels happen to store (often black or junk);
- palette and CMYK images are converted by Pillow (no ICC colour management);
- the EXIF orientation tag is applied, so photos are upright as a viewer shows them.

Files that cannot be used raise :class:`ImageRejected` with a short reason; callers list it
in the manifest and go on. Nothing here crashes on a bad file.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must fail to load, never be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageRejected(Exception):
    """A file that is not a usable image; ``str(e)`` is the reason for the manifest."""


def decode_rgb(path: str | Path, max_pixels: int) -> np.ndarray:
    """Fully decode ``path`` into an ``HxWx3`` uint8 RGB array, or raise
    :class:`ImageRejected` (empty, not an image, truncated/corrupt, more than ``max_pixels``
    pixels, unsupported pixel format)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageRejected(f"unreadable: {e.strerror or e}") from None
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    return decode_rgb_bytes(data, max_pixels)


def decode_rgb_bytes(data: bytes, max_pixels: int) -> np.ndarray:
    """:func:`decode_rgb` for bytes already in memory."""
    # Pillow's own bomb check only warns between MAX_IMAGE_PIXELS and twice that; turn the
    # warning into an error and check the header size ourselves so the limit is exact.
    saved_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
                    if w * h > max_pixels:
                        raise ImageRejected(_bomb_reason(w, h, max_pixels))
                    if w == 0 or h == 0:
                        raise ImageRejected("image has no pixels")
                    im.load()
                    return to_rgb(_upright(im))
            except ImageRejected:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise ImageRejected(f"decompression bomb: {_one_line(e)}") from None
            except UnidentifiedImageError:
                raise ImageRejected("not an image (unrecognised format)") from None
            except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError) as e:
                # Pillow reports truncated and corrupt data with these; the message says which.
                raise ImageRejected(f"truncated or corrupt: {_one_line(e)}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a damaged EXIF block leaves the pixels as stored rather
    than rejecting an otherwise good image."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def _bomb_reason(w: int, h: int, max_pixels: int) -> str:
    return f"decompression bomb: {w}x{h} = {w * h} pixels > data.max_image_pixels={max_pixels}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any decoded Pillow image -> ``HxWx3`` uint8 RGB (see the module docstring for rules)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(im, dtype=np.float64)
        # "I" is 32-bit signed; in practice it carries 16-bit samples (PNG, TIFF), so treat
        # the range as 0..65535 and clip anything outside it.
        a = np.clip(a, 0, 65535)
        g = np.rint(a * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":
        raise ImageRejected("unsupported pixel format: 32-bit float (mode F)")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    try:
        rgb = im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageRejected(f"unsupported pixel format {mode}: {_one_line(e)}") from None
    return np.asarray(rgb, dtype=np.uint8)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize to ``size x size`` (the reference's ``Resize([s, s], BICUBIC)``);
    returns the input unchanged when it already has that size."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    out = Image.fromarray(img, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.uint8)


def encode_png(img: np.ndarray) -> bytes:
    """Lossless PNG with no metadata: the same pixels always give the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (archives may be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_file(src: str | Path, load_size: int, max_pixels: int) -> bytes:
    """Decode ``src``, convert to RGB, resize to ``load_size``: the prepared PNG's bytes.
    Raises :class:`ImageRejected` for an unusable file."""
    return encode_png(resize_square(decode_rgb(src, max_pixels), load_size))
