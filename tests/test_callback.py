"""RFCallback inside real Trainer runs: what it logs, where, and what it must never disturb."""

from __future__ import annotations

import copy
import csv
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rf_callback import RFCallback, probe_rf
from tests.lightning_models import ConvClassifier, NoValidation, loaders, trainer_kwargs

SHAPE = (1, 1, 16, 16)
STEPS_PER_EPOCH = 4  # 32 samples, batches of 8


def read_events(logdir) -> EventAccumulator:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def fit(tmp_path, callbacks, model=None, **overrides):
    model = model or ConvClassifier()
    train, val = loaders()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **overrides), callbacks=callbacks)
    trainer.fit(model, train, val)
    return trainer, model


def test_fit_logs_scalars_and_images_at_fit_start_and_each_validation_epoch(tmp_path):
    initial = ConvClassifier()
    model = copy.deepcopy(initial)
    logger = TensorBoardLogger(tmp_path, name="run")
    fit(tmp_path, [RFCallback(layer="features")], model=model, logger=logger)
    events = read_events(logger.log_dir)
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    steps = [0, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for axis in "hw":
        for kind in ("theoretical", "weights"):
            assert f"rf/features/pos0/size_{axis}/{kind}" in scalars
            assert {
                f"rf-span/features/pos0/{kind}/first_{axis}",
                f"rf-span/features/pos0/{kind}/last_{axis}",
            } <= scalars
    assert {
        "rf/features/pos0/heatmap/weights",
        "rf/features/pos0/figure",
        "rf/features/pos0/heatmap/theoretical",
    } <= images
    size_h = events.Scalars("rf/features/pos0/size_h/weights")
    assert [e.step for e in size_h] == steps
    start = probe_rf(initial, SHAPE, "center", layer="features", mode="weights")
    end = probe_rf(model, SHAPE, "center", layer="features", mode="weights")
    assert size_h[0].value == start.size[0] and size_h[-1].value == end.size[0]
    last_w = events.Scalars("rf-span/features/pos0/weights/last_w")
    assert last_w[-1].value == end.bounds[1][1]
    theoretical = events.Scalars("rf/features/pos0/size_w/theoretical")  # a flat line beside the weights' size
    assert [(e.step, e.value) for e in theoretical] == [(step, 8.0) for step in steps]
    assert [e.step for e in events.Scalars("rf-span/features/pos0/theoretical/first_h")] == [0]
    assert [e.step for e in events.Images("rf/features/pos0/heatmap/weights")] == steps
    assert [e.step for e in events.Images("rf/features/pos0/heatmap/theoretical")] == [0]
    # Figures cost a few training steps each: drawn at fit start and at fit end only.
    assert [e.step for e in events.Images("rf/features/pos0/figure")] == [0, 2 * STEPS_PER_EPOCH]


def test_training_trajectory_is_bitwise_unchanged(tmp_path):
    def run(callbacks, folder):
        pl.seed_everything(7, workers=True)
        model = ConvClassifier()
        logger = CSVLogger(tmp_path / folder)
        train, val = loaders()
        trainer = pl.Trainer(**trainer_kwargs(tmp_path / folder, max_epochs=3, logger=logger), callbacks=callbacks)
        trainer.fit(model, train, val)
        with open(f"{logger.log_dir}/metrics.csv") as handle:
            rows = [
                (row["epoch"], row["step"], row["train_loss"], row["val_loss"])
                for row in csv.DictReader(handle)
                if row["train_loss"] or row["val_loss"]
            ]
        return model, trainer.optimizers[0].state_dict(), rows

    base_model, base_opt, base_rows = run([], "without")
    model, opt, rows = run([RFCallback(layer="features", every_n_epochs=1)], "with")
    for (name, a), (_, b) in zip(base_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name  # weights and BatchNorm statistics
    for a, b in zip(base_opt["state"].values(), opt["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert len(base_rows) == 3 * STEPS_PER_EPOCH + 3 and rows == base_rows  # every logged loss, to the last digit


class CheckpointedClassifier(ConvClassifier):
    """The same network, its features under gradient checkpointing (recomputed in the backward pass)."""

    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.checkpointed_steps = 0

    def forward(self, x):
        if torch.is_grad_enabled():
            self.checkpointed_steps += 1
            features = torch.utils.checkpoint.checkpoint(self.features, x, use_reentrant=self.use_reentrant)
        else:
            features = self.features(x)
        return self.head(features.mean(dim=(2, 3)))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_fit_under_gradient_checkpointing_is_probed_and_keeps_its_checkpoints(tmp_path, use_reentrant):
    """Every probe of such a model failed (the backward recomputed the forward outside the probe's function mode),
    so the callback only warned. The probe's copy runs the checkpointed function as a plain call; the training run
    keeps its checkpoints, and its losses are the same as without the callback."""

    def run(callbacks):
        pl.seed_everything(7, workers=True)
        model = CheckpointedClassifier(use_reentrant)
        fit(tmp_path, callbacks, model=model, logger=False, max_epochs=2)
        return model

    callback = RFCallback(layer="features", effective=False, log_images=False, strict=True)
    model = run([callback])
    assert [h["fields"][0]["size"] for h in callback.history] == [[8, 8]] * 3
    base_model = run([])
    assert all(torch.equal(a, b) for a, b in zip(base_model.state_dict().values(), model.state_dict().values()))
    assert model.checkpointed_steps == base_model.checkpointed_steps == 2 * STEPS_PER_EPOCH
    checkpointing = torch.utils.checkpoint  # put back after each probe
    assert checkpointing.CheckpointFunction.__name__ == "CheckpointFunction"
    assert checkpointing._checkpoint_without_reentrant_generator.__module__ == "torch.utils.checkpoint"


def test_validate_under_inference_mode_probes(tmp_path):
    model = ConvClassifier()
    _, val = loaders()
    callback = RFCallback(layer="features")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False), callbacks=[callback], inference_mode=True)
    trainer.validate(model, val)
    expected = probe_rf(model, SHAPE, "center", layer="features", mode="weights")
    assert trainer.callback_metrics["rf/features/pos0/size_h/weights"] == expected.size[0]
    assert callback.history[-1]["fields"][0]["bounds"] == [list(b) for b in expected.bounds]


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_reduced_precision_is_probed_in_float32(tmp_path, precision):
    callback = RFCallback(layer="features", mode="theoretical")
    trainer, _ = fit(tmp_path, [callback], precision=precision, max_epochs=1, logger=False)
    assert callback.history[-1]["fields"][0]["bounds"] == [[5, 12], [5, 12]]
    assert trainer.callback_metrics["rf/features/pos0/size_h/theoretical"] == 8


def test_the_fit_start_message_names_the_layer_as_the_logs_do(tmp_path, caplog):
    callback = RFCallback(layer="0", module="features", pos=(3, 3), log_images=False, effective=False)
    with caplog.at_level("INFO"):
        fit(tmp_path, [callback], max_epochs=1, logger=False)
    assert any("RFCallback: RF of layer 'features.0' at (3, 3): 3 x 3" in r.message for r in caplog.records)


def test_compiled_submodule_probe_sees_weights_changed_after_compiling(tmp_path):
    model = ConvClassifier()
    model.features = torch.compile(model.features, backend="eager")
    callback = RFCallback(layer="0", module="features", pos=(3, 3), input_shape=SHAPE, mode="weights")
    fit(tmp_path, [callback], model=model, max_epochs=1, logger=False)
    with torch.no_grad():  # after compiling and training: prune the live first conv to its centre tap
        conv = model.features._orig_mod[0]
        mask = torch.zeros_like(conv.weight)
        mask[..., 1, 1] = 1
        conv.weight.mul_(mask)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False), callbacks=[callback])
    trainer.validate(model, loaders()[1])
    assert callback.history[-1]["fields"][0]["size"] == [1, 1]


