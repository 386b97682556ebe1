"""Parameters: typed, validated before any work, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cyclegan.config import Config, load_config
from cyclegan.errors import ConfigError


def test_shipped_params_load_and_are_embedded_default(repo_root: Path) -> None:
    cfg = load_config(repo_root / "params.yaml")
    assert cfg.data.source == "synthetic"
    assert cfg.train.crop_size <= cfg.data.load_size
    # The shipped params.yaml spells out the defaults of the code (no hidden divergence).
    assert cfg.train == Config().train


def test_paper_params_are_the_papers_settings(repo_root: Path) -> None:
    cfg = load_config(repo_root / "params.paper.yaml")
    assert (cfg.train.netG, cfg.train.ngf, cfg.train.ndf) == ("resnet_9blocks", 64, 64)
    assert (cfg.data.load_size, cfg.train.crop_size, cfg.train.batch_size) == (286, 256, 1)
    assert (cfg.train.epochs, cfg.train.epochs_decay, cfg.train.lr) == (100, 100, 2e-4)


def test_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr=1e-4", "train.flip=false", "data.synthetic.n_test=5"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.flip is False
    assert cfg.data.synthetic.n_test == 5
    assert cfg.flat()["data.synthetic.n_test"] == 5


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.lr=abc", "train.lr = 'abc'"),
        ("train.nonexistent=1", "'train.nonexistent'"),
        ("train.batch_size=0", "train.batch_size = 0 is out of range"),
        ("train.batch_size=1.5", "train.batch_size = 1.5"),
        ("train.precision=fp16", "one of 'auto', 'fp32', 'bf16'"),
        ("train.flip=maybe", "train.flip"),
        ("nosection.key=1", "unknown section 'nosection'"),
        ("train.crop_size=64", "crop_size = 64 is larger than data.load_size"),
        ("lr=1", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_misspelt_section_in_file(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown section 'trian' \(did you mean 'train'\?\)"):
        load_config(p)


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
