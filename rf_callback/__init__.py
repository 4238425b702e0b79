"""rf_callback: exact receptive fields of convolutional networks, as a library and a Lightning callback."""

from rf_callback.callback.coverage import CoverageError, CoverageEvent
from rf_callback.core import (
    AxisGeometry,
    EffectiveField,
    LayerField,
    NoGradientError,
    ProbeError,
    ReceptiveField,
    ReceptiveFieldMap,
    RFVerification,
    Tokens,
    effective_rf,
    probe_rf,
    rf_table,
    verify_rf,
)

__all__ = [
    "AxisGeometry",
    "CoverageError",
    "CoverageEvent",
    "EffectiveField",
    "LayerField",
    "NoGradientError",
    "ProbeError",
    "RFCallback",
    "RFVerification",
    "ReceptiveField",
    "ReceptiveFieldMap",
    "Tokens",
    "effective_rf",
    "probe_rf",
    "rf_table",
    "verify_rf",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The callback needs Lightning, whose import takes seconds: the probe and the command line do not pay for it.
    if name == "RFCallback":
        from rf_callback.callback.rf_callback import RFCallback

        return RFCallback
    raise AttributeError(f"module 'rf_callback' has no attribute {name!r}")
