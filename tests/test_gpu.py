"""On a CUDA device: the probe's answers equal the CPU's, and GPU fits keep their trajectory and draw their figures.

Marked ``cuda``: skipped where CUDA is absent, so CI on the CPU stays green; ``make test-gpu`` runs them.
"""

from __future__ import annotations

import csv
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rf_callback import RFCallback, effective_rf, probe_rf, verify_rf
from tests.lightning_models import ConvClassifier, loaders, trainer_kwargs
from tests.models import TinyResNet, vgg_style

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
@pytest.mark.parametrize("factory", [TinyResNet, vgg_style])
def test_a_cuda_model_gives_the_cpus_bounds_and_heatmaps(factory, mode):
    torch.manual_seed(0)
    model = factory().eval()
    shape = (1, 3, 32, 32)
    positions = [(0, 0), (3, 5), "center"]
    for pos in positions:
        on_cpu = probe_rf(model, shape, pos, mode=mode)
        on_gpu = probe_rf(model.cuda(), shape, pos, mode=mode)
        model.cpu()
        assert on_gpu.bounds == on_cpu.bounds
        assert torch.equal(on_gpu.heatmap > 0, on_cpu.heatmap > 0)
        if mode == "theoretical":
            torch.testing.assert_close(on_gpu.heatmap, on_cpu.heatmap, rtol=1e-5, atol=0)
            assert list(on_gpu.geometry) == list(on_cpu.geometry)


def test_a_field_probed_on_cuda_is_read_after_the_model_moves_back_to_the_cpu():
    model = TinyResNet().cuda()
    field = probe_rf(model, (1, 3, 12, 10))  # clipped: the geometry is measured later
    model.cpu()
    assert list(field.geometry) == list(probe_rf(model, (1, 3, 12, 10)).geometry)
    assert verify_rf(model, probe_rf(model, (1, 3, 12, 10))).passed


def test_effective_rf_on_cuda_equals_the_cpus():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    inputs = torch.randn(4, 3, 32, 32)
    on_cpu = effective_rf(model, inputs, dtype=torch.float64)
    on_gpu = effective_rf(model.cuda(), inputs, dtype=torch.float64)
    torch.testing.assert_close(on_gpu.heatmap, on_cpu.heatmap, rtol=1e-9, atol=1e-12)


def _fit(tmp_path, folder, callbacks, **overrides):
    pl.seed_everything(7, workers=True)
    model = ConvClassifier()
    logger = CSVLogger(tmp_path / folder)
    train, val = loaders()
    kwargs = trainer_kwargs(tmp_path / folder, max_epochs=2, logger=[logger, TensorBoardLogger(tmp_path / folder)])
    kwargs.update(accelerator="gpu", deterministic=True, **overrides)
    trainer = pl.Trainer(**kwargs, callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train, val)
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = [(r["step"], r["train_loss"], r["val_loss"]) for r in csv.DictReader(handle) if r["train_loss"]]
    return model, rows, [str(w.message) for w in caught], trainer


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_a_gpu_fit_keeps_its_losses_and_draws_its_fit_end_figures(tmp_path, precision):
    base, base_rows, _, _ = _fit(tmp_path, "without", [], precision=precision)
    model, rows, messages, trainer = _fit(tmp_path, "with", [RFCallback(layer="features")], precision=precision)
    assert rows == base_rows and len(rows) > 0
    for (name, a), (_, b) in zip(base.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    assert not [m for m in messages if m.startswith("RFCallback") and "failed" in m], messages
    events = EventAccumulator(trainer.loggers[1].log_dir, size_guidance={"images": 0}).Reload()
    figure_steps = [e.step for e in events.Images("rf/features/pos0/figure")]
    assert figure_steps[0] == 0 and len(figure_steps) == 2  # fit start and fit end


def test_a_channels_last_compiled_gpu_fit_draws_its_figures(tmp_path):
    pl.seed_everything(7, workers=True)
    model = ConvClassifier().to(memory_format=torch.channels_last)
    train, val = loaders()
    kwargs = trainer_kwargs(tmp_path, max_epochs=1, logger=TensorBoardLogger(tmp_path))
    kwargs.update(accelerator="gpu")
    trainer = pl.Trainer(**kwargs, callbacks=[RFCallback(layer="features", strict=True)])
    trainer.fit(torch.compile(model), train, val)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0}).Reload()
    assert len(events.Images("rf/features/pos0/figure")) == 2
