"""rf-probe never shows a traceback: every bad input and every fault ends with one line naming the option, exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import pytest

import rf_callback.cli.arguments as arguments
import rf_callback.cli.running as running
import rf_callback.plotting as plotting
from rf_callback import ProbeError, probe_rf
from rf_callback.cli import TRACEBACK_VARIABLE, main
from tests.cli_models import head_defined_first

ROOT = Path(__file__).resolve().parents[1]
NET = ["tests.cli_models:small_net", "--input-shape", "3,16,16"]
PREFIX = "rf-probe: error: "


def failure(capsys, *argv: str, status: int = 2) -> tuple[str, str]:
    """Runs the command in process; checks the exit status and the single message line; returns (stderr, stdout)."""
    try:
        main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    except KeyboardInterrupt:  # escaping main, it would end the test session
        pytest.fail("KeyboardInterrupt escaped main()")
    else:
        pytest.fail("main() returned instead of failing")
    captured = capsys.readouterr()
    assert code == status, captured.err
    assert captured.err.startswith(PREFIX) and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err, captured.out


def run(*args: str, **popen) -> subprocess.CompletedProcess:
    """The command as a user runs it: a fresh process from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(TRACEBACK_VARIABLE, None)
    command = [sys.executable, "-m", "rf_callback.cli", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, **popen)


# --- every option value is checked at the door -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--pos", "1.5,2"], "--pos '1.5,2' is not"),
        (["--pos", "1,,2"], "--pos '1,,2' is not"),
        (["--pos", "-1,-1"], "--pos=-1,-1"),
        (["--target-size", "0"], "--target-size '0' is not a positive int"),
        (["--target-size", "1.5"], "--target-size '1.5' is not"),
        (["--target-size", "-3"], "--target-size '-3' is not"),
        (["--kwargs", "[1]"], "--kwargs '[1]' must be a JSON object"),
        (["--kwargs", '"channels"'], "--kwargs '\"channels\"' must be a JSON object"),
        (["--kwargs", "{bad"], "--kwargs '{bad' is not JSON"),
        (["--mode", "foo"], "argument --mode: invalid choice: 'foo'"),
        (["--input-shape", "3,16,16,16,16"], "--input-shape '3,16,16,16,16' is not C,L or C,H,W"),
        (["--input-shape", ""], "--input-shape '' is not"),
        (["--layer", ""], "--layer '' is not a dotted submodule name"),
        (["--layer", "a..b"], "--layer 'a..b' is not a dotted submodule name"),
        (["--layer", "0", "--layer", "2"], "--layer is given 2 times"),
        (["--table", "--plot", "t.png"], "--plot applies to one probe"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_bad_option_value_is_refused_naming_the_option(capsys, extra, named):
    err, out = failure(capsys, *NET, *extra)
    assert named in err and out == ""


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--pos", "1,2,3"], "--pos 1,2,3 must have 2 int index(es)"),
        (["--pos", "9,0"], "--pos 9,0 is outside the output map"),
        (["--layer", "9"], "--layer 9 is not a submodule of the model"),
        (["--table", "--layer", "nope"], "--layer nope is not a submodule of the model"),
    ],
)
def test_probe_refusal_is_said_in_the_options_words(capsys, extra, named):
    err, _ = failure(capsys, *NET, *extra)
    assert named in err and "pos=" not in err and "layer=" not in err


def test_output_without_spatial_axes_points_to_the_layer_option(capsys):
    err, _ = failure(capsys, "tests.cli_models:resnet", "--input-shape", "3,16,16")
    assert "no spatial axes" in err and "pass --layer NAME" in err and "layer=" not in err


# --- --input-shape is C,... without the batch axis ---------------------------------------------------------------


