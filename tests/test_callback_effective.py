"""RFCallback's effective field and the coverage alert in real Trainer runs."""

from __future__ import annotations

import io

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from rf_callback import CoverageError, CoverageEvent, RFCallback, effective_rf
from rf_callback.plotting import figure_to_array, plot_growth
from tests.lightning_models import ConvClassifier, NoValidation, ShrinkingField, loaders, trainer_kwargs
from tests.recording import recorded_warnings


def fit(tmp_path, callback, model, **overrides):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **overrides), callbacks=[callback])
    trainer.fit(model, *loaders())
    return trainer


def alerts(record) -> list[str]:
    return [str(w.message) for w in record if "effective receptive field" in str(w.message)]


def test_effective_metrics_are_logged_with_images_and_a_growth_curve(tmp_path):
    model = ConvClassifier()
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = RFCallback(layer="features", erf_samples=8)
    fit(tmp_path, callback, model, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    summary = {f"rf-effective/features/pos0/{name}_{axis}" for name in ("ratio", "offset", "spread") for axis in "hw"}
    assert {"rf/features/pos0/size_h/effective", "rf/features/pos0/size_w/effective"} | summary <= scalars
    assert not any("area" in tag or "com_" in tag for tag in scalars)  # the full set is opt-in
    effective_images = {"rf/features/pos0/heatmap/effective", "rf/features/pos0/overlay", "rf/features/pos0/growth"}
    assert effective_images <= images
    assert [e.step for e in events.Scalars("rf/features/pos0/size_h/effective")] == [4, 8]
    # The logged value is effective_rf's on the same 8 validation inputs and the final weights.
    inputs = callback.erf_inputs
    assert inputs.shape == (8, 1, 16, 16)
    field = effective_rf(model, inputs, "center", layer="features")
    expected = field.metrics()
    assert events.Scalars("rf/features/pos0/size_h/effective")[-1].value == expected["extent0.95_h"]
    spread = events.Scalars("rf-effective/features/pos0/spread_w")[-1].value
    assert spread == pytest.approx(expected["std_w"], rel=1e-5)
    ratio = events.Scalars("rf-effective/features/pos0/ratio_h")[-1].value
    assert ratio == pytest.approx(expected["extent0.95_h"] / field.theoretical.size[0], rel=1e-6)


def test_every_effective_metric_is_opt_in(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = RFCallback(layer="features", erf_samples=8, effective_scalars="all", log_images=False)
    fit(tmp_path, callback, ConvClassifier(), logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"rf-effective/features/pos0/area0.5", "rf-effective/features/pos0/com_h"} <= scalars
    assert "rf-effective/features/pos0/spread_h" in scalars and "rf-effective/features/pos0/std_h" not in scalars


def test_alert_fires_exactly_at_the_epoch_coverage_is_lost_and_once(tmp_path):
    received: list[CoverageEvent] = []
    callback = RFCallback(target_size=5, on_alert=received.append, log_images=False)
    with pytest.warns(UserWarning) as record:
        trainer = fit(tmp_path, callback, ShrinkingField(shrink_epoch=1), max_epochs=4, logger=False)
    assert [e.epoch for e in received] == [1] and received[0].reason == "lost"
    assert received[0].extent == (1, 1) and received[0].target == (5, 5) and received[0].theoretical == (7, 7)
    assert len(alerts(record)) == 1 and "at epoch 1" in alerts(record)[0] and "stopped covering" in alerts(record)[0]
    assert trainer.current_epoch == 4  # "warn" does not stop
    assert [h["effective"]["8_8"]["extent0.95_h"] for h in callback.history[1:]] == [6.0, 1.0, 1.0, 1.0]
    assert trainer.callback_metrics["rf/output/pos0/target/covered"] == 0
    assert trainer.callback_metrics["rf/output/pos0/target/margin"] == -4


def test_a_covered_run_never_alerts(tmp_path):
    callback = RFCallback(target_size=(6, 5), log_images=False)
    with recorded_warnings() as record:
        trainer = fit(tmp_path, callback, ShrinkingField(shrink_epoch=None), max_epochs=3, logger=False)
    assert alerts(record) == [] and callback.trackers["8_8"].events == []
    assert trainer.callback_metrics["rf/output/pos0/target/covered"] == 1
    assert trainer.callback_metrics["rf/output/pos0/target/margin"] == 0


def test_not_reached_within_patience(tmp_path):
    received: list[CoverageEvent] = []
    callback = RFCallback(target_size=9, patience=2, on_alert=received.append, log_images=False)
    with pytest.warns(UserWarning, match="theoretical receptive field .* 7 x 7, smaller than the target size 9 x 9"):
        fit(tmp_path, callback, ShrinkingField(shrink_epoch=None), max_epochs=3, logger=False)
    assert [(e.epoch, e.reason) for e in received] == [(1, "not_reached")]


def test_two_positions_on_one_cell_of_the_validation_inputs_share_one_check_per_epoch(tmp_path):
    """(8, 8) and (-1, -1) are two cells of the 16 x 16 training map but one of the 9 x 9 validation map: one
    tracker, checked once per validation (twice before, so a patience of 2 alerted after the first epoch)."""
    received: list[CoverageEvent] = []
    callback = RFCallback(pos=[(8, 8), (-1, -1)], target_size=9, patience=2, on_alert=received.append,
                          log_images=False)  # fmt: skip
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 9, 9), torch.zeros(16).long())
    train, _ = loaders()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, logger=False), callbacks=[callback])
    with pytest.warns(UserWarning, match="smaller than the target size 9 x 9"):
        trainer.fit(ShrinkingField(shrink_epoch=None), train, torch.utils.data.DataLoader(data, batch_size=8))
    assert [(e.epoch, e.reason) for e in received] == [(1, "not_reached")]
    assert list(callback.trackers) == ["8_8"] and callback.trackers["8_8"].checks == 3
    margins = [trainer.callback_metrics[f"rf/output/pos{i}/target/margin"] for i in (0, 1)]
    assert margins[0] == margins[1] < 0