def test_csv_logger_only_warns_once_and_logs_scalars(tmp_path):
    logger = CSVLogger(tmp_path)
    with pytest.warns(UserWarning, match="no TensorBoardLogger, WandbLogger or MLFlowLogger") as record:
        fit(tmp_path, [RFCallback(layer="features")], logger=logger)
    assert sum("no TensorBoardLogger" in str(w.message) for w in record) == 1
    assert not any("gets the scalars only" in str(w.message) for w in record)  # a CSV file holds scalars only
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    tag = "rf/features/pos0/size_h/weights"
    assert [r[tag] for r in rows if r.get(tag)] != []


def test_no_logger_still_computes(tmp_path):
    callback = RFCallback(layer="features", log_images=False)
    trainer, _ = fit(tmp_path, [callback], logger=False)
    assert len(callback.history) == 3  # fit start and two validation epochs
    assert trainer.callback_metrics["rf/features/pos0/size_w/weights"] > 0


def test_without_validation_falls_back_to_train_epoch_end(tmp_path, caplog):
    callback = RFCallback(layer="features")
    model = NoValidation()
    train, _ = loaders()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False, limit_val_batches=0), callbacks=[callback])
    with caplog.at_level("INFO"):
        trainer.fit(model, train)
    assert [h["epoch"] for h in callback.history] == [None, 0, 1]
    assert sum("no validation loop" in r.message for r in caplog.records) == 1
    caplog.clear()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False, limit_val_batches=0), callbacks=[callback])
    with caplog.at_level("INFO"):  # reused for another run: what it says, it says again once
        trainer.fit(NoValidation(), train)
    assert sum("no validation loop" in r.message for r in caplog.records) == 1


def test_a_validation_step_without_validation_data_probes_at_training_epoch_ends(tmp_path):
    """Before, a module with a validation_step fitted without val data was never probed after fit start, silently."""
    callback = RFCallback(layer="features")
    train, _ = loaders()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False), callbacks=[callback])
    trainer.fit(ConvClassifier(), train)
    assert [h["epoch"] for h in callback.history] == [None, 0, 1]


@pytest.mark.parametrize(
    ("check_val", "every", "probed"), [(2, 2, [3, 7]), (3, 3, [8]), (2, 3, [5]), (1, 3, [2, 5, 8])]
)
def test_probes_come_every_check_val_times_every_n_epochs_training_epochs(tmp_path, check_val, every, probed):
    """As documented: every n-th validation epoch (before, (2, 2) probed after epochs 1, 3, 5, 7)."""
    callback = RFCallback(layer="features", every_n_epochs=every, log_images=False, effective=False)
    fit(tmp_path, [callback], logger=False, max_epochs=9, check_val_every_n_epoch=check_val, num_sanity_val_steps=0)
    assert [h["epoch"] for h in callback.history] == [None, *probed]


def test_probes_under_validation_by_steps_come_every_n_th_epoch_that_validated(tmp_path):
    """4 batches per epoch, validation every 6 steps across epochs: validations end epochs 1, 2, 4, 5, 7; every
    second of them is 2 and 5 (before, the training epoch's number decided: 1, 5 and 7)."""
    callback = RFCallback(layer="features", every_n_epochs=2, log_images=False, effective=False)
    fit(tmp_path, [callback], logger=False, max_epochs=8, check_val_every_n_epoch=None, val_check_interval=6,
        num_sanity_val_steps=0)  # fmt: skip
    assert [h["epoch"] for h in callback.history] == [None, 2, 5]


def test_fit_end_figures_are_drawn_over_inputs_of_any_number_of_channels(tmp_path):
    """Two channels (a stereo spectrogram): the overlay is drawn over their mean (before, every fit-end image failed,
    the growth curve too, which needs no input)."""
    model, logger = ConvClassifier(channels=2), TensorBoardLogger(tmp_path, name="run")
    train, val = loaders(channels=2)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, logger=logger),
                         callbacks=[RFCallback(layer="features", strict=True)])  # fmt: skip
    trainer.fit(model, train, val)
    images = set(read_events(logger.log_dir).Tags()["images"])
    assert {"rf/features/pos0/overlay", "rf/features/pos0/growth", "rf/features/pos0/figure"} <= images


