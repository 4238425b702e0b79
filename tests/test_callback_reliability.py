"""RFCallback never ends the user's training run but for a wrong argument, and never reads the user's data itself.

Real Trainer runs on CPU: whatever fails inside the callback (a probe at fit start or in a validation epoch, the
effective field, a figure, a logger) warns once with the reason and the fix and training goes on, unless strict;
the effective field's inputs come from the batches the Trainer hands over, so a streaming data set is read exactly
as often as without the callback; every argument is checked at construction.
"""

from __future__ import annotations

import pickle
import threading

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

import rf_callback.callback.reporting as reporting_module
from rf_callback import ProbeError, RFCallback, effective_rf, probe_rf
from rf_callback.callback.sampling import InputReservoir
from tests.lightning_models import (
    ConvClassifier,
    CountingStream,
    DictBatchClassifier,
    LockedClassifier,
    NamedBatchClassifier,
    RecordingClassifier,
    ShrinkingField,
    dict_loaders,
    loaders,
    named_loaders,
    trainer_kwargs,
)
from tests.recording import recorded_warnings

FAILED = "failed, training goes on"


def fit(tmp_path, callbacks, model, train, val, **overrides):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **overrides), callbacks=callbacks)
    trainer.fit(model, train, val)
    return trainer


def callback_warnings(record, text: str = "RFCallback") -> list[str]:
    return [str(w.message) for w in record if text in str(w.message)]


# -- the data loaders are the Trainer's


class _ValidationBatches(Callback):
    """Keeps the inputs of the validation batches of epoch 0, and the callback's choice after each validation epoch."""

    def __init__(self):
        self.first_epoch: list[torch.Tensor] = []
        self.choices: list[torch.Tensor] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and trainer.current_epoch == 0:
            self.first_epoch.append(batch[0].detach().clone())

    def on_validation_epoch_end(self, trainer, pl_module):
        rf = next(c for c in trainer.callbacks if isinstance(c, RFCallback))
        if not trainer.sanity_checking:
            self.choices.append(rf.erf_inputs.clone())


def _stream_run(tmp_path, callbacks):
    pl.seed_everything(3, workers=True)
    model, stream = RecordingClassifier(), CountingStream(items_per_pass=24)
    train, _ = loaders()
    fit(tmp_path, callbacks, model, train, DataLoader(stream, batch_size=8), logger=False, max_epochs=2)
    return model, stream


def test_streaming_validation_data_is_read_exactly_as_often_as_without_the_callback(tmp_path):
    base_model, base_stream = _stream_run(tmp_path / "without", [])
    rf, batches = RFCallback(layer="features", erf_samples=12, log_images=False), _ValidationBatches()
    model, stream = _stream_run(tmp_path / "with", [rf, batches])
    assert stream.drawn == base_stream.drawn  # the callback drew nothing from the stream
    assert model.val_losses == base_model.val_losses  # so validation saw the same items, to the last digit
    assert all(torch.equal(a, b) for a, b in zip(base_model.state_dict().values(), model.state_dict().values()))
    # The effective field was measured, on 12 inputs chosen among those the Trainer handed over at epoch 0 ...
    assert [sorted(h.get("effective", {})) for h in rf.history] == [[], ["4_4"], ["4_4"]]
    seen = torch.cat(batches.first_epoch)
    assert rf.erf_inputs.shape == (12, 1, 16, 16)
    assert all((seen == x).flatten(1).all(dim=1).any() for x in rf.erf_inputs)
    # ... and kept: the same inputs at every epoch.
    assert len(batches.choices) == 2 and torch.equal(batches.choices[0], batches.choices[1])


def test_the_logged_effective_field_is_that_of_the_chosen_inputs(tmp_path):
    model, rf = ConvClassifier(), RFCallback(layer="features", erf_samples=8, log_images=False)
    trainer = fit(tmp_path, [rf], model, *loaders(), logger=False)
    expected = effective_rf(model, rf.erf_inputs, "center", layer="features").metrics()
    assert trainer.callback_metrics["rf/features/pos0/size_h/effective"] == expected["extent0.95_h"]
    spread = float(trainer.callback_metrics["rf-effective/features/pos0/spread_w"])
    assert spread == pytest.approx(expected["std_w"], rel=1e-5)
    dataset = loaders()[1].dataset.tensors[0]  # chosen among the validation samples, no sample twice
    matches = [(dataset == x).flatten(1).all(dim=1).nonzero().flatten().tolist() for x in rf.erf_inputs]
    assert all(len(m) == 1 for m in matches) and len({m[0] for m in matches}) == 8


