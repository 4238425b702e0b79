"""RFCallback configured from a LightningCLI YAML file and from the command line, in a real `fit`."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from rf_callback import RFCallback
from tests.lightning_models import ConvClassifier

cli = pytest.importorskip("lightning.pytorch.cli")
pytest.importorskip("jsonargparse")

ALERTS: list = []


def record_alert(event) -> None:
    """An ``on_alert`` named by its import path in the YAML file."""
    ALERTS.append(event)


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        generator = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 1, 16, 16, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=8)

    val_dataloader = train_dataloader


CONFIG = """\
trainer:
  max_epochs: 2
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: rf_callback.RFCallback
      init_args:
        pos: [4, 4]
        layer: features
        mode: theoretical
        target_size: 9
        erf_samples: 8
        on_alert: tests.test_callback_lightning_cli.record_alert
"""


def callbacks_of(run) -> list[RFCallback]:
    return [c for c in run.trainer.callbacks if isinstance(c, RFCallback)]


def test_yaml_config_builds_the_callback_with_every_argument_and_fits(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(root=tmp_path / "run"))
    ALERTS.clear()
    run = cli.LightningCLI(ConvClassifier, Data, args=["fit", "--config", str(config)])
    (callback,) = callbacks_of(run)
    assert (callback.positions, callback.layer, callback.mode) == ([(4, 4)], "features", "theoretical")
    assert callback.target_size == (9,)
    assert callback.on_alert is record_alert
    assert [h["fields"][0]["size"] for h in callback.history] == [[8, 8]] * 3
    assert ALERTS and ALERTS[0].target == (9, 9)  # a 8 x 8 field never covers 9: the alert reached on_alert


def test_command_line_adds_the_callback(tmp_path):
    args = ["fit", "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=false",
            "--trainer.callbacks+=rf_callback.RFCallback", "--trainer.callbacks.pos=[3, 3]",
            "--trainer.callbacks.layer=features", "--trainer.callbacks.effective=false"]  # fmt: skip
    (callback,) = callbacks_of(cli.LightningCLI(ConvClassifier, Data, args=args))
    assert callback.positions == [(3, 3)] and callback.history[-1]["fields"][0]["bounds"] == [[3, 10], [3, 10]]
