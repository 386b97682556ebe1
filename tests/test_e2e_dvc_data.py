"""A user's own photos through DVC, as docs/data.md says, in a fresh git copy of the project.

A folder of small "photos" (mixed sizes, JPEG and PNG, grayscale, RGBA, an EXIF-rotated JPEG,
a broken file) goes to data/sources/, is `dvc add`-ed and committed, and becomes
`data.source`. Then: `dvc repro` runs every stage and leaves `dvc status` clean; adding,
changing or deleting an image makes `dvc status` report `prepare` and `dvc repro` run it
(and, since the prepared data changed, what follows); no change, nothing runs. The same for
a local .zip archive. A clone of the result has the committed metrics (`dvc metrics diff`
loads HEAD's), and `dvc repro` there runs every stage. Without the project's environment on
PATH the stages say what to do. No MLFLOW_* or AWS_* variables: the clone's own
sqlite:///mlruns.db is used.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.test_e2e_dvc import STAGES, TINY, _merge, _ran, _run, user_env
from tests.train_support import copy_project

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
NAME = "my_photos2paintings"  # the name docs/data.md and the README use
SOURCE = f"data/sources/{NAME}"
# The broken file is 1 of 15: allow it (the default 5% would refuse the whole dataset).
PARAMS = _merge({"data": {"source": SOURCE, "max_reject_fraction": 0.2}}, TINY)


def _photo(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = (rng.uniform(0, 255, 3) + 80 * np.sin(xx[..., None] / 3 + yy[..., None] / 5)) % 255
    img = Image.fromarray(rgb.astype(np.uint8), "RGB")
    if mode == "RGBA":
        img.putalpha(Image.fromarray((xx * 255 // max(w - 1, 1)).astype(np.uint8), "L"))
    return img.convert(mode)


def _photos(root: Path) -> None:
    """A reference layout of 15 files like a phone and the web give them."""
    rotated = Image.Exif()
    rotated[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display
    seed = 0
    for split in ("trainA", "trainB", "testA", "testB"):
        folder = root / split
        folder.mkdir(parents=True)
        seed += 10
        _photo(seed, (48, 36)).save(folder / "holiday.jpg", quality=90)
        _photo(seed + 1, (20, 30), "L").save(folder / "grey.png")
        _photo(seed + 2, (33, 33), "RGBA").save(folder / "cutout.png")
        if split.startswith("train"):
            _photo(seed + 3, (40, 24)).save(folder / "phone.jpg", exif=rotated.tobytes())
    good = (root / "trainB" / "holiday.jpg").read_bytes()
    (root / "trainB" / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated


def _status(work: Path, env: dict[str, str]) -> dict:
    """`dvc status` as JSON: the stages (and .dvc files) that changed; {} when up to date."""
    r = subprocess.run([DVC, "status", "--json"], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout or "{}")


def _counts(work: Path) -> dict[str, int]:
    return json.loads((work / "data/prepared/manifest.json").read_text())["counts"]


def _commit(work: Path, env: dict[str, str], message: str) -> None:
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", message], work, env)


def _make_project(work: Path) -> dict[str, str]:
    """A git repository of the project's files (tracked and not ignored), tiny params."""
    copy_project(work)
    params = _merge(yaml.safe_load((work / "params.yaml").read_text()), PARAMS)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = user_env()
    # The stages run this copy's code, as in a user's clone (installed editable), and Python
    # writes its bytecode beside it: DVC must not take that for a change.
    env["PYTHONPATH"] = str(work / "src")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    _run(["git", "init", "-q", "-b", "main"], work, env)
    _commit(work, env, "project")
    return env


