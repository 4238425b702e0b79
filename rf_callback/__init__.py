"""rf_callback: exact receptive fields of convolutional networks, as a library and a Lightning callback."""

from rf_callback.alerts import CoverageError, CoverageEvent
from rf_callback.effective_probe import effective_rf
from rf_callback.geometry import AxisGeometry
from rf_callback.graph import ProbeError
from rf_callback.layouts import Tokens
from rf_callback.probe import probe_rf
from rf_callback.result import EffectiveField, ReceptiveField, ReceptiveFieldMap
from rf_callback.table import LayerField, rf_table
from rf_callback.verify import RFVerification, verify_rf

__all__ = [
    "AxisGeometry",
    "CoverageError",
    "CoverageEvent",
    "EffectiveField",
    "LayerField",
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
        from rf_callback.callback import RFCallback

        return RFCallback
    raise AttributeError(f"module 'rf_callback' has no attribute {name!r}")