def test_input_choice_is_uniform_private_and_independent_of_the_batch_size():
    samples = torch.arange(20.0).reshape(20, 1, 1, 1).expand(20, 1, 2, 2)

    def choice(seed: int, batch_size: int) -> list[int]:
        reservoir = InputReservoir(5, seed)
        for batch in samples.split(batch_size):
            reservoir.add(batch)
        return sorted(int(x) for x in reservoir.chosen(None, world_size=1)[:, 0, 0, 0])

    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    assert choice(0, 8) == choice(0, 3) == choice(0, 20)  # one key per sample, in stream order
    assert choice(0, 8) != choice(1, 8)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    counts = np.bincount(np.concatenate([choice(seed, 7) for seed in range(1000)]), minlength=20)
    assert counts.sum() == 5000 and np.all(np.abs(counts - 250) < 60)  # 250 each, binomial sd 14


def test_a_sample_offered_again_is_kept_once():
    """A distributed sampler pads each rank's share with copies of the first samples; a copy must not weigh twice."""
    samples = torch.arange(10.0).reshape(10, 1, 1, 1).expand(10, 1, 2, 2)
    reservoir = InputReservoir(32, seed=0)
    for batch in (samples[:6], samples[6:], samples[:2]):
        reservoir.add(batch)
    assert sorted(int(x) for x in reservoir.chosen(None, world_size=1)[:, 0, 0, 0]) == list(range(10))
    small = InputReservoir(3, seed=0)  # full: a copy competes with its first key kept, never takes a second place
    for _ in range(4):
        small.add(samples)
    assert len({int(x) for x in small.chosen(None, world_size=1)[:, 0, 0, 0]}) == 3


def test_samples_passed_over_for_their_shape_are_counted_and_said(tmp_path):
    """Variable-length series padded per batch: the effective field was measured on the first batch's 4 samples of
    32, silently (its extent 15 where every other batch gives 13-14)."""
    reservoir = InputReservoir(32, seed=0)
    for length in (49, 61, 60, 49):
        reservoir.add(torch.randn(4, 1, length))
    assert reservoir.chosen(None, world_size=1).shape == (8, 1, 49)
    assert reservoir.passed_over_note().startswith("8 of the 16 validation samples were shaped unlike the first")
    same = InputReservoir(32, seed=0)
    same.add(torch.randn(4, 1, 49))
    assert same.passed_over_note() is None
    rf = RFCallback(layer="features", log_images=False)
    train, _ = loaders()
    sizes = [torch.randn(8, 1, side, side) for side in (16, 20)]
    validation = torch.utils.data.DataLoader([(x, torch.zeros(8).long()) for x in sizes], batch_size=None)
    with recorded_warnings() as record:
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, logger=False), callbacks=[rf]).fit(
            ConvClassifier(), train, validation
        )
    said = [str(w.message) for w in record if "passed over" in str(w.message)]
    assert (
        len(said) == 1 and "8 of the 16 validation samples were shaped unlike the first batch's (1, 16, 16)" in said[0]
    )


class LazyClassifier(ConvClassifier):
    """ConvClassifier's layers as lazy modules: no parameters before the first forward pass."""

    def __init__(self):
        super().__init__(example=False)
        self.features = nn.Sequential(nn.LazyConv2d(8, 3, padding=1), nn.ReLU(), nn.LazyConv2d(8, 3, padding=1))
        self.head = nn.LazyLinear(3)


def test_lazy_modules_are_probed_after_the_first_step_instead_of_failing_at_fit_start(tmp_path):
    """The fit-start probe failed ("have no parameters yet"), and the theoretical field was never logged."""
    rf = RFCallback(layer="features", log_images=False)
    with recorded_warnings() as record:
        trainer = fit(tmp_path, [rf], LazyClassifier(), *loaders(), logger=False, max_epochs=1)
    assert not [str(w.message) for w in record if "RFCallback" in str(w.message)]
    assert (rf.history[0]["epoch"], rf.history[0]["step"]) == (None, 1)
    assert trainer.callback_metrics["rf/features/pos0/size_h/theoretical"] == 5


