import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from rf_callback import probe_rf, rf_table
from rf_callback.cli import main
from tests.cli_models import resnet, small_net, unet

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, command: list[str] | None = None) -> subprocess.CompletedProcess:
    """The command as a user runs it: a fresh process from the repository root, stdout and stderr captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = command or [sys.executable, "-m", "rf_callback.cli"]
    return subprocess.run([*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def fields(text: str) -> dict[str, str]:
    """The summary's `key   value` lines as a dict."""
    return {line[:10].strip(): line[10:] for line in text.splitlines() if line[:1].isalpha()}


def usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("rf-probe: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


# --- the command as a subprocess ------------------------------------------------------------------------------


def test_prints_the_numbers_probe_rf_gives():
    done = run("tests.cli_models:small_net", "--input-shape", "3,20,16", "--pos", "3,5")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress when stderr is not a terminal
    field = probe_rf(small_net(), (1, 3, 20, 16), (3, 5))
    shown = fields(done.stdout)
    assert shown["position"] == "(3, 5)"
    assert shown["size"] == " x ".join(map(str, field.size)) == "9 x 9"
    assert shown["bounds"] == ", ".join(f"{a}..{b}" for a, b in field.bounds) == "2..10, 6..14"
    assert shown["stride"] == "2 x 2" and shown["offset"] == "4 x 4"
    assert shown["input"] == "(1, 3, 20, 16)" and shown["output"] == "10 x 8 (theoretical)"


def test_json_parses_to_the_field_and_plot_writes_a_png(tmp_path):
    png = tmp_path / "rf.png"
    done = run("tests.cli_models:small_net", "--kwargs", '{"channels": 2}', "--input-shape", "2,12,10", "--json",
               "--plot", str(png))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == probe_rf(small_net(channels=2), (1, 2, 12, 10)).to_dict()
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def test_table_json_gives_one_record_per_layer():
    done = run("tests.cli_models:resnet", "--input-shape", "3,24,20", "--table", "--json")
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert records == [row.to_dict() for row in rf_table(resnet(), (1, 3, 24, 20))]
    assert [r["name"] for r in records][:5] == ["stem.0", "stem.1", "stem.2", "stem", "pool"]


def test_bad_argument_exits_2_with_a_one_line_message():
    done = run("tests.cli_models:small_net", "--input-shape", "3,x,16")
    assert done.returncode == 2
    assert done.stderr.startswith("rf-probe: error: --input-shape '3,x,16' is not C,L or C,H,W or C,D,H,W")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr and done.stdout == ""


def test_missing_module_exits_nonzero_naming_it_without_traceback():
    done = run("no_such_module_for_rf_probe.models:build", "--input-shape", "3,16,16")
    assert done.returncode != 0
    assert "no_such_module_for_rf_probe" in done.stderr and "Traceback" not in done.stderr


def test_installed_console_script_runs():
    script = shutil.which("rf-probe") or shutil.which("rf-probe", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the rf-probe console script is not installed (pip install -e .)")
    done = run("tests.cli_models:unet", "--input-shape", "1,16,14", "--table", command=[script])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].split() == ["layer", "type", "output", "size", "full", "size", "stride", "offset"]
    assert lines[3].split()[-12:] == ["8", "x", "8", "8", "x", "8", "2", "x", "2", "3", "x", "3"]
    assert lines[4].split() == ["dec", "Conv2d", "1", "x", "2", "x", "16", "x", "14", "10", "x", "10", "-", "x", "-",
                                "-", "x", "-", "-", "x", "-"]  # fmt: skip


# --- the same entry point in process ---------------------------------------------------------------------------


def test_help_says_that_the_module_is_imported_and_run(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "runs its code" in " ".join(capsys.readouterr().out.split())


def test_python_file_path_as_module(capsys):
    assert main(["tests/cli_models.py:small_net_1d", "--input-shape", "2,30", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["size"], record["stride"], record["offset"]) == ([7], [2], [2])


def test_a_centre_past_six_digits_prints_in_full(capsys):
    """small_net_1d: r = 7, S = 2, P = 2, so output 600000 spans 1199998..1200004, centred at 1200001 (printed as
    1.2e+06 before: six significant digits)."""
    assert main(["tests.cli_models:small_net_1d", "--input-shape", "2,1300000", "--pos", "600000"]) == 0
    shown = fields(capsys.readouterr().out)
    assert shown["span"] == "1199998..1200004" and shown["center"] == "1200001"


def test_pos_all_prints_the_map(capsys):
    assert main(["tests.cli_models:unet", "--input-shape", "1,16,16", "--pos", "all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == probe_rf(unet(), (1, 1, 16, 16), "all").to_dict()
    assert main(["tests.cli_models:unet", "--input-shape", "1,16,16", "--pos", "all", "--target-size", "10"]) == 0
    shown = fields(capsys.readouterr().out)
    assert shown["output"] == "16 x 16 (theoretical), 256 positions"
    assert shown["size"] == "5 x 5 to 10 x 10" and shown["stride"] == "- x -"
    # The field is 10 wide except where the border clips it: index x covers 10 when x - 5 >= 0 and x + 5 <= 15
    # (x even: [x-5, x+4]; x odd: [x-4, x+5]), i.e. x in 5..10 on each axis: 6 x 6 positions.
    assert shown["target"] == "10 x 10: covered at 36 of 256 positions"


def test_target_size_names_the_first_covering_layer(capsys):
    argv = ["tests.cli_models:resnet", "--input-shape", "3,32,32", "--table", "--target-size", "16,20"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # layer2.conv1 is 17 x 17 (not 20 wide), layer2.conv2 the first 25 x 25.
    assert out.splitlines()[-1] == "target 16 x 20: first covered by layer2.conv2 (Conv2d, field 25 x 25)"
    assert main([*argv[:-1], "40"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "target 40 x 40: no layer covers it (largest: 25 x 25 at layer2.conv2); it is larger than the input "
        "(32 x 32), so no field on it can cover it"
    )
    assert main(["tests.cli_models:small_net", "--input-shape", "3,16,16", "--target-size", "9"]) == 0
    assert fields(capsys.readouterr().out)["target"] == "9 x 9: covered"
    assert main(["tests.cli_models:small_net", "--input-shape", "3,16,16", "--target-size", "10", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["target_size"], record["covers_target"]) == ([10, 10], False)


def test_table_marks_fields_that_span_the_input(capsys):
    # small_net on 4 x 4: the last conv's centre field is clip([2*2 - 4, 2*2 - 4 + 8]) = 0..3 on both axes.
    assert main(["tests.cli_models:small_net", "--input-shape", "3,4,4", "--table"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:] if line[:1].isdigit()}
    assert list(rows) == ["0", "1", "2", "3", "4"]
    assert [row.endswith("*") for row in rows.values()] == [False, False, True, True, True]


def test_a_table_without_rows_says_so_instead_of_a_verdict_on_the_target(capsys):
    """It printed "target 5 x 5: no layer covers it" where every layer was left out (a convolution called twice)."""
    assert main(["tests.cli_models:twice", "--input-shape", "3,20,20", "--table", "--target-size", "5"]) == 0
    out, err = capsys.readouterr()
    assert "rf-probe: warning: rf_table: 1 row is left out, of modules that run more than once" in err
    assert "(no rows: every layer was left out" in out and "target 5 x 5: no row to compare it with" in out
    assert "no layer covers it" not in out


def test_layer_selects_the_probed_submodule(capsys):
    assert main(["tests.cli_models:resnet", "--input-shape", "3,32,32", "--layer", "layer1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == probe_rf(resnet(), (1, 3, 32, 32), layer="layer1").to_dict()
    argv = ["tests.cli_models:resnet", "--input-shape", "3,32,32", "--table", "--json"]
    assert main([*argv, "--layer", "layer2", "--layer", "pool"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["pool", "layer2"]


def test_gif_sweeps_the_output_map(tmp_path, capsys):
    gif = tmp_path / "sweep.gif"
    assert main(["tests.cli_models:small_net", "--input-shape", "3,6,6", "--gif", str(gif)]) == 0
    assert gif.read_bytes()[:6] == b"GIF89a"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal_and_not_quiet(monkeypatch, capsys):
    argv = ["tests.cli_models:small_net", "--input-shape", "3,8,8", "--table"]
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(argv) == 0
    progress = terminal.getvalue()
    assert "\rprobing layer 1/5: 0" in progress and "\rprobing layer 5/5: 4" in progress
    assert progress.endswith("\r") and progress.rsplit("\r", 2)[1].strip() == ""  # the line is cleared at the end
    quiet = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert main([*argv, "--quiet"]) == 0
    assert quiet.getvalue() == ""
    monkeypatch.undo()
    assert main(argv) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tests.cli_models:small_net", "--input-shape", "3,16,16", "--kwargs", "{channels: 3}"], "is not JSON"),
        (["tests.cli_models:small_net", "--input-shape", "3,16,16", "--kwargs", "[3]"], "must be a JSON object"),
        (["tests.cli_models:small_net", "--input-shape", "3,16,16", "--mode", "exact"], "invalid choice: 'exact'"),
        (["tests.cli_models:small_net", "--input-shape", "3,16,16", "--pos", "1,x"], "--pos '1,x' is not"),
        (["tests.cli_models:small_net", "--input-shape", "3,16,16", "--target-size", "1,2,3"], "--target-size"),
        (["tests.cli_models:small_net", "--input-shape", "0,16,16"], "--input-shape '0,16,16' is not"),
        (["tests.cli_models:small_net"], "the following arguments are required: --input-shape"),
        (["tests.cli_models", "--input-shape", "3,16,16"], "is not MODULE:CALLABLE"),
        (["tests.cli_models:no_such_net", "--input-shape", "3,16,16"], "has no attribute 'no_such_net'"),
        (["tests/no_such_file.py:net", "--input-shape", "3,16,16"], "cannot import module 'tests/no_such_file.py'"),
        (["tests.cli_models:broken_factory", "--input-shape", "3,16,16"], "raised RuntimeError: the factory failed"),
        (["tests.cli_models:not_a_model", "--input-shape", "3,16,16"], "returned a str, not a torch.nn.Module"),
        (["tests.cli_models:small_net", "--input-shape", "3,16,16", "--kwargs", '{"depth": 3}'], "TypeError"),
        (["tests.cli_models:small_net", "--input-shape", "3,16"], "has 1 spatial axes, but the convolution"),
        (["tests.cli_models:small_net", "--input-shape", "3,16,16", "--pos", "9,0"], "is outside the output map"),
        (["tests.cli_models:small_net", "--input-shape", "3,16,16", "--layer", "7"], "is not a submodule"),
        (["tests.cli_models:resnet", "--input-shape", "3,16,16"], "no spatial axes"),
        (["tests.cli_models:small_net", "--input-shape", "3,16,16", "--table", "--pos", "1,1"], "--pos applies"),
        (["tests.cli_models:small_net", "--input-shape", "3,16,16", "--pos", "all", "--plot", "a.png"], "--plot"),
        (["tests.cli_models:small_net", "--input-shape", "3,16,16", "--gif", "a.png"], "must end in .gif"),
        (["tests.cli_models:small_net", "--input-shape", "3,4,4,4", "--gif", "a.gif"], "--gif animates 1D and 2D"),
        (["tests.cli_models:small_net", "--input-shape", "3,16,16", "--plot", "no/such/dir/a.png"], "does not exist"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    assert message in usage_error(capsys, *argv)
