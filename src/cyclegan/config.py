"""Typed, validated parameters: ``params.yaml`` plus ``--set section.key=value`` overrides.

Each stage reads one section (``data``, ``train``, ``evaluate``, ``register``, ``mlflow``).
Everything is checked before any work starts: an unknown key, a wrong type or an
out-of-range value raises :class:`~cyclegan.errors.ConfigError` naming the key, the value
and what is allowed.

Constraints live next to each field (``_f(default, min=..., choices=...)``) so the rule and
its error message cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from cyclegan.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


def _f(default: Any, *, min: float | None = None, max: float | None = None, doc: str = "") -> Any:
    """A dataclass field with a default, an inclusive range and a one-line description."""
    meta = {"min": min, "max": max, "doc": doc}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    return dataclasses.replace(value) if dataclasses.is_dataclass(value) else type(value)(value)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    """The built-in unpaired dataset (see :mod:`cyclegan.data.synthetic`)."""

    image_size: int = _f(32, min=8, max=1024, doc="side of the generated images, pixels")
    n_train_a: int = _f(400, min=1, doc="training scenes in domain A")
    n_train_b: int = _f(400, min=1, doc="training scenes in domain B (drawn independently)")
    n_test: int = _f(64, min=1, doc="test scenes per domain, each with ground truth")


@dataclass
class DataConfig:
    """Where the unpaired images come from and how they are prepared."""

    source: str = _f(
        "synthetic",
        doc="synthetic | a folder | an archive (.zip/.tar/.tar.gz) | a dataset name "
        "(horse2zebra, ...) | an http(s) URL | s3://bucket/prefix",
    )
    load_size: int = _f(32, min=8, max=4096, doc="images are resized once to this square size")
    seed: int = _f(0, min=0, doc="seed for the synthetic dataset")
    synthetic: SyntheticConfig = _f(SyntheticConfig())
    sha256: str | None = _f(None, doc="expected sha256 of a downloaded archive (URL sources)")
    s3_endpoint_url: str | None = _f(None, doc="S3-compatible endpoint (default: AWS or env)")
    max_reject_fraction: float = _f(0.05, min=0.0, max=1.0, doc="fail if more are rejected")
    max_image_pixels: int = _f(89_478_485, min=1, doc="larger images are rejected (bombs)")
    max_archive_bytes: int = _f(20 * 2**30, min=1, doc="bound on an archive's extracted size")
    num_workers: int | Literal["auto"] = _f("auto", min=1, doc="processes for preparation")


@dataclass
class TrainConfig:
    """CycleGAN training; defaults are the reference's unless noted (CPU-sized model)."""

    epochs: int = _f(2, min=0, doc="epochs at constant learning rate (reference n_epochs)")
    epochs_decay: int = _f(2, min=0, doc="epochs of linear decay to zero (n_epochs_decay)")
    max_steps: int | None = _f(None, min=1, doc="stop after this many steps (smoke tests)")
    batch_size: int = _f(1, min=1, doc="images per rank per step (the paper: 1)")
    crop_size: int = _f(32, min=8, max=4096, doc="random crop side; <= data.load_size")
    flip: bool = _f(True, doc="random horizontal flip")
    netG: Literal["resnet_9blocks", "resnet_6blocks"] = _f("resnet_6blocks")
    ngf: int = _f(32, min=1, doc="generator filters in the first layer (paper: 64)")
    ndf: int = _f(32, min=1, doc="discriminator filters in the first layer (paper: 64)")
    n_layers_D: int = _f(3, min=1, max=8, doc="PatchGAN depth (3 = 70x70)")
    gan_mode: Literal["lsgan", "vanilla"] = _f("lsgan")
    lr: float = _f(2e-4, min=1e-12, max=1.0, doc="Adam learning rate")
    beta1: float = _f(0.5, min=0.0, max=0.999999)
    beta2: float = _f(0.999, min=0.0, max=0.999999)
    lambda_A: float = _f(10.0, min=0.0, doc="cycle loss weight A->B->A")
    lambda_B: float = _f(10.0, min=0.0, doc="cycle loss weight B->A->B")
    lambda_identity: float = _f(0.5, min=0.0, doc="identity loss, relative to lambda_A/B")
    pool_size: int = _f(50, min=0, doc="image history pool per discriminator (0 = off)")
    seed: int = _f(0, min=0)
    device: Literal["auto", "cpu", "cuda"] = _f("auto")
    precision: Literal["fp32", "bf16"] = _f("fp32", doc="bf16 autocast for the networks")
    channels_last: bool = _f(False, doc="channels_last memory layout (faster convs on GPU)")
    tf32: bool = _f(False, doc="allow TF32 for float32 convs/matmuls on CUDA (fp32 otherwise)")
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = _f("none")
    nproc_per_node: int | Literal["auto"] = _f(1, min=1, doc="ranks per node; auto = all GPUs")
    num_workers: int = _f(0, min=0, doc="DataLoader worker processes per rank")
    log_every: int = _f(25, min=1, doc="steps between loss readings (the only host syncs)")
    sample_every: int = _f(500, min=1, doc="steps between sample grids")
    checkpoint_every: int = _f(500, min=1, doc="steps between checkpoints (and at epoch ends)")
    keep_checkpoints: int = _f(3, min=1, doc="checkpoints kept")
    resume: Literal["auto", "never", "always"] = _f(
        "auto",
        doc="auto: resume a matching checkpoint, else start fresh keeping the old aside; "
        "never: always start fresh; always: resume or fail",
    )