class _ThreadedRanks:
    """``all_gather`` across threads standing for ranks: each call stacks what every rank handed over."""

    def __init__(self, ranks: int):
        self.ranks, self.barrier, self.slots = ranks, threading.Barrier(ranks), {}

    def strategy(self, rank: int):
        ranks, calls = self, [0]

        class Strategy:
            root_device = torch.device("cpu")

            @staticmethod
            def all_gather(tensor):
                calls[0] += 1
                ranks.slots[calls[0], rank] = tensor.clone()
                ranks.barrier.wait()
                gathered = torch.stack([ranks.slots[calls[0], r] for r in range(ranks.ranks)])
                ranks.barrier.wait()
                return gathered

        return Strategy()


def test_samples_passed_over_are_counted_over_every_rank():
    """Rank 1 saw only 20 x 20 inputs, rank 0 only 16 x 16: its 100 samples were passed over, and the warning said
    nothing (each rank's own count) or 8 (what it had kept)."""
    reservoirs = [InputReservoir(8, seed=0, rank=rank) for rank in range(2)]
    for _ in range(10):
        reservoirs[0].add(torch.randn(10, 1, 16, 16))
        reservoirs[1].add(torch.randn(10, 1, 20, 20))
    ranks, chosen = _ThreadedRanks(2), [None, None]

    def choose(rank):
        chosen[rank] = reservoirs[rank].chosen(ranks.strategy(rank), world_size=2)

    threads = [threading.Thread(target=choose, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert chosen[0].shape == chosen[1].shape == (8, 1, 16, 16)
    for reservoir in reservoirs:
        assert reservoir.passed_over_note().startswith("100 of the 200 validation samples were shaped unlike")


# -- failures warn once, with the reason and the fix; strict raises


def test_dict_batch_whose_first_tensor_is_a_mask_warns_and_fit_completes(tmp_path):
    rf = RFCallback(layer="features", log_images=False)
    with recorded_warnings() as record:
        trainer = fit(tmp_path, [rf], DictBatchClassifier(), *dict_loaders(), logger=False)
    assert trainer.current_epoch == 2
    said = callback_warnings(record, FAILED)
    assert len(said) == 1, said  # once, though every probe fails
    assert "taken from the first tensor of the first batch" in said[0]
    assert "pass RFCallback(input_shape=(N, C, H, W))" in said[0] and "module=" in said[0]


def test_dict_batch_with_input_shape_probes_and_warns_about_the_effective_field_once(tmp_path):
    rf = RFCallback(layer="features", input_shape=(1, 3, 16, 16), log_images=False)
    with recorded_warnings() as record:
        trainer = fit(tmp_path, [rf], DictBatchClassifier(), *dict_loaders(), logger=False)
    assert trainer.current_epoch == 2 and [h["epoch"] for h in rf.history] == [None, 0, 1]
    said = callback_warnings(record, FAILED)
    assert len(said) == 1 and said[0].startswith("RFCallback: the effective field failed"), said
    assert "first tensor of the validation batches" in said[0] and "effective=False" in said[0]


def test_validation_batches_without_an_input_tensor_first_warn_once_and_fit_completes(tmp_path):
    rf = RFCallback(layer="features", log_images=False)  # the input shape comes from example_input_array
    with recorded_warnings() as record:
        trainer = fit(tmp_path, [rf], NamedBatchClassifier(), *named_loaders(), logger=False, max_epochs=3)
    assert trainer.current_epoch == 3 and [h["epoch"] for h in rf.history] == [None, 0, 1, 2]
    said = callback_warnings(record, FAILED)
    assert len(said) == 1 and "no validation batch handed to the callback had an input tensor" in said[0], said
    assert "put the input first in the batch, or pass RFCallback(effective=False)" in said[0]


def test_dict_batch_under_strict_raises(tmp_path):
    with pytest.raises(ProbeError, match="forward raised"):
        fit(tmp_path, [RFCallback(layer="features", strict=True)], DictBatchClassifier(), *dict_loaders(), logger=False)


def test_uncopyable_module_warns_naming_the_way_out_and_fit_completes(tmp_path):
    with recorded_warnings() as record:
        trainer = fit(tmp_path, [RFCallback(layer="features")], LockedClassifier(), *loaders(), logger=False)
    assert trainer.current_epoch == 2
    said = callback_warnings(record, FAILED)
    assert len(said) == 1, said
    assert "the probe at fit start failed" in said[0] and "deep" in said[0] and "module=" in said[0]
    # The way out works: module= copies the submodule only.
    rf = RFCallback(layer="0", module="features", log_images=False)
    with recorded_warnings() as record:
        fit(tmp_path, [rf], LockedClassifier(), *loaders(), logger=False)
    assert callback_warnings(record, FAILED) == [] and len(rf.history) == 3


class _StemmedClassifier(ConvClassifier):
    """ConvClassifier with a layer before ``features`` in its forward: a 3 x 3 stem (``stride`` 1 or 2), or none
    but a normalisation of the input (``stride=None``)."""

    def __init__(self, stride: int | None):
        super().__init__()
        self.stem = None if stride is None else nn.Conv2d(1, 1, 3, stride=stride, padding=1)

    def forward(self, x):
        x = (x - 0.5) / 2 if self.stem is None else self.stem(x)
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("stride", [1, 2])
def test_module_that_receives_another_tensor_than_the_input_is_refused(tmp_path, stride):
    """``module="features"`` after a stem probed the features on the model's input shape, on their own: 3 x 3
    fields of ``features.0`` logged under ``rf/features.0/...``, where the model's field at that layer is 5 x 5
    (stride 1) or 7 x 7 (stride 2, on a map of 8 x 8 cells, not 16 x 16). Nothing is probed now, with the reason
    and the fix, and the fit goes on; ``strict=True`` raises."""
    rf = RFCallback(layer="0", module="features", mode="theoretical", log_images=False, effective=False)
    with recorded_warnings() as record:
        trainer = fit(tmp_path, [rf], _StemmedClassifier(stride), *loaders(), logger=False, max_epochs=1)
    said = callback_warnings(record, "nothing is probed, training goes on")
    assert len(said) == 1 and "layer='features'" in said[0], said
    assert "receives a (8, 1, 8, 8) tensor" in said[0] if stride == 2 else "ConvolutionBackward0" in said[0]
    assert rf.history == [] and not any(name.startswith("rf") for name in trainer.callback_metrics)
    assert trainer.current_epoch == 1
    whole = probe_rf(_StemmedClassifier(stride), (1, 1, 16, 16), "center", layer="features.0")
    assert whole.size == ((5, 5) if stride == 1 else (7, 7))  # what module= logged as 3 x 3
    strict = RFCallback(layer="0", module="features", log_images=False, effective=False, strict=True)
    with pytest.raises(ValueError, match="receives"):
        fit(tmp_path, [strict], _StemmedClassifier(stride), *loaders(), logger=False, max_epochs=1)


def test_module_that_receives_the_input_normalised_is_probed_at_fit_start_on_the_initial_weights(tmp_path):
    """A normalisation before the module moves no pixel: the module is probed, its fit-start weights probe on the
    weights before the first optimizer step (the check waits for the first forward, not for the step)."""
    model = _StemmedClassifier(None)
    initial = probe_rf(model, (1, 1, 16, 16), (3, 3), layer="features.0", mode="weights")
    rf = RFCallback(pos=(3, 3), layer="0", module="features", log_images=False, effective=False)
    with recorded_warnings() as record:
        fit(tmp_path, [rf], model, *loaders(), logger=False, max_epochs=1)
    assert callback_warnings(record) == []
    assert (rf.history[0]["epoch"], rf.history[0]["step"]) == (None, 0) and len(rf.history) == 2
    assert rf.history[0]["fields"][0]["bounds"] == [list(b) for b in initial.bounds]


def _small_critic() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(1))


class _CallsTheModuleOtherwise(pl.LightningModule):
    """A module that receives the input beside other tensors: a GAN's critic on generated then real images (manual
    optimization: the generator steps first), an adversarial step's perturbed input, a backbone's crops."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.critic = how, _small_critic()
        self.generator = nn.Sequential(nn.Linear(8, 256), nn.Unflatten(1, (1, 16, 16)))
        self.automatic_optimization = how != "gan"

    def training_step(self, batch, batch_idx):
        x = batch[0]
        if self.how == "gan":
            generator, critic = self.optimizers()
            fake = self.generator(torch.randn(len(x), 8))
            generator.zero_grad()
            self.manual_backward(self.critic(fake).mean())
            generator.step()
            critic.zero_grad()
            self.manual_backward(self.critic(x).mean() - self.critic(fake.detach()).mean())
            critic.step()
            return None
        if self.how == "adversarial":
            delta = torch.zeros_like(x, requires_grad=True)
            (gradient,) = torch.autograd.grad(self.critic(x + delta).mean(), delta)
            return self.critic((x + 0.03 * gradient.sign()).detach()).mean()
        return self.critic(x).mean() + self.critic(x[..., 4:12, 4:12]).mean()

    def configure_optimizers(self):
        critic = torch.optim.SGD(self.critic.parameters(), lr=0.01)
        return [torch.optim.SGD(self.generator.parameters(), lr=0.01), critic] if self.how == "gan" else critic


@pytest.mark.parametrize("how", ["gan", "adversarial", "crops"])
def test_module_that_receives_the_input_beside_other_tensors_is_probed(tmp_path, how):
    """A call on the input itself (no layer with parameters made it) is enough: the critic's call on generated
    images, the perturbed input (x + delta, made by no parameter) and the crops were refused as a stem's output."""
    rf = RFCallback(layer="2", module="critic", input_shape=(1, 1, 16, 16), mode="theoretical", log_images=False)
    data = DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 1, 16, 16)), batch_size=8)
    with recorded_warnings() as record:
        fit(tmp_path, [rf], _CallsTheModuleOtherwise(how), data, None, logger=False, max_epochs=1)
    assert callback_warnings(record, "nothing is probed") == []
    assert [h["fields"][0]["bounds"] for h in rf.history] == [[[6, 10], [6, 10]]] * 2


