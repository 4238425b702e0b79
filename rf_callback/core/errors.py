"""The probe's errors: it ran but could not measure a field, or could not copy the model it measures."""

from __future__ import annotations


class ProbeError(RuntimeError):
    """The probe ran but could not measure a field: the forward raised, or the gradient was zero or not finite."""


class CopyError(ProbeError):
    """The model cannot be deep-copied, and the probe only ever runs on a copy."""
