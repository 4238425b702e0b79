"""The Lightning integration: :class:`RFCallback` and the small parts it wires together.

- :mod:`~rf_callback.callback.rf_callback`: the hooks, which read as a table of contents of what the callback does.
- :mod:`~rf_callback.callback.arguments`: the checks of the callback's arguments.
- :mod:`~rf_callback.callback.coverage`: the effective field's coverage of the target, tracked and alerted on.
- :mod:`~rf_callback.callback.sampling`: the inputs the effective field is measured on.
- :mod:`~rf_callback.callback.dashboard`: the names of everything logged.
- :mod:`~rf_callback.callback.loggers`: one writer per kind of Lightning logger.
- :mod:`~rf_callback.callback.failures`: what a failure inside training says, and its fix.

Only :mod:`~rf_callback.callback.rf_callback` imports Lightning, and only when :class:`RFCallback` is asked for.
"""

__all__ = ["RFCallback"]


def __getattr__(name: str):
    # Lightning's import takes seconds: the coverage alerts, which the package's root exports, do not pay for it.
    if name == "RFCallback":
        from rf_callback.callback.rf_callback import RFCallback

        return RFCallback
    raise AttributeError(f"module 'rf_callback.callback' has no attribute {name!r}")