def test_fit_end_pictures_of_two_positions_on_one_cell_keep_their_own_tags(tmp_path):
    """pos1 (-1, -1) and pos0 (8, 8) are one cell of the 9 x 9 validation map, pos2 (0, 0) another: each index
    gets its overlay and growth curve (before, pos1 got pos2's pictures and pos2 none)."""
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = RFCallback(pos=[(8, 8), (-1, -1), (0, 0)], erf_samples=8)
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 9, 9), torch.zeros(16).long())
    train, _ = loaders()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, logger=logger), callbacks=[callback])
    trainer.fit(ShrinkingField(shrink_epoch=None), train, torch.utils.data.DataLoader(data, batch_size=8))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()

    def logged(index: int, kind: str) -> np.ndarray:
        encoded = events.Images(f"rf/output/pos{index}/{kind}")[-1].encoded_image_string
        return np.array(Image.open(io.BytesIO(encoded)).convert("RGB"))

    assert np.array_equal(logged(0, "overlay"), logged(1, "overlay"))
    assert not np.array_equal(logged(1, "overlay"), logged(2, "overlay"))
    for index, label in ((1, "8_8"), (2, "0_0")):
        rows = [(0, callback.history[-1]["effective"][label])]
        title = f"effective field of output at pos{index} ({label.replace('_', ', ')})"
        assert np.array_equal(logged(index, "growth"), figure_to_array(plot_growth(rows, title=title)))


def test_on_miss_stop_stops_training_at_that_epoch(tmp_path):
    callback = RFCallback(target_size=5, on_miss="stop", log_images=False)
    with pytest.warns(UserWarning, match="stopped covering"):
        trainer = fit(tmp_path, callback, ShrinkingField(shrink_epoch=2), max_epochs=6, logger=False)
    assert trainer.current_epoch == 3 and callback.history[-1]["epoch"] == 2


