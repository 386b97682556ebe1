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
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from cyclegan.errors import ConfigError
from cyclegan.fsio import atomic_write

DEFAULT_PARAMS = Path("params.yaml")
MAX_SEED = 2**32 - 1  # numpy's seeding range; torch and Python accept it too
MAX_PARAMS_BYTES = 1 << 20  # a params file is a few KB; anything this large is a mistake
MAX_YAML_NODES = 10_000  # after expanding aliases: a real params.yaml has ~100


def _f(default: Any, *, min: float | None = None, max: float | None = None, doc: str = "") -> Any:
    """A dataclass field with a default, an inclusive range and a one-line description."""
    meta = {"min": min, "max": max, "doc": doc}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value)
    return type(value)(value)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    """The built-in unpaired dataset (see :mod:`cyclegan.data.synthetic`)."""

    image_size: int = _f(32, min=8, max=1024, doc="side of the generated images, pixels")
    n_train_a: int = _f(400, min=1, max=100_000, doc="training scenes in domain A")
    n_train_b: int = _f(400, min=1, max=100_000, doc="training scenes in domain B (independent)")
    n_test: int = _f(64, min=1, max=100_000, doc="test scenes per domain, with ground truth")


@dataclass
class DataConfig:
    """Where the unpaired images come from and how they are prepared."""

    source: str = _f(
        "synthetic",
        doc="synthetic | a folder | an archive (.zip/.tar/.tar.gz) | a dataset name "
        "(horse2zebra, ...) | an http(s) URL | s3://bucket/prefix",
    )
    load_size: int = _f(32, min=8, max=4096, doc="images are resized once to this square size")
    seed: int = _f(0, min=0, max=MAX_SEED, doc="seed for the synthetic dataset")
    synthetic: SyntheticConfig = _f(SyntheticConfig())
    sha256: str | None = _f(None, doc="expected sha256 of a downloaded archive (URL sources)")
    s3_endpoint_url: str | None = _f(None, doc="S3-compatible endpoint (default: AWS or env)")
    max_reject_fraction: float = _f(0.05, min=0.0, max=1.0, doc="fail if more are rejected")
    max_image_pixels: int = _f(
        89_478_485, min=1, max=2**31, doc="larger images are rejected (decompression bombs)"
    )
    max_archive_bytes: int = _f(
        20 * 2**30, min=1, max=2**50, doc="bound on a download's and an archive's size, bytes"
    )
    num_workers: int | Literal["auto"] = _f("auto", min=1, max=256, doc="processes for preparation")