def test_module_watched_in_a_fit_without_a_training_step_is_probed_and_left_unhooked(tmp_path):
    """With no training batch the fit-start probe waited for a step that never came, and the live module kept the
    callback's hook (it recorded every later call, and the module no longer pickled)."""
    rf = RFCallback(layer="0", module="features", log_images=False, effective=False)
    model = ConvClassifier()
    fit(tmp_path, [rf], model, *loaders(), logger=False, max_epochs=1, limit_train_batches=0)
    assert not model.features._forward_pre_hooks and rf.history[0]["step"] == 0
    pickle.dumps(model.features)


class _PickyLogger(CSVLogger):
    """A logger that refuses metric names with a slash (as some tracking services refuse some characters)."""

    def log_metrics(self, metrics, step=None):
        if any("/" in name for name in metrics):
            raise ValueError("metric names may not contain '/'")
        super().log_metrics(metrics, step)


def test_logger_that_raises_warns_once_and_fit_completes(tmp_path):
    logger = _PickyLogger(tmp_path)
    rf = RFCallback(layer="features", log_images=False)
    with recorded_warnings() as record:
        trainer = fit(tmp_path, [rf], ConvClassifier(), *loaders(), logger=logger)
    assert trainer.current_epoch == 2 and len(rf.history) == 3
    said = callback_warnings(record, "_PickyLogger failed")
    assert len(said) == 1 and "metric names may not contain '/'" in said[0], said
    assert "fix that logger" in said[0]
    assert "rf/features/pos0/size_h/weights" in trainer.callback_metrics  # the scalars are still there


