#!/usr/bin/env bash
# The wheel users install. Builds it from a clean copy of the package's files (no stale build/ or egg-info leaks in);
# checks that it holds exactly the source tree's modules plus py.typed and declares the rf-probe command; then imports
# every module from the unpacked wheel in an isolated interpreter (-I) run outside the repository, so the source tree
# cannot stand in for it. Then builds the sdist and the wheel with `python -m build`, runs `twine check` on both,
# installs the wheel into a fresh virtual environment (its dependencies lent from the given Python's site-packages,
# whose editable rf_callback stays out) and runs `rf-probe --help` and one probe there. Offline, about 20 seconds:
# the venv's own setuptools builds it (--no-build-isolation).
# Usage: .ci/check_wheel.sh [python]   (default .venv/bin/python; `make wheel-check` runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
# Absolute but not resolved: a venv's python is a symlink to its base interpreter, which lacks the venv's packages.
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; *) PY=$(command -v "$PY") ;; esac
ROOT=$PWD
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

mkdir "$TMP/src"
tar -c --exclude=__pycache__ --exclude='*.py[co]' pyproject.toml README.md rf_callback | tar -x -C "$TMP/src"
# The venv's setuptools when it is the one pyproject.toml asks for (the dev extra's); else pip fetches one.
ISOLATION=--no-build-isolation
"$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' 2>/dev/null || ISOLATION=
"$PY" -m pip wheel --quiet --no-deps $ISOLATION --disable-pip-version-check -w "$TMP/dist" "$TMP/src"

cd "$TMP"
"$PY" -I - "$ROOT" "$TMP/dist" "$TMP/site" <<'EOF'
import configparser
import importlib
import importlib.metadata
import pathlib
import pkgutil
import sys
import zipfile

root, dist, site = (pathlib.Path(arg) for arg in sys.argv[1:])
(wheel,) = dist.glob("rf_callback-*.whl")

with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    archive.extractall(site)
packaged = {name for name in names if name.startswith("rf_callback/")}
source = {path.relative_to(root).as_posix() for path in (root / "rf_callback").rglob("*.py")} | {"rf_callback/py.typed"}
problems = [f"it lacks {name}" for name in sorted(source - packaged)]
problems += [f"it holds {name}, which the source tree does not" for name in sorted(packaged - source)]
(dist_info,) = {name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")}
entry_points = configparser.ConfigParser()
entry_points.read_string((site / dist_info / "entry_points.txt").read_text())
if entry_points.get("console_scripts", "rf-probe", fallback=None) != "rf_callback.cli:main":
    problems.append(f"{dist_info}/entry_points.txt does not declare rf-probe = rf_callback.cli:main")

if not problems:
    sys.path.insert(0, str(site))
    import rf_callback
    from rf_callback import RFCallback, probe_rf  # noqa: F401

    found = pkgutil.walk_packages(rf_callback.__path__, "rf_callback.")
    modules = ["rf_callback"] + [module.name for module in found if not module.name.endswith(".__main__")]
    for name in modules:
        importlib.import_module(name)
    problems += [
        f"{name} was imported from {module.__file__}, not from the wheel"
        for name, module in sorted(sys.modules.items())
        if name.split(".")[0] == "rf_callback" and not str(getattr(module, "__file__", "")).startswith(str(site))
    ]
    (installed,) = importlib.metadata.distributions(path=[str(site)])
    (script,) = installed.entry_points.select(group="console_scripts", name="rf-probe")
    if script.load() is not rf_callback.cli.main:
        problems.append("its rf-probe entry point does not load rf_callback.cli.main")

if problems:
    sys.exit(f"wheel check: {wheel.name} is broken:\n  " + "\n  ".join(problems))
print(f"wheel check: {wheel.name} holds the {len(source)} files of rf_callback/; its {len(modules)} modules load")
EOF

# The sdist and the wheel as `python -m build` makes them, checked by twine.
"$PY" -m build --no-isolation --sdist --wheel --outdir "$TMP/build" "$TMP/src" > "$TMP/build.log" 2>&1 \
  || { cat "$TMP/build.log"; exit 1; }
"$PY" -m twine check --strict "$TMP"/build/*

# A fresh virtual environment with the wheel installed, its dependencies (torch, Lightning, ...) lent by a .pth line.
"$PY" -m venv --without-pip "$TMP/venv"
"$PY" -m pip --python "$TMP/venv/bin/python" install --quiet --no-deps --disable-pip-version-check "$TMP"/build/*.whl
LENT=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
FRESH=$("$TMP/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$LENT" > "$FRESH/lent_dependencies.pth"
"$TMP/venv/bin/python" -I -c "import rf_callback, sys; sys.exit(0 if rf_callback.__file__.startswith('$FRESH') else f'rf_callback imported from {rf_callback.__file__}')"
"$TMP/venv/bin/rf-probe" --help > /dev/null
PROBED=$("$TMP/venv/bin/rf-probe" torch.nn:Conv2d --kwargs '{"in_channels": 3, "out_channels": 4, "kernel_size": 5}' \
  --input-shape 3,16,16 --pos 2,3)
case $PROBED in *"5 x 5"*) ;; *) echo "wheel check: rf-probe in a fresh venv printed: $PROBED"; exit 1 ;; esac
echo "wheel check: sdist and wheel pass twine check; in a fresh venv, rf-probe --help runs and a probe prints: $(echo "$PROBED" | grep "^size")"