def test_effective_fields_on_validation_inputs_shaped_otherwise_say_which_cells_they_are(tmp_path, caplog):
    """Probed on the 16 x 16 example, measured on 24 x 24 validation inputs: pos0 ("center") is cell (4, 4) of the
    probe's 8 x 8 map but (6, 6) of the inputs' 12 x 12 one. The note and a message say so (they said nothing)."""
    generator = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 24, 24, generator=generator), torch.zeros(16).long())
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = RFCallback(layer="features", log_images=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger), callbacks=[callback])
    with caplog.at_level("INFO"):
        trainer.fit(ConvClassifier(), loader, loader)
    said = [r.message for r in caplog.records if "validation inputs of shape (1, 24, 24)" in r.message]
    assert len(said) == 1 and "pos0 is cell (6, 6) of a 12 x 12 map" in said[0]
    notes = [e.tensor_proto.string_val[0].decode() for e in read_events(logger.log_dir).Tensors(
        "rf/features/positions/text_summary")]  # fmt: skip
    assert "output cell (4, 4) of a 8 × 8 map" in notes[0]
    assert len(notes) == 2 and "validation inputs 1 × 24 × 24" in notes[1]
    assert "output cell (6, 6) of a 12 × 12 map: theoretical field 8 × 8 (input indices 9..16, 9..16)" in notes[1]


def test_a_fit_under_lightnings_model_pruning_probes_every_epoch(tmp_path):
    """ModelPruning leaves pruning masks on the model between epochs: the theoretical copy multiplied its constant
    weights by them, and with 95 % pruned found no field at all (or a smaller one). It is the architecture's."""
    from lightning.pytorch.callbacks import ModelPruning

    callback = RFCallback(layer="features", mode="theoretical", strict=True, log_images=False, effective=False)
    pruning = ModelPruning("l1_unstructured", amount=0.95, make_pruning_permanent=False, verbose=0)
    trainer, model = fit(tmp_path, [pruning, callback], logger=False, max_epochs=3)
    assert hasattr(model.features[0], "weight_mask")  # the masks were there when the later epochs were probed
    sizes = [entry["fields"][0]["size"] for entry in callback.history]
    assert sizes == [[8, 8]] * 4  # fit start, then epochs 0, 1, 2


class GrowsItsFirstKernel(ConvClassifier):
    """A network grown during the fit: from epoch 1 its first convolution is 7 x 7 (r = 1 + 6 + 1 + 4 = 12)."""

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            self.features[0] = torch.nn.Conv2d(1, 8, 7, padding=3)


def test_a_network_whose_layers_change_during_the_fit_gets_its_theoretical_field_probed_again(tmp_path, caplog):
    """The theoretical field was probed once per fit: after the change it logged 8 beside a weights field of up to
    12, and the effective field's ratios were to 8."""
    callback = RFCallback(layer="features", log_images=False)
    with caplog.at_level("INFO"):
        trainer, _ = fit(tmp_path, [callback], model=GrowsItsFirstKernel(), logger=False)
    assert trainer.callback_metrics["rf/features/pos0/size_h/theoretical"] == 12
    assert (
        sum("layers changed; now RF of layer 'features' at (4, 4): 12 x 12" in r.message for r in caplog.records) == 1
    )
    effective = callback.history[-1]["effective"]["4_4"]
    assert effective["extent0.95_ratio_h"] == effective["extent0.95_h"] / 12


def test_stochastic_weight_averaging_changes_no_layer_in_the_callbacks_eyes(tmp_path, caplog):
    """Lightning's StochasticWeightAveraging sets every BatchNorm's momentum to None for the epoch that recomputes
    their statistics: the callback said "the probed model's layers changed", probed the theoretical field again and
    logged it a second time, where nothing the field depends on changed."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    callback = RFCallback(layer="features", log_images=False, effective=False)
    averaging = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    with caplog.at_level("INFO"):
        fit(tmp_path, [averaging, callback], logger=False, max_epochs=3)
    assert [entry["fields"][0]["size"] for entry in callback.history][-1] == [8, 8]
    assert not [r.message for r in caplog.records if "the probed model's" in r.message]


class MaskedConv(torch.nn.Conv2d):
    """A convolution pruned by a mask of its own, held in a buffer (not ``torch.nn.utils.prune``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.ones_like(self.weight))

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


class ParameterMaskedConv(MaskedConv):
    """The same, its mask held in a frozen parameter (which the theoretical copy keeps, as a buffer)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.mask
        self.mask = torch.nn.Parameter(torch.ones_like(self.weight), requires_grad=False)


class CutsItsSecondKernel(ConvClassifier):
    """From epoch 1 the second 3 x 3 convolution keeps its centre tap only: r = 1 + 2 + 1 = 4 instead of 8."""

    def __init__(self, conv: type[MaskedConv] = MaskedConv):
        super().__init__()
        self.features[4] = conv(8, 8, 3, padding=1)

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            with torch.no_grad():
                self.features[4].mask.zero_()
                self.features[4].mask[..., 1, 1] = 1


@pytest.mark.parametrize("conv", [MaskedConv, ParameterMaskedConv], ids=["buffer", "frozen_parameter"])
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_mask_held_in_a_buffer_and_cut_during_the_fit_gets_the_theoretical_field_probed_again(tmp_path, mode, conv):
    """The theoretical copy reads a buffer (or a mask in a frozen parameter) as it is, so a mask cut in place changes
    the architecture's field; the callback kept the field of the uncut mask (logged 8 for 4, and the effective
    field's ratios were to 8)."""
    callback = RFCallback(layer="features", mode=mode, log_images=False)
    trainer, model = fit(tmp_path, [callback], model=CutsItsSecondKernel(conv), logger=False)
    assert probe_rf(model, (1, 1, 16, 16), (4, 4), layer="features").size == (4, 4)
    assert trainer.callback_metrics["rf/features/pos0/size_h/theoretical"] == 4
    effective = callback.history[-1]["effective"]["4_4"]
    assert effective["extent0.95_ratio_h"] == effective["extent0.95_h"] / 4


