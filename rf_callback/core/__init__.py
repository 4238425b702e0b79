"""The probe itself, which needs only torch: model → copy → graph → passes → result.

Modules, from the bottom up:

- :mod:`~rf_callback.core.layouts`, :mod:`~rf_callback.core.arguments`: the axes of a tensor and the checks at the door.
- :mod:`~rf_callback.core.model_copy`: the copy that is probed (theoretical constants or the weights, biases zeroed).
- :mod:`~rf_callback.core.graph`: the graph of the copy and its batched backward passes.
- :mod:`~rf_callback.core.support`: the non-zero extent of an input gradient.
- :mod:`~rf_callback.core.geometry`: the (r, S, P) algebra, which knows nothing of graphs.
- :mod:`~rf_callback.core.lattice`, :mod:`~rf_callback.core.geometry_probe`: the geometry read off the graph.
- :mod:`~rf_callback.core.probe`, :mod:`~rf_callback.core.table`, :mod:`~rf_callback.core.verify`: the public probes.
- :mod:`~rf_callback.core.effective`, :mod:`~rf_callback.core.effective_probe`: the effective field on real inputs.
- :mod:`~rf_callback.core.result`: the value objects every probe returns.
"""

from rf_callback.core.effective_probe import effective_rf
from rf_callback.core.errors import NoGradientError
from rf_callback.core.geometry import AxisGeometry
from rf_callback.core.graph import ProbeError
from rf_callback.core.layouts import Tokens
from rf_callback.core.probe import probe_rf
from rf_callback.core.result import EffectiveField, ReceptiveField, ReceptiveFieldMap
from rf_callback.core.table import LayerField, rf_table
from rf_callback.core.verify import RFVerification, verify_rf

__all__ = [
    "AxisGeometry",
    "EffectiveField",
    "LayerField",
    "NoGradientError",
    "ProbeError",
    "RFVerification",
    "ReceptiveField",
    "ReceptiveFieldMap",
    "Tokens",
    "effective_rf",
    "probe_rf",
    "rf_table",
    "verify_rf",
]
