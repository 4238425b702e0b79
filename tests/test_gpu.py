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
@pytest.mark.parametrize(("factory", "layer"), [(TinyResNet, "layer2"), (vgg_style, None)])
def test_a_cuda_model_gives_the_cpus_bounds_and_heatmaps(factory, layer, mode):
    torch.manual_seed(0)
    model = factory().eval()
    shape = (1, 3, 32, 32)
    positions = [(0, 0), (3, 5), "center"]
    for pos in positions:
        on_cpu = probe_rf(model, shape, pos, mode=mode, layer=layer)
        on_gpu = probe_rf(model.cuda(), shape, pos, mode=mode, layer=layer)
        model.cpu()
        assert on_gpu.bounds == on_cpu.bounds
        assert torch.equal(on_gpu.heatmap > 0, on_cpu.heatmap > 0)
        if mode == "theoretical":
            torch.testing.assert_close(on_gpu.heatmap, on_cpu.heatmap, rtol=1e-5, atol=0)
            assert list(on_gpu.geometry) == list(on_cpu.geometry)


def test_a_field_probed_on_cuda_is_read_after_the_model_moves_back_to_the_cpu():
    model = TinyResNet().cuda()
    field = probe_rf(model, (1, 3, 12, 10), layer="layer2")  # clipped: the geometry is measured later
    model.cpu()  # what Lightning does at fit end
    assert [(g.size, g.stride, g.offset) for g in field.geometry] == [(25, 4, 12), (25, 4, 12)]
    assert verify_rf(model, probe_rf(model, (1, 3, 12, 10), layer="layer2")).passed


def test_effective_rf_on_cuda_equals_the_cpus():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    inputs = torch.randn(4, 3, 32, 32)
    on_cpu = effective_rf(model, inputs, [(2, 2), (4, 5)], layer="layer2", dtype=torch.float64)
    on_gpu = effective_rf(model.cuda(), inputs, [(2, 2), (4, 5)], layer="layer2", dtype=torch.float64)
    on_cpu_copy = effective_rf(model, inputs, [(2, 2), (4, 5)], layer="layer2", dtype=torch.float64, device="cpu")
    for a, b, c in zip(on_cpu, on_gpu, on_cpu_copy):
        torch.testing.assert_close(b.heatmap, a.heatmap, rtol=1e-9, atol=1e-12)
        assert torch.equal(c.heatmap, a.heatmap)


def _fit(tmp_path, folder, callbacks, **overrides):
    pl.seed_everything(7, workers=True)
    model = ConvClassifier()
    logger = CSVLogger(tmp_path / folder)
    train, val = loaders()
    kwargs = trainer_kwargs(tmp_path / folder, max_epochs=2, logger=[logger, TensorBoardLogger(tmp_path / folder)])
    kwargs.update(accelerator="gpu", deterministic="warn", **overrides)
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


def test_probe_device_cpu_takes_no_gpu_memory_beside_training(tmp_path):
    # Probes on a 1024 x 1024 input (8 draws): on the GPU they would take some 256 MiB beside the fit's few MiB.
    peaks = []
    arms = ([], [RFCallback(layer="features", probe_device="cpu", input_shape=(1, 1, 1024, 1024), effective=False)],
            [RFCallback(layer="features", input_shape=(1, 1, 1024, 1024), effective=False)])  # fmt: skip
    for index, callbacks in enumerate(arms):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _fit(tmp_path, f"peak{index}", callbacks)
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] <= peaks[0] + (1 << 20)
    assert peaks[2] > peaks[0] + (100 << 20)  # the same probes on the GPU: the test can fail


def test_a_probe_that_runs_out_of_gpu_memory_warns_with_the_fix_and_training_goes_on(tmp_path):
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    fraction = (before + (512 << 20)) / torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        # Training on 16 x 16 inputs fits; the probe, on an input of 4096 x 4096 (8 draws), does not.
        callback = RFCallback(layer="features", input_shape=(1, 1, 4096, 4096), effective=False)
        _, rows, messages, _ = _fit(tmp_path, "oom", [callback])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert rows, "training went on"
    warned = [m for m in messages if "OutOfMemoryError" in m]
    assert warned and "probe_device='cpu'" in warned[0]
    assert torch.cuda.memory_allocated() <= before + (64 << 20)  # what the probe took is given back


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


@pytest.mark.parametrize("sharding", ["ModelParallelStrategy", "FSDPStrategy"])
def test_a_sharded_fit_on_one_gpu_logs_the_whole_models_fields(tmp_path, sharding):
    # FSDP2 (a mesh of one) and FSDP1 (blocks auto-wrapped) on one GPU with nccl: the code paths of many GPUs.
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from tests.lightning_models import ResidualBlock, ResidualClassifier

    torch.manual_seed(0)
    initial = probe_rf(ResidualClassifier(), (1, 1, 16, 16), (2, 5), layer="features", mode="weights", draws=3)
    torch.manual_seed(0)
    model = ResidualClassifier()
    rf = RFCallback((2, 5), layer="features", mode="weights", draws=3)
    if sharding == "FSDPStrategy":
        strategy = FSDPStrategy(auto_wrap_policy=ModuleWrapPolicy({ResidualBlock}))
    else:
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer = pl.Trainer(callbacks=[rf], logger=False, **trainer_kwargs(tmp_path, accelerator="gpu", strategy=strategy))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no probe may fail
        warnings.filterwarnings("ignore", message=".*(deprecated|sync_dist|num_workers|LeafSpec).*")
        trainer.fit(model, *loaders())
    assert rf.history[0]["fields"][0]["bounds"] == [list(b) for b in initial.bounds]
    assert [entry["step"] for entry in rf.history] == [0, 4, 8]
    assert all(entry["effective"] for entry in rf.history[1:])
