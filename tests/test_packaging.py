"""What `pip install` puts into site-packages: every package folder, under names of our own."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def _packaging() -> tuple[list[str], dict[str, str]]:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return cfg["packages"], cfg["package-dir"]


def test_every_package_folder_is_installed() -> None:
    """A new subpackage that pyproject.toml does not list would be missing from the wheel and
    the image (an editable install hides that)."""
    packages, dirs = _packaging()
    found = set()
    for name, folder in dirs.items():
        base = REPO / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            if "__pycache__" in rel:
                continue
            found.add(".".join(p for p in (name, *rel) if p))
    assert found - {""} == set(packages)


def test_front_ends_install_under_our_own_names() -> None:
    """Generic top-level names (`pipeline`, `components`) would collide with other
    distributions; the Kubeflow front end is `cyclegan_kfp`."""
    packages, _ = _packaging()
    assert {p.split(".")[0] for p in packages} == {"cyclegan", "cyclegan_kfp"}
    for name in ("cyclegan_kfp.pipeline", "cyclegan_kfp.components.train"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        assert Path(spec.origin).is_relative_to(REPO)