def test_input_shape_without_channels_says_how_it_was_read(capsys):
    err, _ = failure(capsys, "tests.cli_models:small_net", "--input-shape", "16,16")
    assert err.startswith(f"{PREFIX}--input-shape 16,16 is read as C=16, L=16 (channels first, no batch axis)")
    assert "(Conv2d)" in err and "pass C,H,W, e.g. 3,16,16" in err and "C (the channels) seems to be missing" in err
    assert "N, C" not in err  # the command has no batch axis to talk about


def test_input_shape_of_the_channels_and_one_axis_for_a_2d_model_suggests_both_axes(capsys):
    # 3,40 is C=3 (the first convolution's channels) and one spatial axis: the example was 3,3,40 (H=3), too small
    err, _ = failure(capsys, "tests.cli_models:small_net", "--input-shape", "3,40")
    assert "--input-shape 3,40 is read as C=3, L=40" in err
    assert "pass C,H,W, e.g. 3,40,40; a spatial axis seems to be missing" in err


def test_input_shape_with_a_batch_axis_says_to_leave_it_out(capsys):
    err, _ = failure(capsys, "tests.cli_models:small_net", "--input-shape", "1,3,16,16")
    assert "--input-shape 1,3,16,16 is read as C=1, D=3, H=16, W=16" in err
    assert "pass C,H,W, e.g. 3,16,16; leave out the batch axis" in err


def test_input_shape_of_2d_for_a_1d_model(capsys):
    err, _ = failure(capsys, "tests.cli_models:small_net_1d", "--input-shape", "2,16,16")
    assert "--input-shape 2,16,16 is read as C=2, H=16, W=16" in err and "(Conv1d)" in err
    assert "pass C,L, e.g. 2,16" in err and "batch" not in err.split("e.g.")[1]


# --- pictures are checked before anything is probed -------------------------------------------------------------


def test_plot_format_must_be_one_matplotlib_writes(capsys):
    err, out = failure(capsys, *NET, "--plot", "rf.txt")
    assert "--plot 'rf.txt' must end in one of matplotlib's picture formats" in err and out == ""
    supported = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    assert all(f".{suffix}" in err for suffix in supported) and "use e.g. --plot rf.png" in err


def test_plot_without_extension_is_refused(capsys):
    err, _ = failure(capsys, *NET, "--plot", "rf")
    assert "--plot 'rf' must end in one of" in err and "has no file extension" in err


def test_gif_must_end_in_gif(capsys):
    err, out = failure(capsys, *NET, "--gif", "sweep.png")
    assert "--gif 'sweep.png' must end in .gif" in err and "use e.g. --gif sweep.gif" in err and out == ""


def test_plot_to_a_folder_is_refused(tmp_path, capsys):
    err, out = failure(capsys, *NET, "--plot", str(tmp_path))
    assert f"--plot {str(tmp_path)!r} is a folder" in err and out == ""


def test_gif_to_a_folder_named_like_a_gif_is_refused(tmp_path, capsys):
    folder = tmp_path / "sweep.gif"
    folder.mkdir()
    err, _ = failure(capsys, *NET, "--gif", str(folder))
    assert f"--gif {str(folder)!r} is a folder" in err


def test_plot_in_a_missing_folder_is_refused(tmp_path, capsys):
    err, out = failure(capsys, *NET, "--plot", str(tmp_path / "no" / "rf.png"))
    assert "--plot" in err and "is in a folder that does not exist" in err and out == ""


def test_plot_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file")
    err, _ = failure(capsys, *NET, "--plot", str(tmp_path / "notes.txt" / "rf.png"))
    assert "--plot" in err and "which is a file, not a folder" in err


def test_plot_in_a_read_only_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user can write to read-only folders (root)")
        err, out = failure(capsys, *NET, "--plot", str(folder / "rf.png"))
    finally:
        folder.chmod(0o755)
    assert "--plot" in err and "cannot be written" in err and out == ""


@pytest.mark.parametrize(("option", "name"), [("--plot", "rf.png"), ("--gif", "sweep.gif")])
def test_picture_where_no_file_can_be_created_is_refused(capsys, option, name):
    path = Path("/proc") / f"rf_probe_{name}"
    if not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    err, out = failure(capsys, *NET, option, str(path))
    assert f"{option} {str(path)!r} cannot be written" in err and out == "" and not path.exists()