def test_a_network_whose_layers_change_during_the_fit_logs_its_new_theoretical_spans_and_heatmap(tmp_path):
    """The spans and heatmap of the theoretical field were logged at fit start only: after the change, the latest
    span (8 wide) contradicted the latest size (12)."""
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = RFCallback(layer="features", effective=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger), callbacks=[callback])
    model = GrowsItsFirstKernel()
    trainer.fit(model, *loaders())
    (first, last), _ = probe_rf(model, (1, 1, 16, 16), (4, 4), layer="features").bounds
    assert last - first + 1 == 12
    events = read_events(logger.log_dir)
    spans = [(e.step, e.value) for e in events.Scalars("rf-span/features/pos0/theoretical/first_h")]
    assert spans[-1] == (2 * STEPS_PER_EPOCH, first) and len(spans) == 2
    assert [(e.step, e.value) for e in events.Scalars("rf-span/features/pos0/theoretical/last_h")][-1][1] == last
    assert [e.step for e in events.Images("rf/features/pos0/heatmap/theoretical")] == [0, 2 * STEPS_PER_EPOCH]


class Grows(torch.nn.Module):
    """``features``, then from when ``active`` is set a third 3 x 3 convolution (r = 8 + 2 * 2 = 12)."""

    def __init__(self, features):
        super().__init__()
        self.features, self.extra, self.active = features, torch.nn.Conv2d(8, 8, 3, padding=1), False

    def forward(self, x):
        y = self.features(x)
        return self.extra(y) if self.active else y


class ActivatesBlocks(ConvClassifier):
    """A network grown by an attribute its forward reads, from epoch 1: no layer is added, replaced or changed."""

    def __init__(self):
        super().__init__()
        self.features = Grows(self.features)

    def on_train_epoch_start(self):
        self.features.active = self.current_epoch >= 1


def test_a_network_grown_by_an_attribute_its_forward_reads_gets_its_theoretical_field_probed_again(tmp_path, caplog):
    """Only a change of the layers set off a new theoretical probe: the field logged 8 beside a weights field of 12,
    and the effective field's ratios were to 8 (above 1). The weights field reaching past the theoretical one,
    where it lay inside, shows the change; each size is logged once per step."""
    logger = CSVLogger(tmp_path, name="run")
    callback = RFCallback(layer="features", mode="weights", log_images=False)
    with caplog.at_level("INFO"):
        trainer, _ = fit(tmp_path, [callback], model=ActivatesBlocks(), logger=logger, max_epochs=3)
    sizes = [entry["fields"][0]["size"] for entry in callback.history]
    assert sizes == [[8, 8], [8, 8], [12, 12], [12, 12]]  # fit start, then epochs 0, 1, 2
    assert trainer.callback_metrics["rf/features/pos0/size_h/theoretical"] == 12
    said = [r.message for r in caplog.records if "forward changed (no layer did); now" in r.message]
    assert len(said) == 1 and "12 x 12" in said[0]
    effective = callback.history[-1]["effective"]
    assert all(metrics["extent0.95_ratio_h"] <= 1 for metrics in effective.values())
    with open(logger.log_dir + "/metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("rf/features/pos0/size_h/theoretical")]
    steps = [int(row["step"]) for row in rows]
    assert len(steps) == len(set(steps))


class DeactivatesBlocks(ActivatesBlocks):
    """A network shrunk by an attribute its forward reads: the third convolution runs in epoch 0 only."""

    def on_train_epoch_start(self):
        self.features.active = self.current_epoch == 0


def test_a_network_shrunk_by_an_attribute_its_forward_reads_gets_its_theoretical_field_probed_again(tmp_path):
    """A weights field that shrinks stays inside the kept theoretical field, which showed no change: the callback
    logged the theoretical size 12 of the forward before (8 now), and the effective ratios were to 12."""
    callback = RFCallback(layer="features", mode="weights", log_images=False)
    model = DeactivatesBlocks()
    model.features.active = True
    trainer, _ = fit(tmp_path, [callback], model=model, logger=False, max_epochs=2)
    assert trainer.callback_metrics["rf/features/pos0/size_h/theoretical"] == 8
    assert [entry["fields"][0]["size"] for entry in callback.history] == [[12, 12], [12, 12], [8, 8]]
    effective = callback.history[-1]["effective"]["4_4"]
    assert effective["extent0.95_ratio_h"] == effective["extent0.95_h"] / 8


class ReadsItsOwnFlag(ConvClassifier):
    """The LightningModule's own forward reads a flag of its own: a third 3 x 3 convolution runs in epoch 0 only."""

    def __init__(self):
        super().__init__()
        self.extra, self.active = torch.nn.Conv2d(8, 8, 3, padding=1), True
        self.example_input_array = None

    def forward(self, x):
        y = self.features(x)
        return self.extra(y) if self.active else y

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.head(self(batch[0]).mean(dim=(2, 3))), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.cross_entropy(self.head(self(batch[0]).mean(dim=(2, 3))), batch[1]))

    def on_train_epoch_start(self):
        self.active = self.current_epoch == 0


def test_a_flag_the_lightning_modules_own_forward_reads_gets_the_theoretical_field_probed_again(tmp_path):
    """A LightningModule's own values are left out as bookkeeping, except those its forward reads."""
    callback = RFCallback(mode="weights", log_images=False)
    trainer, model = fit(tmp_path, [callback], model=ReadsItsOwnFlag(), logger=False, max_epochs=2)
    assert probe_rf(model, (1, 1, 16, 16), (4, 4)).size == (8, 8)
    assert trainer.callback_metrics["rf/output/pos0/size_h/theoretical"] == 8