def test_on_miss_raise_raises_the_documented_type(tmp_path):
    callback = RFCallback(target_size=5, on_miss="raise", log_images=False)
    with pytest.raises(CoverageError, match="at epoch 1") as info, pytest.warns(UserWarning):
        fit(tmp_path, callback, ShrinkingField(shrink_epoch=1), max_epochs=3, logger=False)
    assert info.value.event.extent == (1, 1)


def test_resume_keeps_effective_history_and_alert_state(tmp_path):
    callback = RFCallback(target_size=5, log_images=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=False, enable_checkpointing=True),
                         callbacks=[callback, checkpoint])  # fmt: skip
    with pytest.warns(UserWarning, match="stopped covering"):
        trainer.fit(ShrinkingField(shrink_epoch=1), *loaders())
    resumed = RFCallback(target_size=5, log_images=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4, logger=False), callbacks=[resumed])
    with recorded_warnings() as record:
        trainer.fit(ShrinkingField(shrink_epoch=1), *loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert alerts(record) == []  # the loss was alerted before the checkpoint: not again
    assert [h["epoch"] for h in resumed.history] == [None, 0, 1, 2, 3]
    assert resumed.trackers["8_8"].events[0]["epoch"] == 1 and resumed.trackers["8_8"].checks == 4


def test_effective_true_without_validation_is_refused(tmp_path):
    with pytest.raises(MisconfigurationException, match="effective=True.* needs validation data"):
        fit(tmp_path, RFCallback(layer="features", effective=True), NoValidation(), logger=False,
            limit_val_batches=0)  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_size": 0}, "target_size=0"),
        ({"target_size": (4, 4, 4, 4)}, r"target_size=\(4, 4, 4, 4\)"),
        ({"on_miss": "abort"}, "on_miss='abort'"),
        ({"on_alert": "print"}, "on_alert='print'"),
        ({"coverage_mass": 1.5}, "coverage_mass=1.5"),
        ({"erf_samples": 0}, "erf_samples=0"),
        ({"patience": 0}, "patience=0"),
        ({"effective": "yes"}, "effective='yes'"),
    ],
)
def test_bad_effective_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        RFCallback(**kwargs)


class GoesDead(ConvClassifier):
    """From epoch 1 the last BatchNorm's bias silences every ReLU: the output no longer depends on the input."""

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            with torch.no_grad():
                self.features[5].bias.fill_(-1e4)


def test_a_position_whose_output_stops_depending_on_the_input_covers_nothing(tmp_path):
    """Its gradient map is zero: the effective field failed as an error (warned once), no alert came, and the
    monitored ``covered`` kept the 1 of the epoch before."""
    received: list[CoverageEvent] = []
    callback = RFCallback(layer="features", target_size=2, on_alert=received.append, log_images=False, erf_samples=8)
    with recorded_warnings() as record:
        trainer = fit(tmp_path, callback, GoesDead(lr=0.0), max_epochs=3, logger=False)
    assert [(e.epoch, e.reason, e.extent) for e in received] == [(1, "lost", (0, 0))]
    assert "no longer depends on the input" in alerts(record)[0]
    said = [str(w.message) for w in record if "does not depend on the effective field's inputs" in str(w.message)]
    assert len(said) == 1 and not any("failed" in str(w.message) for w in record)
    assert trainer.callback_metrics["rf/features/pos0/target/covered"] == 0
    assert trainer.callback_metrics["rf/features/pos0/target/margin"] == -2
    assert trainer.callback_metrics["rf/features/pos0/size_h/effective"] == 0  # not epoch 0's extent
    assert [bool(h["effective"]) for h in callback.history[1:]] == [True, False, False]


class WeightsGoDead(ConvClassifier):
    """From epoch 1 the second convolution's weights are zero: the weights-mode probe fails as well."""

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            with torch.no_grad():
                self.features[4].weight.zero_()


