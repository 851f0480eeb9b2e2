"""The learning-rate rule of the reference CycleGAN (`lr_policy=linear`): constant, then a linear decay
towards 0. The train state applies it through torch's LambdaLR, one step per epoch."""

from __future__ import annotations


def lr_factor(epoch: int, epochs: int, epochs_decay: int) -> float:
    """The reference's linear rule, for 0-based `epoch`: 1.0 for the first `epochs` epochs, then
    falling linearly by 1/(epochs_decay + 1) per epoch over `epochs_decay` epochs."""
    return 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)