class KeepsItsBooks(ConvClassifier):
    """A LightningModule's own bookkeeping, a metric's counts and a buffer made under inference mode: none of them
    changes what the theoretical copy reads."""

    def __init__(self):
        super().__init__()
        import torchmetrics

        self.best_val_loss, self.seen = float("inf"), 0
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)
        with torch.inference_mode():  # as a grid built lazily during a trainer.validate()
            self.features[0].register_buffer("grid", torch.zeros(3))

    def training_step(self, batch, batch_idx):
        self.seen += len(batch[0])
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.val_acc(self(batch[0]), batch[1])
        return super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self):
        self.best_val_loss = min(self.best_val_loss, float(self.trainer.callback_metrics.get("val_loss", 0.0)))


def test_bookkeeping_that_the_forward_does_not_read_sets_off_no_theoretical_probe(tmp_path, monkeypatch):
    """A best validation loss, a sample count and a torchmetrics metric's counts changed every epoch, and each change
    cost a theoretical probe; reading a buffer made under inference mode's version raised."""
    from rf_callback.callback.fields import FieldProber

    modes: list[str] = []
    probe = FieldProber.probe
    monkeypatch.setattr(FieldProber, "probe", lambda self, module, mode, shape: modes.append(mode) or probe(
        self, module, mode, shape))  # fmt: skip
    callback = RFCallback(layer="features", log_images=False, strict=True)
    fit(tmp_path, [callback], model=KeepsItsBooks(), logger=False, max_epochs=3)
    assert modes.count("theoretical") == 1 and modes.count("weights") == 4


class Residual(torch.nn.Module):
    """A residual 3 x 3 convolution whose GroupNorm starts at zero (``zero_init_last``)."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.GroupNorm(2, 8)
        torch.nn.init.zeros_(self.norm.weight)

    def forward(self, x):
        return x + self.norm(self.conv(x))


class ZeroInitialisedResidual(ConvClassifier):
    """Its weights field is the first convolution's until the branch wakes, then the whole input (the GroupNorm's
    statistics join every position, which the theoretical copy holds constant)."""

    def __init__(self):
        super().__init__(lr=0.5)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), Residual())


def test_a_weights_field_that_reaches_past_the_theoretical_one_by_a_groupnorm_says_no_change(tmp_path, caplog):
    """The branch woke and the weights field went from inside the theoretical one to the whole input: the callback
    said "the forward changed" and wrote a new positions note, although the theoretical field probed again was the
    same. It probes again, says nothing where nothing changed, and does not ask again."""
    pl.seed_everything(0, verbose=False)
    callback = RFCallback(layer="features", mode="weights", log_images=False, effective=False)
    with caplog.at_level("INFO"):
        fit(tmp_path, [callback], model=ZeroInitialisedResidual(), logger=False, max_epochs=3)
    bounds = [entry["fields"][0]["bounds"] for entry in callback.history]
    assert bounds[0] == [[7, 9], [7, 9]] and bounds[-1] == [[0, 15], [0, 15]]  # inside, then past it
    assert not [r.message for r in caplog.records if "the probed model's" in r.message]
    assert callback._prober.theoretical[0].bounds == ((6, 10), (6, 10))


def test_under_weight_averaging_the_probe_measures_the_weights_validation_ran_on(tmp_path):
    """``EMAWeightAveraging`` swaps the average in for validation and back out in its own
    ``on_validation_epoch_end``: placed before RFCallback (the natural order) the probe measured the live weights,
    which validation never ran and ``fit`` does not return, and what it logged depended on the callbacks' order."""
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks, "EMAWeightAveraging"):
        pytest.skip("EMAWeightAveraging is Lightning 2.6's")

    class Validated(pl.Callback):
        def __init__(self):
            self.weights = {}

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 0 and not trainer.sanity_checking:
                self.weights[trainer.current_epoch] = copy.deepcopy(pl_module.features)

    logged = {}
    for order in ("averaging first", "probe first"):
        averaging, validated = callbacks.EMAWeightAveraging(decay=0.5), Validated()
        callback = RFCallback(layer="features", mode="weights", log_images=False, erf_samples=8)
        order_of = [averaging, callback] if order == "averaging first" else [callback, averaging]
        pl.seed_everything(0, verbose=False)
        fit(tmp_path, [*order_of, validated], model=ConvClassifier(lr=0.5), logger=False, max_epochs=2)
        for entry in callback.history[1:]:
            ran_on = validated.weights[entry["epoch"]]
            weights = probe_rf(ran_on, SHAPE, (4, 4), mode="weights").bounds
            assert [list(b) for b in weights] == entry["fields"][0]["bounds"], order
        logged[order] = [entry["effective"] for entry in callback.history[1:]]
    assert logged["averaging first"] == logged["probe first"]