def test_a_network_that_dies_covers_nothing_even_where_the_weights_probe_fails(tmp_path):
    """The failed weights probe skipped the effective field and the coverage check: no alert, nothing logged, and
    the monitored ``covered`` kept the 1 of epoch 0 (``on_miss="raise"`` never raised)."""
    received: list[CoverageEvent] = []
    callback = RFCallback(layer="features", target_size=2, on_alert=received.append, log_images=False, erf_samples=8)
    with recorded_warnings() as record:
        trainer = fit(tmp_path, callback, WeightsGoDead(lr=0.0), max_epochs=2, logger=False)
    assert any("the probe failed" in str(w.message) for w in record)  # the weights probe, with its own reason
    assert [(e.epoch, e.reason, e.extent) for e in received] == [(1, "lost", (0, 0))]
    assert trainer.callback_metrics["rf/features/pos0/target/covered"] == 0
    assert trainer.callback_metrics["rf/features/pos0/size_h/effective"] == 0
    raising = RFCallback(layer="features", target_size=2, on_miss="raise", log_images=False, erf_samples=8)
    with pytest.raises(CoverageError, match="no longer depends on the input"):
        fit(tmp_path, raising, WeightsGoDead(lr=0.0), max_epochs=2, logger=False)


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.ones(1, 1, 8, 8))

    def forward(self, x):
        return x * self.gate


class OneCellGoesDead(ConvClassifier):
    """From epoch 1 a gate after the features is zero at cell (1, 1) alone: only that position's field fails."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.features.append(_Gate())

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            with torch.no_grad():
                self.features[-1].gate[..., 1, 1] = 0


def test_a_position_whose_weights_field_fails_alone_leaves_the_others_logged(tmp_path):
    """One weights probe ran every position: a cell dead alone failed it, and every position's weights sizes,
    spans and heatmaps were missing for that epoch (the history held no field), with one warning that named the
    dead cell only. Each position is probed alone then: the others are logged, the dead one's entry is None."""
    callback = RFCallback(layer="features", pos=[(1, 1), (4, 4)], target_size=2, erf_samples=8, log_images=False)
    with recorded_warnings() as record:
        trainer = fit(tmp_path, callback, OneCellGoesDead(lr=0.0), max_epochs=2, logger=False)
    said = [str(w.message) for w in record if "the probe of position 0 (1, 1) failed" in str(w.message)]
    assert len(said) == 1 and "the other positions' fields are logged" in said[0]
    last = callback.history[-1]
    assert last["epoch"] == 1 and last["fields"][0] is None and last["fields"][1]["bounds"] == [[5, 12], [5, 12]]
    assert trainer.callback_metrics["rf/features/pos1/size_h/weights"] == 8
    assert trainer.callback_metrics["rf/features/pos0/size_h/theoretical"] == 7  # still logged beside


class CornerDead(ConvClassifier):
    """One 3 x 3 mean with bias -0.7, then a ReLU, on inputs in 0.75..1: live inside, dead at the corners (four of
    the nine taps are zero padding there). lr 0 keeps it so."""

    def __init__(self):
        super().__init__(lr=0.0, example=False)
        self.features = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.fill_(1 / 9)
            self.features[0].bias.fill_(-0.7)
        self.head = nn.Linear(1, 3)


def corner_data(side: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = 0.75 + 0.25 * torch.rand(8, 1, side, side, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(8).long()), batch_size=4)


