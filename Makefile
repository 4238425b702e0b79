# The README's commands. `make demo` and `make test` work on a new machine from nothing: they create .venv,
# install the CPU build of torch first (a bare `torch` would pull a multi-GB CUDA build), then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo probe-demo screenshots docs test typecheck wheel-check test-gpu lint format bench bench-env bench-real clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/train_demo.py

probe-demo: $(VENV)/.installed
	$(PY) examples/probe_demo.py

# Screenshots of TensorBoard's tabs in headless Chromium for the docs: docs/dashboard_*.png (not part of `make test`).
# Needs `apt-get install chromium chromium-driver`; installs selenium into the venv. ARGS="--tags '^rf/'" passes options.
screenshots: $(VENV)/.installed
	$(PY) -c "import selenium" 2>/dev/null || $(PY) -m pip install --quiet selenium
	[ -d out/logs ] || $(PY) examples/train_demo.py
	$(PY) docs/screenshots.py --logdir out/logs --out docs/ $(ARGS)

# The documentation site (mkdocs.yml, docs/*.md, the API reference from the docstrings) into site/. --strict: a
# broken link or anchor, a missing reference or a docstring griffe cannot parse fails the build. A few seconds.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir site

docs: $(VENV)/.installed
	$(MKDOCS)

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(MKDOCS)
	.ci/check_wheel.sh $(PY)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# The declared types, checked: mypy with [tool.mypy] of pyproject.toml (about a minute cold, seconds from its cache).
typecheck: $(VENV)/.installed
	$(PY) -m mypy

# The wheel users install: built from the package's files, its contents and rf-probe entry point checked, every
# module imported from it outside the repository (.ci/check_wheel.sh, a few seconds).
wheel-check: $(VENV)/.installed
	.ci/check_wheel.sh $(PY)

# The tests marked `cuda` (skipped without a CUDA device), with the Python that has a CUDA build of torch:
# `make test-gpu PY=python3` on a machine that has one installed.
test-gpu: $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/.installed,)
	$(PY) -m pytest -q -m cuda tests/test_gpu.py

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(VENV)/.installed
	PYTHONPATH=. $(PY) benchmarks/bench_probe.py
	PYTHONPATH=. $(PY) benchmarks/bench_callback.py
	PYTHONPATH=. $(PY) benchmarks/bench_effective.py

# The benchmark on torchvision's ResNet-18/50, VGG-16 and MobileNetV2 at 224 x 224 runs in a separate environment
# with torchvision (on this project's machines pip takes both from local disk); without it, on real_models.py's
# re-implementations of their layer shapes. `make bench-env` creates it; `make bench-real` uses it when present.
BENCH_VENV ?= .venv-bench
BENCH_TORCH ?= torch==2.14.1 torchvision==0.29.1 timm==1.0.29

$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet $(BENCH_TORCH)
	$(BENCH_VENV)/bin/python -m pip install --quiet -e .
	touch $@

bench-env: $(BENCH_VENV)/.installed

bench-real: $(if $(wildcard $(BENCH_VENV)/bin/python),,$(VENV)/.installed)  # ARGS="--quick" passes options on
	if [ -x $(BENCH_VENV)/bin/python ]; then $(BENCH_VENV)/bin/python benchmarks/bench_real.py $(ARGS); \
	else $(PY) benchmarks/bench_real.py --source own $(ARGS); fi

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis out site
