"""Does my network see whole objects? Two small residual networks trained with RFCallback(target_size=16).

The data: 48 x 48 noisy images holding two 3 x 3 dots at opposite corners of a 16 x 16 square (class "near") or of a
24 x 24 one ("far"), near the centre. One dot says nothing about the class: an output must see both dots of a near
pair at once, a field of 16 x 16 at least, so the target size is 16.

Each residual block starts as the identity (its last BatchNorm weight is zero, as torchvision's zero_init_residual):
at initialisation an output sees only through the first 3 x 3 convolution.
- deep (max-pooling, two blocks, max-pooling, two blocks; theoretical field 48 x 48): as it learns to relate the
  dots, its effective field (the extent holding 0.95 of the gradient mass of the centre output) grows by about 15
  pixels over the epochs, from about 20 to about 35, past the target: no alert.
- shallow (one block at full resolution; theoretical field 7 x 7, smaller than the objects): RFCallback warns at fit
  start and alerts after the first epoch; its effective field stays a few pixels and its accuracy at chance.

Run: python examples/train_demo.py [--epochs N] [--seed S] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rf_callback import CoverageEvent, RFCallback, probe_rf

IMAGE, DOT, NEAR, FAR = 48, 3, 16, 24


def pairs(count: int, seed: int) -> TensorDataset:
    """Two dots at opposite corners of a NEAR x NEAR (label 1) or FAR x FAR (label 0) square, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.randn(count, 1, IMAGE, IMAGE, generator=generator)
    labels = torch.randint(0, 2, (count,), generator=generator)
    shifts = torch.randint(-8, 9, (count, 2), generator=generator)
    for image, label, (dy, dx) in zip(images, labels.tolist(), shifts.tolist()):
        side = NEAR if label else FAR
        top, left = (IMAGE - side) // 2 + dy, (IMAGE - side) // 2 + dx
        for y, x in ((top, left), (top + side - DOT, left + side - DOT)):
            image[0, y : y + DOT, x : x + DOT] += 1.0
    return TensorDataset(images, labels)


class Block(nn.Module):
    """A residual block that starts as the identity: its last BatchNorm weight is zero."""

    def __init__(self, channels: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )  # fmt: skip
        nn.init.zeros_(self.branch[-1].weight)

    def forward(self, x):
        return torch.relu(x + self.branch(x))


class PairClassifier(pl.LightningModule):
    """``features`` (a 3x3 stem, then the stages: the probed feature map), global average pooling, a linear layer."""

    def __init__(self, *stages: nn.Module, channels: int = 16):
        super().__init__()
        stem = [nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
        self.features = nn.Sequential(*stem, *stages)
        self.head = nn.Linear(channels, 2)
        self.example_input_array = torch.zeros(1, 1, IMAGE, IMAGE)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def deep() -> PairClassifier:
    """Two stages of 2x2 max-pooling and two blocks: a 48 x 48 field (54 x 54 before the border cuts it)."""
    return PairClassifier(nn.MaxPool2d(2), Block(16), Block(16), nn.MaxPool2d(2), Block(16), Block(16))


def shallow() -> PairClassifier:
    """One block at full resolution: a 7 x 7 field, too small for 16 x 16 objects whatever the training."""
    return PairClassifier(Block(16))


def where_to_look(callback: RFCallback, logdir: pathlib.Path, index: int = 0) -> str:
    """The TensorBoard command and the names of the charts of one probed position (its index in ``pos``)."""
    layer, base = callback.layer_name, f"rf/{callback.layer_name}/pos{index}"
    return (
        f"tensorboard --logdir {logdir}\n"
        f"  Custom Scalars tab: chart '{layer} · pos{index} · size along h', tags {base}/size_h/theoretical, "
        f".../weights, .../effective, .../target\n"
        f"  Images tab: {base}/overlay (the field on a validation input), {base}/growth (the extent by epoch)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    train = DataLoader(pairs(512, seed=args.seed + 1), batch_size=32, shuffle=True)
    val = DataLoader(pairs(256, seed=args.seed + 2), batch_size=128)

    summary = []
    for name, make in (("deep", deep), ("shallow", shallow)):
        pl.seed_everything(args.seed, verbose=False)
        alerts: list[CoverageEvent] = []
        callback = RFCallback(layer="features", target_size=NEAR, on_alert=alerts.append)
        trainer = pl.Trainer(
            max_epochs=args.epochs, accelerator="cpu", logger=TensorBoardLogger(args.out / "logs", name=name),
            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=4,
            callbacks=[callback],
        )  # fmt: skip
        print(f"=== {name} network ===")
        model = make()
        trainer.fit(model, train, val)
        theoretical = probe_rf(model, (1, 1, IMAGE, IMAGE), layer="features", mode="theoretical").size
        metric = f"extent{callback.coverage_mass:g}_h"  # one position probed: the first entry of each epoch
        extents = [int(next(iter(h["effective"].values()))[metric]) for h in callback.history if h.get("effective")]
        said = [f"epoch {a.epoch}, extent {_sizes(a.extent)} < target {_sizes(a.target)}" for a in alerts]
        summary.append(
            f"{name}: theoretical field {_sizes(theoretical)}; effective extent along h by epoch {extents}; "
            f"val_acc {float(trainer.callback_metrics['val_acc']):.2f}; {len(alerts)} alert(s){': ' if said else ''}"
            + "; ".join(said)
        )
    print(f"\n=== target {NEAR} x {NEAR}, effective extent holding {callback.coverage_mass:g} of the gradient mass ===")
    print(*summary, sep="\n")
    print("\nWhere to look (both runs log under the same names):", where_to_look(callback, args.out / "logs"))


def _sizes(values) -> str:
    return " x ".join(map(str, values))


if __name__ == "__main__":
    main()