@dataclass
class TrainConfig:
    """CycleGAN training; defaults are the reference's unless noted (CPU-sized model)."""

    epochs: int = _f(2, min=0, max=100_000, doc="epochs at constant learning rate (n_epochs)")
    epochs_decay: int = _f(2, min=0, max=100_000, doc="epochs of linear decay to zero")
    max_steps: int | None = _f(None, min=1, max=2**40, doc="stop after this many steps")
    batch_size: int = _f(1, min=1, max=4096, doc="images per rank per step (the paper: 1)")
    crop_size: int = _f(32, min=8, max=4096, doc="random crop side; <= data.load_size")
    flip: bool = _f(True, doc="random horizontal flip")
    netG: Literal["resnet_9blocks", "resnet_6blocks"] = _f("resnet_6blocks")
    # Parameters grow with the square of the width: 256 is already 16x the paper's model.
    ngf: int = _f(32, min=1, max=256, doc="generator filters in the first layer (paper: 64)")
    ndf: int = _f(32, min=1, max=256, doc="discriminator filters in the first layer (paper: 64)")
    n_layers_D: int = _f(3, min=1, max=8, doc="PatchGAN depth (3 = 70x70)")
    gan_mode: Literal["lsgan", "vanilla"] = _f("lsgan")
    lr: float = _f(2e-4, min=1e-12, max=1.0, doc="Adam learning rate")
    beta1: float = _f(0.5, min=0.0, max=0.999999)
    beta2: float = _f(0.999, min=0.0, max=0.999999)
    lambda_A: float = _f(10.0, min=0.0, max=1e6, doc="cycle loss weight A->B->A")
    lambda_B: float = _f(10.0, min=0.0, max=1e6, doc="cycle loss weight B->A->B")
    lambda_identity: float = _f(0.5, min=0.0, max=1e6, doc="identity loss, relative to lambda_A/B")
    pool_size: int = _f(50, min=0, max=1000, doc="image history pool per discriminator (0 = off)")
    seed: int = _f(0, min=0, max=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = _f("auto")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "auto",
        doc="bf16 autocast for the networks; auto = bf16 where the hardware runs it natively "
        "and it pays (CUDA with bf16; CPUs with AVX512-BF16/AMX for large enough crops)",
    )
    num_threads: int | Literal["auto"] = _f(
        "auto",
        min=1,
        max=1024,
        doc="intra-op CPU threads per rank; auto = the CPUs this process may use (affinity and "
        "cgroup quota) shared among the ranks on this node",
    )
    channels_last: bool = _f(False, doc="channels_last memory layout (faster convs on GPU)")
    tf32: bool = _f(False, doc="allow TF32 for float32 convs/matmuls on CUDA (fp32 otherwise)")
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = _f("none")
    nproc_per_node: int | Literal["auto"] = _f(1, min=1, doc="ranks per node; auto = all GPUs")
    num_workers: int = _f(0, min=0, max=64, doc="DataLoader worker processes per rank")
    log_every: int = _f(25, min=1, doc="steps between loss readings (the only host syncs)")
    sample_every: int = _f(500, min=1, doc="steps between sample grids")
    checkpoint_every: int = _f(500, min=1, doc="steps between checkpoints (and at epoch ends)")
    keep_checkpoints: int = _f(3, min=1, max=10_000, doc="checkpoints kept")
    resume: Literal["auto", "never", "always"] = _f(
        "auto",
        doc="auto: resume a matching checkpoint, else start fresh keeping the old aside; "
        "never: always start fresh; always: resume or fail",
    )


@dataclass
class EvaluateConfig:
    """FID/KID and ground-truth metrics on the test splits."""

    batch_size: int = _f(32, min=1, max=4096)
    device: Literal["auto", "cpu", "cuda"] = _f("auto")
    num_threads: int | Literal["auto"] = _f(
        "auto", min=1, max=1024, doc="intra-op CPU threads; auto = the CPUs this process may use"
    )
    fid_weights: str | None = _f(None, doc="Inception weights file (default: the packaged copy)")
    kid_subsets: int = _f(100, min=1, max=100_000)
    kid_subset_size: int = _f(1000, min=2, max=1_000_000, doc="clipped to the number of images")
    max_images: int | None = _f(None, min=1, doc="cap per direction (default: all test images)")
    num_samples: int = _f(8, min=1, max=256, doc="rows in the sample grid")
    feature_cache: bool = _f(
        True, doc="reuse Inception features of the real test images across runs"
    )


@dataclass
class RegisterConfig:
    """MLflow Model Registry: gate on a metric, move the champion alias."""

    model_name: str = _f("cyclegan")
    metric: str = _f("fid_A2B", doc="a key of metrics/eval.json")
    threshold: float | None = _f(None, doc="register only if the metric passes it")
    greater_is_better: bool | None = _f(None, doc="default: from the metric (fid/kid lower)")
    alias: str = _f("champion")
    onnx: bool = _f(True, doc="attach G_A.onnx/G_B.onnx (checked in onnxruntime) to the version")


