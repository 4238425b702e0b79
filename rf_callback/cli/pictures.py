"""The ``--plot`` and ``--gif`` files: checked before the probe, and removed if a failure leaves them half-written."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rf_callback.cli.errors import UsageError


def checked_picture(option: str, path: str) -> bool:
    """Checks that ``path`` can be written in a format ``option`` knows, before anything is probed.

    Args:
        option: ``"--plot"`` or ``"--gif"``.
        path: the file the option names.

    Returns:
        Whether the file existed before (a new file left half-written by a failure is removed).

    Raises:
        UsageError: ``path`` is a folder, has an extension the option does not write, is in a folder that does not
            exist (or is a file), or cannot be written.
    """
    formats = _picture_formats(option)
    target = Path(path)
    if path and target.is_dir():
        raise UsageError(
            f"{option} {path!r} is a folder; give a file name in it, e.g. {option} {target / _example(option, '')}"
        )
    suffix = target.suffix.lower().lstrip(".")
    if suffix not in formats:
        found = f"ends in {target.suffix!r}" if target.suffix else "has no file extension"
        if option == "--gif":
            allowed, also = ".gif (the sweep is an animated GIF)", "; for a single picture use --plot"
        else:
            allowed, also = f"one of matplotlib's picture formats ({', '.join(f'.{f}' for f in formats)})", ""
        raise UsageError(
            f"{option} {path!r} must end in {allowed}, but it {found}: use e.g. {option} {_example(option, path)}{also}"
        )
    folder = target.parent
    if not folder.exists():
        raise UsageError(
            f"{option} {path!r} is in a folder that does not exist: {str(folder)!r}; create it first or choose "
            f"another path"
        )
    if not folder.is_dir():
        raise UsageError(f"{option} {path!r} is in {str(folder)!r}, which is a file, not a folder; choose another path")
    existed = target.exists()
    try:
        with open(target, "ab"):
            pass
    except OSError as error:
        raise UsageError(
            f"{option} {path!r} cannot be written ({error.strerror or error}); choose a path in a folder you can "
            f"write to"
        ) from None
    if not existed:
        target.unlink(missing_ok=True)
    return existed


@contextmanager
def writing(option: str, path: str, existed: bool) -> Iterator[None]:
    """Turns a failure to draw or write a picture into one line; removes a partial file this command created.

    Args:
        option: ``"--plot"`` or ``"--gif"``.
        path: the file being written.
        existed: whether the file was there before the command (as :func:`checked_picture` returned); only a file
            that was not is removed.

    Yields:
        Nothing: the body draws and writes the picture.

    Raises:
        UsageError: the body raised an ``Exception``; any other exception (an interrupt) is raised as it was.
    """
    try:
        yield
    except BaseException as error:
        if not existed:
            Path(path).unlink(missing_ok=True)
        if not isinstance(error, Exception):
            raise
        raise UsageError(
            f"writing {option} {path!r} failed after the results above were printed: {type(error).__name__}: "
            f"{error}; choose another path or format (e.g. {option} {_example(option, path)}) and run again"
        ) from error


def _picture_formats(option: str) -> tuple[str, ...]:
    """The file extensions ``option`` writes: matplotlib's for ``--plot`` (no pyplot state), GIF for ``--gif``."""
    if option == "--gif":
        return ("gif",)
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(sorted(FigureCanvasBase.get_supported_filetypes()))


def _example(option: str, path: str) -> str:
    stem = Path(path).stem or "rf"
    return f"{stem}.gif" if option == "--gif" else f"{stem}.png"