@dataclass
class EvaluateConfig:
    """FID/KID and ground-truth metrics on the test splits."""

    batch_size: int = _f(32, min=1)
    device: Literal["auto", "cpu", "cuda"] = _f("auto")
    fid_weights: str | None = _f(None, doc="Inception weights file (default: the packaged copy)")
    kid_subsets: int = _f(100, min=1)
    kid_subset_size: int = _f(1000, min=2, doc="clipped to the number of images")
    max_images: int | None = _f(None, min=1, doc="cap per direction (default: all test images)")
    num_samples: int = _f(8, min=1, doc="rows in the sample grid")


@dataclass
class RegisterConfig:
    """MLflow Model Registry: gate on a metric, move the champion alias."""

    model_name: str = _f("cyclegan")
    metric: str = _f("fid_A2B", doc="a key of metrics/eval.json")
    threshold: float | None = _f(None, doc="register only if the metric passes it")
    greater_is_better: bool | None = _f(None, doc="default: from the metric (fid/kid lower)")
    alias: str = _f("champion")


@dataclass
class MlflowConfig:
    """Tracking: ``tracking_uri`` null means $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db."""

    tracking_uri: str | None = _f(None)
    experiment: str = _f("cyclegan")
    run_name: str | None = _f(None)
    system_metrics: bool = _f(False, doc="log CPU/GPU utilisation (needs psutil)")