class _BrokenImages:
    def __init__(self, writer):
        self._writer = writer

    def add_image(self, *args, **kwargs):
        raise RuntimeError("the image service is down")

    def __getattr__(self, name):
        return getattr(self._writer, name)


class _NoImagesLogger(TensorBoardLogger):
    @property
    def experiment(self):
        return _BrokenImages(super().experiment)


def test_tensorboard_images_that_fail_warn_once_and_scalars_still_land(tmp_path):
    logger = _NoImagesLogger(tmp_path, name="run")
    with recorded_warnings() as record:
        trainer = fit(tmp_path, [RFCallback(layer="features")], ConvClassifier(), *loaders(), logger=logger)
    assert trainer.current_epoch == 2
    said = callback_warnings(record, FAILED)
    assert len(said) == 1 and "images to _NoImagesLogger" in said[0] and "the image service is down" in said[0]


def test_figures_that_fail_at_fit_end_warn_once_and_fit_completes(tmp_path, monkeypatch):
    def no_figures(field):
        raise RuntimeError("no display")

    monkeypatch.setattr(reporting_module, "plot_rf_figure", no_figures)
    logger = TensorBoardLogger(tmp_path, name="run")
    with recorded_warnings() as record:
        trainer = fit(tmp_path, [RFCallback(layer="features")], ConvClassifier(), *loaders(), logger=logger)
    assert trainer.current_epoch == 2
    said = callback_warnings(record, "no display")
    assert len(said) == 1 and "log_images=False" in said[0], said


