"""Where a probe event goes: the scalars, images and figures, written to each of the Trainer's loggers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rf_callback.callback import dashboard
from rf_callback.callback.failures import IMAGES_FIX, Failures, logger_fix
from rf_callback.callback.loggers import LoggerWriter, writer_for
from rf_callback.core.result import EffectiveField, ReceptiveField


class Reporter:
    """Writes what the callback measured to the Trainer's loggers, each through its own API.

    Scalars go to every logger (and through ``pl_module.log`` so ``EarlyStopping`` can monitor them); images and
    figures to the loggers that take them. A logger's failure is its own kind of failure, warned once.

    Args:
        layer_name: the probed layer as logged (``module.layer``, or ``output``).
        log_images: whether images and figures are drawn at all.
        coverage_mass: the mass fraction of the effective extent, for the captions.
        failures: where failures are reported.
    """

    def __init__(self, layer_name: str, *, log_images: bool, coverage_mass: float, failures: Failures):
        self.layer_name = layer_name
        self.log_images = log_images
        self.coverage_mass = coverage_mass
        self.failures = failures
        self._said_no_images = False
        self._said_scalars_only: set[str] = set()

    # -- the loggers

    def writers(self, trainer) -> list[LoggerWriter]:
        """One writer per logger of the Trainer (a logger that takes scalars only is said once).

        Args:
            trainer: the Lightning ``Trainer``.

        Returns:
            The writers, in the order of ``trainer.loggers``.
        """
        writers = [writer_for(logger) for logger in trainer.loggers]
        for writer in writers:
            if writer.name == "DummyLogger":  # fast_dev_run turns logging off by design: nothing to say
                continue
            if self.log_images and not writer.known and writer.name not in self._said_scalars_only:
                self._said_scalars_only.add(writer.name)
                rank_zero_warn(
                    f"RFCallback: {writer.name} gets the scalars only (through log_metrics); the heatmaps and "
                    f"figures go to TensorBoardLogger, WandbLogger and MLFlowLogger"
                )
        return writers

    def image_writers(self, trainer) -> list[LoggerWriter]:
        """The writers of the loggers that take images.

        Args:
            trainer: the Lightning ``Trainer``.

        Returns:
            Those writers.
        """
        return [writer for writer in self.writers(trainer) if writer.takes_images]

    def metrics(self, trainer, metrics: dict[str, float], *, step: int, pl_module=None) -> None:
        """Writes scalars to every logger at ``step``, and through ``pl_module.log`` when it is given.

        Args:
            trainer: the Lightning ``Trainer``.
            metrics: the scalars, by name.
            step: the step they are logged at.
            pl_module: the LightningModule, for ``EarlyStopping`` and ``ModelCheckpoint`` (not at fit start).
        """
        if pl_module is not None:
            with self.failures.guard("log", "pl_module.log of the callback's scalars"):
                for name, value in metrics.items():
                    pl_module.log(name, value, on_epoch=True, logger=False, sync_dist=True)
        if not trainer.is_global_zero:
            return
        # The loggers get the scalars directly, at the step of the images, so one probe lies on one step.
        for writer in self.writers(trainer):
            with self._writing(writer, "scalars"):
                writer.scalars(metrics, step)

    def image(self, trainer, tag: str, image: np.ndarray, step: int, caption: str) -> None:
        """Writes one image to every logger that takes images.

        Args:
            trainer: the Lightning ``Trainer``.
            tag: the image's name.
            image: an ``(H, W, 3)`` uint8 array.
            step: the step it is logged at.
            caption: what it shows.
        """
        for writer in self.image_writers(trainer):
            with self._writing(writer, "images"):
                writer.image(tag, image, step, caption)

    def _writing(self, writer: LoggerWriter, what: str):
        return self.failures.guard(f"logger {writer.name}", f"writing the callback's {what} to {writer.name}",
                                   logger_fix(writer.name))  # fmt: skip

    # -- what a probe event logs

    def dashboard(
        self, trainer, theoretical: list[ReceptiveField], target, *, n_axes: int, effective: bool, step: int = 0
    ) -> None:
        """Declares the charts overlaying the sizes, and says which cell each position index is.

        Args:
            trainer: the Lightning ``Trainer``.
            theoretical: the theoretical fields, one per position.
            target: per axis, the target size, or ``None``.
            n_axes: the number of spatial axes.
            effective: whether the effective field will be logged.
            step: the step of the note (the fields' first probe, or a probe again after the layers changed).
        """
        if not trainer.is_global_zero:
            return
        charts = dashboard.chart_layout(
            self.layer_name, len(theoretical), n_axes, target=target is not None, effective=effective
        )
        note = dashboard.positions_note(self.layer_name, theoretical, target)
        for writer in self.writers(trainer):
            with self._writing(writer, "charts"):
                writer.charts(charts)
                writer.text(dashboard.note_tag(self.layer_name), note, step)

    def fields(
        self,
        trainer,
        kind: str,
        fields: Sequence[ReceptiveField | None],
        *,
        step: int,
        figures: bool,
        target_for,
        beside: list[ReceptiveField] | None = None,
        pl_module=None,
    ) -> None:
        """Logs probed fields (``kind`` is ``theoretical`` or ``weights``), their images and the target's sizes.

        Args:
            trainer: the Lightning ``Trainer``.
            kind: the probe's mode.
            fields: one field per position (``None``: its probe failed alone, said already).
            step: the step they are logged at.
            figures: also draw each field's figure (fit start and fit end only: a figure costs a few steps).
            target_for: the target per axis for a number of axes, or ``None`` (the callback's target).
            beside: every probe after fit start passes the theoretical fields (an empty list where they failed):
                their sizes are logged beside (a flat line in the charts). The target's sizes come once per probe:
                with ``beside`` or the theoretical ones.
            pl_module: the LightningModule, for ``pl_module.log``.
        """
        metrics = {}
        for index, field in enumerate(fields):
            if field is not None:  # else its probe failed alone (said): the theoretical and target sizes go on
                metrics.update(dashboard.field_scalars(self.layer_name, index, field, kind))
            if beside and kind != "theoretical":
                metrics.update(dashboard.size_scalars(self.layer_name, index, beside[index], "theoretical"))
            probed = field if field is not None else beside[index] if beside else None
            if probed is None:
                continue
            target = target_for(len(probed.bounds))
            if target is not None and (beside is not None or kind == "theoretical"):  # once per probe
                metrics.update(dashboard.target_scalars(self.layer_name, index, target))
        self.metrics(trainer, metrics, step=step, pl_module=pl_module)
        if self.log_images:
            self._field_images(trainer, kind, fields, step, figures=figures)

    def _field_images(
        self, trainer, kind: str, fields: Sequence[ReceptiveField | None], step: int, *, figures: bool
    ) -> None:
        if not self.image_writers(trainer):
            if not self._said_no_images and not getattr(trainer, "fast_dev_run", False):
                self._said_no_images = True
                rank_zero_warn(
                    "RFCallback: no TensorBoardLogger, WandbLogger or MLFlowLogger among the Trainer's loggers, so no "
                    "heatmaps are logged (scalars still are); add one of them to see the pictures"
                )
            return
        if not trainer.is_global_zero:
            return
        from rf_callback.plotting import figure_to_array, heatmap_image

        for index, field in enumerate(fields):
            if field is None:
                continue
            with self.failures.guard("images", "drawing the field's images", IMAGES_FIX):
                caption = self.caption(field)
                tag = dashboard.image_tag(self.layer_name, index, f"heatmap/{kind}")
                # probe_rf at named positions draws every field's heatmap: only a ReceptiveFieldMap's lack one.
                heatmap = heatmap_image(cast(torch.Tensor, field.heatmap), support=True)
                self.image(trainer, tag, heatmap, step, caption)
                if figures:
                    figure = figure_to_array(plot_rf_figure(field))
                    self.image(trainer, dashboard.image_tag(self.layer_name, index, "figure"), figure, step, caption)

    def effective_note(self, trainer, theoretical: list[ReceptiveField | None], target) -> None:
        """Says which cell each position index is on validation inputs shaped unlike the probed input.

        Args:
            trainer: the Lightning ``Trainer``.
            theoretical: the theoretical field of every position on those inputs, in the order of ``pos`` (``None``
                for a position off their output map).
            target: per axis, the target size, or ``None``.
        """
        note = dashboard.positions_note(self.layer_name, theoretical, target, effective=True)
        cells = ", ".join(
            f"pos{index} is off the map"
            if field is None
            else f"pos{index} is cell {field.position} of a {' x '.join(map(str, field.output_shape))} map"
            for index, field in enumerate(theoretical)
        )
        shape = next(field for field in theoretical if field is not None).input_shape[1:]
        rank_zero_info(
            f"RFCallback: the effective field is measured on validation inputs of shape {tuple(shape)}, unlike the "
            f"probed input: there {cells}, and its ratios are to the theoretical field there"
        )
        if not trainer.is_global_zero:
            return
        for writer in self.writers(trainer):
            with self._writing(writer, "charts"):
                writer.text(dashboard.note_tag(self.layer_name), note, trainer.global_step)

    def effective_image(self, trainer, index: int, field: EffectiveField) -> None:
        """Logs the effective field's heatmap at the current step.

        Args:
            trainer: the Lightning ``Trainer``.
            index: the position's index in ``pos``.
            field: its effective field.
        """
        if not self.log_images or not trainer.is_global_zero:
            return
        with self.failures.guard("images", "drawing the effective field's heatmap", IMAGES_FIX):
            from rf_callback.plotting import heatmap_image

            tag = dashboard.image_tag(self.layer_name, index, "heatmap/effective")
            self.image(trainer, tag, heatmap_image(field.heatmap), trainer.global_step, self.caption(field))

    def final_figures(
        self,
        trainer,
        *,
        step: int,
        fields: Sequence[ReceptiveField | None],
        effective: dict[int, EffectiveField],
        cells: dict[int, str],
        image,
        history: list[dict[str, Any]],
        target: tuple[int, ...] | None,
    ) -> None:
        """Logs the fit-end figures: each field's, the effective field over an input, and its growth curve.

        Args:
            trainer: the Lightning ``Trainer``.
            step: the step of the last probe.
            fields: the last probe's fields.
            effective: the last effective field of each position that has one, by its index in ``pos``.
            cells: the cell each index was measured at last (its label in the history), by its index in ``pos``.
            image: the input the effective field is drawn over (its channels' mean where they are not 1 or 3).
            history: the callback's history (the growth curve's epochs and metrics).
            target: per axis, the target size, or ``None``.
        """
        from rf_callback.plotting import figure_to_array, plot_effective, plot_growth

        layer = self.layer_name
        for index, field in enumerate(fields):
            if field is None:
                continue
            figure = figure_to_array(plot_rf_figure(field))
            self.image(trainer, dashboard.image_tag(layer, index, "figure"), figure, step, self.caption(field))
        for index, effective_field in effective.items():
            overlay = plot_effective(effective_field, image=_drawable(image), q=self.coverage_mass, target=target)
            tag = dashboard.image_tag(layer, index, "overlay")
            self.image(trainer, tag, figure_to_array(overlay), step, self.caption(effective_field))
        entries = [entry for entry in history if entry.get("effective")]
        # The history keys each epoch's metrics by cell; position indices that name one cell share its curve.
        for index, label in sorted(cells.items()):
            rows = [(entry["epoch"], entry["effective"][label]) for entry in entries if label in entry["effective"]]
            if not rows:  # never measured: no curve
                continue
            title = f"effective field of {layer} at pos{index} ({label.replace('_', ', ')})"
            image_array = figure_to_array(plot_growth(rows, title=title, target=target))
            self.image(trainer, dashboard.image_tag(layer, index, "growth"), image_array, step, title)

    def caption(self, field: ReceptiveField | EffectiveField) -> str:
        """What an image of ``field`` shows, in words.

        Args:
            field: a probed or effective field.

        Returns:
            The caption.
        """
        if isinstance(field, EffectiveField):
            extent = " x ".join(str(last - first + 1) for first, last in field.extent(self.coverage_mass))
            where = f"{self.layer_name} at {field.position}"
            return f"effective field of {where}: {self.coverage_mass:g} of the mass in {extent}"
        return f"{field.mode} field of {self.layer_name} at {field.position}: {' x '.join(map(str, field.size))}"


def plot_rf_figure(field: ReceptiveField):
    """The figure of one field (matplotlib is imported only when a figure is drawn).

    Args:
        field: the field.

    Returns:
        Its matplotlib figure.
    """
    from rf_callback.plotting import plot_rf

    return plot_rf(field)


def _drawable(sample: torch.Tensor | None) -> torch.Tensor | None:
    """An input ``(C, *spatial)`` as the figures draw it: grey or RGB as it is, else the mean of its channels."""
    if sample is None or sample.shape[0] in (1, 3):
        return sample
    return sample.mean(dim=0, keepdim=True)
