"""Versioned data round-trips through a DVC S3 remote (moto's S3 server on loopback), with
the credentials kept out of git."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cyclegan.data.prepare import prepare
from tests.servers import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.test_data_prepare import cfg_for, paths_in, tree_hashes

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).parent / "dvc")


def _env(tmp_path: Path) -> dict[str, str]:
    # No AWS variables: DVC must get its credentials from .dvc/config.local alone.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_"))}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        XDG_CONFIG_HOME=str(tmp_path / "xdg"),  # no user-level DVC config
        DVC_NO_ANALYTICS="1",
        GIT_CONFIG_NOSYSTEM="1",
    )
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r.stdout


def test_push_and_pull_through_an_s3_remote(tmp_path, moto_s3) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _env(tmp_path)
    bucket = moto_s3.create_bucket("cyclegan-dvc-remote")
    syn = {"image_size": 16, "n_train_a": 8, "n_train_b": 8, "n_test": 4}
    paths = paths_in(repo)
    prepare(cfg_for("synthetic", synthetic=syn), paths)
    expected = {"data/raw": tree_hashes(paths.raw), "data/prepared": tree_hashes(paths.prepared)}

    _run(["git", "init", "-q"], repo, env)
    _run([DVC, "init", "-q"], repo, env)
    _run([DVC, "remote", "add", "-d", "s3", f"s3://{bucket}/dvc"], repo, env)
    _run([DVC, "remote", "modify", "s3", "endpointurl", moto_s3.endpoint], repo, env)
    _run([DVC, "remote", "modify", "--local", "s3", "access_key_id", TEST_ACCESS_KEY], repo, env)
    _run(
        [DVC, "remote", "modify", "--local", "s3", "secret_access_key", TEST_SECRET_KEY],
        repo,
        env,
    )
    _run([DVC, "add", "-q", "data/raw", "data/prepared"], repo, env)
    _run([DVC, "push", "-q"], repo, env)
    keys = moto_s3.client().list_objects_v2(Bucket=bucket, Prefix="dvc/").get("KeyCount", 0)
    assert keys > 0

    # Lose the workspace copy and the cache; everything must come back from the remote.
    shutil.rmtree(paths.raw)
    shutil.rmtree(paths.prepared)
    shutil.rmtree(repo / ".dvc" / "cache")
    _run([DVC, "pull", "-q"], repo, env)
    assert tree_hashes(paths.raw) == expected["data/raw"]
    assert tree_hashes(paths.prepared) == expected["data/prepared"]

    # The credentials live only in the git-ignored .dvc/config.local.
    assert TEST_SECRET_KEY in (repo / ".dvc" / "config.local").read_text()
    assert TEST_SECRET_KEY not in (repo / ".dvc" / "config").read_text()
    _run(["git", "add", "-A"], repo, env)
    tracked = _run(["git", "ls-files"], repo, env).split()
    assert ".dvc/config" in tracked and ".dvc/config.local" not in tracked
    assert "data/prepared.dvc" in tracked and "data/raw.dvc" in tracked
    for name in tracked:
        text = (repo / name).read_bytes()
        assert TEST_SECRET_KEY.encode() not in text, name
        assert TEST_ACCESS_KEY.encode() not in text, name