def test_a_fit_resumed_from_a_checkpoint_without_the_callback_logs_its_first_probe_at_the_restored_step(tmp_path):
    """The first probe sees the restored weights of step 4: it was logged as the initial weights of step 0."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, [checkpoint], max_epochs=1, logger=False, enable_checkpointing=True)
    callback, logger = RFCallback(layer="features", log_images=False), TensorBoardLogger(tmp_path, name="run")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger), callbacks=[callback])
    trainer.fit(ConvClassifier(), *loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [(h["epoch"], h["step"]) for h in callback.history] == [(None, STEPS_PER_EPOCH), (1, 2 * STEPS_PER_EPOCH)]
    steps = [e.step for e in read_events(logger.log_dir).Scalars("rf/features/pos0/size_h/weights")]
    assert steps == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_input_shape_from_first_batch_without_example_input_array(tmp_path):
    callback = RFCallback(layer="features")
    fit(tmp_path, [callback], model=ConvClassifier(example=False), logger=False, max_epochs=1)
    assert callback.input_shape == SHAPE
    assert callback.history[0]["fields"][0]["input_shape"] == list(SHAPE)


def test_a_fit_that_sees_no_batch_ends_quietly(tmp_path):
    # No batch, no input shape, no probe: fit end has nothing to draw (it once failed on the unknown shape).
    callback = RFCallback(layer="features", strict=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_train_batches=0, limit_val_batches=0), callbacks=[callback])
    trainer.fit(ConvClassifier(example=False), *loaders())
    assert callback.input_shape is None and callback.history == []


def test_resume_continues_history_without_logging_initial_field_twice(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = RFCallback(layer="features")
    fit(tmp_path, [first, checkpoint], max_epochs=1, logger=False, enable_checkpointing=True)
    assert [h["epoch"] for h in first.history] == [None, 0]
    resumed = RFCallback(layer="features")
    train, val = loaders()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=False, enable_checkpointing=True),
                         callbacks=[resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")])  # fmt: skip
    trainer.fit(ConvClassifier(), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history] == [None, 0, 1]


class Tested(ConvClassifier):
    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)


def test_testing_or_validating_a_checkpoint_after_fit_keeps_the_fits_history(tmp_path):
    """Lightning restores every callback's state for ``test`` and ``validate`` with a ``ckpt_path`` too: the
    checkpoint's history (of its epoch) replaced the fit's, and the alert state went back with it. The fit's history
    stays; a validation of a checkpoint adds its own probe."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    callback = RFCallback(layer="features", target_size=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, logger=False, enable_checkpointing=True),
                         callbacks=[callback, checkpoint])  # fmt: skip
    train, val = loaders()
    trainer.fit(Tested(), train, val)
    fitted = [(h["epoch"], h["step"]) for h in callback.history]
    assert fitted == [(None, 0), (0, 4), (1, 8), (2, 12)]
    checks = {name: tracker.checks for name, tracker in callback.trackers.items()}
    trainer.test(dataloaders=val, ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    assert [(h["epoch"], h["step"]) for h in callback.history] == fitted
    assert {name: tracker.checks for name, tracker in callback.trackers.items()} == checks
    trainer.validate(dataloaders=val, ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    assert [(h["epoch"], h["step"]) for h in callback.history] == [*fitted, (3, 12)]
    # Another model starts the callback afresh: it takes the checkpoint's history, and adds its probe.
    trainer.validate(Tested(), val, ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    assert [(h["epoch"], h["step"]) for h in callback.history][:-1] == fitted[:3]
    # A callback that fitted nothing shows the history of the checkpoint it last tested.
    fresh = RFCallback(layer="features", target_size=4)
    tester = pl.Trainer(**trainer_kwargs(tmp_path, logger=False), callbacks=[fresh])
    for epoch in (0, 2):
        tester.test(Tested(), val, ckpt_path=str(tmp_path / "ckpt" / f"epoch={epoch}.ckpt"))
    assert [(h["epoch"], h["step"]) for h in fresh.history] == fitted


class WideFirstLayer(ConvClassifier):
    """ConvClassifier with a 5 x 5 first convolution: r = 1 + 4 + 1 + 2*2 = 10 at ``features``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.features[0] = torch.nn.Conv2d(1, 8, 5, padding=2)


def test_a_callback_reused_for_another_model_starts_afresh(tmp_path):
    """A sweep that builds its callbacks once: the second fit's fields are its own model's (they were the first's:
    its theoretical size logged beside the second model's weights, no initial probe, the first fit's inputs)."""
    callback = RFCallback(layer="features", pos=(4, 4))
    first, _ = fit(tmp_path / "a", [callback], model=WideFirstLayer(), logger=CSVLogger(tmp_path / "a"), max_epochs=1)
    assert [h["epoch"] for h in callback.history] == [None, 0]
    assert first.callback_metrics["rf/features/pos0/size_h/theoretical"] == 10
    generator = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 24, 24, generator=generator), torch.zeros(16).long())
    model = ConvClassifier(example=False)  # a 3 x 3 first layer, on 24 x 24 inputs found in the batches
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", max_epochs=1, logger=CSVLogger(tmp_path / "b")),
                         callbacks=[callback])  # fmt: skip
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer.fit(model, loader, loader)
    assert [h["epoch"] for h in callback.history] == [None, 0]
    assert callback.input_shape == (1, 1, 24, 24) and callback.erf_inputs.shape[-2:] == (24, 24)
    assert trainer.callback_metrics["rf/features/pos0/size_h/theoretical"] == 8
    assert probe_rf(model, (1, 1, 24, 24), (4, 4), layer="features").size == (8, 8)


def test_fit_called_again_on_the_same_trainer_and_model_continues_the_history(tmp_path):
    callback = RFCallback(layer="features")
    model, (train, val) = ConvClassifier(), loaders()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, logger=False), callbacks=[callback])
    trainer.fit(model, train, val)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, train, val)
    assert [h["epoch"] for h in callback.history] == [None, 0, 1]


def test_a_resumed_fit_logs_the_charts_and_note_but_not_the_initial_field_again(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    board = TensorBoardLogger(tmp_path, name="run")
    fit(tmp_path, [RFCallback(layer="features"), checkpoint], max_epochs=1, logger=board, enable_checkpointing=True)
    resumed_board = TensorBoardLogger(tmp_path, name="run")  # a new version
    train, val = loaders()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=resumed_board, enable_checkpointing=True),
                         callbacks=[RFCallback(layer="features")])  # fmt: skip
    trainer.fit(ConvClassifier(), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed_board.log_dir != board.log_dir
    events = read_events(resumed_board.log_dir)
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    assert "rf/features/positions/text_summary" in events.Tags()["tensors"]
    assert [e.step for e in events.Scalars("rf/features/pos0/size_h/weights")] == [2 * STEPS_PER_EPOCH]


def test_positions_naming_one_cell_twice_are_refused_before_training(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"positions \[\(7, 7\), \(7, 7\)\] name the same output"):
        fit(tmp_path, [RFCallback(layer="features", pos=[(7, 7), (-1, -1)])], logger=False)


class Series(pl.LightningModule):
    """Two 1D convolutions on 32-step series (the second of stride 2): output i reads inputs 2i .. 2i + 6."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 5, padding=2), torch.nn.Conv1d(4, 4, 3, stride=2))
        self.example_input_array = torch.zeros(1, 1, 32)

    def forward(self, x):
        return self.features(x)

    def training_step(self, batch, _index):
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_list_of_ints_on_a_1d_map_probes_as_many_positions_as_probe_rf_does(tmp_path):
    """``pos=[3, 4]`` is two positions on a 1D map in probe_rf; the callback read it as one position of two indices
    and stopped the fit. On a 2D map it stays one position."""
    series = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 1, 32)), batch_size=4)
    callback = RFCallback(pos=[3, -4], layer="features")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[callback])
    trainer.fit(Series(), series)
    assert callback.positions == [(3,), (-4,)]  # as given: -4 counts from the end of every map it is read on
    for index, position in enumerate((3, 11)):
        assert trainer.callback_metrics[f"rf/features/pos{index}/size_l/theoretical"] == 7
        assert trainer.callback_metrics[f"rf-span/features/pos{index}/weights/first_l"] >= 2 * position - 2
    trainer, _ = fit(tmp_path, [RFCallback(layer="features", pos=[4, 4])], logger=False, max_epochs=1)
    assert "rf/features/pos1/size_h/theoretical" not in trainer.callback_metrics


