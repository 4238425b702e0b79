"""What the callback says when something fails inside it: each kind of failure once, with its reason and its fix."""

from __future__ import annotations

import contextlib
import re
import traceback
import warnings
from collections.abc import Callable, Iterator

import torch
from lightning.pytorch.utilities import rank_zero_warn

from rf_callback.callback.coverage import CoverageError
from rf_callback.core.model_copy import CopyError


class NoInputsError(RuntimeError):
    """No validation batch offered an input tensor to measure the effective field on."""


COPY_FIX = (
    "The callback probes a deep copy, so that the model being trained is never changed: pass "
    "RFCallback(module='...') naming the submodule that holds the layers (the backbone), one without the attribute "
    "that cannot be copied (a lock, an open file, a process handle), or give that attribute a __deepcopy__; a model "
    "on the meta device must be put on a real device first"
)
IMAGES_FIX = "pass log_images=False to skip the images (the scalars do not need them)"


def copy_fix(error: BaseException) -> str | None:
    """The fix for a model that cannot be copied, or None if ``error`` is another failure.

    It is empty where the message names ``module=`` already.
    """
    if not is_copy_failure(error):
        return None
    return "" if "module=" in str(error) else COPY_FIX


def memory_fix(error: BaseException, *, effective: bool = False) -> str | None:
    """The fix for a GPU that ran out of memory inside the callback, or None if ``error`` is another failure."""
    if not isinstance(error, torch.cuda.OutOfMemoryError):
        return None
    fewer = ", or fewer erf_samples (the effective field's inputs)" if effective else ""
    return (
        "The probe runs on a copy of the model beside training: pass RFCallback(probe_device='cpu') to run it on the "
        f"CPU, module= naming a smaller submodule to copy{fewer}"
    )


def inputs_fix(error: Exception) -> str:
    """How to give the callback inputs for the effective field."""
    return (
        "The effective field is measured on the first tensor of the validation batches (a tensor, or the first value "
        "of a tuple, list or dict, shaped (N, C, *spatial)): put the input first in the batch, or pass "
        "RFCallback(effective=False)"
    )


def logger_fix(name: str) -> str:
    """What to do about a logger that refused the callback's scalars or images."""
    return (
        f"The callback's scalars and images are not written to {name} (the scalars stay in trainer.callback_metrics "
        f"and the callback's history); fix that logger, or pass log_images=False if it is the images it refuses"
    )


class Failures:
    """Says each kind of failure once, with its reason and its fix (or raises it under ``strict``).

    A kind is where it happened (``"probe"``, ``"effective"``, one logger, ...) and the type of the error, so a
    probe that fails at every epoch for the same reason warns once; a model that cannot be copied is one kind
    wherever the copy is made.

    Args:
        strict: raise every failure (with its fix as a note) instead of warning.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.said: set[tuple[str, str]] = set()

    @contextlib.contextmanager
    def guard(
        self, kind: str, what: str, fix: str | Callable[[Exception], str] = "", *, goes_on: str = "training goes on"
    ) -> Iterator[None]:
        """Runs the block; what it raises is reported as a failure of ``kind`` (see :meth:`report`).

        Args:
            kind: where the block runs, e.g. ``"probe"`` or ``"images"``.
            what: the block in words, for the warning (``"drawing the figures at fit end"``).
            fix: the fix to say, or a function of the error that returns it.
            goes_on: what happens after the warning.

        Raises:
            CoverageError: always passed on (``on_miss="raise"`` is the user's choice).
        """
        try:
            yield
        except CoverageError:
            raise
        except Exception as error:  # noqa: BLE001 - the training run is the user's: warn unless strict
            self.report(kind, what, error, fix(error) if callable(fix) else fix, goes_on=goes_on)

    def report(self, kind: str, what: str, error: Exception, fix: str, *, goes_on: str = "training goes on") -> None:
        """Warns about ``error`` unless its kind was warned already; under ``strict`` raises it instead.

        Args:
            kind: where it happened, e.g. ``"probe"``.
            what: what failed, in words.
            error: the error.
            fix: what the user can do about it ("" when the message says it already).
            goes_on: what happens after the warning.

        Raises:
            Exception: ``error`` itself, under ``strict``.
        """
        if self.strict:
            if fix and hasattr(error, "add_note"):  # Python >= 3.11: the fix shows under the traceback
                error.add_note(f"RFCallback: {fix}")
            raise error
        if isinstance(error, torch.cuda.OutOfMemoryError):
            # The frames of the traceback hold the probe's tensors: clear them, then give their memory back.
            traceback.clear_frames(error.__traceback__)
            torch.cuda.empty_cache()
        key = ("copy", "") if is_copy_failure(error) else (kind, type(error).__name__)
        if key in self.said:
            return
        self.said.add(key)
        text = f"RFCallback: {what} failed{_on_this_rank()}, {goes_on} ({type(error).__name__.lstrip('_')}: {error})"
        if fix:
            text += f". {fix}"
        _warn(text)

    def elsewhere(self, what: str) -> None:
        """Warns, once per ``what``, that another rank failed ``what``, so every rank skipped it.

        Args:
            what: what failed on another rank, in words (``"the probe"``).
        """
        if self.strict or ("elsewhere", what) in self.said:
            return
        self.said.add(("elsewhere", what))
        _warn(
            f"RFCallback: {what} failed on another rank, so every rank skips it{_on_this_rank(' (this is rank {})')} "
            f"and the ranks stay in step; that rank's warning says why"
        )


def _rank() -> int | None:
    """This process's rank where more than one process runs, else None."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed and torch.distributed.get_world_size() > 1 else None


def _on_this_rank(template: str = " on rank {}") -> str:
    rank = _rank()
    return "" if rank is None else template.format(rank)


def _warn(text: str) -> None:
    """Warns on this rank: a failure can happen on one rank only (every rank probes), and its rank must say so."""
    if _rank() is None:
        rank_zero_warn(text)
    else:
        warnings.warn(text, UserWarning, stacklevel=3)


_ARGUMENT_ERROR = re.compile(r"^(pos|layer|module|element|layout)=|pass (layer|element|layout)=")


def is_argument_error(error: Exception, *, shape_given: bool) -> bool:
    """Whether the probe refused an argument of the callback that does not fit the model (``pos``, ``layer``, ...).

    The probe raises ``ValueError`` naming the argument; an input shape found in a batch is not an argument, so a
    model that refuses it is a failure to warn about, not a reason to end the run.
    """
    if not isinstance(error, ValueError):
        return False
    text = str(error)
    return bool(_ARGUMENT_ERROR.search(text)) or (shape_given and text.startswith("input_shape="))


_COPY_WORDS = ("pickle", "deepcopy", "deep-cop", "deep cop", "be copied", "cannot copy")


def is_copy_failure(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) comes from deep-copying the model."""
    if isinstance(error, CopyError):
        return True
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if any(word in str(error).lower() for word in _COPY_WORDS):
            return True
        frame = error.__traceback__
        while frame is not None:
            code = frame.tb_frame.f_code
            if code.co_name == "deepcopy" and code.co_filename.endswith("copy.py"):
                return True
            frame = frame.tb_next
        error = error.__cause__ or error.__context__
    return False
