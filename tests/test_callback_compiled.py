"""A compiled LightningModule (trainer.fit(torch.compile(model))): both modes measure the copy, never the live model."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from rf_callback import RFCallback
from tests.lightning_models import ConvClassifier, loaders, trainer_kwargs


class PrunedDuringTraining(ConvClassifier):
    """Prunes the first conv to its centre tap after the first epoch: the weights-mode field shrinks from 8 to 6.

    Its steps do not call ``self.log``, which dynamo cannot compile here (Lightning compiles the steps too).
    """

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            with torch.no_grad():
                mask = torch.zeros_like(self.features[0].weight)
                mask[..., 1, 1] = 1
                self.features[0].weight.mul_(mask)


def test_compiled_lightning_module_keeps_its_theoretical_field_and_its_bn_statistics(tmp_path):
    model = PrunedDuringTraining(lr=0.0)  # no learning: the pruned taps stay zero
    theoretical = RFCallback(pos=(4, 4), layer="features", mode="theoretical", effective=False)
    weights = RFCallback(pos=(4, 4), layer="features", mode="weights", effective=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False, max_epochs=2), callbacks=[theoretical, weights])
    trainer.fit(torch.compile(model, backend="eager"), *loaders())
    assert [h["fields"][0]["size"] for h in theoretical.history] == [[8, 8]] * 3
    # The first conv is pruned to its centre tap at epoch 1: 1 + 0 + 1 + 2 * 2 = 6.
    assert [h["fields"][0]["size"] for h in weights.history] == [[8, 8], [8, 8], [6, 6]]


def test_probe_of_a_module_whose_forward_lightning_compiled_leaves_its_batchnorm_statistics_alone():
    from lightning.pytorch.utilities.compile import from_compiled

    from rf_callback import probe_rf

    model = from_compiled(torch.compile(ConvClassifier(), backend="eager")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert probe_rf(model, (1, 1, 16, 16), (4, 4), layer="features").size == (8, 8)
    assert probe_rf(model, (1, 1, 16, 16), (4, 4), layer="features", mode="weights").size == (8, 8)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.features[1], nn.BatchNorm2d)


class TwoHeads(ConvClassifier):
    """``features`` returns a tuple: the usual map and a coarser one."""

    def __init__(self):
        super().__init__()
        self.features = _Both(self.features)

    def forward(self, x):
        return self.head(self.features(x)[0].mean(dim=(2, 3)))


class _Both(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body, self.pool = body, nn.AvgPool2d(2)

    def forward(self, x):
        fine = self.body(x)
        return fine, self.pool(fine)


def test_a_tuple_output_needs_element_before_the_first_step_and_element_picks_it(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    kwargs = trainer_kwargs(tmp_path, logger=False, max_epochs=1)
    with pytest.raises(MisconfigurationException, match=r"is a tuple of 2 .*pass element="):
        pl.Trainer(**kwargs, callbacks=[RFCallback(layer="features", effective=False)]).fit(TwoHeads(), *loaders())
    callback = RFCallback(pos=(2, 2), layer="features", element=1, effective=False)
    pl.Trainer(**kwargs, callbacks=[callback]).fit(TwoHeads(), *loaders())
    assert callback.history[-1]["fields"][0]["element"] == 1
    assert callback.history[-1]["fields"][0]["size"] == [10, 10]  # r = 8 + (2 - 1) * 2 = 10 at stride 2
    assert "element" in callback.state_key and "element" not in RFCallback(layer="features").state_key