@dataclass
class MlflowConfig:
    """Tracking: ``tracking_uri`` null means $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db."""

    tracking_uri: str | None = _f(None)
    experiment: str = _f("cyclegan")
    run_name: str | None = _f(
        None, doc="default: the DVC experiment's name, else '<source>-<netG>-<time>'"
    )
    system_metrics: bool = _f(True, doc="CPU, memory (and GPU) utilisation in the run")


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


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: a key twice in one mapping is an error (PyYAML keeps
    the last one silently), and aliases may not expand a small file into a huge value."""


def _mapping(loader: _ParamsLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(
                f"{loader.name}: key {_short(key)} appears twice (lines {seen[key]} and {line})",
                "keep one of them",
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_ParamsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _expanded_size(node: yaml.Node, memo: dict[int, int], limit: int) -> int:
    """Values in ``node`` with every alias expanded (shared nodes are counted each time they
    are used, which is what a consumer pays), stopping as soon as ``limit`` is passed."""
    if id(node) in memo:
        return memo[id(node)]
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, memo, limit)
        if size > limit:
            break
    memo[id(node)] = size
    return size


def parse_yaml(text: str, source: str) -> Any:
    """A YAML document from a params file or a pipeline parameter, with one-line errors:
    invalid YAML, a duplicate key (with both line numbers) or aliases that expand to more
    than :data:`MAX_YAML_NODES` values."""
    loader = _ParamsLoader(text)
    loader.name = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise ConfigError(
                f"{source}: YAML aliases (&/*) expand to more than {MAX_YAML_NODES} values",
                "write the values out; a params file needs no aliases",
            )
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {_one_line(str(e))}") from None
    finally:
        loader.dispose()


def _read_params(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_PARAMS_BYTES:
            raise ConfigError(
                f"{path} is {size} bytes; a params file is a few KB", "pass the right --params"
            )
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})",
            "save it as UTF-8",
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a params file") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror})") from None
    loaded = parse_yaml(text, str(path))
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {_tname(loaded)}")
    return loaded


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), *, required: bool = False
) -> Config:
    """Read ``path`` (default ``params.yaml``; built-in defaults if absent and not
    ``required``), apply ``section.key=value`` overrides, validate, and return the config."""
    path = Path(path) if path is not None else DEFAULT_PARAMS
    raw: dict[str, Any] = {}
    if path.exists():
        raw = _read_params(path)
    elif required or path != DEFAULT_PARAMS:
        raise ConfigError(f"parameters file {path} not found", "pass --params FILE")
    return _validated(raw, overrides, str(path), "--set")


def config_from_yaml(
    text: str, overrides: Iterable[str] = (), *, source: str = "params", flag: str = "overrides"
) -> Config:
    """A params.yaml document given as text (a pipeline parameter), with overrides: the same
    rules and one-line errors as :func:`load_config`, without a file."""
    loaded = parse_yaml(text, source) if text.strip() else None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {_tname(loaded)}")
    return _validated(loaded or {}, overrides, source, flag)


def _validated(raw: dict[str, Any], overrides: Iterable[str], source: str, flag: str) -> Config:
    overrides = list(overrides)
    for item in overrides:
        _apply_override(raw, item)
    set_keys = {item.partition("=")[0].strip() for item in overrides}
    try:
        cfg = _build(Config, raw, source=source, prefix="")
    except ConfigError as e:
        # Name the flag, not the file, when the bad key or value came from --set (an unknown
        # section "trian" comes from "--set trian.lr=1").
        if e.key and any(k == e.key or k.startswith(e.key + ".") for k in set_keys):
            e.message = e.message.replace(f"{source}: ", f"{flag}: ", 1)
        raise
    check_cross(cfg)
    return cfg


def write_params(cfg: Config, path: str | Path) -> Path:
    """``cfg`` as a complete params.yaml (every key), atomically: what a process that must
    be started with the same parameters (a DDP rank, a TrainJob node) reads."""
    return atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(raw: Mapping[str, Any], source: str = "config") -> Config:
    """Validate a nested dict (e.g. one stored in a checkpoint) into a :class:`Config`."""
    cfg = _build(Config, dict(raw), source=source, prefix="")
    check_cross(cfg)
    return cfg


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise ConfigError(
            f"--set {_short(item)}: expected section.key=value", "e.g. --set train.lr=0.0001"
        )
    try:
        value = parse_yaml(text, f"--set {key}") if text.strip() else None
    except ConfigError:
        value = text  # not YAML (e.g. "a: b: c"): the text itself, checked like any value
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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, source=source, prefix=f"{key}.")
    options = _options(tp)
    errors: list[str] = []
    for opt in options:
        ok, converted = coerce(opt, value)
        if ok:
            _check_range(converted, f, source=source, key=key)
            return converted
        errors.append(_describe(opt))
    err = ConfigError(
        f"{source}: {key} = {_short(value)} is not valid",
        f"expected {' or '.join(dict.fromkeys(errors))}{_range_text(f)}",
    )
    err.key = key
    raise err


def _options(tp: Any) -> list[Any]:
    if get_origin(tp) in (Union, types.UnionType):
        return list(get_args(tp))
    return [tp]


def coerce(tp: Any, value: Any) -> tuple[bool, Any]:
    """Whether ``value`` (as YAML typed it) is a ``tp`` - bool, int, float, str, None or a
    Literal - and the value as that type: strict, only int->float widens; NaN and inf are no
    numbers. The rule for every parameter, and for typed pipeline arguments too."""
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
        number: float | None = None
        if isinstance(value, (int, float)):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it is.
            try:
                number = float(value)
            except ValueError:
                return False, value
        # NaN passes every range check (all comparisons are false) and inf breaks training:
        # neither is a value any parameter can take.
        return number is not None and math.isfinite(number), number
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in this module, not user input


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}[tp]


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
            f"{source}: {key} = {_short(value)} is out of range", f"allowed{_range_text(f)}"
        )
        err.key = key
        raise err


def check_cross(cfg: Config) -> None:
    """Rules between keys, checked by every front end before any work (``cyclegan params``,
    the stage commands, the Kubeflow components)."""
    tc = cfg.train
    if tc.crop_size > cfg.data.load_size:
        raise _cross(
            "train.crop_size",
            f"train.crop_size = {tc.crop_size} is larger than data.load_size = "
            f"{cfg.data.load_size}",
            "set train.crop_size <= data.load_size",
        )
    if tc.epochs + tc.epochs_decay == 0 and tc.max_steps is None:
        raise _cross(
            "train.epochs",
            "train.epochs + train.epochs_decay is 0: nothing to train",
            "set train.epochs >= 1",
        )
    if tc.crop_size % 4:
        raise _cross(
            "train.crop_size",
            f"train.crop_size = {tc.crop_size} is not a multiple of 4",
            "the generator downsamples twice by 2; use e.g. 32, 128 or 256",
        )
    smallest = min_crop_for_discriminator(tc.n_layers_D)
    if tc.crop_size < smallest:
        raise _cross(
            "train.crop_size",
            f"train.crop_size = {tc.crop_size} is too small for a PatchGAN with "
            f"n_layers_D = {tc.n_layers_D}",
            f"use train.crop_size >= {smallest} or fewer discriminator layers",
        )


def _cross(key: str, message: str, hint: str) -> ConfigError:
    err = ConfigError(message, hint)
    err.key = key
    return err


def min_crop_for_discriminator(n_layers: int) -> int:
    """The smallest multiple of 4 whose PatchGAN maps keep more than one element at every
    instance norm (the norm is undefined on a single value)."""
    crop = 4
    while True:
        side = crop
        for _ in range(n_layers):  # stride-2 convs, kernel 4, padding 1
            side = (side - 2) // 2 + 1
        if side - 1 >= 2:  # the stride-1 conv's normed map, then the 1-channel output
            return crop
        crop += 4


def _tname(v: Any) -> str:
    return type(v).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message must never embed a huge
    value (nor take long to build one)."""
    if isinstance(value, (list, dict, tuple, set)) and len(value) > 20:
        return f"<{_tname(value)} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_parameters(cfg: Config | None = None) -> str:
    """Every parameter as YAML with its meaning as a comment: the values of ``cfg`` (the
    built-in defaults if None). The output is itself a valid params.yaml."""
    cfg = cfg or Config()
    lines = []
    for sec in dataclasses.fields(Config):
        lines.append(f"{sec.name}:")
        lines.extend(_describe_section(getattr(cfg, sec.name), "  "))
    return "\n".join(lines)


def _yaml_scalar(v: Any) -> str:
    """How ``v`` is written in params.yaml (null, true, 0.0002, synthetic)."""
    text = yaml.safe_dump(v, default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def _describe_section(obj: Any, indent: str) -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.append(f"{indent}{f.name}:")
            out.extend(_describe_section(v, indent + "  "))
        else:
            doc = f.metadata.get("doc", "")
            out.append(f"{indent}{f.name}: {_yaml_scalar(v)}" + (f"  # {doc}" if doc else ""))
    return out