@dataclass
class Config:
    """All parameters, one section per stage."""

    data: DataConfig = _f(DataConfig())
    train: TrainConfig = _f(TrainConfig())
    evaluate: EvaluateConfig = _f(EvaluateConfig())
    register: RegisterConfig = _f(RegisterConfig())
    mlflow: MlflowConfig = _f(MlflowConfig())

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.0002, "data.synthetic.n_test": 64, ...}`` for MLflow params."""
        return dict(_flatten(self.to_dict()))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), *, required: bool = False
) -> Config:
    """Read ``path`` (default ``params.yaml``; built-in defaults if absent and not
    ``required``), apply ``section.key=value`` overrides, validate, and return the config."""
    path = Path(path) if path is not None else DEFAULT_PARAMS
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {_tname(loaded)}")
        raw = loaded
    elif required or path != DEFAULT_PARAMS:
        raise ConfigError(f"parameters file {path} not found", "pass --params FILE")
    overrides = list(overrides)
    for item in overrides:
        _apply_override(raw, item)
    set_keys = {item.partition("=")[0].strip() for item in overrides}
    try:
        cfg = _build(Config, raw, source=str(path), prefix="")
    except ConfigError as e:
        # Name the flag, not the file, when the bad value came from --set.
        if e.key in set_keys:
            e.message = e.message.replace(f"{path}: ", "--set: ", 1)
        raise
    _check_cross(cfg)
    return cfg


def config_from_dict(raw: Mapping[str, Any], source: str = "config") -> Config:
    """Validate a nested dict (e.g. one stored in a checkpoint) into a :class:`Config`."""
    cfg = _build(Config, dict(raw), source=source, prefix="")
    _check_cross(cfg)
    return cfg


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise ConfigError(
            f"--set {item!r}: expected section.key=value", "e.g. --set train.lr=0.0001"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {p!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, *, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping of keys, got {_tname(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        kind = "section" if not prefix else "key"
        bad = f"{prefix}{unknown[0]}"
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        err = ConfigError(
            f"{source}: unknown {kind} {bad!r}"
            + (f" (did you mean {prefix}{close[0]!r}?)" if close else ""),
            f"allowed in {where}: {', '.join(fields)}",
        )
        err.key = bad
        raise err
    kwargs = {}
    for name, value in raw.items():
        f = fields[name]
        kwargs[name] = _convert(hints[name], value, f, source=source, key=f"{prefix}{name}")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, f: dataclasses.Field, *, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source=source, prefix=f"{key}.")
    options = _options(tp)
    errors: list[str] = []
    for opt in options:
        ok, converted = _coerce(opt, value)
        if ok:
            _check_range(converted, f, source=source, key=key)
            return converted
        errors.append(_describe(opt))
    err = ConfigError(
        f"{source}: {key} = {value!r} is not valid",
        f"expected {' or '.join(dict.fromkeys(errors))}{_range_text(f)}",
    )
    err.key = key
    raise err


def _options(tp: Any) -> list[Any]:
    if get_origin(tp) in (Union, types.UnionType):
        return list(get_args(tp))
    return [tp]


def _coerce(tp: Any, value: Any) -> tuple[bool, Any]:
    """Strict conversion: YAML already typed the value; only int->float widens."""
    if tp is type(None):
        return value is None, None
    if get_origin(tp) is Literal:
        return value in get_args(tp), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it is.
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in this module, not user input


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}[tp]


def _range_text(f: dataclasses.Field) -> str:
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _check_range(value: Any, f: dataclasses.Field, *, source: str, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        err = ConfigError(
            f"{source}: {key} = {value!r} is out of range", f"allowed{_range_text(f)}"
        )
        err.key = key
        raise err


def _check_cross(cfg: Config) -> None:
    if cfg.train.crop_size > cfg.data.load_size:
        raise ConfigError(
            f"train.crop_size = {cfg.train.crop_size} is larger than data.load_size = "
            f"{cfg.data.load_size}",
            "set train.crop_size <= data.load_size",
        )
    if cfg.train.epochs + cfg.train.epochs_decay == 0 and cfg.train.max_steps is None:
        raise ConfigError(
            "train.epochs + train.epochs_decay is 0: nothing to train",
            "set train.epochs >= 1",
        )


def _tname(v: Any) -> str:
    return type(v).__name__


def describe_parameters() -> str:
    """A human-readable list of every parameter, its default and its meaning."""
    lines = []
    for sec in dataclasses.fields(Config):
        lines.append(f"{sec.name}:")
        lines.extend(_describe_section(sec.default_factory(), "  "))  # type: ignore[misc]
    return "\n".join(lines)


def _describe_section(obj: Any, indent: str) -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.append(f"{indent}{f.name}:")
            out.extend(_describe_section(v, indent + "  "))
        else:
            doc = f.metadata.get("doc", "")
            out.append(f"{indent}{f.name}: {v!r}" + (f"  # {doc}" if doc else ""))
    return out
