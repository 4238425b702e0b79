"""RFCallback for a ``pytorch_lightning`` Trainer, which accepts only callbacks derived from its own base."""

from __future__ import annotations

import pytorch_lightning

from rf_callback.callback import RFCallback as _RFCallback

__all__ = ["RFCallback"]


class RFCallback(_RFCallback, pytorch_lightning.Callback):
    """The twin of :class:`rf_callback.RFCallback` for ``pytorch_lightning.Trainer``: same arguments, same logs.

    It lives in a module of its own because importing ``pytorch_lightning`` reroutes the rank-zero logger that both
    Lightning packages share; users of ``lightning`` do not pay for that.
    """
