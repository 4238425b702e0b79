"""Writes the callback's scalars, images and text to each Lightning logger through that logger's own API."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

__all__ = ["LoggerWriter", "writer_for"]


class LoggerWriter:
    """Scalars to any Lightning logger (``log_metrics``); images, text and chart layouts where the logger has them.

    This base class is what a logger without an image API gets (``CSVLogger``, or one this package does not know):
    the scalars only. Subclasses add the images, a text note and the chart layout in their logger's own way.

    Args:
        logger: a Lightning logger (``lightning.pytorch`` or ``pytorch_lightning``).
    """

    takes_images = False
    known = False  # a logger this package knows: no warning that it gets the scalars only

    def __init__(self, logger):
        self.logger = logger

    @property
    def name(self) -> str:
        """The logger's class name, as messages show it."""
        return type(self.logger).__name__

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Logs scalars at ``step`` (the Trainer's global step)."""
        self.logger.log_metrics(dict(metrics), step=step)

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None:
        """Logs an RGB image (``uint8``, ``(height, width, 3)``) at ``step``; ignored by scalar-only loggers."""

    def text(self, tag: str, text: str, step: int) -> None:
        """Logs a Markdown note at ``step``; ignored by loggers without text."""

    def charts(self, layout: Mapping[str, Mapping[str, list[str]]]) -> None:
        """Declares charts that overlay several scalars: ``{category: {chart title: [tag regex, ...]}}``."""


class CSVWriter(LoggerWriter):
    """``CSVLogger``: the scalars, which is all a CSV file holds."""

    known = True


class TensorBoardWriter(LoggerWriter):
    """``TensorBoardLogger``: images, text, and a Custom Scalars layout overlaying the sizes in one chart."""

    takes_images = known = True

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None:  # noqa: D102
        self.logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:  # noqa: D102
        self.logger.experiment.add_text(tag, text, global_step=step)

    def charts(self, layout: Mapping[str, Mapping[str, list[str]]]) -> None:  # noqa: D102
        multiline = {
            category: {title: ["Multiline", list(tags)] for title, tags in charts.items()}
            for category, charts in layout.items()
        }
        self.logger.experiment.add_custom_scalars(multiline)


class WandbWriter(LoggerWriter):
    """``WandbLogger``: ``wandb.Image`` with a caption, at the scalars' ``trainer/global_step``; text as a table."""

    takes_images = known = True

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None:  # noqa: D102
        self.logger.log_image(key=tag, images=[image], step=step, caption=[caption])

    def text(self, tag: str, text: str, step: int) -> None:  # noqa: D102
        self.logger.log_text(key=tag, columns=["note"], data=[[text]], step=step)


class MLflowWriter(LoggerWriter):
    """``MLFlowLogger``: images as step-indexed image artifacts of the run; text as a Markdown artifact."""

    takes_images = known = True

    def image(self, tag: str, image: np.ndarray, step: int, caption: str) -> None:  # noqa: D102
        # synchronous: the artifact is stored when the call returns, like the scalars, not by a background thread
        self.logger.experiment.log_image(self.logger.run_id, image, key=_mlflow_key(tag), step=step, synchronous=True)

    def text(self, tag: str, text: str, step: int) -> None:  # noqa: D102
        self.logger.experiment.log_text(self.logger.run_id, text, artifact_file=f"rf_callback/{_mlflow_key(tag)}.md")


_WRITERS = {
    "TensorBoardLogger": TensorBoardWriter,
    "WandbLogger": WandbWriter,
    "MLFlowLogger": MLflowWriter,
    "CSVLogger": CSVWriter,
}


def writer_for(logger) -> LoggerWriter:
    """The writer of a Lightning logger, found by its class or nearest Lightning base class.

    Subclasses of Lightning's loggers get their base's writer; ``lightning.pytorch`` and ``pytorch_lightning``
    loggers alike.

    Args:
        logger: a Lightning logger.

    Returns:
        Its writer; a scalar-only :class:`LoggerWriter` for a logger this package does not know.
    """
    for cls in type(logger).__mro__:
        if cls.__name__ in _WRITERS and cls.__module__.startswith(("lightning.", "pytorch_lightning.")):
            return _WRITERS[cls.__name__](logger)
    return LoggerWriter(logger)


def _mlflow_key(tag: str) -> str:
    """The tag as ``MLFlowLogger.log_metrics`` writes a metric's name, so a layer's images sit beside its scalars.

    MLflow allows ASCII letters, digits, ``_ - . /`` and spaces; Lightning drops the rest, and so does this.
    """
    return re.sub(r"[^a-zA-Z0-9_/. -]+", "", tag)
