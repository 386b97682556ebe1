"""The reference CycleGAN networks and the on-disk model format."""

from cyclegan.models.io import GeneratorSpec, load_generator, save_generators
from cyclegan.models.networks import (
    PatchDiscriminator,
    ResnetBlock,
    ResnetGenerator,
    count_parameters,
    init_weights,
)

__all__ = [
    "GeneratorSpec",
    "PatchDiscriminator",
    "ResnetBlock",
    "ResnetGenerator",
    "count_parameters",
    "init_weights",
    "load_generator",
    "save_generators",
]
