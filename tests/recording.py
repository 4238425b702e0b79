"""A context that records every warning of its block, none filtered out as a repeat (so 'once' is the code's doing)."""

from __future__ import annotations

import warnings


class recorded_warnings:  # noqa: N801 - used like warnings.catch_warnings
    """Records every warning raised in the block; ``as record`` gives the list."""

    def __enter__(self):
        self._context = warnings.catch_warnings(record=True)
        record = self._context.__enter__()
        warnings.simplefilter("always")
        return record

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)
