"""The final model folder: two generators as safetensors plus ``model.json``.

No pickle anywhere: weights are safetensors, the architecture is plain JSON, so loading a
model executes no code from the file.

Layout::

    models/cyclegan/
      G_A.safetensors   # A -> B
      G_B.safetensors   # B -> A
      model.json        # {"format": 1, "generator": {"ngf": 64, "n_blocks": 9, ...}, ...}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from cyclegan.errors import ModelError
from cyclegan.fsio import atomic_write
from cyclegan.models.networks import ResnetGenerator

FORMAT_VERSION = 1
Direction = Literal["A2B", "B2A"]
GENERATOR_FILES: dict[str, str] = {"A2B": "G_A.safetensors", "B2A": "G_B.safetensors"}


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything needed to rebuild a :class:`ResnetGenerator`."""

    input_nc: int = 3
    output_nc: int = 3
    ngf: int = 64
    n_blocks: int = 9

    @classmethod
    def from_train_config(cls, train_cfg: Any) -> GeneratorSpec:
        """From a :class:`cyclegan.config.TrainConfig` (``netG`` names the block count)."""
        return cls(ngf=train_cfg.ngf, n_blocks=9 if train_cfg.netG == "resnet_9blocks" else 6)

    def build(self) -> ResnetGenerator:
        return ResnetGenerator(self.input_nc, self.output_nc, self.ngf, self.n_blocks)

    @classmethod
    def from_json(cls, data: Any, where: str) -> GeneratorSpec:
        """Validate ``model.json``'s ``generator`` entry before anything is allocated."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict):
            raise ModelError(f"{where}: 'generator' must be a mapping of {', '.join(names)}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ModelError(
                f"{where}: unknown generator setting {unknown[0]!r}", f"allowed: {', '.join(names)}"
            )
        values = {}
        for name in names:
            value = data.get(name, getattr(cls, name))
            lo, hi = _SPEC_RANGES[name]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ModelError(
                    f"{where}: generator {name} = {str(value)[:40]!r} is not an integer in "
                    f"[{lo}, {hi}]",
                    "this is not a model folder written by `cyclegan train`",
                )
            values[name] = value
        return cls(**values)


# What model.json may say: the widest generator train.ngf allows, the two netG depths and more.
_SPEC_RANGES = {"input_nc": (1, 4), "output_nc": (1, 4), "ngf": (1, 256), "n_blocks": (1, 64)}


def _state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Unwrap DDP / torch.compile wrappers so keys are always the plain module's.
    net = getattr(net, "module", net)
    net = getattr(net, "_orig_mod", net)
    return {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()
    }


def save_generators(
    model_dir: str | Path,
    G_A: torch.nn.Module,
    G_B: torch.nn.Module,
    spec: GeneratorSpec,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write both generators and ``model.json`` atomically into ``model_dir``."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    for direction, net in (("A2B", G_A), ("B2A", G_B)):
        sd = _state_dict(net)
        atomic_write(
            model_dir / GENERATOR_FILES[direction], lambda p, sd=sd: save_file(sd, p), by_name=True
        )
    meta = {"format": FORMAT_VERSION, "generator": asdict(spec), **(extra or {})}
    atomic_write(model_dir / "model.json", json.dumps(meta, indent=2, sort_keys=True))
    return model_dir


def read_model_json(model_dir: str | Path) -> dict[str, Any]:
    """``model.json`` of a model folder, validated, with a clear error when it is not one."""
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise ModelError(
            f"{model_dir} is not a model folder (no model.json)",
            "run `cyclegan train` first, or pass the folder it wrote (models/cyclegan)",
        )
    try:
        meta = json.loads(path.read_bytes()[: 1 << 20])
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(
            f"{path} is not valid JSON ({str(e)[:80]})", "re-run `cyclegan train`"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelError(f"{path}: unsupported model format {str(found)[:40]!r}")
    GeneratorSpec.from_json(meta.get("generator"), str(path))
    return meta


def load_generator(
    model_dir: str | Path, direction: Direction = "A2B", device: str | torch.device = "cpu"
) -> ResnetGenerator:
    """Rebuild one generator from a model folder, in eval mode, on ``device``."""
    meta = read_model_json(model_dir)
    if direction not in GENERATOR_FILES:
        raise ModelError(f"direction must be A2B or B2A, got {direction!r}")
    spec = GeneratorSpec.from_json(meta["generator"], str(Path(model_dir) / "model.json"))
    weights = Path(model_dir) / GENERATOR_FILES[direction]
    if not weights.is_file():
        raise ModelError(f"{weights} is missing", "the model folder is incomplete; re-run train")
    net = spec.build()
    load_weights(net, weights)
    return net.to(device).eval()


def load_weights(net: torch.nn.Module, weights: str | Path) -> None:
    """Load a safetensors file into ``net``; a damaged or mismatching file is a ModelError."""
    try:
        sd = load_file(str(weights))
    except Exception as e:  # safetensors raises its own types for a damaged header
        raise ModelError(
            f"{weights} is not a readable safetensors file ({str(e).splitlines()[0][:120]})",
            "re-run `cyclegan train`, or pass another model",
        ) from None
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise ModelError(
            f"{weights} does not fit the generator model.json describes "
            f"({str(e).splitlines()[0][:160]})",
            "the folder mixes files of different models; re-run `cyclegan train`",
        ) from None
