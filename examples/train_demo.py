"""Does my network see whole objects? Two networks trained on synthetic shapes, with RFCallback(target_size=...).

The data: 48 x 48 images holding one 16 x 16 shape (a filled square or a hollow one) at a random place, made on
the fly from a seeded generator (no download). The label is the shape. A shallow network (two 3x3 convolutions:
a 5 x 5 field) cannot see a whole object: RFCallback warns at fit start and alerts after the first validation
epoch. A deeper one (three stages with max-pooling) can: no alert. Both runs log to TensorBoard in out/logs:
`tensorboard --logdir out/logs`.

Run: python examples/train_demo.py [--epochs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rf_callback import CoverageEvent, RFCallback

OBJECT, IMAGE = 16, 48


def shapes(count: int, seed: int) -> TensorDataset:
    """Images with one filled (label 0) or hollow (label 1) square of side OBJECT, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.randn(count, 1, IMAGE, IMAGE, generator=generator)
    labels = torch.randint(0, 2, (count,), generator=generator)
    corners = torch.randint(0, IMAGE - OBJECT + 1, (count, 2), generator=generator)
    for image, label, (top, left) in zip(images, labels, corners.tolist()):
        image[0, top : top + OBJECT, left : left + OBJECT] += 1.0
        if label == 1:
            image[0, top + 3 : top + OBJECT - 3, left + 3 : left + OBJECT - 3] -= 1.0
    return TensorDataset(images, labels)


class ShapeClassifier(pl.LightningModule):
    """``features`` (the probed feature map), global average pooling, a linear classifier."""

    def __init__(self, features: nn.Module, channels: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(channels, 2)
        self.example_input_array = torch.zeros(1, 1, IMAGE, IMAGE)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch[0])
        self.log("val_acc", (logits.argmax(1) == batch[1]).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def shallow() -> ShapeClassifier:
    """Two 3x3 convolutions: a 5 x 5 field, too small for 16 x 16 objects whatever the training."""
    return ShapeClassifier(nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                         nn.ReLU()), 16)  # fmt: skip


def deep() -> ShapeClassifier:
    """Three stages of 3x3 convolution, BatchNorm, ReLU and 2x2 max-pooling, then a 3x3 convolution: 38 x 38."""
    layers: list[nn.Module] = []
    for cin, cout in ((1, 16), (16, 32), (32, 32)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
    return ShapeClassifier(nn.Sequential(*layers, nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()), 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(0, verbose=False)
    train = DataLoader(shapes(768, seed=1), batch_size=64, shuffle=True)
    val = DataLoader(shapes(256, seed=2), batch_size=128)

    for name, make in (("shallow", shallow), ("deep", deep)):
        alerts: list[CoverageEvent] = []
        callback = RFCallback(layer="features", target_size=OBJECT, on_alert=alerts.append)
        trainer = pl.Trainer(
            max_epochs=args.epochs, accelerator="cpu", logger=TensorBoardLogger(args.out / "logs", name=name),
            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=4,
            callbacks=[callback],
        )  # fmt: skip
        print(f"\n=== {name} network, target object size {OBJECT} x {OBJECT} ===")
        trainer.fit(make(), train, val)
        theoretical = callback.history[0]["fields"][0]
        label = next(iter(callback.history[-1]["effective"]))
        extents = [h["effective"][label]["extent0.95_h"] for h in callback.history if h.get("effective")]
        print(f"{name}: theoretical field {' x '.join(map(str, theoretical['size']))} at the centre; effective "
              f"extent (0.95 of the gradient mass) by epoch: {extents}; val_acc "
              f"{float(trainer.callback_metrics['val_acc']):.2f}")  # fmt: skip
        print(f"{name}: {len(alerts)} alert(s)" + (f": {alerts[0].message}" if alerts else ": covers the target"))
    print(f"\nTensorBoard logs: tensorboard --logdir {args.out / 'logs'}")


if __name__ == "__main__":
    main()
