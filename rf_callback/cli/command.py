"""The ``rf-probe`` command: the receptive field of any model built by an importable factory, from the shell."""

from __future__ import annotations

from collections.abc import Sequence

from rf_callback.cli.arguments import build_parser, check_arguments
from rf_callback.cli.errors import PROG, TRACEBACK_VARIABLE, Stage, UsageError, fail, show_traceback, silence_stdout
from rf_callback.cli.loading import load_model
from rf_callback.cli.running import run

__all__ = ["PROG", "TRACEBACK_VARIABLE", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``rf-probe`` command.

    Every failure ends the same way: one line on stderr that names the option (or the factory) at fault and how to
    fix it, and ``SystemExit(2)``, whatever raised, including the model's own code and the writing of a picture
    after the results were printed; never a traceback (unless ``RF_PROBE_TRACEBACK=1`` asks for the traceback of
    an unexpected failure). An interrupt (Ctrl-C) ends with one line and ``SystemExit(130)``.

    Args:
        argv: the command-line arguments without the program name; ``None`` for ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success (failures raise ``SystemExit`` instead, as described above).
    """
    stage = Stage()
    try:
        args = build_parser().parse_args(argv)
        stage.now = "checking the arguments"
        checked = check_arguments(args)
        stage.now = f"building the model ({args.target})"
        model = load_model(args.target, checked.kwargs)
        return run(args, checked, model, stage)
    except UsageError as error:
        show_traceback(error.__cause__)
        fail(str(error))
    except KeyboardInterrupt:
        fail(f"interrupted (Ctrl-C) while {stage.now}; nothing more was done", status=130)
    except BrokenPipeError:  # the reader left (| head): what it did not read is not wanted, and that is no failure
        silence_stdout()
        raise SystemExit(0) from None
    except Exception as error:
        show_traceback(error)
        fail(
            f"unexpected {type(error).__name__} while {stage.now}: {error}; this is a bug in {PROG}: rerun with "
            f"{TRACEBACK_VARIABLE}=1 for the traceback and report it"
        )


if __name__ == "__main__":
    raise SystemExit(main())
