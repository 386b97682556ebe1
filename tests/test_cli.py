"""The `cyclegan` command as users run it: a subprocess, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def _run(exe: str, *args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


CONTRACT_COMMANDS = ("prepare", "train", "evaluate", "register", "translate", "export", "pipeline")
STAGES = ("prepare", "train", "evaluate", "register")


def test_every_contract_command_exists_and_takes_its_options(cyclegan_exe, repo_root, cli_env):
    """Each command of the contract answers --help, and each stage takes --params and --set
    (a command merely named in the top-level description would not pass)."""
    for cmd in CONTRACT_COMMANDS:
        r = _run(cyclegan_exe, cmd, "--help", cwd=repo_root, env=cli_env)
        assert r.returncode == 0, (cmd, r.stderr)
        assert r.stdout.startswith(f"usage: cyclegan {cmd}"), (cmd, r.stdout[:200])
        if cmd in STAGES:
            assert "--params FILE" in r.stdout and "--set SECTION.KEY=VALUE" in r.stdout
    r = _run(cyclegan_exe, "pipeline", "--help", cwd=repo_root, env=cli_env)
    for action in ("compile", "run-local", "submit"):
        r2 = _run(cyclegan_exe, "pipeline", action, "--help", cwd=repo_root, env=cli_env)
        assert r2.returncode == 0 and r2.stdout.startswith(f"usage: cyclegan pipeline {action}")
    r = _run(cyclegan_exe, "nosuchcommand", cwd=repo_root, env=cli_env)
    assert r.returncode == 2 and "invalid choice" in r.stderr


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


def test_params_prints_a_valid_params_file_with_the_effective_values(
    cyclegan_exe, repo_root, cli_env, tmp_path
) -> None:
    """`cyclegan params` is YAML (null, not Python's None) that loads back into exactly the
    configuration it shows, --set overrides included; a bad one fails in one line."""
    from cyclegan.config import load_config

    r = _run(cyclegan_exe, "params", "--set", "train.lr=0.0005", cwd=repo_root, env=cli_env)
    assert r.returncode == 0, r.stderr
    for section in ("data:", "train:", "evaluate:", "register:", "mlflow:"):
        assert f"\n{section}" in f"\n{r.stdout}"
    assert "tracking_uri: null" in r.stdout and "None" not in r.stdout
    printed = tmp_path / "printed.yaml"
    printed.write_text(r.stdout)
    assert load_config(printed, required=True) == load_config(
        repo_root / "params.yaml", ["train.lr=0.0005"], required=True
    )
    r = _run(cyclegan_exe, "params", "--set", "trian.lr=1", cwd=repo_root, env=cli_env)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("cyclegan params: error: --set: unknown section 'trian'"), line
    assert "did you mean 'train'" in line
