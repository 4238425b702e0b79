"""RFCallback's wall-time overhead on a short training run, measured side by side in one run and printed as ratios.

The same fit (a small VGG-style classifier on 64 x 64 RGB inputs, a few epochs on random data, CPU) runs with
``RFCallback(layer="features")`` (every other argument at its default: weights mode with 8 draws, images on, the
effective field on 32 validation inputs) and without it, interleaved A B A B ... so that drifts in machine load hit
both arms alike. Both arms log to a ``TensorBoardLogger``. The ratio of the median wall times is the callback's
overhead (target: at most 1.03x). Then the cost of each part of one probe, in training steps.

Run: python benchmarks/bench_callback.py [--repeats N] [--epochs N] [--samples N] [--threads N]
     [--device cuda] [--model resnet18 | resnet50]
``--device cuda`` fits on the GPU (``Trainer(accelerator="gpu")``) and reports each arm's peak GPU memory;
``--model resnet18`` trains torchvision's ResNet-18 (10 classes, 96 x 96 inputs, batch 64) and probes ``net.layer4``;
``--model resnet50`` its ResNet-50 (224 x 224, batch 128, ``bf16-mixed`` on a GPU), the callback issue's heavier fit.

On a shared machine, --threads 1 keeps other processes from stalling torch's thread pool.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rf_callback import RFCallback, effective_rf, probe_rf
from rf_callback.plotting import figure_to_array, plot_effective, plot_growth, plot_rf

MODEL = {"name": "small", "side": 64, "layer": "features", "batch": 64, "precision": "32-true"}  # --model
MODELS = {
    "small": {"name": "small", "side": 64, "layer": "features", "batch": 64, "precision": "32-true"},
    "resnet18": {"name": "resnet18", "side": 96, "layer": "net.layer4", "batch": 64, "precision": "32-true"},
    "resnet50": {"name": "resnet50", "side": 224, "layer": "net.layer4", "batch": 128, "precision": "bf16-mixed"},
}
DEVICE = torch.device("cpu")  # --device


class Fit(pl.LightningModule):
    """Cross-entropy classification with SGD: what the benchmark's models train with."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Classifier(Fit):
    """Three stages of conv3 + BN + ReLU, two max-pooled, then global pool and linear: 64 x 64 in, 16 x 16 out."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *stage(3, 16), nn.MaxPool2d(2), *stage(16, 32), nn.MaxPool2d(2), *stage(32, 32), nn.Dropout(0.1)
        )
        self.head = nn.Linear(32, classes)
        self.example_input_array = torch.zeros(2, 3, 64, 64)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class ResNetClassifier(Fit):
    """torchvision's ResNet-18 or ResNet-50 for 10 classes, as ``net``: the GPU fits of the callback's issue."""

    def __init__(self, name: str, side: int):
        super().__init__()
        import torchvision

        self.net = getattr(torchvision.models, name)(num_classes=10)
        self.example_input_array = torch.zeros(2, 3, side, side)

    def forward(self, x):
        return self.net(x)


def new_model() -> pl.LightningModule:
    return Classifier() if MODEL["name"] == "small" else ResNetClassifier(MODEL["name"], MODEL["side"])


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=2)
def _data(samples: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random data set, made once per size (12800 images of 224 x 224 take seconds to draw)."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(samples, 3, side, side, generator=generator), torch.randint(
        0, 10, (samples,), generator=generator
    )


def loaders(samples: int, batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    x, y = _data(samples, MODEL["side"])
    val = max(batch_size, samples // 8)
    return (
        DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[:val], y[:val]), batch_size=batch_size),
    )


ARMS = {  # name: the callback's arguments, or None for no callback
    "without": None,
    "with": {},
    "with, log_images=False": {"log_images": False},
}


class TimedRFCallback(RFCallback):
    """RFCallback that adds up the wall time spent in its own Trainer hooks (``spent``)."""

    spent = 0.0


def _timed(name: str):
    hook = getattr(RFCallback, name)

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            self.spent += time.perf_counter() - start

    return timed


for _name in [n for n in vars(RFCallback) if n.startswith("on_") or n == "setup"]:
    setattr(TimedRFCallback, _name, _timed(_name))


PEAKS: dict[str, int] = {}  # per arm, the largest peak GPU memory of its fits


def fit_seconds(arm: str, epochs: int, samples: int) -> tuple[float, TimedRFCallback | None]:
    """Wall time of one trainer.fit, from a fresh model with the same seed."""
    torch.manual_seed(0)
    model = new_model()
    train, val = loaders(samples, MODEL["batch"])
    callback = None if ARMS[arm] is None else TimedRFCallback(layer=MODEL["layer"], **ARMS[arm])
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="gpu" if DEVICE.type == "cuda" else "cpu", devices=1, default_root_dir=root,
            logger=TensorBoardLogger(root), precision=MODEL["precision"] if DEVICE.type == "cuda" else "32-true",
            callbacks=[callback] if callback else [], enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, log_every_n_steps=10,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(model, train, val)
        sync()
        elapsed = time.perf_counter() - start
    if DEVICE.type == "cuda":
        PEAKS[arm] = max(PEAKS.get(arm, 0), torch.cuda.max_memory_allocated())
    return elapsed, callback


def median_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


STEP = "one training step"


def components(repeats: int = 5) -> dict[str, tuple[float, int, int]]:
    """Seconds of each part of the callback's work (medians), with how often a fit runs it: once, per epoch."""
    torch.manual_seed(0)
    model = new_model().to(DEVICE)
    optimizer = model.configure_optimizers()
    side, layer = MODEL["side"], MODEL["layer"]
    batch = MODEL["batch"]
    x, y = torch.randn(batch, 3, side, side, device=DEVICE), torch.randint(0, 10, (batch,), device=DEVICE)
    bf16 = MODEL["precision"] == "bf16-mixed" and DEVICE.type == "cuda"

    def train_step():
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    shape, inputs = (1, 3, side, side), torch.randn(32, 3, side, side)
    field = probe_rf(model, shape, "center", layer=layer, mode="weights")
    effective = effective_rf(model, inputs, layer=layer)
    metrics = {k: v for k, v in effective.metrics((0.95,)).items() if v is not None}
    rows = [(epoch, metrics) for epoch in range(4)]
    model.train()
    parts = {  # name: (work, runs once per fit (at its start or end), runs per validation epoch)
        STEP: (train_step, 0, 0),
        "probe_rf, mode='theoretical'": (lambda: probe_rf(model, shape, layer=layer), 1, 0),
        "probe_rf, mode='weights'": (lambda: probe_rf(model, shape, layer=layer, mode="weights"), 1, 1),
        "figure_to_array(plot_rf(field))": (lambda: figure_to_array(plot_rf(field)), 2, 0),  # fit start and end
        "effective_rf on 32 inputs": (lambda: effective_rf(model, inputs, layer=layer), 0, 1),
        "figure_to_array(plot_effective(...))": (
            lambda: figure_to_array(plot_effective(effective, image=inputs[0])), 1, 0  # fit end
        ),
        "figure_to_array(plot_growth(...))": (lambda: figure_to_array(plot_growth(rows)), 1, 0),
    }  # fmt: skip
    return {name: (median_of(repeats, fn), start, each) for name, (fn, start, each) in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fits per arm (interleaved)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU fit")
    parser.add_argument("--model", choices=list(MODELS), default="small")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    MODEL.update(MODELS[args.model])
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Lightning's advice on num_workers etc.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, lightning {pl.__version__}, {torch.get_num_threads()} threads")
    side = MODEL["side"]
    print(
        f"fit on {DEVICE}: {MODEL['name']}, {args.epochs} epochs of {args.samples} samples ({side} x {side} RGB, "
        f"batch {MODEL['batch']}, {MODEL['precision']} on a GPU), validation on 1/8 of them"
    )
    fit_seconds("with", 1, 256)  # warm-up: imports, matplotlib, allocator
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    in_hooks: dict[str, list[float]] = {arm: [] for arm in ARMS}  # (fit) / (fit - time in the callback's hooks)
    probes = 0
    for repeat in range(args.repeats):
        for arm in ARMS:
            elapsed, callback = fit_seconds(arm, args.epochs, args.samples)
            times[arm].append(elapsed)
            spent = 0.0 if callback is None else callback.spent
            in_hooks[arm].append(elapsed / (elapsed - spent))
            if callback is not None:
                probes = len(callback.history)
            print(f"  repeat {repeat + 1}, {arm + ' callback':<32} {elapsed:6.2f} s, {spent:5.2f} s in its hooks")
    steps = args.epochs * -(-args.samples // MODEL["batch"])
    print(
        f"\nRFCallback(layer={MODEL['layer']!r}): {probes} probes per fit (fit start + one per validation epoch), "
        f"{steps} steps"
    )
    if PEAKS:
        print(
            "  peak GPU memory of a fit: " + ", ".join(f"{arm} {peak / 2**20:.0f} MiB" for arm, peak in PEAKS.items())
        )
    base = statistics.median(times["without"])
    print(f"  {'fit with callback / without':<32} {'median':>8} {'best':>8} {'in hooks':>9}")
    for arm in list(ARMS)[1:]:
        median = statistics.median(times[arm])
        best = min(times[arm]) / min(times["without"])
        print(f"  {arm:<32} {median / base:7.3f}x {best:7.3f}x {statistics.median(in_hooks[arm]):8.3f}x")
    print("  (target: median <= 1.03x with the defaults; 'in hooks': fit / (fit - time in the callback's hooks),")
    print("   the same fit's own share, which machine-load noise between fits does not blur)")

    parts = components()
    step = parts[STEP][0]
    batch = MODEL["batch"]
    print(f"\nthe callback's parts, in training steps of a batch of {batch} (medians), and how often a fit runs them")
    overhead = 0.0
    for name, (seconds, once, per_epoch) in list(parts.items())[1:]:
        overhead += seconds * (once + per_epoch * args.epochs)
        print(f"  {name:<40} {seconds / step:6.2f} steps  x {once} once + {per_epoch} per epoch")
    estimate = (min(times["without"]) + overhead) / min(times["without"])
    print(f"  sum of the parts over a fit / fastest fit without callback: {estimate:.3f}x (noise-free estimate)")
    images = sum(s * (a + e * args.epochs) for n, (s, a, e) in parts.items() if n.startswith("figure"))
    print(f"  share of the figures in that overhead: {images / overhead:.0%}")


if __name__ == "__main__":
    main()
