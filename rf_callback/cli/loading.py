"""The user's model: ``MODULE:CALLABLE`` imported (a dotted module or a ``.py`` file) and called with ``--kwargs``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from rf_callback.cli.errors import UsageError


def load_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """Imports the factory that ``spec`` names and calls it.

    Args:
        spec: ``MODULE:CALLABLE``: a dotted module name (importable from the current directory) or a path to a
            ``.py`` file, then the dotted name of a callable in it.
        kwargs: the keyword arguments of the callable (``--kwargs``).

    Returns:
        The model the callable returned.

    Raises:
        UsageError: ``spec`` is malformed, the module cannot be imported or lacks the callable, or the callable
            raises, exits or returns something other than a ``torch.nn.Module``.
    """
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise UsageError(f"{spec!r} is not MODULE:CALLABLE (e.g. my_package.models:resnet or net.py:build)")
    module = _import(module_name)
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"cannot import {attribute!r} from module {module_name!r}: it has no attribute {part!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"{spec!r} is a {type(factory).__name__}, not a callable that builds a model")
    try:
        model = factory(**kwargs)
    except Exception as error:
        raise UsageError(
            f"calling {spec}(**{kwargs!r}) raised {type(error).__name__}: {error}; fix the factory or its --kwargs"
        ) from error
    except SystemExit as exit_:
        raise UsageError(
            f"calling {spec}(**{kwargs!r}) raised SystemExit({exit_.code!r}): the factory called sys.exit() (as "
            f"argparse does on a command line it cannot parse) instead of returning a model; make it take its "
            f"settings as arguments and pass them with --kwargs"
        ) from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}(**{kwargs!r}) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import(name: str) -> ModuleType:
    """Imports a dotted module (from the current directory first) or a ``.py`` file, naming it on failure."""
    is_file = name.endswith(".py") or os.sep in name or (os.altsep is not None and os.altsep in name)
    try:
        if is_file:
            return _import_file(name)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(name)
    except UsageError:
        raise
    except ModuleNotFoundError as error:
        if error.name and (name == error.name or name.startswith(f"{error.name}.")):
            raise UsageError(f"cannot import module {name!r}: no module named {error.name!r}") from None
        raise UsageError(f"importing module {name!r} failed: {error}") from None
    except SystemExit as exit_:
        raise UsageError(
            f"importing module {name!r} raised SystemExit({exit_.code!r}): its code calls sys.exit() when imported; "
            f"put the script part under if __name__ == '__main__':"
        ) from None
    except Exception as error:
        raise UsageError(f"importing module {name!r} raised {type(error).__name__}: {error}") from error


def _import_file(path: str) -> ModuleType:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"cannot import module {path!r}: no such file")
    # The file's folder goes first on sys.path so that it can import its neighbours, as `python file.py` would.
    folder = str(file.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = file.stem if file.stem.isidentifier() and file.stem not in sys.modules else "_rf_probe_target"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import module {path!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