def test_fit_end_pictures_are_logged_at_the_step_of_the_probe_they_show(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    fit(tmp_path, [RFCallback(layer="features", every_n_epochs=2)], max_epochs=3, logger=logger)
    events = read_events(logger.log_dir)
    probes = [e.step for e in events.Scalars("rf/features/pos0/size_h/weights")]
    assert probes == [0, 2 * STEPS_PER_EPOCH]  # no probe after the third epoch
    for image in ("figure", "overlay", "growth"):
        assert events.Images(f"rf/features/pos0/{image}")[-1].step == probes[-1], image


def test_two_callbacks_share_a_trainer(tmp_path):
    a, b = RFCallback(layer="features", pos=(1, 1)), RFCallback(layer="features.0", pos=[(2, 2), (5, 5)])
    assert a.state_key != b.state_key
    trainer, _ = fit(tmp_path, [a, b], logger=False, max_epochs=1)
    assert "rf/features/pos0/size_h/weights" in trainer.callback_metrics
    assert trainer.callback_metrics["rf/features.0/pos1/size_h/weights"] == 3  # pos1 is (5, 5)
    assert len(b.history[-1]["fields"]) == 2


def test_probe_failure_warns_and_training_goes_on_unless_strict(tmp_path):
    class Diverging(ConvClassifier):
        def on_validation_epoch_start(self):
            with torch.no_grad():
                self.features[0].weight[0, 0, 0, 0] = float("nan")

        def validation_step(self, batch, batch_idx):
            pass

    with pytest.warns(UserWarning, match="the probe failed, training goes on.*not finite"):
        trainer, _ = fit(tmp_path, [RFCallback(layer="features")], model=Diverging(), logger=False)
    assert trainer.current_epoch == 2
    with pytest.raises(Exception, match="not finite"):
        fit(tmp_path, [RFCallback(layer="features", strict=True)], model=Diverging(), logger=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pos": "middle"}, r"pos='middle'"),
        ({"pos": (1.5, 2)}, r"pos=\(1.5, 2\)"),
        ({"layer": ""}, r"layer=''"),
        ({"module": 3}, r"module=3"),
        ({"mode": "exact"}, r"mode='exact'.*one of"),
        ({"every_n_epochs": 0}, r"every_n_epochs=0"),
        ({"draws": 0}, r"draws=0"),
        ({"input_shape": (16, 16)}, r"input_shape=\(16, 16\)"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        RFCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer": "features", "pos": (8, 8)}, r"pos=\(8, 8\) is outside the output map .* \(8, 8\)"),
        ({"layer": "featurez"}, r"layer='featurez' is not a submodule.*'features'"),
        ({"module": "backbone"}, r"module='backbone'\) is not a submodule of ConvClassifier; some names: \['features'"),
        ({}, r"no spatial axes.*layer="),
    ],
)
def test_arguments_that_do_not_fit_the_model_fail_before_the_first_step(tmp_path, kwargs, match):
    model = ConvClassifier()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(MisconfigurationException, match=match):
        fit(tmp_path, [RFCallback(**kwargs)], model=model, logger=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_input_shape_is_explained(tmp_path):
    class Unshaped(ConvClassifier):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["x"], batch["y"]), batch_idx)

    data = [{"x": "not a tensor", "y": 0}]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False), callbacks=[RFCallback(layer="features")])
    with pytest.raises(MisconfigurationException, match="cannot find the input shape.*input_shape="):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Unshaped(example=False), torch.utils.data.DataLoader(data, batch_size=None))


class TrainerStandIn:
    """What ``RFCallback.setup`` reads of a Trainer: its strategy."""

    def __init__(self, strategy):
        self.strategy = strategy


def test_deepspeed_stage_3_alone_is_refused_with_the_strategy_to_use():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    # FSDP needs GPUs to build a Trainer; setup reads only the strategy, so it gets a real one directly.
    RFCallback().setup(TrainerStandIn(strategy=FSDPStrategy()), ConvClassifier(), "fit")
    # DeepSpeed is not installed here: a strategy of its name and stage stands in (the check reads no more).
    for stage_3, refused in ((True, True), (False, False)):
        deepspeed = type("DeepSpeedStrategy", (), {"zero_stage_3": stage_3})()
        if refused:
            with pytest.raises(MisconfigurationException, match="ZeRO stage 3.*stage 1 or 2"):
                RFCallback().setup(TrainerStandIn(strategy=deepspeed), ConvClassifier(), "fit")
        else:
            RFCallback().setup(TrainerStandIn(strategy=deepspeed), ConvClassifier(), "fit")
    RFCallback().setup(TrainerStandIn(strategy=ModelParallelStrategy()), ConvClassifier(), "fit")