def test_figures_that_fail_under_strict_raise(tmp_path, monkeypatch):
    def no_figures(field):
        raise RuntimeError("no display")

    monkeypatch.setattr(reporting_module, "plot_rf_figure", no_figures)
    logger = TensorBoardLogger(tmp_path, name="run")
    with pytest.raises(RuntimeError, match="no display"):
        fit(tmp_path, [RFCallback(layer="features", strict=True)], ConvClassifier(), *loaders(), logger=logger)


def test_a_layer_that_does_not_fit_still_ends_the_run_before_the_first_step(tmp_path):
    model = DictBatchClassifier()
    rf = RFCallback(layer="featurez", input_shape=(1, 3, 16, 16))
    with pytest.raises(MisconfigurationException, match="layer='featurez'"):
        fit(tmp_path, [rf], model, *dict_loaders(), logger=False)
    assert model.global_step == 0


# -- arguments are checked at the door


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"draws": True}, r"draws=True\): draws must be an int >= 1 .*a bool is not a number here; .*draws=8"),
        ({"draws": 2.0}, r"draws=2\.0\): draws must be an int >= 1.*pass draws=2"),
        ({"draws": "8"}, r"draws='8'\).*pass the int, not a str: draws=8"),
        ({"seed": "0"}, r"seed='0'\): seed must be an int .*pass the int, not a str: seed=0"),
        ({"seed": True}, r"seed=True\).*a bool is not a number"),
        ({"seed": 1.5}, r"seed=1\.5\): seed must be an int"),
        ({"seed": 2**64}, r"seed=18446744073709551616\).*range"),
        ({"erf_samples": 0}, r"erf_samples=0\): erf_samples must be an int >= 1"),
        ({"erf_samples": True}, r"erf_samples=True\).*a bool"),
        ({"every_n_epochs": 1.0}, r"every_n_epochs=1\.0\).*pass every_n_epochs=1"),
        ({"patience": -1}, r"patience=-1\): patience must be an int >= 1"),
        ({"coverage_mass": 0}, r"coverage_mass=0\): coverage_mass must be a mass fraction q with 0 < q <= 1"),
        ({"coverage_mass": True}, r"coverage_mass=True\).*0 < q <= 1"),
        ({"coverage_mass": "0.9"}, r"coverage_mass='0\.9'\).*e\.g\. coverage_mass=0\.95"),
        ({"coverage_mass": float("nan")}, r"coverage_mass=nan\)"),
        ({"target_size": (4.0, 4.0)}, r"target_size=\(4\.0, 4\.0\)\).*positive int.*pass target_size=\(4, 4\)"),
        ({"target_size": True}, r"target_size=True\)"),
        ({"target_size": -3}, r"target_size=-3\)"),
        ({"target_size": "16"}, r"target_size='16'\)"),
        (
            {"pos": (4.0, 4.0)},
            r"pos=\(4\.0, 4\.0\)\).*4\.0 is a float, but positions are integer indices; pass pos=\(4, 4\)",
        ),
        ({"pos": "all"}, r"pos='all'\).*for probe_rf"),
        ({"pos": ()}, r"pos=\(\)\)"),
        ({"pos": [(1, 1), 2]}, r"pos=\[\(1, 1\), 2\]\)"),
        ({"pos": True}, r"pos=True\)"),
        (
            {"layer": 2},
            r"layer=2\): layer must be a dotted submodule name \(a str, as in model\.named_modules\(\).*layer='2'",
        ),
        ({"layer": nn.Conv2d(1, 1, 3)}, r"layer=<Conv2d module>\).*not the module object"),
        ({"module": ""}, r"module=''\).*pass module=None"),
        ({"module": ["features"]}, r"module=\['features'\]\).*named_modules"),
        ({"input_shape": (16, 16)}, r"input_shape=\(16, 16\)\).*e\.g\. input_shape=\(1, 3, 16, 16\)"),
        ({"input_shape": (1, 3, 16.0, 16)}, r"input_shape=\(1, 3, 16\.0, 16\)\)"),
        ({"input_shape": "1,3,16,16"}, r"input_shape='1,3,16,16'\)"),
        ({"on_alert": 3}, r"on_alert=3\): on_alert must be callable or None"),
        ({"strict": "yes"}, r"strict='yes'\): strict must be True or False"),
        ({"log_images": 1}, r"log_images=1\): log_images must be True or False"),
        ({"effective": 1}, r"effective=1\): effective must be True, False or None"),
        ({"mode": None}, r"mode=None\): mode must be one of \('theoretical', 'weights'\)"),
        ({"on_miss": ["warn"]}, r"on_miss=\['warn'\]\): on_miss must be one of"),
        ({"probe_device": "gpu0"}, r"probe_device='gpu0' is not a device: pass a device name \('cpu'"),
    ],
)
def test_bad_argument_is_refused_at_construction_with_the_fix(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        RFCallback(**kwargs)


def test_numpy_and_torch_integers_are_accepted_as_ints():
    plain = RFCallback(pos=(4, 4), draws=4, seed=3, target_size=(5, 6), erf_samples=8, every_n_epochs=2, patience=2)
    numpy = RFCallback(
        pos=(np.int64(4), np.int32(4)), draws=np.int64(4), seed=np.uint8(3), target_size=np.array([5, 6]),
        erf_samples=torch.tensor(8), every_n_epochs=np.int16(2), patience=np.int64(2), coverage_mass=np.float32(0.5),
        input_shape=torch.Size([1, 1, 16, 16]),
    )  # fmt: skip
    for name in ("positions", "draws", "seed", "target_size", "erf_samples", "every_n_epochs", "patience"):
        assert getattr(numpy, name) == getattr(plain, name), name
        value = getattr(numpy, name)
        flat = (
            [i for v in value for i in (v if isinstance(v, tuple) else (v,))]
            if isinstance(value, (list, tuple))
            else [value]
        )
        assert all(type(v) is int for v in flat), name  # plain ints go to the probe
    assert numpy.state_key == plain.state_key and numpy.input_shape == (1, 1, 16, 16)
    assert RFCallback(pos=np.array([[1, 2], [3, 4]])).positions == [(1, 2), (3, 4)]


# -- the fit-start target warnings say what is wrong


def _fit_start_warnings(tmp_path, callback) -> list[str]:
    with recorded_warnings() as record:
        fit(tmp_path, [callback], ShrinkingField(shrink_epoch=None), *loaders(), logger=False, max_epochs=1)
    return callback_warnings(record, "target size")


def test_target_larger_than_the_input_is_said_to_be_so(tmp_path):
    said = _fit_start_warnings(tmp_path, RFCallback(target_size=(20, 8), log_images=False, effective=False))
    assert len(said) == 1, said
    assert "the target size 20 x 8 is larger than the input, 16 x 16" in said[0]
    assert "no amount of training" not in said[0] and "Enlarge" not in said[0]


def test_field_cut_by_the_border_is_not_called_too_small(tmp_path):
    # Three 3x3 convolutions: r = 7; at (0, 0) the input's border cuts it to 4 x 4 (input 0..3).
    said = _fit_start_warnings(tmp_path, RFCallback(pos=(0, 0), target_size=5, log_images=False, effective=False))
    assert len(said) == 1, said
    assert "is 4 x 4 on the input" in said[0] and "the input's border cuts it: unclipped it is 7 x 7" in said[0]
    assert "no amount of training" not in said[0] and "Enlarge" not in said[0]


def test_field_too_small_even_unclipped_still_gets_the_advice_to_enlarge_it(tmp_path):
    said = _fit_start_warnings(tmp_path, RFCallback(pos=(0, 0), target_size=9, log_images=False, effective=False))
    assert len(said) == 1, said
    assert "4 x 4 (7 x 7 before the input's border cuts it), smaller than the target size 9 x 9" in said[0]
    assert "no amount of training" in said[0] and "Enlarge the field" in said[0]
