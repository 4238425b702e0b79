"""rf_callback: exact receptive fields of convolutional networks, as a library and a Lightning callback."""

from rf_callback.callback import RFCallback
from rf_callback.probe import ProbeError, RFVerification, probe_rf, verify_rf
from rf_callback.result import AxisGeometry, ReceptiveField, ReceptiveFieldMap

__all__ = [
    "AxisGeometry",
    "ProbeError",
    "RFCallback",
    "RFVerification",
    "ReceptiveField",
    "ReceptiveFieldMap",
    "probe_rf",
    "verify_rf",
]
__version__ = "0.1.0"
