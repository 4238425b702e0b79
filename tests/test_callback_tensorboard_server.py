"""RFCallback's logs as a real TensorBoard server serves them: tags, steps, values and images over its HTTP API."""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from rf_callback import RFCallback, probe_rf
from tests.lightning_models import ConvClassifier, loaders, trainer_kwargs

SHAPE = (1, 1, 16, 16)
SCALAR_TAGS = (
    "rf/features/pos0/size_h/weights", "rf/features/pos0/size_w/weights", "rf/features/pos0/size_h/theoretical",
)  # fmt: skip
IMAGE_TAGS = ("rf/features/pos0/heatmap/weights", "rf/features/pos0/figure")
STARTUP_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, *, raw: bool = False):
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read()
    return body if raw else json.loads(body)


@contextlib.contextmanager
def _tensorboard(logdir: Path, log_file: Path):
    """A real `tensorboard` server on a free local port, yielding its base URL; always stopped on exit."""
    port = _free_port()
    command = [
        sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
        "--port", str(port), "--reload_interval", "1", "--load_fast", "false",
    ]  # fmt: skip
    with open(log_file, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def _wait_for_tags(server: subprocess.Popen, url: str, run: str, log_file: Path) -> tuple[dict, dict]:
    """Polls the tag lists until the server has loaded every expected tag of `run` (or fails with its log)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    scalars, images, last_error = {}, {}, None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"tensorboard exited with {server.returncode}:\n{log_file.read_text(errors='replace')}")
        try:
            scalars = _get(f"{url}/data/plugin/scalars/tags")
            images = _get(f"{url}/data/plugin/images/tags")
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError) as error:
            last_error = error  # not listening yet
        else:
            if set(SCALAR_TAGS) <= set(scalars.get(run, {})) and set(IMAGE_TAGS) <= set(images.get(run, {})):
                return scalars, images
        time.sleep(0.5)
    pytest.fail(
        f"tensorboard did not serve the tags of run {run!r} within {STARTUP_TIMEOUT_S:.0f} s (last error: "
        f"{last_error!r}); scalars: {scalars}, images: {images}\n{log_file.read_text(errors='replace')}"
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Trains ConvClassifier for 2 epochs with RFCallback(layer='features'), then serves its logs."""
    logdir = tmp_path_factory.mktemp("tensorboard")
    torch.manual_seed(0)
    model = ConvClassifier()
    initial = copy.deepcopy(model)
    callback = RFCallback(layer="features")
    trainer = pl.Trainer(callbacks=[callback], logger=TensorBoardLogger(logdir), **trainer_kwargs(logdir))
    trainer.fit(model, *loaders())  # 32 samples, batch 8: 4 steps per epoch
    run = Path(trainer.logger.log_dir).relative_to(logdir).as_posix()
    log_file = logdir.parent / f"{logdir.name}-server.log"
    with _tensorboard(logdir, log_file) as (server, url):
        scalar_tags, image_tags = _wait_for_tags(server, url, run, log_file)
        yield SimpleNamespace(
            url=url, run=run, model=model, initial=initial, callback=callback, trainer=trainer,
            scalar_tags=scalar_tags[run], image_tags=image_tags[run],
        )  # fmt: skip


def _scalar_series(served, tag: str) -> list[tuple[int, float]]:
    query = urllib.parse.urlencode({"run": served.run, "tag": tag})
    return [(step, value) for _wall_time, step, value in _get(f"{served.url}/data/plugin/scalars/scalars?{query}")]


def _image_series(served, tag: str) -> list[dict]:
    query = urllib.parse.urlencode({"run": served.run, "tag": tag, "sample": 0})
    return _get(f"{served.url}/data/plugin/images/images?{query}")


def test_server_lists_the_rf_scalar_and_image_tags(served):
    assert set(SCALAR_TAGS) <= set(served.scalar_tags)
    span = {f"rf-span/features/pos0/weights/{k}_{a}" for k in ("first", "last") for a in "hw"}
    assert span <= set(served.scalar_tags)
    assert set(IMAGE_TAGS) <= set(served.image_tags)
    for tag in IMAGE_TAGS:
        assert served.image_tags[tag]["samples"] == 1


def test_served_rf_size_is_the_initial_probe_then_one_per_validation_epoch(served):
    probed = [tuple(entry["fields"][0]["size"]) for entry in served.callback.history]
    initial = probe_rf(served.initial, SHAPE, "center", layer="features", mode="weights").size
    final = probe_rf(served.model, SHAPE, "center", layer="features", mode="weights").size
    for axis, name in enumerate("hw"):
        series = _scalar_series(served, f"rf/features/pos0/size_{name}/weights")
        steps, values = [s for s, _ in series], [v for _, v in series]
        assert len(series) == 1 + served.trainer.max_epochs
        assert steps[0] == 0 and steps == sorted(steps) and len(set(steps)) == len(steps)
        assert values == [float(size[axis]) for size in probed]
        assert values[0] == initial[axis]
        assert values[-1] == final[axis]


def test_served_theoretical_size_is_a_flat_line_at_every_probe(served):
    theoretical = probe_rf(served.model, SHAPE, "center", layer="features", mode="theoretical").size
    steps = [entry["step"] for entry in served.callback.history]
    assert _scalar_series(served, "rf/features/pos0/size_h/theoretical") == [(s, float(theoretical[0])) for s in steps]


def test_served_custom_scalars_layout_overlays_the_sizes_per_axis(served):
    layout = _get(f"{served.url}/data/plugin/custom_scalars/layout")
    (category,) = layout["category"]
    assert category["title"] == "receptive field of features"
    charts = {chart["title"]: chart["multiline"]["tag"] for chart in category["chart"]}
    assert charts["features · pos0 · size along h"] == ["^rf/features/pos0/size_h/"]
    assert charts["features · pos0 · size along w"] == ["^rf/features/pos0/size_w/"]
    assert "features · pos0 · effective extent / theoretical size" in charts  # the run measures the effective field
    assert not any("target" in title for title in charts)  # but has no target_size: no empty coverage charts
    # the chart's regex picks the theoretical, weights' and effective sizes on one set of axes (no target here)
    query = urllib.parse.urlencode({"run": served.run, "tag": "^rf/features/pos0/size_h/"})
    served_lines = _get(f"{served.url}/data/plugin/custom_scalars/scalars?{query}")
    assert served_lines["regex_valid"]
    lines = served_lines["tag_to_events"]
    assert set(lines) == {f"rf/features/pos0/size_h/{kind}" for kind in ("theoretical", "weights", "effective")}
    effective = [entry["effective"]["4_4"]["extent0.95_h"] for entry in served.callback.history[1:]]
    assert [value for _wall_time, _step, value in lines["rf/features/pos0/size_h/effective"]] == effective


def test_served_scalars_and_images_are_at_step_0_then_the_validation_global_steps(served):
    steps_per_epoch = 4
    expected = [0] + [steps_per_epoch * (epoch + 1) for epoch in range(served.trainer.max_epochs)]  # 0, 4, 8
    assert [entry["step"] for entry in served.callback.history] == expected
    assert [image["step"] for image in _image_series(served, "rf/features/pos0/heatmap/weights")] == expected
    # Figures cost a few training steps each: drawn at fit start and at fit end only.
    assert [image["step"] for image in _image_series(served, "rf/features/pos0/figure")] == [0, expected[-1]]
    assert [step for step, _ in _scalar_series(served, "rf/features/pos0/size_h/weights")] == expected


def test_served_heatmap_and_figure_are_png_images(served):
    for tag in IMAGE_TAGS:
        images = _image_series(served, tag)
        assert images
        body = _get(f"{served.url}/data/plugin/images/individualImage?{images[-1]['query']}", raw=True)
        assert body.startswith(b"\x89PNG\r\n\x1a\n")
