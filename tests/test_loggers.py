"""RFCallback writes to every common Lightning logger through its own API, read back from the real back ends."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rf_callback import RFCallback
from rf_callback.callback.loggers import (
    CSVWriter,
    LoggerWriter,
    MLflowWriter,
    TensorBoardWriter,
    WandbWriter,
    writer_for,
)
from tests.lightning_models import ConvClassifier, loaders, trainer_kwargs
from tests.recording import recorded_warnings

STEPS = [0, 4, 8]  # fit start, then 2 validation epochs of 4 steps
SIZE_H = "rf/features/pos0/size_h/weights"
HEATMAP = "rf/features/pos0/heatmap/weights"


def fit(tmp_path, logger, **callback_kwargs):
    callback = RFCallback(layer="features", target_size=6, **callback_kwargs)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=logger), callbacks=[callback])
    trainer.fit(ConvClassifier(), *loaders())
    return callback


def weights_sizes(callback) -> list[float]:
    return [float(entry["fields"][0]["size"][0]) for entry in callback.history]


def test_wandb_offline_run_holds_the_scalars_and_captioned_images_at_the_same_step(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from tests.wandb_log import history_rows

    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="rf")
    try:
        callback = fit(tmp_path, logger)
    finally:
        wandb.finish()
    (log,) = Path(tmp_path, "wandb").glob("offline-run-*/run-*.wandb")
    rows = history_rows(log)
    sizes = [(row["trainer/global_step"], row[SIZE_H]) for row in rows if SIZE_H in row]
    assert sizes == list(zip(STEPS, weights_sizes(callback)))
    target = "rf/features/pos0/size_w/target"
    targets = [(row["trainer/global_step"], row[target]) for row in rows if target in row]
    assert targets == [(step, 6) for step in STEPS]
    images = [row for row in rows if f"{HEATMAP}/_type" in row]
    assert [row["trainer/global_step"] for row in images] == STEPS  # each image at its scalars' step
    for row, size in zip(images, weights_sizes(callback)):
        assert row[f"{HEATMAP}/captions"] == [f"weights field of features at (4, 4): {size:g} x {size:g}"]
        (name,) = row[f"{HEATMAP}/filenames"]
        with Image.open(log.parent / "files" / name) as picture:
            assert picture.size == (256, 256)  # the 16 x 16 heatmap enlarged 16 times
    for image in ("figure", "overlay", "growth", "heatmap/effective", "heatmap/theoretical"):
        assert any(f"rf/features/pos0/{image}/_type" in row for row in rows), image


def test_mlflow_sqlite_store_holds_the_scalars_and_image_artifacts_at_the_same_step(tmp_path):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="rf", tracking_uri=tracking, artifact_location=str(tmp_path / "artifacts"))
    callback = fit(tmp_path, logger)
    client = MlflowClient(tracking)
    history = client.get_metric_history(logger.run_id, SIZE_H)
    assert [(m.step, m.value) for m in history] == list(zip(STEPS, weights_sizes(callback)))
    effective = client.get_metric_history(logger.run_id, "rf/features/pos0/size_h/effective")
    assert [m.step for m in effective] == STEPS[1:]
    pngs = [a.path for a in client.list_artifacts(logger.run_id, "images") if a.path.endswith(".png")]
    steps_by_key: dict[str, list[int]] = {}
    for path in pngs:
        key, step = re.fullmatch(r"images/(.+)\+step\+(\d+)\+timestamp\+.*\.png", path).groups()
        steps_by_key.setdefault(key.replace("~", "/"), []).append(int(step))
    assert sorted(steps_by_key[HEATMAP]) == STEPS
    assert sorted(steps_by_key["rf/features/pos0/heatmap/effective"]) == STEPS[1:]
    assert {"rf/features/pos0/figure", "rf/features/pos0/overlay", "rf/features/pos0/growth"} <= set(steps_by_key)
    local = client.download_artifacts(logger.run_id, next(p for p in pngs if "heatmap~weights" in p), str(tmp_path))
    with Image.open(local) as picture:
        assert picture.size == (256, 256)
    note = client.download_artifacts(logger.run_id, "rf_callback/rf/features/positions.md", str(tmp_path))
    assert "**pos0**: output cell (4, 4) of a 8 × 8 map: theoretical field 8 × 8" in Path(note).read_text()


def test_tensorboard_gets_the_positions_note_and_coloured_heatmaps(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    fit(tmp_path, logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    (note,) = events.Tensors("rf/features/positions/text_summary")
    assert "output cell (4, 4) of a 8 × 8 map" in note.tensor_proto.string_val[0].decode()
    heatmap = events.Images(HEATMAP)[0]
    assert (heatmap.width, heatmap.height) == (256, 256)
    with Image.open(__import__("io").BytesIO(heatmap.encoded_image_string)) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    assert len({tuple(p) for p in pixels.reshape(-1, 3)}) > 2  # coloured, not a grey ramp
    assert not np.all(pixels[..., 0] == pixels[..., 1])


class ListLogger(Logger):
    """A logger this package does not know: it keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "list"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def test_an_unknown_logger_gets_the_scalars_and_one_warning(tmp_path):
    logger = ListLogger()
    with recorded_warnings() as record:
        callback = fit(tmp_path, [logger, CSVLogger(tmp_path)])
    said = [str(w.message) for w in record if "gets the scalars only" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("RFCallback: ListLogger gets the scalars only")
    sizes = [(step, metrics[SIZE_H]) for step, metrics in logger.rows if SIZE_H in metrics]
    assert sizes == list(zip(STEPS, weights_sizes(callback)))
    with open(Path(tmp_path) / "lightning_logs" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(SIZE_H)]
    assert [(int(row["step"]), float(row[SIZE_H])) for row in rows] == sizes


def test_without_images_no_logger_is_warned_that_it_gets_the_scalars_only(tmp_path):
    with recorded_warnings() as record:
        fit(tmp_path, ListLogger(), log_images=False)
    assert not any("gets the scalars only" in str(w.message) for w in record)


def test_fast_dev_run_is_not_told_to_add_the_logger_it_has(tmp_path):
    """fast_dev_run swaps the user's TensorBoardLogger for a DummyLogger: the callback said the DummyLogger "gets the
    scalars only" and to add a TensorBoardLogger, which the user had."""
    callback = RFCallback(layer="features")
    trainer = pl.Trainer(
        **{**trainer_kwargs(tmp_path, logger=TensorBoardLogger(tmp_path)), "max_epochs": None}, fast_dev_run=True,
        callbacks=[callback],
    )  # fmt: skip
    with recorded_warnings() as record:
        trainer.fit(ConvClassifier(), *loaders())
    said = [str(w.message) for w in record if "RFCallback" in str(w.message)]
    assert not [m for m in said if "scalars only" in m or "add one of them" in m], said
    assert callback.history  # the probes ran


def test_writers_are_chosen_by_the_nearest_lightning_base_class(tmp_path):
    class MyBoard(TensorBoardLogger):
        pass

    assert type(writer_for(MyBoard(tmp_path))) is TensorBoardWriter
    assert type(writer_for(CSVLogger(tmp_path))) is CSVWriter
    assert type(writer_for(ListLogger())) is LoggerWriter
    assert not writer_for(ListLogger()).known and not writer_for(CSVLogger(tmp_path)).takes_images
    pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.loggers import TensorBoardLogger as ClassicBoard

    assert type(writer_for(ClassicBoard(tmp_path))) is TensorBoardWriter
    assert {WandbWriter.takes_images, MLflowWriter.takes_images} == {True}


def test_mlflow_image_keys_are_the_metric_names_lightning_writes(tmp_path):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="rf", tracking_uri=tracking, artifact_location=str(tmp_path / "artifacts"))
    tag = "rf/étage.conv(1)/pos0/heatmap/weights"  # MLflow refuses é and parentheses
    logger.log_metrics({tag.replace("heatmap/weights", "size_h/weights"): 3.0}, step=0)
    writer_for(logger).image(tag, np.zeros((4, 4, 3), np.uint8), 0, "caption")
    client = MlflowClient(tracking)
    (metric,) = client.get_run(logger.run_id).data.metrics
    assert metric == "rf/tage.conv1/pos0/size_h/weights"
    (image,) = [a.path for a in client.list_artifacts(logger.run_id, "images") if a.path.endswith(".png")]
    assert image.startswith("images/rf~tage.conv1~pos0~heatmap~weights+step+0+")
