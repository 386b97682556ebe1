"""The reference's image history pool (Shrivastava et al. 2017), reproducible and resumable.

Discriminators see a mix of the newest fakes and older ones, which damps oscillation. Until the
pool holds ``size`` images every fake is stored and returned unchanged; after that each fake,
with probability 1/2, is swapped with a random stored one (the stored one is returned, the new
one takes its place), and otherwise is returned as is.

The random draws come from the pool's own CPU ``torch.Generator`` (not Python's global
``random`` as in the reference), so the pool is reproducible from a seed, independent of
anything else that draws random numbers, and its whole state (images and generator) goes into
checkpoints. Drawing on the CPU never waits for the GPU.
"""

from __future__ import annotations

from typing import Any

import torch


class ImagePool:
    """A history of up to ``size`` generated images (``size=0`` disables it)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Return a batch of the same shape: each image either itself or a stored older one."""
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0).clone()  # own the memory (CUDA-graph outputs get reused)
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif torch.rand(1, generator=self.generator).item() > 0.5:
                i = int(torch.randint(0, self.size, (1,), generator=self.generator).item())
                out.append(self.images[i])
                self.images[i] = image
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict[str, Any]:
        """Images (on the CPU) and the generator state: only tensors, for weights_only loads."""
        images = torch.cat(self.images, 0).cpu() if self.images else torch.empty(0)
        return {"size": self.size, "images": images, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        """Restore what :meth:`state_dict` returned, placing the images on ``device``."""
        if int(state["size"]) != self.size:
            raise ValueError(f"pool size {state['size']} in the state, {self.size} here")
        images = state["images"]
        self.images = [im.unsqueeze(0).to(device) for im in images] if images.numel() else []
        self.generator.set_state(state["rng"])