def test_plot_in_any_matplotlib_format_is_written(tmp_path, capsys):
    pdf = tmp_path / "rf.pdf"
    assert main([*NET, "--plot", str(pdf)]) == 0
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_check_leaves_no_file_behind(tmp_path, capsys):
    png = tmp_path / "rf.png"
    failure(capsys, *NET, "--plot", str(png), "--pos", "1,x")  # refused after the picture check would pass
    assert not png.exists()


# --- failures after the results were printed -------------------------------------------------------------------


def test_plot_write_failure_after_printing_is_one_line(tmp_path, capsys, monkeypatch):
    png = tmp_path / "rf.png"

    def disk_full(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full)
    err, out = failure(capsys, *NET, "--plot", str(png))
    assert out.splitlines()[5] == "size      9 x 9"  # the results came first
    assert f"writing --plot {str(png)!r} failed after the results above were printed" in err
    assert "No space left on device" in err and "choose another path or format" in err
    assert not png.exists()  # the half-written file is removed


def test_plot_write_failure_keeps_a_file_that_was_there(tmp_path, capsys, monkeypatch):
    png = tmp_path / "rf.png"
    png.write_bytes(b"old")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda *a, **k: 1 / 0)
    err, _ = failure(capsys, *NET, "--plot", str(png))
    assert "writing --plot" in err and "ZeroDivisionError" in err and png.exists()


def test_gif_failure_after_printing_is_one_line(tmp_path, capsys, monkeypatch):
    gif = tmp_path / "sweep.gif"

    def broken(model, shape, path, **kwargs):
        Path(path).write_bytes(b"GIF89a")
        raise RuntimeError("PillowWriter failed")

    monkeypatch.setattr(plotting, "animate_rf", broken)
    err, out = failure(capsys, *NET, "--gif", str(gif))
    assert "size" in out and f"writing --gif {str(gif)!r} failed" in err and "RuntimeError: PillowWriter" in err
    assert not gif.exists()


# --- the model's own code failing ------------------------------------------------------------------------------


def test_model_that_cannot_be_copied(capsys):
    err, out = failure(capsys, "tests.cli_models:locked_net", "--input-shape", "3,16,16")
    assert "tests.cli_models:locked_net" in err and "cannot be deep-copied" in err and "_thread.lock" in err
    assert "copy.deepcopy()" in err and out == ""


def test_factory_that_raises(capsys):
    err, _ = failure(capsys, "tests.cli_models:broken_factory", "--input-shape", "3,16,16")
    assert "calling tests.cli_models:broken_factory(**{}) raised RuntimeError" in err and "--kwargs" in err


def test_factory_that_exits_is_not_silent(capsys):
    err, _ = failure(capsys, "tests.cli_models:exiting_factory", "--input-shape", "3,16,16")
    assert "raised SystemExit(3)" in err and "called sys.exit()" in err and "--kwargs" in err


