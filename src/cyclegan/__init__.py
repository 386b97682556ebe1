"""CycleGAN experiment pipeline: data, models, training, evaluation, registry."""

from importlib.metadata import PackageNotFoundError, version

try:
    # The one place the version is written is pyproject.toml; this reads what was installed.
    __version__ = version("cyclegan-pipeline")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
