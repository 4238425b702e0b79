"""The probe's errors: it ran but could not measure a field, or could not copy the model it measures."""

from __future__ import annotations


class ProbeError(RuntimeError):
    """The probe ran but could not measure a field: the forward raised, or the gradient was zero or not finite."""


class CopyError(ProbeError):
    """The model cannot be deep-copied, and the probe only ever runs on a copy."""


class NoGradientError(ValueError):
    """The output at some probed positions does not depend on the inputs: their gradient maps are zero everywhere.

    Attributes:
        positions: the positions whose maps are zero, in the order they were asked for.
    """

    def __init__(self, message: str, positions: list[tuple[int, ...]]):
        super().__init__(message)
        self.positions = positions