def test_factory_running_argparse_ends_with_our_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["tests.cli_models:argparse_factory", "--input-shape", "3,16,16"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[0].startswith("usage: train.py")  # argparse's own words, printed by the factory
    assert err.splitlines()[-1].startswith(PREFIX) and "raised SystemExit(2)" in err.splitlines()[-1]


def test_module_that_exits_when_imported(tmp_path, capsys):
    script = tmp_path / "script_net.py"
    script.write_text("import sys\n\nsys.exit(5)\n")
    err, _ = failure(capsys, f"{script}:net", "--input-shape", "3,16,16")
    assert "raised SystemExit(5)" in err and "if __name__ == '__main__':" in err


def test_forward_that_raises(capsys):
    err, _ = failure(capsys, "tests.cli_models:failing_forward", "--input-shape", "3,16,16")
    assert err.startswith(f"{PREFIX}probing tests.cli_models:failing_forward with --input-shape 3,16,16")
    assert "the forward failed on purpose" in err and "(--input-shape, with a batch of 1)" in err


def test_forward_that_exits(capsys):
    err, _ = failure(capsys, "tests.cli_models:exiting_forward", "--input-shape", "3,16,16")
    assert "--input-shape 3,16,16" in err and "called sys.exit(4)" in err


def test_probe_error_names_the_options(capsys):
    err, _ = failure(capsys, "tests.cli_models:nan_net", "--input-shape", "3,16,16", "--mode", "weights")
    assert "--input-shape 3,16,16 --mode weights failed" in err and "not finite" in err


def test_a_fix_the_message_suggests_is_named_as_an_option(capsys):
    """The weights-mode refusal of dead units ended with "mode='theoretical' gives the field", the library's words."""
    err, _ = failure(capsys, "tests.cli_models:dead_net", "--input-shape", "3,16,16", "--mode", "weights")
    assert "--mode theoretical gives the field" in err and "mode='" not in err


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), ProbeError("no input position influences")])
def test_any_probe_failure_is_one_line(capsys, monkeypatch, error):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(running, "probe_rf", fails)
    err, out = failure(capsys, *NET, "--layer", "2")
    assert "probing tests.cli_models:small_net with --input-shape 3,16,16 --layer 2" in err
    assert str(error) in err and out == ""


def test_unexpected_error_in_the_command_itself(capsys, monkeypatch):
    def bug(text):
        raise TypeError("a bug")

    monkeypatch.setattr(arguments, "_kwargs", bug)
    err, _ = failure(capsys, *NET)
    assert "unexpected TypeError while checking the arguments: a bug" in err
    assert f"{TRACEBACK_VARIABLE}=1" in err


