"""The parts RFCallback wires together, each on its own (the Trainer runs are in test_callback*.py)."""

import warnings

import pytest
import torch
from torch import nn

from rf_callback import effective_rf, probe_rf
from rf_callback.callback.coverage import CoverageWatch
from rf_callback.callback.failures import Failures
from rf_callback.callback.fields import FieldProber
from rf_callback.callback.schedule import ProbeSchedule, batch_input_shape, first_loader, first_tensor


def test_schedule_probes_every_nth_epoch_once():
    schedule = ProbeSchedule(every_n_epochs=2)
    assert [schedule.due(epoch) for epoch in range(4)] == [False, True, False, True]
    schedule.probed(1)
    assert not schedule.due(1) and schedule.due(3)


def test_schedule_under_validation_by_steps_counts_each_epoch_that_validated_once_and_keeps_the_count():
    schedule = ProbeSchedule(every_n_epochs=2)
    # Validations in epochs 1, 1 (twice in one epoch), 2, 4, 5: the 2nd and 4th epochs that validated are due.
    assert [schedule.due(epoch, None) for epoch in (1, 1, 2, 4)] == [False, False, True, False]
    resumed = ProbeSchedule(every_n_epochs=2)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.due(5, None) and resumed.validated_epochs == 4  # the count went on: epoch 5 is the 4th
    resumed.probed(5)
    again = ProbeSchedule(every_n_epochs=1)
    again.load_state_dict(resumed.state_dict())  # resumed in the middle of epoch 5: it was probed already
    assert not again.due(5) and again.due(6)


def test_the_input_is_the_first_tensor_of_a_batch_with_a_batch_of_one():
    image = torch.zeros(4, 3, 8, 6)
    assert first_tensor({"image": image, "label": torch.zeros(4)}) is image
    assert first_tensor(([image, 1], 2)) is image and first_tensor(("text",)) is None
    assert batch_input_shape((image, torch.zeros(4))) == (1, 3, 8, 6)
    assert batch_input_shape(torch.zeros(4, 10)) is None  # no spatial axis: not an input the probe takes
    assert first_loader({"a": 1, "b": 2}) == 1 and first_loader([]) is None and first_loader("x") == "x"


def test_failures_warn_once_per_kind_and_raise_under_strict():
    failures = Failures()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with failures.guard("probe", "the probe", lambda error: "the fix"):
                raise RuntimeError("broken")
        with failures.guard("images", "the images"):
            raise RuntimeError("broken")
    texts = [str(w.message) for w in caught]
    assert texts == [
        "RFCallback: the probe failed, training goes on (RuntimeError: broken). the fix",
        "RFCallback: the images failed, training goes on (RuntimeError: broken)",
    ]
    with pytest.raises(RuntimeError, match="broken"), Failures(strict=True).guard("probe", "the probe"):
        raise RuntimeError("broken")


def test_field_prober_probes_the_named_module_and_keeps_the_theoretical_fields_per_shape():
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    prober = FieldProber(
        [(4, 4)], layer="0", module="backbone", element=None, layout="channels_first", draws=2, seed=0, device=None
    )
    fields = prober.probe(model, "theoretical", (1, 1, 9, 9))
    assert [f.bounds for f in fields] == [((3, 5), (3, 5))]  # a 3 x 3 field of layer 0 only
    first = prober.theoretical_fields(model, (1, 1, 9, 9))
    assert prober.theoretical_fields(model, (1, 1, 9, 9)) is first  # probed once
    other = prober.theoretical_fields(model, (1, 1, 9, 9), inputs_shape=(5, 1, 12, 12))
    assert other[0].input_shape == (1, 1, 12, 12) and prober.theoretical is first


def test_coverage_watch_alerts_once_when_coverage_is_lost():
    model = nn.Sequential(nn.Conv2d(1, 1, 5, padding=2))
    theoretical = probe_rf(model, (1, 1, 9, 9), (4, 4))
    field = effective_rf(model, torch.randn(4, 1, 9, 9), (4, 4), theoretical=theoretical)
    extent = tuple(last - first + 1 for first, last in field.extent(0.95))
    watch = CoverageWatch(patience=1, coverage_mass=0.95)
    covered, margin, event = watch.check("4_4", theoretical, field, extent, epoch=0, layer="output")
    assert (covered, margin, event) == (True, 0, None)
    larger = tuple(e + 1 for e in extent)
    covered, margin, event = watch.check("4_4", theoretical, field, larger, epoch=1, layer="output")
    assert (covered, margin, event.reason, event.epoch) == (False, -1, "lost", 1)
    assert watch.check("4_4", theoretical, field, larger, epoch=2, layer="output")[2] is None  # once per loss
    restored = CoverageWatch(patience=1, coverage_mass=0.95)
    restored.load_state_dict(watch.state_dict())
    assert restored.trackers["4_4"].events == watch.trackers["4_4"].events
