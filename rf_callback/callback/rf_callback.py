"""RFCallback: probes the receptive field of the model being trained and logs it to the Trainer's loggers."""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.parameter import UninitializedParameter

from rf_callback.callback import dashboard
from rf_callback.callback.arguments import (
    checked_choice,
    checked_count,
    checked_flag,
    checked_input_shape,
    checked_mass,
    checked_name,
    checked_positions,
    checked_seed,
    checked_target,
    refused,
    target_per_axis,
)
from rf_callback.callback.coverage import ON_MISS, CoverageError, CoverageEvent, CoverageWatch, uncoverable_message
from rf_callback.callback.dashboard import EFFECTIVE_SCALARS
from rf_callback.callback.failures import IMAGES_FIX, Failures, inputs_fix, is_argument_error
from rf_callback.callback.fields import FieldProber, effective_fix, probe_fix
from rf_callback.callback.reporting import Reporter
from rf_callback.callback.sampling import InputReservoir
from rf_callback.callback.schedule import (
    ProbeSchedule,
    batch_input_shape,
    first_loader,
    first_tensor,
    has_validation,
    ranks_agree,
    strategy_refusal,
)
from rf_callback.core.arguments import checked_device, checked_element, checked_layout
from rf_callback.core.errors import ProbeError
from rf_callback.core.layouts import CHANNELS_FIRST, Tokens
from rf_callback.core.model_copy import MODES, WALK_LIMIT, autograd_nodes
from rf_callback.core.result import EffectiveField, ReceptiveField
from rf_callback.core.sharding import fsdp1_parameters_whole, gather_note


