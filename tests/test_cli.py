"""The `cyclegan` command as users run it: a subprocess, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def _run(exe: str, *args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_contract_command(cyclegan_exe, repo_root, cli_env) -> None:
    r = _run(cyclegan_exe, "--help", cwd=repo_root, env=cli_env)
    assert r.returncode == 0
    for cmd in ("prepare", "train", "evaluate", "register", "translate", "pipeline"):
        assert cmd in r.stdout
    for cmd in ("prepare", "train", "evaluate", "register", "translate", "pipeline"):
        r = _run(cyclegan_exe, cmd, "--help", cwd=repo_root, env=cli_env)
        assert r.returncode == 0, r.stderr
    r = _run(cyclegan_exe, "pipeline", "--help", cwd=repo_root, env=cli_env)
    for action in ("compile", "run-local", "submit"):
        assert action in r.stdout


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--set", "train.lr=abc"], "train.lr"),
        (["--set", "train.nonexistent=1"], "train.nonexistent"),
    ],
)
def test_bad_parameter_is_one_line_and_nonzero(cyclegan_exe, repo_root, cli_env, args, key):
    r = _run(cyclegan_exe, "train", *args, cwd=repo_root, env=cli_env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert key in lines[0] and "Traceback" not in r.stderr


def test_misspelt_section_fails_before_work(cyclegan_exe, tmp_path, cli_env) -> None:
    (tmp_path / "params.yaml").write_text("trian:\n  lr: 0.1\n")
    for stage in ("prepare", "train", "evaluate", "register"):
        r = _run(cyclegan_exe, stage, cwd=tmp_path, env=cli_env)
        assert r.returncode != 0
        assert "unknown section 'trian'" in r.stderr and "Traceback" not in r.stderr
        # Nothing was written: validation comes before any work.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_params_lists_every_section(cyclegan_exe, repo_root, cli_env) -> None:
    r = _run(cyclegan_exe, "params", cwd=repo_root, env=cli_env)
    assert r.returncode == 0
    for section in ("data:", "train:", "evaluate:", "register:", "mlflow:"):
        assert section in r.stdout