def test_traceback_only_when_asked(capsys, monkeypatch):
    monkeypatch.setenv(TRACEBACK_VARIABLE, "1")
    with pytest.raises(SystemExit) as info:
        main(["tests.cli_models:broken_factory", "--input-shape", "3,16,16"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("Traceback") and "the factory failed on purpose" in err
    assert err.splitlines()[-1].startswith(PREFIX)


# --- interrupts -----------------------------------------------------------------------------------------------


def test_interrupt_in_the_factory_exits_130(capsys):
    err, _ = failure(capsys, "tests.cli_models:interrupted_factory", "--input-shape", "3,16,16", status=130)
    assert "interrupted (Ctrl-C) while building the model (tests.cli_models:interrupted_factory)" in err


def test_interrupt_while_probing_exits_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(running, "probe_rf", interrupted)
    err, _ = failure(capsys, *NET, status=130)
    assert "interrupted (Ctrl-C) while probing tests.cli_models:small_net" in err


def test_interrupt_while_writing_removes_the_partial_picture(tmp_path, capsys, monkeypatch):
    png = tmp_path / "rf.png"

    def interrupted(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    err, _ = failure(capsys, *NET, "--plot", str(png), status=130)
    assert f"while writing --plot {png}" in err and not png.exists()


# --- the command as a user runs it ----------------------------------------------------------------------------


def test_subprocess_unwritable_plot_fails_before_probing(tmp_path):
    (tmp_path / "notes.txt").write_text("a file")
    done = run("tests.cli_models:small_net", "--input-shape", "3,16,16", "--plot", str(tmp_path / "notes.txt/rf.png"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"{PREFIX}--plot ") and done.stderr.count("\n") == 1


def test_subprocess_uncopyable_model_with_plot_has_no_traceback(tmp_path):
    png = tmp_path / "rf.png"
    done = run("tests.cli_models:locked_net", "--input-shape", "3,16,16", "--plot", str(png))
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert done.stderr.startswith(PREFIX) and "cannot be deep-copied" in done.stderr and not png.exists()


def test_subprocess_factory_exit_code_is_not_passed_on():
    done = run("tests.cli_models:exiting_factory", "--input-shape", "3,16,16")
    assert done.returncode == 2 and done.stderr.startswith(PREFIX) and "SystemExit(3)" in done.stderr


def test_subprocess_closed_stdout_ends_quietly():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "rf_callback.cli", *NET, "--table"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # like `rf-probe ... | head -0`: the reader is gone before anything is printed
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0 and err == ""  # as `yes | head` does: the reader left, nothing failed


def test_element_picks_a_feature_map_from_a_dict_output(capsys):
    argv = ["tests.cli_models:two_maps", "--input-shape", "3,16,16"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "pass --element INDEX|KEY" in err and "'coarse'" in err
    assert len(err.splitlines()) == 1
    assert main([*argv, "--element", "coarse", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["size"], record["element"]) == ([5, 5], "coarse")
    with pytest.raises(SystemExit):
        main([*argv, "--element", "fine", "--table"])
    assert "--element applies to one probe" in capsys.readouterr().err


def test_element_names_a_key_of_digits(capsys):
    """--element 1 was read as the index 1, which no dict keyed '0', '1' (torchvision's FPN) has: such a key could
    never be named. A tuple's index and a missing element keep their messages, in the command's words."""
    argv = ["tests.cli_models:level_maps", "--input-shape", "3,16,16", "--json"]
    assert main([*argv, "--element", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["bounds"] == [[6, 10], [6, 10]]
    with pytest.raises(SystemExit):
        main(argv)
    assert "pass --element INDEX|KEY with the key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--element", "2"])
    assert "--element 2 is not a key of the output" in capsys.readouterr().err


def test_the_centre_not_given_is_named_as_the_default(capsys):
    """Without --pos, a refusal of the centre read "--pos None names none"."""
    with pytest.raises(SystemExit):
        main(["tests.cli_models:empty_map", "--input-shape", "1,8,8"])
    assert "so --pos center names none" in capsys.readouterr().err


def test_a_rank_is_checked_against_the_convolution_that_runs_first(capsys):
    """The hint took the first convolution defined, a CRNN's 1D head, so 4 channels into its 2D body read "has 2
    spatial axes, but ... head (Conv1d) takes 1: pass C,L", whose advice failed too; the forward's own error says
    what is wrong, and a real rank mismatch names the body."""
    argv = ["tests.cli_models:head_defined_first", "--input-shape"]
    with pytest.raises(SystemExit):
        main([*argv, "4,32,64"])
    err = capsys.readouterr().err
    assert "to have 3 channels, but got 4" in err and "Conv1d" not in err
    with pytest.raises(SystemExit):
        main([*argv, "3,32"])
    assert "the convolution body (Conv2d), the model's first, takes 2" in capsys.readouterr().err
    with pytest.raises(ProbeError, match="the model's forward raised .* to have 3 channels, but got 4"):
        probe_rf(head_defined_first(), (1, 4, 32, 64))  # not "the model's first convolution (head: Conv1d)"


def test_gif_sweeps_the_feature_map_element_names(tmp_path, capsys):
    """Before, --gif probed without --element and failed after printing the field."""
    gif = tmp_path / "coarse.gif"
    assert (
        main(["tests.cli_models:two_maps", "--input-shape", "3,16,16", "--element", "coarse", "--gif", str(gif)]) == 0
    )
    assert gif.read_bytes()[:6] == b"GIF89a" and capsys.readouterr().err == ""


def test_element_digits_that_do_not_read_back_as_an_int_name_a_key(capsys):
    """--element 01 was read as int 1, then the key '1': the field of another map, with exit status 0."""
    argv = ["tests.cli_models:padded_keys", "--input-shape", "3,16,16", "--pos", "8,8", "--json"]
    assert main([*argv, "--element", "01"]) == 0
    assert json.loads(capsys.readouterr().out)["bounds"] == [[7, 9], [7, 9]]
    assert main([*argv, "--element", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["bounds"] == [[4, 12], [4, 12]]
