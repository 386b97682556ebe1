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

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from cyclegan.errors import CycleGANError
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


def _atomic_write_bytes(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        _atomic_write_bytes(
            model_dir / GENERATOR_FILES[direction], lambda p, sd=sd: save_file(sd, p)
        )
    meta = {"format": FORMAT_VERSION, "generator": asdict(spec), **(extra or {})}
    text = json.dumps(meta, indent=2, sort_keys=True)
    _atomic_write_bytes(model_dir / "model.json", lambda p: Path(p).write_text(text))
    return model_dir


def read_model_json(model_dir: str | Path) -> dict[str, Any]:
    """``model.json`` of a model folder, with a clear error when it is not one."""
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise CycleGANError(
            f"{model_dir} is not a model folder (no model.json)",
            "run `cyclegan train` first, or pass the folder it wrote (models/cyclegan)",
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise CycleGANError(f"{path}: unsupported model format {meta.get('format')!r}")
    return meta


def load_generator(
    model_dir: str | Path, direction: Direction = "A2B", device: str | torch.device = "cpu"
) -> ResnetGenerator:
    """Rebuild one generator from a model folder, in eval mode, on ``device``."""
    meta = read_model_json(model_dir)
    if direction not in GENERATOR_FILES:
        raise CycleGANError(f"direction must be A2B or B2A, got {direction!r}")
    net = GeneratorSpec(**meta["generator"]).build()
    weights = Path(model_dir) / GENERATOR_FILES[direction]
    if not weights.is_file():
        raise CycleGANError(f"{weights} is missing", "the model folder is incomplete; re-run train")
    net.load_state_dict(load_file(str(weights)))
    return net.to(device).eval()
