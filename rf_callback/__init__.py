"""rf_callback: exact receptive fields of convolutional networks, as a library and a Lightning callback."""

from rf_callback.alerts import CoverageError, CoverageEvent
from rf_callback.callback import RFCallback
from rf_callback.probe import ProbeError, RFVerification, effective_rf, probe_rf, verify_rf
from rf_callback.result import AxisGeometry, EffectiveField, ReceptiveField, ReceptiveFieldMap

__all__ = [
    "AxisGeometry",
    "CoverageError",
    "CoverageEvent",
    "EffectiveField",
    "ProbeError",
    "RFCallback",
    "RFVerification",
    "ReceptiveField",
    "ReceptiveFieldMap",
    "effective_rf",
    "probe_rf",
    "verify_rf",
]
__version__ = "0.1.0"
