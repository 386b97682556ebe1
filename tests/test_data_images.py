"""Decoding and conversion of single files: every odd format becomes 8-bit RGB, every bad
file becomes a reason, nothing crashes."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cyclegan.data.images import (
    ImageRejected,
    decode_rgb,
    encode_png,
    resize_square,
)

LIMIT = 10_000_000


def _save(tmp_path: Path, name: str, im: Image.Image, **kw) -> Path:
    p = tmp_path / name
    im.save(p, **kw)
    return p


def _png_16bit_rgb(values: np.ndarray) -> bytes:
    """A real 16-bit-per-channel RGB PNG (Pillow cannot write one), built chunk by chunk."""
    h, w, _ = values.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16-bit, colour type 2 (RGB)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_grayscale_and_bilevel_become_rgb(tmp_path) -> None:
    g = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    out = decode_rgb(_save(tmp_path, "g.png", Image.fromarray(g, "L")), LIMIT)
    assert out.dtype == np.uint8 and out.shape == (4, 16, 3)
    assert (out == g[..., None]).all()
    bw = Image.fromarray(g > 100).convert("1")
    out = decode_rgb(_save(tmp_path, "bw.png", bw), LIMIT)
    assert set(np.unique(out)) == {0, 255}


def test_alpha_is_composited_on_white(tmp_path) -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (200, 10, 10, 255)  # opaque red stays red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent -> white, whatever colour it stores
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    out = decode_rgb(_save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")), LIMIT)
    assert out.shape == (2, 3, 3)
    assert tuple(out[0, 0]) == (200, 10, 10)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert abs(int(out[0, 2, 0]) - 127) <= 1
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert tuple(decode_rgb(_save(tmp_path, "la.png", la), LIMIT)[0, 1]) == (255, 255, 255)


def test_palette_images_with_and_without_transparency(tmp_path) -> None:
    p = Image.new("P", (4, 1))
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    p.putdata([0, 1, 2, 1])
    out = decode_rgb(_save(tmp_path, "p.png", p), LIMIT)
    assert [tuple(c) for c in out[0]] == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 255, 0)]
    out = decode_rgb(_save(tmp_path, "pt.png", p, transparency=1), LIMIT)
    assert tuple(out[0, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (255, 0, 0)


def test_cmyk_jpeg_becomes_rgb(tmp_path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    path = _save(tmp_path, "c.jpg", cmyk, quality=95)
    assert Image.open(path).mode == "CMYK"
    out = decode_rgb(path, LIMIT)
    assert out.shape == (16, 16, 3)
    assert np.abs(out.reshape(-1, 3).mean(0) - (0, 255, 255)).max() < 6


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path) -> None:
    ramp = np.linspace(0, 65535, 300).round().astype(np.uint16)
    img = np.tile(ramp, (2, 1))
    path = _save(tmp_path, "g16.png", Image.fromarray(img))
    assert Image.open(path).mode.startswith("I")  # really stored as 16 bits
    out = decode_rgb(path, LIMIT)
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(out[0, :, 0], expected)
    assert out[0, -1, 0] == 255 and out[0, 0, 0] == 0
    assert (np.diff(out[0, :, 0].astype(int)) >= 0).all()  # monotone: a ramp, not a clip
    assert len(np.unique(out)) > 200


def test_16bit_rgb_png_keeps_its_range(tmp_path) -> None:
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    vals = np.stack([ramp, ramp[::-1], np.full_like(ramp, 32896)], -1)[None]
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png_16bit_rgb(vals))
    out = decode_rgb(path, LIMIT).astype(int)
    exact = np.rint(vals[0] / 257.0).astype(int)
    assert np.abs(out[0] - exact).max() <= 1  # Pillow keeps the high byte: within 1
    assert out[0, -1, 0] == 255 and out[0, 0, 1] == 255 and out[0, 0, 2] == 128


def test_exif_orientation_is_applied(tmp_path) -> None:
    im = Image.new("RGB", (8, 4), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_rgb(_save(tmp_path, "o.jpg", im, exif=exif.tobytes()), LIMIT)
    assert out.shape == (8, 4, 3)


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("empty.png", lambda good: b"", "empty file"),
        ("text.png", lambda good: b"just some text, not pixels\n" * 10, "not an image"),
        ("cut.jpg", lambda good: good["JPEG"][: len(good["JPEG"]) // 2], "truncated"),
        ("cut.png", lambda good: good["PNG"][: len(good["PNG"]) // 2], "truncated or corrupt"),
        ("junk.png", lambda good: b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not an image"),
    ],
)
def test_bad_files_are_rejected_with_a_reason(tmp_path, name, make, reason) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    good = {}
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt)
        good[fmt] = buf.getvalue()
    path = tmp_path / name
    path.write_bytes(make(good))
    with pytest.raises(ImageRejected, match=reason):
        decode_rgb(path, LIMIT)


@pytest.mark.parametrize("factor", [1.5, 3.0])  # Pillow warns above 1x and raises above 2x
def test_decompression_bomb_is_rejected_before_decoding(tmp_path, factor) -> None:
    limit = 1_000_000
    side = int((limit * factor) ** 0.5) + 1
    path = _save(tmp_path, "bomb.png", Image.new("1", (side, side)))  # a few hundred bytes
    assert path.stat().st_size < 10_000
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode_rgb(path, limit)
    assert decode_rgb(path, side * side).shape == (side, side, 3)  # fine under a higher limit


def test_resize_is_square_bicubic_and_skipped_at_size() -> None:
    img = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    out = resize_square(img, 16)
    ref = np.asarray(Image.fromarray(img).resize((16, 16), Image.Resampling.BICUBIC))
    assert out.shape == (16, 16, 3) and np.array_equal(out, ref)
    assert resize_square(out, 16) is out


def test_png_encoding_is_lossless_and_deterministic() -> None:
    img = np.random.default_rng(1).integers(0, 255, (9, 7, 3), dtype=np.uint8)
    data = encode_png(img)
    assert data == encode_png(img.copy())
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), img)