class RFCallback(Callback):
    """Probes the receptive field of the model being trained and logs it to the Trainer's loggers.

    At fit start it logs the theoretical field of the architecture and the probe of the initial weights at step
    0; after every ``every_n_epochs``-th validation epoch it logs the probe of
    the current weights at the current global step. Without a validation loop (no ``validation_step``, no
    validation data, or ``limit_val_batches=0``) it probes at the end of each training epoch instead, and says so
    once.

    Each probe runs on a deep copy of the live module (made outside inference mode, in eval mode, float32
    whatever the Trainer's precision, biases zeroed, parameters not requiring grad), so the training run is
    unchanged: same weights, optimizer state, BatchNorm statistics, random states and logged metrics, bit for
    bit. A model or submodule compiled with ``torch.compile`` is unwrapped first.

    Logged, for every probed position ``pos<i>`` (its index in ``pos``) and spatial axis ``<a>`` (``l``; ``h``,
    ``w``; or ``d``, ``h``, ``w``), under the names :mod:`rf_callback.callback.dashboard` lists (``<layer>`` is
    ``output`` for the model's output):

    - scalars ``rf/<layer>/pos<i>/size_<a>/{theoretical,weights,effective,target}``, the target's coverage,
      the effective field's summary (``rf-effective/...``) and the spans (``rf-span/...``), to every logger at
      the step of the images, and through Lightning's logging path so ``EarlyStopping`` and ``ModelCheckpoint``
      can monitor them;
    - images, to every ``TensorBoardLogger``, ``WandbLogger`` and ``MLFlowLogger`` through its own API
      (:mod:`rf_callback.callback.loggers`): the heatmaps (``rf/<layer>/pos<i>/heatmap/<kind>``) at every probe, and the
      figure of :func:`rf_callback.plotting.plot_rf` (``rf/<layer>/pos<i>/figure``) at fit start and fit end
      only (a figure costs as much as a few training steps); a note naming each position's cell, and for
      TensorBoard a Custom Scalars layout overlaying the four sizes per position and axis. Other loggers get the
      scalars (with one warning, ``CSVLogger`` without); without a logger that takes images the callback warns
      once.

    The callback never iterates a data loader: the input shape comes from ``input_shape``,
    ``example_input_array`` or the first batch the Trainer runs, and the effective field's inputs from the
    validation batches the Trainer hands it (see ``erf_samples``), so a streaming data set is read exactly as often
    as without the callback.

    The training run is the user's. Whatever fails inside the callback (a probe at fit start or after an epoch, the
    effective field, choosing its inputs, drawing a figure, a logger) warns once per kind of failure, with the
    reason and the fix, and training goes on; ``strict=True`` raises instead. Only an argument that is not allowed
    (at construction) or does not fit the model (before the first training step) ends a run, with a
    ``MisconfigurationException``.

    For a ``pytorch_lightning`` Trainer, use the twin ``rf_callback.pl.RFCallback``.

    Args:
        pos: the output position(s) to probe: an index tuple (an int for 1D; numpy and torch integers are
            accepted), a list of tuples, or ``"center"``.
        layer: dotted name of the submodule whose output is probed (within ``module`` if given), a str as listed
            by ``named_modules()``; ``None`` probes the output. A classifier must name its last feature map here.
        element: where the probed output is a tuple, list, dict or dataclass of feature maps, the index (negative
            from the end) or key (field name) of the one to probe (the probe never guesses: without it, such an
            output is refused before the first step).
        layout: how the probed output lays out its axes: ``"channels_first"`` (default, ``(N, C, *spatial)``),
            ``"channels_last"`` (``(N, *spatial, C)``, a Swin stage), or tokens on a grid, ``Tokens(grid=(H, W),
            prefix=P)`` or its string form ``"tokens:HxW+P"`` (a ViT's ``(N, P + H*W, C)``; in a YAML file, the
            string). ``pos`` is then on the spatial grid. An output that does not fit it is refused before the first
            step. Part of ``state_key`` when not the default.
        input_shape: the input shape ``(N, C, *spatial)`` (``N`` is ignored). Default: the LightningModule's
            ``example_input_array``, else the first batch the Trainer runs (validation during the sanity check, or
            training): its first tensor. Pass it when that tensor is not the model's input (a dict batch whose
            first value is a mask).
        mode: what the scalars and images show: ``"weights"`` (default: what the current weights connect) or
            ``"theoretical"`` (the architecture's field, which does not change during training).
        module: dotted name of the submodule to copy and probe instead of the whole LightningModule (e.g. the
            backbone), which bounds the memory a probe takes; also the way out for a LightningModule that cannot
            be deep-copied (one holding a lock, an open file or a process handle). It is probed on the input
            shape, so it must receive the model's input: where the first training step shows a layer before it
            (a stem, a resize), nothing is probed, with the reason.
        every_n_epochs: probe after every n-th validation epoch (or training epoch without validation). With the
            Trainer's ``check_val_every_n_epoch=k``, probes come every ``k * n`` training epochs; with validation
            every so many steps (``check_val_every_n_epoch=None``), every n-th epoch that held a validation (once
            per epoch).
        log_images: log the heatmaps and figures to the loggers that take images.
        effective_scalars: ``"summary"`` (default: the effective extent beside the sizes, and its ratio to the
            theoretical size, centre offset and spread) or ``"all"`` (also every other metric of
            :meth:`rf_callback.EffectiveField.metrics`, under ``rf-effective/<layer>/pos<i>/<metric>``).
        strict: raise when anything in the callback fails (a probe, the effective field, a figure, a logger); by
            default the callback warns once per kind of failure, with the reason, and training goes on.
        draws: weights mode: how many random inputs the field is the union over.
        seed: seed of the private generators (weights-mode inputs, the choice of validation inputs); the global
            random states are never drawn from.
        effective: compute the effective field (:func:`rf_callback.effective_rf`) on ``erf_samples`` validation
            inputs after every probed validation epoch and log its extent and summary (see ``effective_scalars``),
            its heatmap and, at fit end, an overlay on a validation input and a growth curve. ``None`` (default): on
            whenever the run has validation data.
        erf_samples: how many validation inputs the effective field is measured on. They are chosen once, during
            the first validation epoch of the fit (not the sanity check, which sees a few batches only), among the
            inputs (first tensors) of the batches of the first validation loader as the Trainer hands them over: each
            sample gets a random key from a generator seeded by ``seed`` and the rank, and the ``erf_samples``
            samples with the smallest keys are kept (reservoir sampling, so every sample seen is equally likely
            whatever the length of the stream). Under DDP the ranks pool their choices, so every rank measures the
            same inputs. The same inputs serve every later epoch, so epochs compare. They are not saved in
            checkpoints (they can be large): a resumed run chooses them again at its first validation epoch, the
            same way, so the same validation data give the same inputs.
        target_size: the size of the objects the network must see (an int, or one per spatial axis, in input
            pixels or samples). At fit start, a warning if even the theoretical field is smaller (or the target is
            larger than the input, or the image border cuts the field at a border position). After each
            effective-field check, ``rf/<layer>/pos<i>/target/covered`` (1 or 0) and ``.../margin`` (the
            smallest extent minus target over the axes) are logged, and an alert is raised when coverage is lost,
            or not reached within ``patience`` checks.
        coverage_mass: the mass fraction q of the effective extent compared with ``target_size`` (0 < q <= 1).
        patience: how many checks coverage may take to be reached before the alert.
        on_miss: what an alert does: ``"warn"`` (a warning naming layer, position, epoch, extent, target and
            theoretical field), ``"stop"`` (also stops training, the Lightning way: all DDP ranks agree through
            the strategy) or ``"raise"`` (also raises :class:`rf_callback.CoverageError`).
        on_alert: called with the :class:`rf_callback.CoverageEvent` of every alert (your code: what it raises
            propagates).
        probe_device: where every probe's copy runs: ``None`` (default) on the model's device, ``"cpu"`` on the CPU,
            so a training run that fills its GPU keeps that memory (the copy is made on the CPU directly). A GPU that
            runs out of memory inside a probe frees what the probe took and warns with this fix; training goes on
            unless ``strict``.

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
        effective_scalars: str = "summary",
        strict: bool = False,
        draws: int = 8,
        seed: int = 0,
        effective: bool | None = None,
        erf_samples: int = 32,
        target_size: int | Sequence[int] | None = None,
        coverage_mass: float = 0.95,
        patience: int = 1,
        on_miss: str = "warn",
        on_alert: Callable[[CoverageEvent], Any] | None = None,
        element: int | str | None = None,
        layout: str | Tokens = CHANNELS_FIRST,
        probe_device: str | torch.device | None = None,
    ):
        super().__init__()
        self._positions, self.pos = checked_positions(pos)
        self.layer, self.module = checked_name("layer", layer), checked_name("module", module)
        try:
            self.element = checked_element(element)
            checked_layout(layout)
            self.layout = layout  # as given, so that messages show it in the user's words
            self.probe_device = checked_device(probe_device, "probe_device")
        except ValueError as error:
            raise MisconfigurationException(f"RFCallback({error}") from None
        self.mode = checked_choice("mode", mode, MODES)
        self.input_shape = checked_input_shape(input_shape)
        self.every_n_epochs = checked_count("every_n_epochs", every_n_epochs, "validation epochs between probes", 1)
        self.log_images, self.strict = checked_flag("log_images", log_images), checked_flag("strict", strict)
        self.effective_scalars = checked_choice("effective_scalars", effective_scalars, EFFECTIVE_SCALARS)
        self.draws = checked_count("draws", draws, "random inputs in weights mode", 8)
        self.seed = checked_seed(seed)
        if effective is not None and not isinstance(effective, (bool, np.bool_)):
            raise refused("effective", effective, "True, False or None (on whenever the run has validation data)")
        self.effective = None if effective is None else bool(effective)
        self.erf_samples = checked_count("erf_samples", erf_samples, "validation inputs of the effective field", 32)
        self.target_size = checked_target(target_size)
        self.coverage_mass = checked_mass(coverage_mass)
        self.patience = checked_count("patience", patience, "checks before a coverage alert", 1)
        self.on_miss = checked_choice("on_miss", on_miss, ON_MISS)
        if on_alert is not None and not callable(on_alert):
            raise refused("on_alert", on_alert, "callable or None", "e.g. on_alert=events.append, events being a list")
        self.on_alert = on_alert
        self._given_input_shape = self.input_shape
        self._failures = Failures(self.strict)
        self._reporter = Reporter(
            self.layer_name, log_images=self.log_images, coverage_mass=self.coverage_mass, failures=self._failures
        )
        self._run: tuple[weakref.ref, weakref.ref] | None = None  # the (Trainer, LightningModule) of the last setup
        self._stage: str | None = None  # the Trainer's stage at the last setup: "fit", "validate", "test", ...
        self._start_run()

    def __getstate__(self) -> dict[str, Any]:
        """The callback's attributes for pickling (``ddp_spawn``), without the weak references to the last run."""
        return {**self.__dict__, "_run": None}

    def _start_run(self) -> None:
        """Forgets what a run measured and said: its history, fields, input shape, inputs and warnings."""
        self.input_shape = self._given_input_shape
        self._said_no_validation = self._said_other_cells = False
        self._said_no_gradient: set[str] = set()  # position labels whose output stopped depending on the inputs
        self._said_off_the_map: set[int] = set()  # position indices off the map of the effective field's inputs
        self._failures.said.clear()
        self.history: list[dict[str, Any]] = []
        self._fitted = False  # whether this run's history comes from a fit (not only from a checkpoint)
        self._erf_inputs: torch.Tensor | None = None
        self._shape_source = "input_shape=" if self.input_shape is not None else None
        self._initial_logged = False
        # Lazy modules without parameters at fit start: the fit-start probe waits for the first training step
        # (True while it waits; False once it waited, so a module no step materialises fails as it would).
        self._initial_waits: bool | None = None
        # What the live ``module`` receives in the fit's first batches, as (shape, the name of the autograd node that
        # made it where layers with parameters did, None where none did, "?" without gradients), recorded by a
        # forward pre-hook until the first optimizer step (see _watch_module_input); and why its fields would not be
        # the input's, where they would not (then nothing is probed).
        self._module_inputs: list[tuple[tuple[int, ...], str | None]] = []
        self._module_hook: Any = None
        self._module_refused: str | None = None
        self._lazy_waits = False  # the fit-start probe waits for lazy modules' parameters, not only for the hook
        # The parts the hooks wire together: when, what, coverage, where it goes, and what failures say.
        self._schedule = ProbeSchedule(self.every_n_epochs)
        self._prober = FieldProber(
            self._positions, layer=self.layer, module=self.module, element=self.element, layout=self.layout,
            draws=self.draws, seed=self.seed, device=self.probe_device,
        )  # fmt: skip
        self._coverage = CoverageWatch(self.patience, self.coverage_mass)
        self.trackers = self._coverage.trackers
        self._reservoir: InputReservoir | None = None
        self._last_fields: list[ReceptiveField | None] = []
        self._theoretical_logged_at: int | None = None  # the step the theoretical fields were last probed again at
        # By index in pos: two indices can name one cell of validation inputs shaped otherwise.
        self._last_effective: dict[int, EffectiveField] = {}
        # The cell each position index was last measured at (its label in the history), for the growth curves.
        self._effective_cells: dict[int, str] = {}

    @property
    def positions(self) -> list:
        """The positions probed: index tuples or ``"center"``.

        A list of ints is one position, or on a 1D map as many, once the first probe has seen the map.
        """
        return [tuple(p) if isinstance(p, list) else p for p in self._prober.positions]

    @property
    def state_key(self) -> str:
        """Identifies this callback's state in a checkpoint by its arguments, so several can share a Trainer."""
        keys: dict[str, str | int | None] = {
            "pos": str(self.pos),
            "layer": self.layer,
            "module": self.module,
            "mode": self.mode,
        }
        if self.element is not None:  # only then: checkpoints written before element= keep their key
            keys["element"] = self.element
        if checked_layout(self.layout) != CHANNELS_FIRST:  # likewise
            keys["layout"] = str(checked_layout(self.layout))
        return self._generate_state_key(**keys)

    @property
    def layer_name(self) -> str:
        """The probed layer as it appears in logged names: ``module.layer``, or ``output``."""
        return ".".join(n for n in (self.module, self.layer) if n) or "output"

    @property
    def erf_inputs(self) -> torch.Tensor | None:
        """The validation inputs the effective field is measured on (CPU, float32); ``None`` until chosen."""
        return self._erf_inputs

    # -- Trainer hooks: a table of contents of what the callback does

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Starts afresh for a new Trainer or model; refuses DeepSpeed stage 3 and a second callback on the same layer.

        Under FSDP1 it gathers the parameters around each probe.

        A callback reused for another run (a sweep that builds its callbacks once) forgets the last run's history,
        fields, input shape and inputs, which described another model; ``trainer.fit`` called again on the same
        Trainer and model continues the run, and a checkpoint restores its state after this hook.
        """
        refusal = strategy_refusal(trainer.strategy)
        if refusal is not None:
            raise MisconfigurationException(refusal)
        for other in getattr(trainer, "callbacks", ()):
            if isinstance(other, RFCallback) and other is not self and other.layer_name == self.layer_name:
                differing = [
                    name
                    for name in _NAMED_VALUES
                    if _spelled_alike(getattr(other, name)) != _spelled_alike(getattr(self, name))
                ]
                if differing:
                    name = differing[0]
                    raise MisconfigurationException(
                        f"two RFCallbacks probe layer {self.layer_name!r} with {name}={getattr(other, name)!r} and "
                        f"{name}={getattr(self, name)!r}: both log under the names rf/{self.layer_name}/pos0/..., so "
                        f"each chart, and what EarlyStopping or ModelCheckpoint monitor, would mix their values. Give "
                        f"them the same {name}, or pass every position to one callback, RFCallback(layer="
                        f"{self.layer!r}, pos=[...]), which names them pos0, pos1, ..."
                    )
        self._stage = stage
        if stage in ("test", "predict"):  # they probe nothing: the fit's history stays
            return
        averaging = _weight_averaging_before(trainer, self)
        if averaging is not None and (stage != "fit" or has_validation(trainer, pl_module)):
            # It swaps the average in for validation and out in its own on_validation_epoch_end: probe before that
            trainer.callbacks.remove(self)
            trainer.callbacks.insert(averaging, self)
        last = self._run
        if last is not None and (last[0]() is not trainer or last[1]() is not pl_module):
            self._start_run()
        self._run = (weakref.ref(trainer), weakref.ref(pl_module))
        if type(trainer.strategy).__name__ == "FSDPStrategy":  # each probe copies inside a gathering
            self._prober.whole_parameters = lambda module: fsdp1_parameters_whole(module, trainer.strategy.model)

    def on_fit_start(self, trainer, pl_module) -> None:
        """Probes the initial weights when the input shape is already known; else waits for the first batch."""
        self._fitted = True
        if self.effective and not has_validation(trainer, pl_module):
            raise MisconfigurationException(
                "RFCallback(effective=True) needs validation data to measure the effective field on: add a "
                "validation_step and val_dataloaders, or pass effective=False"
            )
        if self.input_shape is None:
            self.input_shape = batch_input_shape(getattr(pl_module, "example_input_array", None))
            self._shape_source = "the LightningModule's example_input_array" if self.input_shape else None
        if self.input_shape is not None:
            self._probe_initial(trainer, pl_module)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        """Starts choosing the effective field's inputs at the fit's first validation epoch (not the sanity check)."""
        if self._erf_inputs is None and self._reservoir is None and not trainer.sanity_checking:
            if self._effective_on(trainer, pl_module):
                self._reservoir = InputReservoir(self.erf_samples, self.seed, rank=trainer.global_rank)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Takes the input shape from the first validation batch when unknown; offers its inputs to the choice.

        The first batch is the sanity check's, when the Trainer runs one. The effective field's inputs are chosen
        among the batches of the first validation loader during the fit's first validation epoch.
        """
        self._from_first_batch(trainer, pl_module, batch)
        if self._reservoir is not None and dataloader_idx == 0:
            with self._failures.guard("inputs", "choosing the effective field's inputs", inputs_fix):
                self._reservoir.add(first_tensor(batch))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        """Takes the input shape from the first training batch when it is still unknown: before any step."""
        self._from_first_batch(trainer, pl_module, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """Runs the fit-start probe after the first step where it waited for it (lazy modules, ``module=``)."""
        self._end_initial_wait(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Runs the fit-start probe of ``module=`` once the first step's forward has shown what the module receives.

        The weights are still the initial ones. Lazy modules, and manual optimization (whose step may call the
        module again after an optimizer's step, as a GAN's discriminator on real images after the generator's),
        wait for the step's end.
        """
        if self._initial_waits and not self._lazy_waits and pl_module.automatic_optimization:
            self._end_initial_wait(trainer, pl_module)

    def _end_initial_wait(self, trainer, pl_module) -> None:
        if self._initial_waits:
            self._initial_waits = False
            self._check_module_input()
            self._probe_initial(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """Probes the current weights after every ``every_n_epochs``-th validation epoch (not the sanity check).

        Under ``trainer.validate()`` it probes once, at the end of the validation run.
        """
        if self._reservoir is not None:  # the batches have passed: the effective field's inputs are chosen
            reservoir, self._reservoir = self._reservoir, None
            with self._failures.guard("inputs", "choosing the effective field's inputs", inputs_fix):
                self._erf_inputs = reservoir.chosen(trainer.strategy, trainer.world_size)
            if (note := reservoir.passed_over_note()) is not None:
                rank_zero_warn(f"RFCallback: {note}")
        if trainer.sanity_checking or self.input_shape is None:
            return
        self._end_initial_wait(trainer, pl_module)  # no training step came before this validation
        if trainer.state.fn == "fit" and not self._schedule.due(trainer.current_epoch, trainer.check_val_every_n_epoch):
            return
        self._probe_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Probes at the end of each training epoch when the run has no validation loop."""
        if has_validation(trainer, pl_module) or self.input_shape is None:
            return
        if not self._schedule.due(trainer.current_epoch):
            return
        if not self._said_no_validation:
            self._said_no_validation = True
            rank_zero_info("RFCallback: no validation loop, so the field is probed at the end of each training epoch")
        self._probe_and_log(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The history of results (effective fields and alerts included) and the alert state, for checkpoints.

        The effective field's inputs are left out (they can weigh megabytes): a resumed run chooses them again.
        """
        return {
            "history": copy.deepcopy(self.history),
            "initial_logged": self._initial_logged,
            "trackers": self._coverage.state_dict(),
            "schedule": self._schedule.state_dict(),
            "effective_cells": dict(self._effective_cells),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the history, so a resumed run continues it without logging the initial field twice.

        Lightning restores callbacks for ``validate``, ``test`` and ``predict`` with a ``ckpt_path`` too: after a fit
        the callback keeps that fit's history (the checkpoint's would replace it); a callback that has not fitted
        this model (a new one, or a new model's) takes the checkpoint's.
        """
        if self._stage not in (None, "fit") and self._fitted:
            return
        self.history = list(state_dict.get("history", []))
        self._effective_cells = {int(i): str(cell) for i, cell in state_dict.get("effective_cells", {}).items()}
        self._initial_logged = bool(state_dict.get("initial_logged", bool(self.history)))
        self._coverage.load_state_dict(state_dict.get("trackers", {}))
        self._schedule.load_state_dict(state_dict.get("schedule", {}))

    def on_fit_end(self, trainer, pl_module) -> None:
        """Logs the figures of the last probe and the growth curve of the effective-field metrics against epoch."""
        self._end_initial_wait(trainer, pl_module)  # a fit without a training step: the live module keeps no hook
        if not self.log_images or not trainer.is_global_zero or not self._reporter.image_writers(trainer):
            return
        if self.input_shape is None:  # no batch came, so nothing was probed: there is nothing to draw
            return
        with self._failures.guard(
            "images", "drawing the figures at fit end", IMAGES_FIX, goes_on="the fit ends normally"
        ):
            self._reporter.final_figures(
                trainer, step=self.history[-1]["step"] if self.history else trainer.global_step,
                fields=self._last_fields, effective=dict(sorted(self._last_effective.items())),
                cells=self._effective_cells,
                image=None if self._erf_inputs is None else self._erf_inputs[0], history=self.history,
                target=self._target_for(len(self._shape) - 2),
            )  # fmt: skip

    # -- the input shape

    def _from_first_batch(self, trainer, pl_module, batch) -> None:
        if self.input_shape is not None:
            return
        shape = batch_input_shape(batch)
        if shape is None:
            raise MisconfigurationException(
                "RFCallback cannot find the input shape: pass RFCallback(input_shape=(N, C, H, W)), set the "
                "LightningModule's example_input_array, or yield batches whose first element is the input tensor"
            )
        self.input_shape, self._shape_source = shape, "the first tensor of the first batch"
        if trainer.state.fn == "fit":
            self._probe_initial(trainer, pl_module)

    # -- a probe event: probe, log, then the effective field and its coverage

    def _probe_initial(self, trainer, pl_module) -> None:
        n_axes = len(self._shape) - 2
        if self._initial_logged:  # a resumed fit: its logger (maybe a new version) still gets the charts and the note
            with self._failures.guard("probe", "the theoretical probe of a resumed fit", self._probe_fix):
                kept = [f for f in self._prober.theoretical_fields(pl_module, self._shape) if f is not None]
                self._describe_dashboard(trainer, kept, self._target_for(n_axes))
            return
        target = self._target_for(n_axes)  # refused now if it does not fit the input's axes
        if self._module_refused is not None:
            return
        if self._initial_waits is None and trainer.state.fn == "fit":
            lazy, watched = _has_lazy_parameters(pl_module), self._watch_module_input(pl_module)
            self._lazy_waits = lazy
            if lazy:
                rank_zero_info(
                    "RFCallback: the model's lazy modules have no parameters before its first forward pass: the "
                    "fit-start probe runs after the first training step"
                )
            if lazy or watched:
                self._initial_waits = True
                return
        theoretical: list[ReceptiveField] | None = None
        try:
            theoretical = self._prober.probe(pl_module, "theoretical", self._shape)
        except MisconfigurationException:
            raise
        except Exception as error:  # noqa: BLE001 - only an argument that does not fit the model ends the run
            if is_argument_error(error, shape_given=self._shape_source == "input_shape="):
                raise MisconfigurationException(f"RFCallback: {error}") from error
            self._failures.report("probe", "the probe at fit start", error, self._probe_fix(error))
        # The ranks agree: the theoretical sizes are synced beside every later probe only where all ranks have them.
        if not self._ranks_agree(trainer, theoretical is not None, "the probe at fit start") or theoretical is None:
            return
        cells = [field.position for field in theoretical]
        if len(set(cells)) < len(cells):
            raise MisconfigurationException(
                f"RFCallback(pos={self.pos!r}): positions {cells} name the same output cell more than once (negative "
                f"indices count from the end of the {theoretical[0].output_shape} map); list each cell once"
            )
        self._prober.keep_theoretical(pl_module, theoretical)
        for field in theoretical:
            rank_zero_info(f"RFCallback: {self._described(field)}")
            warning = None if target is None else self._target_warning(field, target)
            if warning is not None:
                rank_zero_warn(warning)
        self._say_what_is_gathered(trainer, pl_module)
        self._describe_dashboard(trainer, theoretical, target)
        step = _fit_start_step(trainer)
        self._reporter.fields(
            trainer,
            "theoretical",
            theoretical,
            step=step,
            figures=self.mode == "theoretical",
            target_for=self._target_for,
        )
        current = theoretical if self.mode == "theoretical" else self._safe_probe(pl_module)
        if self.mode != "theoretical" and not self._ranks_agree(trainer, current is not None, "the probe at fit start"):
            current = None  # every rank records the same history
        if current is not None:
            if current is not theoretical:
                self._reporter.fields(trainer, "weights", current, step=step, figures=True, target_for=self._target_for)
                self._prober.forward_changed(current)  # where the weights fields lie now, against the theoretical
            self._record(current, epoch=None, step=step)
        self._initial_logged = True

    def _watch_module_input(self, pl_module) -> bool:
        """Records what the live ``module`` receives until the first optimizer step; whether it watches.

        ``module=`` probes that submodule on the model's input shape: a layer before it in the model's forward (a
        stem) would leave its fields counted in another tensor's pixels. A forward pre-hook reads the shape of
        what it receives and whether the model's parameters made it (a layer with parameters that train on the
        way, while gradients are on; a frozen stem of the same shape goes unseen), and nothing else; it is removed
        at the first optimizer step (the step's end under manual optimization), or at the first validation or the
        fit's end where no step comes. A model compiled as a whole is not watched (the hook would run inside its
        compiled graph).
        """
        if self.module is None or self._module_hook is not None or hasattr(pl_module, "_orig_mod"):
            return False
        try:
            target = self._prober.target(pl_module)
        except MisconfigurationException:
            return False  # the probe says it, with the names there are
        seen = self._module_inputs
        parameters = {id(p) for p in pl_module.parameters()}

        def record(_module, args, kwargs) -> None:
            received = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(received, torch.Tensor) and not torch.compiler.is_compiling():
                # Without gradients (a sanity check, a frozen module under no_grad) the graph tells nothing: "?"
                made_by = _made_by_parameters(received, parameters) if torch.is_grad_enabled() else "?"
                seen.append((tuple(received.shape), made_by))

        self._module_hook = target.register_forward_pre_hook(record, with_kwargs=True)
        return True

    def _check_module_input(self) -> None:
        """Refuses to probe ``module`` where it never received the input itself (see _watch_module_input).

        A call on a tensor of the input's spatial shape that no layer with parameters made is the input (or a
        normalisation of it, a perturbation of an adversarial step); others may come beside it (a discriminator's
        call on generated images, a backbone's on crops).
        """
        if self._module_hook is None:
            return
        self._module_hook.remove()
        self._module_hook = None
        shape = tuple(self._shape)
        calls, self._module_inputs = self._module_inputs, []
        if any(made_by is None and received[2:] == shape[2:] for received, made_by in calls):
            return
        for received, made_by in calls:
            if received[2:] != shape[2:]:
                what = f"a {received} tensor where the model's input is {shape}"
            elif made_by not in (None, "?"):
                what = f"a {received} tensor made by layers with parameters ({made_by} last)"
            else:
                continue  # no gradients: nothing tells what made it
            self._module_refused = (
                f"RFCallback(module={self.module!r}) probes that submodule on the model's input, but in the model's "
                f"forward it receives {what}: its fields would count that tensor's elements, not the input's pixels "
                f"(a layer before it changes where they lie)"
            )
            fix = (
                f"Probe the whole model at that submodule's output with layer={self.module!r} (probe_device='cpu' "
                f"keeps its copy off the GPU), or name as module= a submodule that receives the input itself"
            )
            self._failures.report("module", "probing module=", ValueError(self._module_refused), fix,
                                  goes_on="nothing is probed, training goes on")  # fmt: skip
            return

    def _probe_and_log(self, trainer, pl_module) -> None:
        if self._module_refused is not None:
            return
        if trainer.state.fn == "fit":  # a trainer.validate() between fits leaves the fit's epochs to probe
            self._schedule.probed(trainer.current_epoch)
        # Decided on every rank at once: a theoretical probe again is a collective (a rank's own value, its best
        # validation loss, may differ from the others')
        if not ranks_agree(trainer, not self._prober.architecture_changed(pl_module)):
            self._probe_theoretical_again(trainer, pl_module)
        # (theoretical mode probes the theoretical fields anyway, and compares them with the kept ones)
        elif self.mode != "theoretical" and not ranks_agree(trainer, not self._prober.values_changed(pl_module)):
            self._probe_theoretical_again(trainer, pl_module, layers_changed=False)
        probed = self._safe_probe(pl_module)
        # The ranks agree whether to go on (a key synced on some ranks only, or a collective of the effective field
        # that some ranks skip, would wait forever): a probe that failed on one rank skips the epoch on all.
        succeeded = self._ranks_agree(trainer, probed is not None, "the probe")
        fields = probed if succeeded and probed is not None else []  # an epoch whose probe failed has none
        if self._prober.forward_changed(fields):  # the same on every rank: their weights and fields are the same
            self._probe_theoretical_again(trainer, pl_module, layers_changed=False)
            self._prober.forward_changed(fields)  # where the fields lie against the theoretical ones probed now
        if succeeded:
            # Theoretical sizes probed again at this step are logged already: once per step
            beside = [] if self._theoretical_logged_at == trainer.global_step else self._prober.theoretical or []
            self._reporter.fields(
                trainer, self.mode, fields, step=trainer.global_step, figures=False, target_for=self._target_for,
                beside=beside, pl_module=pl_module,
            )  # fmt: skip
            self._last_fields = fields
        self._record(fields, epoch=trainer.current_epoch, step=trainer.global_step)
        # Whatever the probe gave: a network whose output stopped depending on the inputs fails the weights probe,
        # and its effective field is what says it covers nothing (every rank measures it, failed probe or not).
        if self._effective_on(trainer, pl_module):
            events: list[CoverageEvent] = []
            # After a failed probe, an error of the same type is the same failure (an input the model refuses),
            # said once already: it is reported as the probe's.
            kind = "effective" if succeeded else "probe"
            with self._failures.guard(kind, "the effective field", self._effective_fix):
                events = self._effective(trainer, pl_module)
            self._alert(trainer, events)  # on every rank, failed or not: "stop" reduces the decision over the ranks

    def _safe_probe(self, pl_module) -> list[ReceptiveField | None] | None:
        """The probe's fields, one per position (``None`` for a position whose field alone failed), or ``None``."""
        try:
            return list(self._prober.probe(pl_module, self.mode, self._shape))
        except ProbeError as error:
            # A field of one position may fail where the others' do not (a unit dead there alone): each position
            # alone keeps the others' fields, where all fail, the probe failed.
            fields = self._prober.probe_each(pl_module, self.mode, self._shape) or []
            failed = [(index, alone) for index, alone in enumerate(fields) if isinstance(alone, ProbeError)]
            if len(failed) == len(fields):  # every one (or a single position): the probe failed
                self._failures.report("probe", "the probe", error, self._probe_fix(error))
                return None
            named = ", ".join(f"{index} {self._prober.positions[index]}" for index, _ in failed)
            self._failures.report(
                "probe of a position", f"the probe of position{'s' if len(failed) > 1 else ''} {named}", failed[0][1],
                self._probe_fix(failed[0][1]), goes_on="the other positions' fields are logged, training goes on",
            )  # fmt: skip
            return [None if isinstance(field, ProbeError) else field for field in fields]
        except Exception as error:  # noqa: BLE001 - the training run is the user's: warn unless strict
            self._failures.report("probe", "the probe", error, self._probe_fix(error))
            return None

    def _effective(self, trainer, pl_module) -> list[CoverageEvent]:
        measured = self._prober.effective(pl_module, self._erf_inputs, self._shape)
        cells = [cell for cell, _ in measured]  # by their index in pos (None: off the map of the inputs)
        shapes = [cell.input_shape[1:] for cell in cells if cell is not None]
        if shapes and shapes[0] != tuple(self._shape[1:]) and not self._said_other_cells:
            self._said_other_cells = True
            self._reporter.effective_note(trainer, cells, self._target_for(len(self._shape) - 2))
        entry, events = {}, []
        # Two position indices may name one cell of inputs shaped otherwise: that cell is checked once per probe.
        checked: dict[str, tuple[bool, int]] = {}
        for index, (cell, field) in enumerate(measured):
            if cell is None:
                self._off_the_map(index)
                continue
            label = dashboard.position_label(cell.position)
            self._effective_cells[index] = label
            logged = dashboard.no_effective_scalars(self.layer_name, index, len(cell.bounds))
            if field is not None:
                metrics = {k: v for k, v in field.metrics((self.coverage_mass,)).items() if v is not None}
                entry[label] = metrics
                full = self.effective_scalars == "all"
                logged = dashboard.effective_scalars(
                    self.layer_name, index, field, metrics, self.coverage_mass, full=full
                )
            target = self._target_for(len(cell.bounds))
            if target is not None:
                if label not in checked:
                    # A position whose output no longer depends on the inputs covers nothing: extent 0.
                    covered, margin, event = self._coverage.check(
                        label, cell, field, target, epoch=trainer.current_epoch, layer=self.layer_name
                    )
                    checked[label] = (covered, margin)
                    events += [event] if event is not None else []
                logged.update(dashboard.coverage_scalars(self.layer_name, index, *checked[label]))
            self._reporter.metrics(trainer, logged, step=trainer.global_step, pl_module=pl_module)
            if field is not None:
                self._last_effective[index] = field  # its overlay on a validation input is drawn at fit end
                self._reporter.effective_image(trainer, index, field)
                continue
            self._last_effective.pop(index, None)  # an earlier epoch's field is not this one's
            if label not in self._said_no_gradient:
                self._said_no_gradient.add(label)
                rank_zero_warn(
                    f"RFCallback: at epoch {trainer.current_epoch}, the output of {self.layer_name} at "
                    f"{cell.position} does not depend on the effective field's inputs (its gradient map is zero "
                    f"everywhere: dead units or zero weights), so it has no effective field"
                    + ("" if target is None else "; it covers nothing of the target size")
                )
        self.history[-1]["effective"] = entry
        return events

    def _off_the_map(self, index: int) -> None:
        """Says once that position ``index`` lies off the output map of the effective field's inputs."""
        if index in self._said_off_the_map:
            return
        self._said_off_the_map.add(index)
        shape = None if self._erf_inputs is None else tuple(self._erf_inputs.shape[1:])
        rank_zero_warn(
            f"RFCallback: position {index} of pos={self.pos!r} lies off the output map of {self.layer_name} on the "
            f"effective field's inputs, shaped {shape} where the fields are probed on {tuple(self._shape[1:])}: it "
            f"has no effective field and no coverage check (the other positions do); pass input_shape= the "
            f"validation inputs' shape, or a position on both maps (pos='center', negative indices count from the "
            f"end of each)"
        )

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

    def _probe_theoretical_again(self, trainer, pl_module, *, layers_changed: bool = True) -> None:
        """Probes the theoretical fields again where the architecture changed during the fit (a grown network).

        ``layers_changed=False``: the fields showed a forward that changed without its layers; where the theoretical
        fields come out the same (a GroupNorm's statistics took the weights field past them), nothing is said.
        """
        theoretical: list[ReceptiveField] | None = None
        kept = [field.bounds for field in self._prober.theoretical or []]
        with self._failures.guard("probe", "the theoretical probe of the changed architecture", self._probe_fix):
            theoretical = self._prober.probe(pl_module, "theoretical", self._shape)
        if not self._ranks_agree(trainer, theoretical is not None, "the theoretical probe of the changed architecture"):
            theoretical = None
        self._prober.keep_theoretical(pl_module, theoretical)  # none kept, none logged beside: never the old ones
        if theoretical is None:
            return
        if not layers_changed and [field.bounds for field in theoretical] == kept:
            return
        changed = "layers changed" if layers_changed else "forward changed (no layer did)"
        for field in theoretical:
            rank_zero_info(f"RFCallback: the probed model's {changed}; now {self._described(field)}")
        self._describe_dashboard(trainer, theoretical, self._target_for(len(self._shape) - 2), step=trainer.global_step)
        if self.mode != "theoretical":  # the spans and heatmaps the fit-start probe logged are the old layers'
            # (theoretical mode logs them with every probe); the sizes and target come beside the probe that follows
            self._reporter.fields(
                trainer, "theoretical", theoretical, step=trainer.global_step, figures=False, target_for=lambda _: None,
                pl_module=pl_module,
            )  # fmt: skip
            self._theoretical_logged_at = trainer.global_step

    def _described(self, field: ReceptiveField) -> str:
        """The field in words, its layer named as the logs name it (``module.layer``, from the LightningModule)."""
        full_name = ".".join(n for n in (self.module, self.layer) if n) or None
        return dataclasses.replace(field, layer=full_name).describe(stride=False)

    def _record(self, fields: Sequence[ReceptiveField | None], *, epoch: int | None, step: int) -> None:
        """Appends a probe to the history (``epoch`` None: the probe at fit start; a field None: its probe failed)."""
        recorded = [None if f is None else f.to_dict(geometry=False) for f in fields]
        self.history.append({"epoch": epoch, "step": step, "fields": recorded})

    def _say_what_is_gathered(self, trainer, pl_module) -> None:
        """Says, once, what each probe gathers where the probed module is sharded (its memory beside training)."""
        root = trainer.strategy.model if type(trainer.strategy).__name__ == "FSDPStrategy" else None
        try:
            note = gather_note(self._prober.target(pl_module), root)
        except Exception:  # noqa: BLE001 - a note only: the probe itself says what fails
            return
        if note is not None:
            rank_zero_info(f"RFCallback: {note}")

    # -- small decisions

    def _ranks_agree(self, trainer, succeeded: bool, what: str) -> bool:
        """Whether ``what`` succeeded on every rank (a collective); a rank that succeeded says when another did not."""
        agreed = ranks_agree(trainer, succeeded)
        if succeeded and not agreed:
            self._failures.elsewhere(what)
        return agreed

    def _effective_on(self, trainer, pl_module) -> bool:
        if self.effective is False or trainer.state.fn != "fit":
            return False
        return has_validation(trainer, pl_module) and first_loader(trainer.val_dataloaders) is not None

    @property
    def _shape(self) -> tuple[int, ...]:
        """``input_shape`` where a probe event needs it: every one comes after the first batch at the latest."""
        assert self.input_shape is not None, "RFCallback probes only once the input shape is known"
        return self.input_shape

    def _target_for(self, n_axes: int) -> tuple[int, ...] | None:
        return target_per_axis(self.target_size, n_axes, self._shape)

    def _target_warning(self, field: ReceptiveField, target: tuple[int, ...]) -> str | None:
        """The fit-start warning when the theoretical field cannot cover the target; ``None`` when it can.

        Only then is the field's geometry read (once per fit, a few passes on thin inputs), to tell a field that is
        too small from one the image border cuts.
        """
        if all(size >= t for size, t in zip(field.size, target)):
            return None
        input_size = tuple(self._shape[2:])
        unclipped = None
        if all(t <= n for t, n in zip(target, input_size)):
            try:
                unclipped = tuple(s if g is None else g.size for g, s in zip(field.geometry, field.size))
            except Exception:  # noqa: BLE001 - the geometry refines the message; without it the plain one is said
                unclipped = None
        return uncoverable_message(
            self.layer_name, field.position, field.size, target, input_size=input_size, unclipped=unclipped
        )

    def _describe_dashboard(self, trainer, theoretical: list[ReceptiveField], target, *, step: int = 0) -> None:
        effective = self.effective is not False and has_validation(trainer, trainer.lightning_module)
        n_axes = len(self._shape) - 2
        self._reporter.dashboard(trainer, theoretical, target, n_axes=n_axes, effective=effective, step=step)

    def _probe_fix(self, error: Exception) -> str:
        return probe_fix(error, self.input_shape, self._shape_source)

    def _effective_fix(self, error: Exception) -> str:
        return effective_fix(error, self._erf_inputs)


# Arguments that change what a logged name holds: two callbacks on one layer must agree on them (mode need not: each
# logs its own mode's sizes, and the theoretical ones are the same).
_NAMED_VALUES = (
    "pos", "element", "layout", "input_shape", "seed", "draws", "erf_samples", "target_size", "coverage_mass"
)  # fmt: skip


def _spelled_alike(value):
    """``value`` with its lists as tuples: ``pos=[4, 4]`` (a LightningCLI config's) names the cell ``(4, 4)`` does."""
    if isinstance(value, (list, tuple)):
        return tuple(_spelled_alike(item) for item in value)
    return value


def _weight_averaging_before(trainer, callback: Callback) -> int | None:
    """The index of the first of Lightning's weight averaging callbacks (EMA) before ``callback``, or None.

    ``WeightAveraging`` swaps the averaged weights in for validation, and back out in its own
    ``on_validation_epoch_end``: a probe after it measured the live weights, not the ones validation ran on (and
    ``fit`` leaves in the model), and what it logged depended on the order of the callbacks list.
    """
    callbacks = getattr(trainer, "callbacks", None)
    if not isinstance(callbacks, list):
        return None
    for index, other in enumerate(callbacks):
        if other is callback:
            return None
        if any(cls.__name__ == "WeightAveraging" for cls in type(other).__mro__):
            return index
    return None


def _made_by_parameters(tensor: torch.Tensor, parameters: set[int]) -> str | None:
    """The name of ``tensor``'s autograd node where its graph reaches one of ``parameters`` (by id), else None.

    The nodes nearest ``tensor`` only (a generator's last layer is among them): a walk of the whole of a training
    graph tens of thousands of nodes deep would overflow the C stack when the graph is freed (see autograd_nodes).
    """
    if any(id(getattr(node, "variable", None)) in parameters for node in autograd_nodes(tensor, WALK_LIMIT)):
        return type(tensor.grad_fn).__name__
    return None


def _has_lazy_parameters(module: nn.Module) -> bool:
    return any(isinstance(p, UninitializedParameter) for p in module.parameters())


def _fit_start_step(trainer) -> int:
    """The step of the weights at fit start: 0, or the step of the checkpoint the fit resumes from.

    At ``on_fit_start`` Lightning has restored the weights of ``ckpt_path`` but not yet its loops, whose
    ``global_step`` is still 0: a checkpoint written without this callback's state would have its weights logged
    as the initial ones.
    """
    loaded = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None)
    if isinstance(loaded, dict) and isinstance(loaded.get("global_step"), int):
        return max(loaded["global_step"], trainer.global_step)
    return trainer.global_step
