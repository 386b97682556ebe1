"""CycleGAN experiment pipeline: data, models, training, evaluation, registry."""

__version__ = "0.1.0"
