"""Small LightningModules and data for the callback tests (picklable: defined at module level for ddp_spawn)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class ConvClassifier(pl.LightningModule):
    """conv3 p1, BN, ReLU, max-pool 2, conv3 p1, BN, ReLU, Dropout, global pool, linear.

    At ``features`` (8 x 8 on a 16 x 16 input): r = 1 + 2 + 1 + 2*2 = 8, S = 2, P = 1 + 0 + 2 = 3, so the centre
    (4, 4) sees [5, 12] on both axes.
    """

    def __init__(self, channels: int = 1, classes: int = 3, example: bool = True, lr: float = 0.05):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
        )  # fmt: skip
        self.head = nn.Linear(8, classes)
        self.lr = lr
        if example:
            self.example_input_array = torch.zeros(2, channels, 16, 16)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class NoValidation(ConvClassifier):
    """The same model without a validation loop."""

    validation_step = None  # type: ignore[assignment]


def loaders(n: int = 32, batch_size: int = 8, channels: int = 1) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, channels, 16, 16, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=batch_size, shuffle=True), DataLoader(data, batch_size=batch_size)


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(
        max_epochs=2, accelerator="cpu", devices=1, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, enable_checkpointing=False,
    )  # fmt: skip
    kwargs.update(overrides)
    return kwargs


class ShrinkingField(pl.LightningModule):
    """Three 3x3 unit convolutions whose effective field shrinks to one pixel at ``shrink_epoch``.

    With unit weights each axis' marginal is 1, 3, 6, 7, 6, 3, 1: the extent holding 0.95 of the mass (25.65 of 27)
    is 6 wide (3 + 6 + 7 + 6 + 3 + 1 = 26).
    At the start of ``shrink_epoch`` every kernel becomes a centre tap: the extent is 1. The learning rate is 0,
    so nothing else moves the weights.
    """

    def __init__(self, shrink_epoch: int | None = 1):
        super().__init__()
        self.features = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1, bias=False) for _ in range(3)])
        with torch.no_grad():
            for conv in self.features:
                conv.weight.fill_(1.0)
        self.shrink_epoch = shrink_epoch
        self.example_input_array = torch.zeros(1, 1, 16, 16)

    def forward(self, x):
        return self.features(x)

    def on_train_epoch_start(self):
        if self.current_epoch == self.shrink_epoch:
            with torch.no_grad():
                for conv in self.features:
                    conv.weight.zero_()
                    conv.weight[..., 1, 1] = 1.0

    def training_step(self, batch, batch_idx):
        return self(batch[0]).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_mean", self(batch[0]).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class CountingStream(torch.utils.data.IterableDataset):
    """A streaming data set: every item drawn is new (seeded by how many were drawn before), and ``drawn`` counts them.

    Reading it once more than the Trainer does shifts every later item, so the validation losses change too.
    """

    def __init__(self, items_per_pass: int = 24):
        self.items_per_pass = items_per_pass
        self.drawn = 0

    def __iter__(self):
        for _ in range(self.items_per_pass):
            generator = torch.Generator().manual_seed(self.drawn)
            self.drawn += 1
            yield torch.randn(1, 16, 16, generator=generator), torch.randint(0, 3, (), generator=generator)


class RecordingClassifier(ConvClassifier):
    """ConvClassifier that keeps every validation loss it computes (``val_losses``), sanity check included."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.val_losses: list[float] = []

    def validation_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.val_losses.append(float(loss))
        self.log("val_loss", loss)


class DictBatchClassifier(ConvClassifier):
    """A 3-channel ConvClassifier fed dict batches whose first value is a segmentation mask, not the image."""

    def __init__(self):
        super().__init__(channels=3, example=False)

    def training_step(self, batch, batch_idx):
        return super().training_step((batch["image"], batch["label"]), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch["image"], batch["label"]), batch_idx)


def dict_loaders(n: int = 16, batch_size: int = 8) -> tuple[DataLoader, DataLoader]:
    """Loaders of ``{"mask": (1, 16, 16) bool, "image": (3, 16, 16), "label": int}`` samples."""
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(n, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    data = [{"mask": images[i, :1] > 0, "image": images[i], "label": labels[i]} for i in range(n)]
    return DataLoader(data, batch_size=batch_size, shuffle=True), DataLoader(data, batch_size=batch_size)


class LockedClassifier(ConvClassifier):
    """ConvClassifier holding a ``threading.Lock``: it cannot be deep-copied, its ``features`` can."""

    def __init__(self):
        super().__init__()
        import threading

        self.lock = threading.Lock()


class NamedBatchClassifier(ConvClassifier):
    """ConvClassifier fed ``(names, images, labels)`` batches: the first element of a batch is a list of strings."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch[1:], batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step(batch[1:], batch_idx)


def named_loaders(n: int = 16, batch_size: int = 8) -> tuple[DataLoader, DataLoader]:
    """Loaders of ``(name, image (1, 16, 16), label)`` samples."""
    generator = torch.Generator().manual_seed(3)
    images, labels = torch.randn(n, 1, 16, 16, generator=generator), torch.randint(0, 3, (n,), generator=generator)
    data = [(f"sample{i}", images[i], labels[i]) for i in range(n)]
    return DataLoader(data, batch_size=batch_size, shuffle=True), DataLoader(data, batch_size=batch_size)


class ResidualBlock(nn.Module):
    """Two 3 x 3 convolutions (padding 1) around an identity: r grows by 4 input strides."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class ResidualClassifier(ConvClassifier):
    """conv 3, residual block, max-pool 2, residual block: at ``features``, r = 3 + 4 + 1 + 2*4 = 16, S = 2, P = 7.

    Under Lightning's ``ModelParallelStrategy``, ``configure_model`` shards each block and then the whole module
    with FSDP2's ``fully_shard`` on the data-parallel mesh; elsewhere it leaves the module whole.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), ResidualBlock(8), nn.MaxPool2d(2), ResidualBlock(8)
        )

    def configure_model(self):
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        for block in self.features:
            if isinstance(block, ResidualBlock):
                fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(self, mesh=mesh["data_parallel"])
