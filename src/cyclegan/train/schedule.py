"""The reference's learning-rate schedule: constant, then linear decay, stepped per epoch."""

from __future__ import annotations


def lr_multiplier(epoch: int, epochs: int, epochs_decay: int) -> float:
    """Factor on the base learning rate during 0-based ``epoch``.

    The reference's ``1 - max(0, epoch + epoch_count - n_epochs) / (n_epochs_decay + 1)`` with
    ``epoch_count = 1``: ``epochs`` epochs at 1, then ``epochs_decay`` epochs decreasing
    linearly, the last one at ``1 / (epochs_decay + 1)`` (never exactly zero).
    """
    return 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)