def test_a_position_without_effective_field_moves_no_other_positions_note_or_pictures(tmp_path):
    """pos0 (0, 0) is dead, pos1 (5, 5) alive, on 12 x 12 validation inputs: the note said "pos0 is cell (5, 5)" and
    pos0's overlay and growth curve were pos1's (titled "pos0 (5, 5)"), pos1 had none."""
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = RFCallback(pos=[(0, 0), (5, 5)], layer="features", erf_samples=8)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, logger=logger), callbacks=[callback])
    with recorded_warnings():
        trainer.fit(CornerDead(), corner_data(8), corner_data(12))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    note = events.Tensors("rf/features/positions/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "**pos0**: output cell (0, 0) of a 12 × 12 map" in note and "**pos1**: output cell (5, 5)" in note
    images = set(events.Tags()["images"])
    assert {"rf/features/pos1/overlay", "rf/features/pos1/growth"} <= images
    assert not {"rf/features/pos0/overlay", "rf/features/pos0/growth"} & images
    rows = [(0, callback.history[-1]["effective"]["5_5"])]
    encoded = events.Images("rf/features/pos1/growth")[-1].encoded_image_string
    growth = figure_to_array(plot_growth(rows, title="effective field of features at pos1 (5, 5)"))
    assert np.array_equal(np.array(Image.open(io.BytesIO(encoded)).convert("RGB")), growth)


def test_a_position_that_loses_its_effective_field_gets_no_overlay_of_an_earlier_epoch(tmp_path):
    """Dead from epoch 1: the fit-end overlay drew epoch 0's field ("0.95 of the mass in 3 x 3") beside an
    effective size of 0 at the same step."""
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = RFCallback(layer="features", erf_samples=8)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger), callbacks=[callback])
    with recorded_warnings():
        trainer.fit(GoesDead(lr=0.0), *loaders())
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("rf/features/pos0/heatmap/effective")] == [4]  # epoch 0's, at its step
    assert "rf/features/pos0/overlay" not in events.Tags()["images"]


class CornerDeadThenAll(CornerDead):
    """CornerDead, then every unit dead from epoch 1 (a bias of -1e4)."""

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            with torch.no_grad():
                self.features[0].bias.fill_(-1e4)


def test_a_growth_curve_keeps_its_index_when_no_position_has_a_field_at_fit_end(tmp_path):
    """pos1 (5, 5) had a field at epoch 0 only, pos0 (0, 0) never: pos1's curve went under pos0 ("pos0 (5, 5)")."""
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = RFCallback(pos=[(0, 0), (5, 5)], layer="features", erf_samples=8)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger), callbacks=[callback])
    with recorded_warnings():
        trainer.fit(CornerDeadThenAll(), corner_data(8), corner_data(8))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [tag for tag in events.Tags()["images"] if tag.endswith(("growth", "overlay"))] == [
        "rf/features/pos1/growth"
    ]
    assert callback.state_dict()["effective_cells"] == {0: "0_0", 1: "5_5"}


def test_a_position_off_the_map_of_smaller_validation_inputs_leaves_the_others_measured(tmp_path):
    """Fields probed on 32 x 32 crops (a 16 x 16 map), validated on 16 x 16 images (an 8 x 8 map): pos0 (12, 12) lies
    off the validation map. The effective field failed for every position ("pos=(12, 12) is outside the output
    map ... (8, 8)"), so (2, 2) had no effective field, no coverage check and no alert either."""
    generator = torch.Generator().manual_seed(5)

    def images(side: int):
        data = torch.utils.data.TensorDataset(
            torch.randn(16, 1, side, side, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        )
        return torch.utils.data.DataLoader(data, batch_size=8)

    logger = TensorBoardLogger(tmp_path, name="run")
    callback = RFCallback(pos=[(12, 12), (2, 2)], layer="features", target_size=6, input_shape=(1, 1, 32, 32))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, logger=logger), callbacks=[callback])
    model = ConvClassifier(example=False)
    with recorded_warnings() as record:
        trainer.fit(model, images(32), images(16))
    off = [str(w.message) for w in record if "lies off the output map" in str(w.message)]
    assert len(off) == 1 and "position 0 of pos=[(12, 12), (2, 2)]" in off[0] and "input_shape=" in off[0]
    direct = effective_rf(model, callback.erf_inputs, (2, 2), layer="features")
    assert (
        callback.history[-1]["effective"]["2_2"]["extent0.95_h"]
        == direct.extent(0.95)[0][1] - direct.extent(0.95)[0][0] + 1
    )
    assert "rf/features/pos1/target/covered" in trainer.callback_metrics
    assert not [k for k in trainer.callback_metrics if "/pos0/" in k and ("effective" in k or "covered" in k)]
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    notes = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("rf/features/positions/text_summary")]
    assert any(
        "**pos0**: off the output map" in n and "**pos1**: output cell (2, 2) of a 8 × 8 map" in n for n in notes
    )