def _set_source(work: Path, source: str) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["source"] = source
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_own_photos_folder_and_archive(tmp_path: Path) -> None:
    work = tmp_path / "project"
    env = _make_project(work)
    photos = tmp_path / NAME
    _photos(photos)

    # docs/data.md, "Your own dataset", as written (the user's folder where `~` would be).
    _run(["sh", "-c", f"cp -r {photos} data/sources/"], work, env)
    _run([DVC, "add", SOURCE], work, env)
    _run(["git", "add", f"{SOURCE}.dvc", "data/sources/.gitignore"], work, env)
    _run(["git", "commit", "-m", f"{NAME} dataset"], work, env)
    untracked = _run(["git", "status", "--porcelain", "--untracked-files=all"], work, env)
    assert NAME not in untracked, untracked  # the images stay out of git

    out = _run([DVC, "repro"], work, env)
    assert _ran(out) == set(STAGES), out[-3000:]
    assert _counts(work) == {"trainA": 4, "trainB": 4, "testA": 3, "testB": 3}
    assert _status(work, env) == {}
    assert _ran(_run([DVC, "repro"], work, env)) == set()
    _commit(work, env, "first run")

    # Adding an image: prepare is reported, and it and what follows run again.
    _photo(99, (64, 48)).save(work / SOURCE / "trainA" / "new.jpg")
    assert "prepare" in _status(work, env)
    out = _run([DVC, "repro"], work, env)
    assert _ran(out) == set(STAGES), out[-3000:]
    assert _counts(work)["trainA"] == 5
    assert _status(work, env) == {}

    # Changing an image's pixels, deleting one: prepare runs again, train is next.
    for change in (
        lambda: _photo(7, (48, 36)).save(work / SOURCE / "testA" / "holiday.jpg", quality=90),
        lambda: (work / SOURCE / "trainA" / "grey.png").unlink(),
    ):
        change()
        assert "prepare" in _status(work, env)
        out = _run([DVC, "repro", "prepare"], work, env)
        assert "prepare" in _ran(out), out[-3000:]
        after = _status(work, env)
        assert "prepare" not in after and "train" in after, after
    assert _counts(work)["trainA"] == 4

    # A local archive, the same way (made from the export outside the project, so that
    # only the archive changes).
    archive = work / "data/sources/photos.zip"
    _zip(photos, archive)
    _run([DVC, "add", "data/sources/photos.zip"], work, env)
    _set_source(work, "data/sources/photos.zip")
    assert "prepare" in _ran(_run([DVC, "repro", "prepare"], work, env))
    assert "prepare" not in _status(work, env)
    _photo(98, (30, 30)).save(photos / "trainB" / "extra.png")
    _zip(photos, archive)
    assert "prepare" in _status(work, env)
    assert "prepare" in _ran(_run([DVC, "repro", "prepare"], work, env))
    assert _counts(work)["trainB"] == 5
    assert _ran(_run([DVC, "repro", "prepare"], work, env)) == set()


def _zip(folder: Path, archive: Path) -> None:
    """The folder zipped as the Berkeley archives are: everything inside one folder."""
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, f"{folder.name}/{p.relative_to(folder)}")


def test_readme_way_then_a_fresh_clone(tmp_path: Path) -> None:
    """The README's two lines, a commit and a push; then a clone pulls the dataset, its
    `dvc metrics diff` loads HEAD's metrics, and its first `dvc repro` runs every stage (it
    has no cache and no outputs, only git's files and the pulled dataset)."""
    work = tmp_path / "project"
    env = _make_project(work)
    _set_source(work, "synthetic")
    _run([DVC, "remote", "add", "-d", "storage", str(tmp_path / "remote")], work, env)
    _commit(work, env, "the default source, a DVC remote")
    photos = tmp_path / NAME
    _photos(photos)

    # README, "Your own images", as written (with the user's folder where `~` would be).
    _run(["sh", "-c", f"cp -r {photos} data/sources/ && dvc add {SOURCE}"], work, env)
    out = _run([DVC, "exp", "run", "-S", f"data.source={SOURCE}"], work, env)
    assert _ran(out) == set(STAGES), out[-3000:]
    _commit(work, env, "first run on my photos")
    _run([DVC, "push"], work, env)

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(work), str(clone)], tmp_path, env)
    diff = _run([DVC, "metrics", "diff"], clone, env)
    assert "failed to load" not in diff, diff
    _run([DVC, "pull", f"{SOURCE}.dvc"], clone, env)
    out = _run([DVC, "repro"], clone, env)
    assert _ran(out) == set(STAGES), out[-3000:]
    assert "failed to load" not in _run([DVC, "metrics", "diff"], clone, env)


def test_stage_without_the_environment_says_what_to_do(tmp_path: Path) -> None:
    work = tmp_path / "project"
    env = _make_project(work)
    env["PATH"] = "/usr/bin:/bin"  # no venv: `cyclegan` cannot be found
    r = subprocess.run([DVC, "repro"], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "cyclegan is not on PATH" in r.stdout + r.stderr, r.stdout + r.stderr
    assert ". .venv/bin/activate" in r.stdout + r.stderr


def test_a_source_dvc_cannot_see_is_named_in_one_line(tmp_path: Path) -> None:
    """A folder outside data/sources/ works but is flagged; a path that is not there is one
    error line."""
    work = tmp_path / "project"
    env = _make_project(work)
    photos = tmp_path / "elsewhere" / NAME
    _photos(photos)
    _set_source(work, str(photos))
    out = _run([DVC, "repro", "prepare"], work, env)
    assert f"data.source {photos} is outside data/sources/" in out, out[-3000:]

    r = subprocess.run(
        [str(BIN / "cyclegan"), "prepare", "--set", "data.source=data/sources/not_there"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(
        "cyclegan prepare: error: data.source 'data/sources/not_there': no such folder or archive"
    ), lines