def test_pytorch_lightning_trainer_accepts_the_same_class(tmp_path):
    pytorch_lightning = pytest.importorskip("pytorch_lightning")

    class Classic(pytorch_lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
            self.head = torch.nn.Linear(4, 3)
            self.example_input_array = torch.zeros(1, 1, 16, 16)

        def forward(self, x):
            return self.head(self.features(x).mean(dim=(2, 3)))

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    from rf_callback.pl import RFCallback as ClassicRFCallback

    callback = ClassicRFCallback(layer="features")
    trainer = pytorch_lightning.Trainer(**trainer_kwargs(tmp_path, logger=False), callbacks=[callback])
    trainer.fit(Classic(), *loaders())
    assert trainer.callback_metrics["rf/features/pos0/size_h/weights"] == 3
    assert len(callback.history) == 3


def test_probe_device_cpu_logs_the_same_fields(tmp_path):
    logged = []
    for device in (None, "cpu"):
        model = ConvClassifier()
        torch.manual_seed(0)
        model.load_state_dict(ConvClassifier().state_dict())
        train, val = loaders()
        callback = RFCallback(layer="features", probe_device=device)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path / str(device), max_epochs=1, logger=False), callbacks=[callback])
        pl.seed_everything(3)
        trainer.fit(model, train, val)
        logged.append([entry["fields"] for entry in callback.history])
    assert logged[0] == logged[1] and logged[0]


def test_a_validation_before_fit_leaves_every_epoch_of_the_fit_probed(tmp_path):
    model = ConvClassifier()
    callback = RFCallback(layer="features", log_images=False, effective=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False, max_epochs=2), callbacks=[callback])
    trainer.validate(model, loaders()[1])  # a baseline validation at epoch 0, step 0
    trainer.fit(model, *loaders())
    fit_probes = [entry["epoch"] for entry in callback.history[1:] if entry["epoch"] is not None]
    assert fit_probes == [0, 1]


def test_two_callbacks_on_one_layer_are_refused_since_their_names_would_mix(tmp_path):
    a, b = RFCallback(layer="features", pos=(1, 1)), RFCallback(layer="features", pos=(4, 4), mode="theoretical")
    with pytest.raises(
        MisconfigurationException,
        match=r"two RFCallbacks probe layer 'features' with pos=\(4, 4\) and pos=\(1, 1\).*pos=\[\.\.\.\]",
    ):
        fit(tmp_path, [a, b], logger=False, max_epochs=1)


def test_one_cell_spelled_as_a_list_and_as_a_tuple_is_one_position(tmp_path):
    """A LightningCLI config gives pos=[4, 4] where Python code gives (4, 4): two callbacks on the layer in two modes
    were refused as probing other positions."""
    a = RFCallback(layer="features", pos=[4, 4], log_images=False, effective=False)
    b = RFCallback(layer="features", pos=(4, 4), mode="theoretical", log_images=False, effective=False)
    fit(tmp_path, [a, b], logger=False, max_epochs=1)
    assert a.history[-1]["fields"][0]["position"] == b.history[-1]["fields"][0]["position"]


def test_two_callbacks_on_one_layer_that_read_the_effective_extent_at_other_masses_are_refused(tmp_path):
    """Both logged size_h/effective, covered and margin under the same names: the logger got 3 and 7 at one step, and
    callback_metrics held neither callback's value."""
    a = RFCallback(layer="features", coverage_mass=0.5, log_images=False)
    b = RFCallback(layer="features", coverage_mass=0.99, mode="theoretical", log_images=False)
    with pytest.raises(MisconfigurationException, match=r"with coverage_mass=0.5 and coverage_mass=0.99"):
        fit(tmp_path, [b, a], logger=False, max_epochs=1)


def test_positions_given_as_index_arrays_are_the_cells_probe_rf_reads(tmp_path):
    """``pos=np.nonzero(mask)`` (one array of indices per axis) was read by the callback as rows: (1, 5) and (6, 2)
    for the cells (1, 6) and (5, 2) that probe_rf reads; 0-d tensors (torch.unravel_index) raised a TypeError;
    arrays of unequal lengths are refused, and a count's refusal named a fix, not the refused value."""
    import numpy as np

    mask = np.zeros((8, 8), dtype=bool)
    mask[1, 6] = mask[5, 2] = True
    assert RFCallback(layer="features", pos=np.nonzero(mask)).positions == [(1, 6), (5, 2)]
    assert RFCallback(layer="features", pos=torch.nonzero(torch.from_numpy(mask), as_tuple=True)).positions == [
        (1, 6),
        (5, 2),
    ]
    assert RFCallback(layer="features", pos=torch.unravel_index(torch.tensor(42), (8, 8))).positions == [(5, 2)]
    with pytest.raises(MisconfigurationException, match=r"of lengths \[2, 1\]"):
        RFCallback(layer="features", pos=(np.array([1, 5]), np.array([6])))
    with pytest.raises(MisconfigurationException, match=r"erf_samples must be an int >= 1 .*; e\.g\. erf_samples=\d"):
        RFCallback(erf_samples=0)
    with pytest.raises(MisconfigurationException, match=r"empty index arrays .* names no position"):
        RFCallback(layer="features", pos=np.nonzero(np.zeros((8, 8), dtype=bool)))
    # One cell on a 1D map reads alike as rows and as columns: the key of checkpoints written before stays.
    one = np.zeros(8, dtype=bool)
    one[3] = True
    assert RFCallback(pos=np.nonzero(one)).state_key == (
        "RFCallback{'pos': '([3],)', 'layer': None, 'module': None, 'mode': 'weights'}"
    )
    callback = RFCallback(layer="features", pos=np.nonzero(mask))
    fit(tmp_path, [callback], logger=False, max_epochs=1)
    assert [f["position"] for f in callback.history[-1]["fields"]] == [[1, 6], [5, 2]]
