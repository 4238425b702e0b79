"""RFCallback: probes the receptive field of the model being trained and logs it to TensorBoard."""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from rf_callback._model_copy import MODES, preserved_random_state
from rf_callback.alerts import ON_MISS, CoverageError, CoverageEvent, CoverageTracker, uncoverable_message
from rf_callback.effective_probe import effective_rf
from rf_callback.probe import probe_rf
from rf_callback.result import EffectiveField, ReceptiveField

_AXIS_NAMES = {1: ("l",), 2: ("h", "w"), 3: ("d", "h", "w")}
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


class RFCallback(Callback):
    """Probes the receptive field of the model being trained and logs it to the Trainer's loggers.

    At fit start it logs the theoretical field of the architecture (``rf_theoretical/...``) and the probe of the
    initial weights (``rf/...``) at step 0; after every ``every_n_epochs``-th validation epoch it logs the probe of
    the current weights at the current global step. Without a validation loop it probes at the end of each
    training epoch instead, and says so once.

    Each probe runs on a deep copy of the live module (made outside inference mode, in eval mode, float32
    whatever the Trainer's precision, biases zeroed, parameters not requiring grad), so the training run is
    unchanged: same weights, optimizer state, BatchNorm statistics, random states and logged metrics, bit for
    bit. A model or submodule compiled with ``torch.compile`` is unwrapped first.

    Logged, for every probed position and spatial axis (``l``; ``h``, ``w``; or ``d``, ``h``, ``w``):

    - scalars ``rf/<layer>/<pos>/size_<axis>``, ``.../first_<axis>`` and ``.../last_<axis>``, through Lightning's
      logging path, so ``EarlyStopping`` and ``ModelCheckpoint`` can monitor them (``<layer>`` is ``output`` for
      the model's output, ``<pos>`` the indices joined by ``_``);
    - images, to every ``TensorBoardLogger`` in ``trainer.loggers``: the heatmap (``rf/<layer>/<pos>/heatmap``)
      at every probe, and the figure of :func:`rf_callback.plotting.plot_rf` (``rf/<layer>/<pos>/figure``) at fit
      start and fit end only (a figure costs as much as a few training steps). Without a TensorBoard logger the
      callback warns once and logs the scalars where it can.

    For a ``pytorch_lightning`` Trainer, use the twin ``rf_callback.pl.RFCallback``.

    Args:
        pos: the output position(s) to probe: an index tuple (an int for 1D), a list of tuples, or ``"center"``.
        layer: dotted name of the submodule whose output is probed (within ``module`` if given); ``None`` probes
            the output. A classifier must name its last feature map here.
        input_shape: the input shape ``(N, C, *spatial)`` (``N`` is ignored). Default: the LightningModule's
            ``example_input_array``, else the first batch the Trainer runs (validation during the sanity check, or
            training): its first tensor.
        mode: what the scalars and images show: ``"weights"`` (default: what the current weights connect) or
            ``"theoretical"`` (the architecture's field, which does not change during training).
        module: dotted name of the submodule to copy and probe instead of the whole LightningModule (e.g. the
            backbone), which bounds the memory a probe takes.
        every_n_epochs: probe after every n-th validation epoch (or training epoch without validation). With the
            Trainer's ``check_val_every_n_epoch=k``, probes come every ``k * n`` training epochs.
        log_images: log the heatmap and the figure to TensorBoard.
        strict: raise when a probe fails during training (non-finite weights, out of memory); by default the
            callback warns with the reason and training goes on.
        draws: weights mode: how many random inputs the field is the union over.
        seed: seed of the private generators (weights-mode inputs, the choice of validation inputs).
        effective: compute the effective field (:func:`rf_callback.effective_rf`) on ``erf_samples`` validation
            inputs after every probed validation epoch and log its metrics (``erf/<layer>/<pos>/<metric>``), its
            heatmap, an overlay on a validation input and, at fit end, a growth curve. ``None`` (default): on
            whenever the run has validation data.
        erf_samples: how many validation inputs, chosen once with a private generator so epochs compare.
        target_size: the size of the objects the network must see (an int, or one per spatial axis, in input
            pixels or samples). At fit start, a warning if even the theoretical field is smaller. After each
            effective-field check, ``rf/<layer>/<pos>/covers_target`` (1 or 0) and ``.../coverage_margin`` (the
            smallest extent minus target over the axes) are logged, and an alert is raised when coverage is lost,
            or not reached within ``patience`` checks.
        coverage_mass: the mass fraction of the effective extent compared with ``target_size``.
        patience: how many checks coverage may take to be reached before the alert.
        on_miss: what an alert does: ``"warn"`` (a warning naming layer, position, epoch, extent, target and
            theoretical field), ``"stop"`` (also stops training, the Lightning way: all DDP ranks agree through
            the strategy) or ``"raise"`` (also raises :class:`rf_callback.CoverageError`).
        on_alert: called with the :class:`rf_callback.CoverageEvent` of every alert.

    Raises:
        MisconfigurationException: an argument is not allowed (at construction), or does not fit the model
            (``pos`` outside the output map, unknown ``layer`` or ``module``, no input shape to be found, a sharded
            strategy) before the first training step.
    """

    def __init__(
        self,
        pos: str | int | Sequence[int] | Sequence[Sequence[int]] = "center",
        *,
        layer: str | None = None,
        input_shape: Sequence[int] | None = None,
        mode: str = "weights",
        module: str | None = None,
        every_n_epochs: int = 1,
        log_images: bool = True,
        strict: bool = False,
        draws: int = 8,
        seed: int = 0,
        effective: bool | None = None,
        erf_samples: int = 32,
        target_size: int | Sequence[int] | None = None,
        coverage_mass: float = 0.95,
        patience: int = 1,
        on_miss: str = "warn",
        on_alert=None,
    ):
        super().__init__()
        self.positions = _checked_positions(pos)
        self.pos = pos
        for name, value in (("layer", layer), ("module", module)):
            if value is not None and (not isinstance(value, str) or not value):
                raise MisconfigurationException(
                    f"RFCallback({name}={value!r}): {name} must be a dotted submodule name such as 'backbone.layer4' "
                    f"(see model.named_modules()), or None"
                )
        if mode not in MODES:
            raise MisconfigurationException(f"RFCallback(mode={mode!r}): mode must be one of {MODES}")
        if not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool) or every_n_epochs < 1:
            raise MisconfigurationException(
                f"RFCallback(every_n_epochs={every_n_epochs!r}): every_n_epochs must be an int >= 1"
            )
        if not isinstance(draws, int) or draws < 1:
            raise MisconfigurationException(f"RFCallback(draws={draws!r}): draws must be an int >= 1")
        if input_shape is not None:
            shape = tuple(input_shape) if isinstance(input_shape, Sequence) else ()
            if not 3 <= len(shape) <= 5 or not all(isinstance(s, int) and s > 0 for s in shape):
                raise MisconfigurationException(
                    f"RFCallback(input_shape={input_shape!r}): input_shape must be (N, C, L), (N, C, H, W) or "
                    f"(N, C, D, H, W) with positive ints, or None to take it from example_input_array or a batch"
                )
        for name, value in (("erf_samples", erf_samples), ("patience", patience)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MisconfigurationException(f"RFCallback({name}={value!r}): {name} must be an int >= 1")
        if on_miss not in ON_MISS:
            raise MisconfigurationException(f"RFCallback(on_miss={on_miss!r}): on_miss must be one of {ON_MISS}")
        if on_alert is not None and not callable(on_alert):
            raise MisconfigurationException(f"RFCallback(on_alert={on_alert!r}): on_alert must be callable or None")
        if not isinstance(coverage_mass, (int, float)) or not 0 < coverage_mass <= 1:
            raise MisconfigurationException(
                f"RFCallback(coverage_mass={coverage_mass!r}): coverage_mass must be a mass fraction in (0, 1]"
            )
        if effective not in (None, True, False):
            raise MisconfigurationException(f"RFCallback(effective={effective!r}): effective must be a bool or None")
        self.target_size = _checked_target(target_size)
        self.effective, self.erf_samples, self.coverage_mass = effective, erf_samples, float(coverage_mass)
        self.patience, self.on_miss, self.on_alert = patience, on_miss, on_alert
        self.trackers: dict[str, CoverageTracker] = {}
        self._erf_inputs: torch.Tensor | None = None
        self._last_fields: list[ReceptiveField] = []
        self._last_effective: dict[str, EffectiveField] = {}
        self._theoretical: list[ReceptiveField] | None = None
        self.layer, self.module, self.mode = layer, module, mode
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.every_n_epochs, self.log_images, self.strict = every_n_epochs, log_images, strict
        self.draws, self.seed = draws, seed
        self.history: list[dict[str, Any]] = []
        self._initial_logged = False
        self._last_probed_epoch: int | None = None
        self._said_no_tensorboard = False
        self._said_no_validation = False

    @property
    def state_key(self) -> str:
        """Identifies this callback's state in a checkpoint by its arguments, so several can share a Trainer."""
        return self._generate_state_key(pos=str(self.pos), layer=self.layer, module=self.module, mode=self.mode)

    @property
    def layer_name(self) -> str:
        """The probed layer as it appears in logged names: ``module.layer``, or ``output``."""
        return ".".join(n for n in (self.module, self.layer) if n) or "output"

    # -- Trainer hooks

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuses sharded strategies, whose parameters no single process holds."""
        name = type(trainer.strategy).__name__
        if name in _SHARDED_STRATEGIES:
            raise MisconfigurationException(
                f"RFCallback does not support {name}: a sharded model cannot be copied whole on one process. Use "
                f"strategy='ddp' (or a single device), or remove the callback"
            )

    def on_fit_start(self, trainer, pl_module) -> None:
        """Probes the initial weights when the input shape is already known; else waits for the first batch."""
        if self.effective and not _has_validation(trainer, pl_module):
            raise MisconfigurationException(
                "RFCallback(effective=True) needs validation data to measure the effective field on: add a "
                "validation_step and val_dataloaders, or pass effective=False"
            )
        if self.input_shape is None:
            self.input_shape = _example_input_shape(pl_module)
        if self.input_shape is not None:
            self._probe_initial(trainer, pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Takes the input shape from the first validation batch (the sanity check) when it is still unknown."""
        self._from_first_batch(trainer, pl_module, batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        """Takes the input shape from the first training batch when it is still unknown: before any step."""
        self._from_first_batch(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """Probes the current weights after every ``every_n_epochs``-th validation epoch (not the sanity check).

        Under ``trainer.validate()`` it probes once, at the end of the validation run.
        """
        if trainer.sanity_checking or self.input_shape is None:
            return
        if trainer.state.fn == "fit" and self._should_skip(trainer):
            return
        self._probe_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Probes at the end of each training epoch when the run has no validation loop."""
        if _has_validation(trainer, pl_module) or self._should_skip(trainer):
            return
        if not self._said_no_validation:
            self._said_no_validation = True
            rank_zero_info("RFCallback: no validation loop, so the field is probed at the end of each training epoch")
        self._probe_and_log(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The history of results (effective fields and alerts included) and the alert state, for checkpoints."""
        return {
            "history": copy.deepcopy(self.history),
            "initial_logged": self._initial_logged,
            "trackers": {label: tracker.state_dict() for label, tracker in self.trackers.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the history, so a resumed run continues it without logging the initial field twice."""
        self.history = list(state_dict.get("history", []))
        self._initial_logged = bool(state_dict.get("initial_logged", bool(self.history)))
        for label, state in state_dict.get("trackers", {}).items():
            self._tracker(label).load_state_dict(state)

    def on_fit_end(self, trainer, pl_module) -> None:
        """Logs the figures of the last probe and the growth curve of the effective-field metrics against epoch."""
        boards = _tensorboard_loggers(trainer)
        if not boards or not trainer.is_global_zero or not self.log_images:
            return
        from rf_callback.plotting import figure_to_array, plot_effective, plot_growth

        step = trainer.global_step
        for field in self._last_fields:
            image = figure_to_array(plot_rf_figure(field))
            for board in boards:
                board.experiment.add_image(
                    f"rf/{self.layer_name}/{_position_label(field.position)}/figure", image, step, dataformats="HWC"
                )
        for label, field in self._last_effective.items():
            image = figure_to_array(plot_effective(field, image=self._erf_inputs[0], q=self.coverage_mass))
            for board in boards:
                board.experiment.add_image(f"erf/{self.layer_name}/{label}/overlay", image, step, dataformats="HWC")
        entries = [h for h in self.history if h.get("effective")]
        for label in entries[-1]["effective"] if entries else []:
            rows = [(h["epoch"], h["effective"][label]) for h in entries if label in h["effective"]]
            image = figure_to_array(plot_growth(rows, title=f"effective field of {self.layer_name} at {label}"))
            for board in boards:
                board.experiment.add_image(
                    f"erf/{self.layer_name}/{label}/growth", image, global_step=trainer.global_step, dataformats="HWC"
                )

    # -- decisions

    def _should_skip(self, trainer) -> bool:
        epoch = trainer.current_epoch
        return self._last_probed_epoch == epoch or (epoch + 1) % self.every_n_epochs != 0 or self.input_shape is None

    def _from_first_batch(self, trainer, pl_module, batch) -> None:
        if self.input_shape is not None:
            return
        shape = _batch_input_shape(batch)
        if shape is None:
            raise MisconfigurationException(
                "RFCallback cannot find the input shape: pass RFCallback(input_shape=(N, C, H, W)), set the "
                "LightningModule's example_input_array, or yield batches whose first element is the input tensor"
            )
        self.input_shape = shape
        if trainer.state.fn == "fit":
            self._probe_initial(trainer, pl_module)

    # -- probing and logging

    def _target(self, pl_module) -> nn.Module:
        module = getattr(pl_module, "_orig_mod", pl_module)
        if self.module is None:
            return module
        try:
            return module.get_submodule(self.module)
        except AttributeError:
            names = [n for n, _ in module.named_modules() if n][:10]
            raise MisconfigurationException(
                f"RFCallback(module={self.module!r}) is not a submodule of {type(module).__name__}; some names: {names}"
            ) from None

    def _probe(self, pl_module, mode: str) -> list[ReceptiveField]:
        fields = probe_rf(
            self._target(pl_module), self.input_shape, self.positions if len(self.positions) > 1 else self.positions[0],
            layer=self.layer, mode=mode, draws=self.draws, seed=self.seed,
        )  # fmt: skip
        return fields if isinstance(fields, list) else [fields]

    def _probe_initial(self, trainer, pl_module) -> None:
        if self._initial_logged:
            return
        try:
            self._theoretical = theoretical = self._probe(pl_module, "theoretical")
        except ValueError as error:  # pos or layer that does not fit the model: refused before the first step
            raise MisconfigurationException(f"RFCallback: {error}") from error
        for field in theoretical:
            rank_zero_info(f"RFCallback: {field.describe(stride=False)}")
            target = self._target_for(field)
            warning = (
                None if target is None else uncoverable_message(self.layer_name, field.position, field.size, target)
            )
            if warning is not None:
                rank_zero_warn(warning)
        self._log_fields(trainer, "rf_theoretical", theoretical, step=0, figures=False)
        current = theoretical if self.mode == "theoretical" else self._safe_probe(pl_module)
        if current is not None:
            self._log_fields(trainer, "rf", current, step=0, figures=True)
            self._record(trainer, current, initial=True)
        self._initial_logged = True

    def _theoretical_fields(self, pl_module) -> list[ReceptiveField]:
        """The theoretical fields, probed once: they depend on the architecture and the input shape, not the weights.

        The effective-field metrics read their centres, so their geometry is measured once per fit, at the first
        validation epoch.
        """
        if self._theoretical is None:
            self._theoretical = self._probe(pl_module, "theoretical")
        return self._theoretical

    def _safe_probe(self, pl_module) -> list[ReceptiveField] | None:
        try:
            return self._probe(pl_module, self.mode)
        except Exception as error:  # noqa: BLE001 - the training run is the user's: warn unless strict
            if self.strict:
                raise
            rank_zero_warn(f"RFCallback: the probe failed, training goes on ({type(error).__name__}: {error})")
            return None

    def _probe_and_log(self, trainer, pl_module) -> None:
        self._last_probed_epoch = trainer.current_epoch
        fields = self._safe_probe(pl_module)
        if fields is None:
            return
        self._log_fields(trainer, "rf", fields, step=trainer.global_step, pl_module=pl_module, figures=False)
        self._last_fields = fields
        self._record(trainer, fields, initial=False)
        if self._effective_on(trainer, pl_module):
            self._effective_and_alert(trainer, pl_module)

    # -- the effective field and the alert

    def _effective_on(self, trainer, pl_module) -> bool:
        if self.effective is False or trainer.state.fn != "fit":
            return False
        return _has_validation(trainer, pl_module) and _first_loader(trainer.val_dataloaders) is not None

    def _tracker(self, label: str) -> CoverageTracker:
        if label not in self.trackers:
            self.trackers[label] = CoverageTracker(target=self.target_size or (), patience=self.patience)
        return self.trackers[label]

    def _target_for(self, field: ReceptiveField) -> tuple[int, ...] | None:
        if self.target_size is None:
            return None
        n = len(field.bounds)
        if len(self.target_size) not in (1, n):
            raise MisconfigurationException(
                f"RFCallback(target_size={self.target_size!r}) must be one int or {n} (one per spatial axis)"
            )
        return self.target_size * n if len(self.target_size) == 1 else self.target_size

    def _effective_and_alert(self, trainer, pl_module) -> None:
        try:
            if self._erf_inputs is None:
                self._erf_inputs = _validation_inputs(trainer, self.erf_samples, self.seed)
            fields = [
                effective_rf(self._target(pl_module), self._erf_inputs, p, layer=self.layer, theoretical=theoretical)
                for p, theoretical in zip(self.positions, self._theoretical_fields(pl_module))
            ]
        except Exception as error:  # noqa: BLE001 - the training run is the user's: warn unless strict
            if self.strict:
                raise
            rank_zero_warn(
                f"RFCallback: the effective field failed, training goes on ({type(error).__name__}: {error})"
            )
            return
        entry, events = {}, []
        for field in fields:
            label = _position_label(field.position)
            metrics = {k: v for k, v in field.metrics((self.coverage_mass,)).items() if v is not None}
            entry[label] = metrics
            logged = {f"erf/{self.layer_name}/{label}/{k}": float(v) for k, v in metrics.items()}
            target = self._target_for(field.theoretical)
            if target is not None:
                tracker = self._tracker(label)
                tracker.target = target
                extent = tuple(last - first + 1 for first, last in field.extent(self.coverage_mass))
                reason = tracker.update(extent)
                base = f"rf/{self.layer_name}/{label}"
                logged[f"{base}/covers_target"] = float(tracker.covered)
                logged[f"{base}/coverage_margin"] = float(tracker.margin(extent))
                if reason is not None:
                    event = CoverageEvent(
                        reason=reason, epoch=trainer.current_epoch, layer=self.layer_name, position=field.position,
                        extent=extent, target=target, theoretical=field.theoretical.size,
                        coverage_mass=self.coverage_mass,
                    )  # fmt: skip
                    tracker.events.append(event.to_dict())
                    events.append(event)
            for name, value in logged.items():
                pl_module.log(name, value, on_epoch=True, logger=False, sync_dist=True)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(logged, step=trainer.global_step)
            if self.log_images:
                self._log_effective_images(trainer, label, field)
        self.history[-1]["effective"] = entry
        self._alert(trainer, events)

    def _alert(self, trainer, events: list[CoverageEvent]) -> None:
        for event in events:
            rank_zero_warn(event.message)
            if self.on_alert is not None:
                self.on_alert(event)
        if self.on_miss == "stop" and self.target_size is not None:
            # A collective on every check, not only on alerts, so no rank waits for the others.
            stop = trainer.strategy.reduce_boolean_decision(bool(events), all=False)
            trainer.should_stop = trainer.should_stop or stop
        if self.on_miss == "raise" and events:
            raise CoverageError(events[0])

    def _log_effective_images(self, trainer, label: str, field: EffectiveField) -> None:
        self._last_effective[label] = field  # its overlay on a validation input is drawn at fit end
        boards = _tensorboard_loggers(trainer)
        if not boards or not trainer.is_global_zero:
            return
        heatmap = _normalised(field.heatmap)
        for board in boards:
            board.experiment.add_image(
                f"erf/{self.layer_name}/{label}/heatmap", heatmap, global_step=trainer.global_step, dataformats="HW"
            )

    def _record(self, trainer, fields: list[ReceptiveField], *, initial: bool) -> None:
        self.history.append(
            {
                "epoch": None if initial else trainer.current_epoch,
                "step": 0 if initial else trainer.global_step,
                "fields": [f.to_dict(geometry=False) for f in fields],
            }
        )

    def _log_fields(self, trainer, prefix: str, fields, *, step: int, figures: bool, pl_module=None) -> None:
        metrics = {}
        for field in fields:
            metrics.update(_scalars(prefix, self.layer_name, field))
        if pl_module is not None:  # for EarlyStopping, ModelCheckpoint and the progress bar (not allowed at fit start)
            for name, value in metrics.items():
                pl_module.log(name, value, on_epoch=True, logger=False, sync_dist=True)
        # The loggers get the scalars directly, at the step of the images, so one probe lies on one step.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        if self.log_images:
            self._log_images(trainer, prefix, fields, step, figures=figures)

    def _log_images(self, trainer, prefix: str, fields: list[ReceptiveField], step: int, *, figures: bool) -> None:
        boards = _tensorboard_loggers(trainer)
        if not boards:
            if not self._said_no_tensorboard:
                self._said_no_tensorboard = True
                rank_zero_warn(
                    "RFCallback: no TensorBoardLogger among the Trainer's loggers, so no heatmaps are logged "
                    "(scalars still are); add lightning.pytorch.loggers.TensorBoardLogger to see them"
                )
            return
        if not trainer.is_global_zero:
            return
        from rf_callback.plotting import figure_to_array

        for field in fields:
            base = f"{prefix}/{self.layer_name}/{_position_label(field.position)}"
            heatmap = _heatmap_image(field)
            figure = figure_to_array(plot_rf_figure(field)) if figures else None
            for board in boards:
                board.experiment.add_image(f"{base}/heatmap", heatmap, global_step=step, dataformats="HW")
                if figure is not None:
                    board.experiment.add_image(f"{base}/figure", figure, global_step=step, dataformats="HWC")


def _tensorboard_loggers(trainer) -> list:
    """The Trainer's TensorBoard loggers, ``pytorch_lightning``'s too when that package is in use."""
    kinds: list[type] = [TensorBoardLogger]
    classic = sys.modules.get("pytorch_lightning.loggers")
    if classic is not None:
        kinds.append(classic.TensorBoardLogger)
    return [logger for logger in trainer.loggers if isinstance(logger, tuple(kinds))]


def plot_rf_figure(field: ReceptiveField):
    """The figure of one field (matplotlib is imported only when a figure is drawn)."""
    from rf_callback.plotting import plot_rf

    return plot_rf(field)


def _checked_positions(pos) -> list:
    allowed = "an index tuple (an int for 1D), a list of index tuples, or 'center'"
    if pos == "center":
        return ["center"]
    if isinstance(pos, int) and not isinstance(pos, bool):
        return [(pos,)]
    if isinstance(pos, Sequence) and not isinstance(pos, str) and len(pos) > 0:
        if all(isinstance(i, int) and not isinstance(i, bool) for i in pos):
            return [tuple(pos)]
        if all(isinstance(p, Sequence) and p and all(isinstance(i, int) for i in p) for p in pos):
            return [tuple(p) for p in pos]
    raise MisconfigurationException(f"RFCallback(pos={pos!r}): pos must be {allowed}")


def _example_input_shape(pl_module) -> tuple[int, ...] | None:
    example = getattr(pl_module, "example_input_array", None)
    return _batch_input_shape(example)


def _batch_input_shape(batch) -> tuple[int, ...] | None:
    """The shape of a batch's input (see :func:`_first_tensor`), with a batch of 1."""
    inputs = _first_tensor(batch)
    return (1, *inputs.shape[1:]) if inputs is not None and 3 <= inputs.dim() <= 5 else None


def _has_validation(trainer, pl_module) -> bool:
    return _overrides(pl_module, "validation_step") and trainer.limit_val_batches != 0


def _overrides(module, name: str) -> bool:
    """Whether the user's class defines ``name`` (for ``lightning`` and ``pytorch_lightning`` modules alike)."""
    for cls in type(module).__mro__:
        if name in vars(cls):
            return vars(cls)[name] is not None and not cls.__module__.startswith(("lightning.", "pytorch_lightning."))
    return False


def _position_label(position: tuple[int, ...]) -> str:
    return "_".join(str(i) for i in position)


def _scalars(prefix: str, layer: str, field: ReceptiveField) -> dict[str, float]:
    names = _AXIS_NAMES[len(field.bounds)]
    base = f"{prefix}/{layer}/{_position_label(field.position)}"
    metrics = {}
    for axis, (first, last) in zip(names, field.bounds):
        metrics[f"{base}/size_{axis}"] = float(last - first + 1)
        metrics[f"{base}/first_{axis}"] = float(first)
        metrics[f"{base}/last_{axis}"] = float(last)
    return metrics


def _heatmap_image(field: ReceptiveField) -> np.ndarray:
    """The heatmap scaled to [0, 1] as a 2D image: a 1D field as a one-row strip, a 3D one at its central depth."""
    first, last = field.bounds[0]
    return _normalised(field.heatmap, depth=(first + last) // 2)


def _normalised(heatmap: torch.Tensor, depth: int | None = None) -> np.ndarray:
    if heatmap.dim() == 1:
        heatmap = heatmap[None, :]
    elif heatmap.dim() == 3:
        heatmap = heatmap[heatmap.shape[0] // 2 if depth is None else depth]
    peak = heatmap.max()
    return (heatmap / peak if peak > 0 else heatmap).float().numpy()


def _checked_target(target_size) -> tuple[int, ...] | None:
    if target_size is None:
        return None
    values = (target_size,) if isinstance(target_size, int) else target_size
    if (
        not isinstance(values, Sequence)
        or not 1 <= len(values) <= 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    ):
        raise MisconfigurationException(
            f"RFCallback(target_size={target_size!r}): target_size must be a positive int, or one per spatial axis "
            f"(input pixels or samples), or None"
        )
    return tuple(values)


def _first_loader(loaders):
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def _first_tensor(item) -> torch.Tensor | None:
    """The input of a batch or sample: the tensor itself, or the first tensor of a tuple, list or dict."""
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, dict):
        item = list(item.values())
    if isinstance(item, (tuple, list)) and item:
        return _first_tensor(item[0])
    return None


def _validation_inputs(trainer, count: int, seed: int) -> torch.Tensor:
    """``count`` validation inputs chosen with a private generator: the same on every rank and every epoch.

    A map-style data set is indexed directly (Lightning's distributed sampler would give each rank other
    samples); otherwise the first batches of the loader are read. The global random states are restored.
    """
    loader = _first_loader(trainer.val_dataloaders)
    dataset = getattr(loader, "dataset", None)
    with preserved_random_state(torch.device("cpu")):
        if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset):
            generator = torch.Generator().manual_seed(seed)
            indices = torch.randperm(len(dataset), generator=generator)[:count].tolist()
            inputs = [_first_tensor(dataset[i]) for i in indices]
            if all(x is not None for x in inputs):
                return torch.stack([x.detach().cpu() for x in inputs])
        batches = []
        for batch in loader:
            batches.append(_first_tensor(batch).detach().cpu())
            if sum(len(b) for b in batches) >= count:
                break
    return torch.cat(batches)[:count]
