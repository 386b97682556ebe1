"""``prepare``: layout, manifest, rejects, safe archives, determinism, atomic output, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cyclegan.config import Config, config_from_dict
from cyclegan.data.dataset import load_rgb
from cyclegan.data.prepare import prepare
from cyclegan.errors import DataError
from cyclegan.paths import Paths

SPLITS = ("trainA", "trainB", "testA", "testB")


def make_image(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    """A small smooth RGB image (distinct per seed)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    c = rng.uniform(0, 255, 3)
    img = (c + 60 * np.sin(xx[..., None] / rng.uniform(2, 6) + rng.uniform(0, 6))) % 255
    img[yy < h // 2] *= 0.5
    return Image.fromarray(img.astype(np.uint8), "RGB")


def make_layout(root: Path, counts: dict[str, int] | None = None, fmt: str = "png") -> Path:
    """Write a reference layout of small images (``counts`` per split, default 4 each)."""
    counts = counts or dict.fromkeys(SPLITS, 4)
    seed = 0
    for split, n in counts.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            seed += 1
            make_image(seed).save(root / split / f"img_{i:03d}.{fmt}")
    return root


def cfg_for(source: str | Path, **data: Any) -> Config:
    """A validated config whose data section reads ``source`` (small sizes)."""
    d = {"source": str(source), "load_size": 16, "num_workers": 1, **data}
    return config_from_dict({"data": d, "train": {"crop_size": 16, "n_layers_D": 2}})


def paths_in(base: Path) -> Paths:
    return Paths(raw=base / "data" / "raw", prepared=base / "data" / "prepared")


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_folder_source_gives_layout_and_manifest(tmp_path) -> None:
    src = make_layout(tmp_path / "src")
    (src / "trainA" / "README.txt").write_text("not an image")
    (src / "trainA" / ".DS_Store").write_bytes(b"\0")
    before = tree_hashes(src)
    paths = paths_in(tmp_path)
    manifest = prepare(cfg_for(src), paths)

    out = paths.prepared
    assert sorted(p.name for p in out.iterdir()) == sorted([*SPLITS, "manifest.json"])
    img = load_rgb(out / "trainA" / "img_000.png")
    assert img.shape == (16, 16, 3)  # resized once, square
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == dict.fromkeys(SPLITS, 4)
    assert manifest["source"]["kind"] == "folder"
    assert manifest["params"]["load_size"] == 16
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    assert len(manifest["files"]) == 16
    assert manifest["ignored"] == [
        {"file": "trainA/README.txt", "reason": "not an image file name"}
    ]
    assert manifest["rejected"] == []
    assert tree_hashes(src) == before  # the source is only read
    assert (tmp_path / "data" / "raw").is_dir()  # the DVC output exists even when unused
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared", "raw"]


def test_bad_files_are_rejected_and_listed(tmp_path) -> None:
    src = make_layout(tmp_path / "src", dict.fromkeys(SPLITS, 5), fmt="jpg")
    good = (src / "trainA" / "img_000.jpg").read_bytes()
    (src / "trainA" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "trainB" / "zero.png").write_bytes(b"")
    (src / "testA" / "text.png").write_text("this is not a picture\n")
    manifest = prepare(cfg_for(src, max_reject_fraction=0.2), paths_in(tmp_path))

    reasons = {r["file"]: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == {"trainA/truncated.jpg", "trainB/zero.png", "testA/text.png"}
    assert "truncated" in reasons["trainA/truncated.jpg"]
    assert "empty" in reasons["trainB/zero.png"]
    assert "not an image" in reasons["testA/text.png"]
    assert manifest["counts"] == dict.fromkeys(SPLITS, 5)
    out = tmp_path / "data" / "prepared"
    assert not (out / "trainA" / "truncated.png").exists()


def test_odd_formats_are_converted_through_prepare(tmp_path) -> None:
    src = make_layout(tmp_path / "src")
    a = src / "trainA"
    Image.new("L", (20, 20), 90).save(a / "gray.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(a / "clear.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(a / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(a / "white16.png")
    Image.new("RGB", (20, 20), (1, 2, 3)).convert("P").save(a / "pal.png")
    prepare(cfg_for(src), paths_in(tmp_path))
    out = tmp_path / "data" / "prepared" / "trainA"
    for name, colour in [("gray", 90), ("clear", 255), ("white16", 255)]:
        img = Image.open(out / f"{name}.png")
        assert img.mode == "RGB"
        assert (np.asarray(img) == colour).all(), name
    assert Image.open(out / "cmyk.png").mode == "RGB"
    assert Image.open(out / "pal.png").mode == "RGB"


def test_decompression_bomb_is_rejected(tmp_path) -> None:
    src = make_layout(tmp_path / "src")
    Image.new("1", (1500, 1500)).save(src / "trainB" / "bomb.png")
    manifest = prepare(
        cfg_for(src, max_image_pixels=1_000_000, max_reject_fraction=0.1), paths_in(tmp_path)
    )
    [rej] = manifest["rejected"]
    assert rej["file"] == "trainB/bomb.png" and "decompression bomb" in rej["reason"]


def test_empty_split_is_one_clear_error(tmp_path) -> None:
    src = make_layout(tmp_path / "src", {"trainA": 3, "trainB": 0, "testA": 2, "testB": 2})
    with pytest.raises(DataError) as e:
        prepare(cfg_for(src), paths_in(tmp_path))
    msg = str(e.value)
    assert "trainB" in msg and "\n" not in msg
    assert not (tmp_path / "data" / "prepared").exists()


def test_missing_split_folder_is_an_error(tmp_path) -> None:
    src = make_layout(tmp_path / "src", {"trainA": 2, "testA": 2, "testB": 2})
    with pytest.raises(DataError, match="no trainB/ folder"):
        prepare(cfg_for(src), paths_in(tmp_path))


def test_too_many_rejects_fail_and_keep_the_old_output(tmp_path) -> None:
    src = make_layout(tmp_path / "src")
    paths = paths_in(tmp_path)
    prepare(cfg_for(src), paths)
    before = tree_hashes(paths.prepared)
    for i in range(3):
        (src / "trainA" / f"bad{i}.png").write_text("nope")
    with pytest.raises(DataError, match="max_reject_fraction"):
        prepare(cfg_for(src, max_reject_fraction=0.1), paths)
    # The failed run left the previous prepared data intact and no temporary folder.
    assert tree_hashes(paths.prepared) == before
    assert sorted(p.name for p in paths.prepared.parent.iterdir()) == ["prepared", "raw"]


def test_prepare_replaces_stale_output(tmp_path) -> None:
    src = make_layout(tmp_path / "src")
    paths = paths_in(tmp_path)
    (paths.prepared / "trainA").mkdir(parents=True)
    (paths.prepared / "trainA" / "stale.png").write_bytes(b"old")
    (paths.prepared.parent / ".prepared.tmp").mkdir()  # left by an interrupted run
    prepare(cfg_for(src), paths)
    assert not (paths.prepared / "trainA" / "stale.png").exists()
    assert sorted(p.name for p in paths.prepared.parent.iterdir()) == ["prepared", "raw"]


def test_ground_truth_splits_are_kept_and_matched(tmp_path) -> None:
    src = make_layout(
        tmp_path / "src",
        {"trainA": 3, "trainB": 3, "testA": 3, "testB": 2, "testA_gt": 3, "testB_gt": 2},
    )
    make_image(99).save(src / "testA_gt" / "orphan.png")
    manifest = prepare(cfg_for(src, max_reject_fraction=0.5), paths_in(tmp_path))
    assert manifest["counts"]["testA_gt"] == 3 and manifest["counts"]["testB_gt"] == 2
    assert {"file": "testA_gt/orphan.png", "reason": "no matching testA/ image"} in manifest[
        "rejected"
    ]


def test_synthetic_prepare_is_byte_identical_across_runs_and_workers(tmp_path) -> None:
    # 200 files: enough for the 2-process pool to be used in the second run.
    syn = {"image_size": 16, "n_train_a": 60, "n_train_b": 60, "n_test": 20}
    one = paths_in(tmp_path / "one")
    two = paths_in(tmp_path / "two")
    m1 = prepare(cfg_for("synthetic", seed=3, synthetic=syn, num_workers=1), one)
    m2 = prepare(cfg_for("synthetic", seed=3, synthetic=syn, num_workers=2), two)
    assert m1 == m2
    assert tree_hashes(one.prepared) == tree_hashes(two.prepared)
    assert m1["counts"] == {
        "trainA": 60,
        "trainB": 60,
        "testA": 20,
        "testB": 20,
        "testA_gt": 20,
        "testB_gt": 20,
    }
    assert m1["params"]["seed"] == 3 and m1["source"]["kind"] == "synthetic"
    # The raw copy is reused by a second prepare, and the prepared output is the same.
    raw_file = one.raw / "synthetic" / "trainA" / "00000.png"
    mtime = raw_file.stat().st_mtime_ns
    assert prepare(cfg_for("synthetic", seed=3, synthetic=syn), one) == m1
    assert raw_file.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------


def _layout_zip(path: Path, src: Path, top: str = "tiny") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, f"{top}/{f.relative_to(src).as_posix()}")
    return path


def test_zip_with_a_top_level_folder_is_extracted_and_prepared(tmp_path) -> None:
    src = make_layout(tmp_path / "src")
    archive = _layout_zip(tmp_path / "tiny.zip", src)
    manifest = prepare(cfg_for(archive), paths_in(tmp_path))
    assert manifest["counts"] == dict.fromkeys(SPLITS, 4)
    assert manifest["source"]["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert (tmp_path / "data" / "raw" / "extracted" / "tiny" / "tiny" / "trainA").is_dir()


def test_tar_gz_is_extracted_and_prepared(tmp_path) -> None:
    src = make_layout(tmp_path / "src")
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for s in SPLITS:
            tf.add(src / s, arcname=s)
    manifest = prepare(cfg_for(archive), paths_in(tmp_path))
    assert manifest["counts"] == dict.fromkeys(SPLITS, 4)


def _zip_with(tmp_path: Path, name: str, extra: tuple[zipfile.ZipInfo | str, bytes]) -> Path:
    src = make_layout(tmp_path / "src")
    box = tmp_path / "box"
    box.mkdir(exist_ok=True)
    archive = _layout_zip(box / name, src)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(*extra)
    return archive


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("../evil.txt", "escapes"),
        ("tiny/../../evil.txt", "escapes"),
        ("/tmp/evil_abs.txt", "absolute"),
        (_symlink_info("tiny/trainA/link.png"), "link"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink"],
)
def test_unsafe_zip_is_refused_and_nothing_escapes(tmp_path, entry, why) -> None:
    archive = _zip_with(tmp_path, "evil.zip", (entry, b"/etc/passwd"))
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match=f"unsafe archive.*{why}"):
        prepare(cfg_for(archive), paths_in(work))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the parent stays clean
    assert not list(tmp_path.rglob("evil*.txt"))
    assert not Path("/tmp/evil_abs.txt").exists()
    # Nothing half-extracted inside data/ either.
    assert not (work / "data" / "prepared").exists()
    assert [p.name for p in (work / "data" / "raw").iterdir()] == []


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "device", "dotdot"])
def test_unsafe_tar_is_refused(tmp_path, kind) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        data = b"x" * 10
        info = tarfile.TarInfo("trainA/a.png" if kind != "dotdot" else "../a.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        if kind != "dotdot":
            bad = tarfile.TarInfo(f"trainA/{kind}")
            bad.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}.get(
                kind, tarfile.CHRTYPE
            )
            bad.linkname = "/etc/passwd"
            tf.addfile(bad)
    with pytest.raises(DataError, match="unsafe archive"):
        prepare(cfg_for(archive), paths_in(tmp_path / "w"))
    assert not (tmp_path / "a.png").exists()


def test_archive_size_is_bounded(tmp_path) -> None:
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("trainA/zeros.png", b"\0" * 200_000)  # compresses to a few hundred bytes
    with pytest.raises(DataError, match="max_archive_bytes"):
        prepare(cfg_for(archive, max_archive_bytes=100_000), paths_in(tmp_path / "w"))
    assert not (tmp_path / "w" / "data" / "raw" / "extracted" / "big").exists()


def test_source_overlapping_the_output_is_refused(tmp_path) -> None:
    paths = paths_in(tmp_path)
    make_layout(paths.prepared)
    with pytest.raises(DataError, match="overlaps"):
        prepare(cfg_for(paths.prepared), paths)
    assert (paths.prepared / "trainA" / "img_000.png").exists()


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_prepare_writes_the_layout(cyclegan_exe, tmp_path, cli_env) -> None:
    (tmp_path / "params.yaml").write_text(
        "data:\n  source: synthetic\n  load_size: 16\n  num_workers: 1\n"
        "  synthetic: {image_size: 16, n_train_a: 6, n_train_b: 5, n_test: 3}\n"
        "train:\n  crop_size: 16\n  n_layers_D: 2\n"
    )
    r = subprocess.run(
        [cyclegan_exe, "prepare"],
        cwd=tmp_path,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "data" / "prepared"
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts == {
        "trainA": 6,
        "trainB": 5,
        "testA": 3,
        "testB": 3,
        "testA_gt": 3,
        "testB_gt": 3,
    }
    assert len(list((out / "testB_gt").glob("*.png"))) == 3

    r = subprocess.run(
        [cyclegan_exe, "prepare", "--set", "data.source=no/such/folder"],
        cwd=tmp_path,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no/such/folder" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
