"""When the callback probes, and on what input shape: the Trainer's epochs, loops and batches, and rank agreement."""

from __future__ import annotations

import torch


class ProbeSchedule:
    """Decides after which epochs the callback probes: every ``every_n_epochs``-th, once per epoch.

    Args:
        every_n_epochs: probe after every n-th epoch (validation epochs, or training epochs without validation).
    """

    def __init__(self, every_n_epochs: int):
        self.every_n_epochs = every_n_epochs
        self.last_probed_epoch: int | None = None
        # Validation by steps (check_val_every_n_epoch=None) does not follow epochs: its epochs are counted.
        self.validated_epochs = 0
        self.last_validated_epoch: int | None = None

    def due(self, epoch: int, validation_every: int | None = 1) -> bool:
        """Whether a probe is due at the end of ``epoch`` (0-based) and has not run in it yet.

        Args:
            epoch: the Trainer's ``current_epoch``.
            validation_every: the Trainer's ``check_val_every_n_epoch`` where the probes follow validation epochs
                (1 where they follow training epochs): every ``every_n_epochs``-th validation epoch is then every
                ``validation_every * every_n_epochs``-th training epoch. ``None`` (validation every so many steps,
                across epochs): each call counts its epoch as a validation epoch, once.

        Returns:
            True at every ``every_n_epochs``-th epoch not probed yet.
        """
        if validation_every is None:
            if self.last_validated_epoch != epoch:
                self.last_validated_epoch = epoch
                self.validated_epochs += 1
            nth = self.validated_epochs
        else:
            nth, remainder = divmod(epoch + 1, validation_every)
            if remainder:
                return False
        return self.last_probed_epoch != epoch and nth % self.every_n_epochs == 0

    def probed(self, epoch: int) -> None:
        """Records that ``epoch`` was probed, so a second hook in the same epoch does not probe again.

        Args:
            epoch: the Trainer's ``current_epoch``.
        """
        self.last_probed_epoch = epoch

    def state_dict(self) -> dict[str, int | None]:
        """The epoch probed last and the count of validation epochs under validation by steps, for checkpoints.

        A fit resumed from a checkpoint written in the middle of an epoch already probed (validation twice an epoch)
        does not probe that epoch again.

        Returns:
            A dict that :meth:`load_state_dict` takes.
        """
        return {
            "last_probed_epoch": self.last_probed_epoch,
            "validated_epochs": self.validated_epochs,
            "last_validated_epoch": self.last_validated_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what :meth:`state_dict` kept (none of it from checkpoints written before it was kept).

        Args:
            state: what :meth:`state_dict` returned.
        """
        self.last_probed_epoch = state.get("last_probed_epoch")
        self.validated_epochs = int(state.get("validated_epochs", 0))
        self.last_validated_epoch = state.get("last_validated_epoch")


def strategy_refusal(strategy) -> str | None:
    """Why RFCallback cannot run under ``strategy``, or None where it can.

    DDP and single devices hold whole parameters; ``ModelParallelStrategy`` (FSDP2's ``fully_shard``) shards them as
    ``DTensor``s, whose shapes the theoretical copy reads and whose values weights mode and the effective field gather
    (the probe's copy, not the live model); ``FSDPStrategy`` (FSDP1) is gathered whole around each probe; DeepSpeed
    stages 1 and 2 shard only the optimizer state and gradients.

    Args:
        strategy: the Trainer's strategy.

    Returns:
        The reason and the fix, or None.
    """
    name = type(strategy).__name__
    if name == "DeepSpeedStrategy" and getattr(strategy, "zero_stage_3", False):
        return (
            "RFCallback does not support DeepSpeed ZeRO stage 3: its parameters are partitioned and gathered only "
            "inside DeepSpeed's own hooks, so the probe's copy would hold empty tensors. Use stage 1 or 2 (whole "
            "parameters on every process), ModelParallelStrategy with fully_shard (FSDP2), or remove the callback"
        )
    return None


def ranks_agree(trainer, succeeded: bool) -> bool:
    """Whether every rank succeeded: a collective on every rank, so one rank's failure never hangs the others.

    Args:
        trainer: the Lightning ``Trainer``.
        succeeded: whether this rank succeeded.

    Returns:
        ``succeeded`` on a single process; under DDP, whether it is true on all ranks.
    """
    if trainer.world_size > 1:
        return trainer.strategy.reduce_boolean_decision(succeeded, all=True)
    return succeeded


def has_validation(trainer, pl_module) -> bool:
    """Whether the run validates: a ``validation_step``, validation data, and validation not switched off.

    Args:
        trainer: the Lightning ``Trainer``.
        pl_module: the ``LightningModule``.

    Returns:
        True when validation epochs will run.
    """
    if not _overrides(pl_module, "validation_step") or trainer.limit_val_batches == 0:
        return False
    # Where the validation data comes from: val_dataloaders, a datamodule or the module's val_dataloader hook.
    fit_loop = getattr(trainer, "fit_loop", None)
    source = getattr(getattr(getattr(fit_loop, "epoch_loop", None), "val_loop", None), "_data_source", None)
    is_defined = getattr(source, "is_defined", None)
    return bool(is_defined()) if callable(is_defined) else True


def _overrides(module, name: str) -> bool:
    """Whether the user's class defines ``name`` (for ``lightning`` and ``pytorch_lightning`` modules alike)."""
    for cls in type(module).__mro__:
        if name in vars(cls):
            return vars(cls)[name] is not None and not cls.__module__.startswith(("lightning.", "pytorch_lightning."))
    return False


def first_loader(loaders):
    """The first of the Trainer's data loaders (a loader, a list, a tuple or a dict of them), or ``None``.

    Args:
        loaders: ``trainer.val_dataloaders`` or the like.

    Returns:
        The first loader, or ``None`` when there is none.
    """
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def first_tensor(item) -> torch.Tensor | None:
    """The input of a batch or sample: the tensor itself, or the first tensor of a tuple, list or dict.

    Args:
        item: a batch as the Trainer hands it over, or ``example_input_array``.

    Returns:
        The tensor, or ``None`` when there is none.
    """
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, dict):
        item = list(item.values())
    if isinstance(item, (tuple, list)) and item:
        return first_tensor(item[0])
    return None


def batch_input_shape(batch) -> tuple[int, ...] | None:
    """The shape of a batch's input (see :func:`first_tensor`), with a batch of 1.

    Args:
        batch: a batch as the Trainer hands it over, or ``example_input_array``.

    Returns:
        ``(1, C, *spatial)`` with 1 to 3 spatial axes, or ``None`` when the batch has no such tensor.
    """
    inputs = first_tensor(batch)
    return (1, *inputs.shape[1:]) if inputs is not None and 3 <= inputs.dim() <= 5 else None
