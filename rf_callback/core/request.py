"""What a probe is asked, checked once at the door: one small immutable value the core passes along."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rf_callback.core.arguments import (
    checked_device,
    checked_dtype,
    checked_element,
    checked_input_shape,
    checked_int,
    checked_layer,
    checked_layout,
    checked_mode,
)
from rf_callback.core.layouts import CHANNELS_FIRST, Tokens
from rf_callback.core.model_copy import model_device


@dataclass(frozen=True)
class ProbeRequest:
    """Which output of a model is probed, read how, on what input, in which mode and number type.

    Every function of the core below the public ones (the graph, its passes, the geometry, the table) receives one
    of these instead of ten loose arguments; :meth:`checked` builds it from a user's arguments, checking each.
    The model is not part of it: the core runs on copies of the model, and one request serves them all.

    Attributes:
        input_shape: the full input shape ``(N, C, *spatial)``.
        layer: the dotted name of the probed submodule, or ``None`` for the model's output.
        element: which feature map of a tuple, list or dict output (index or key), or ``None``.
        layout: how the probed output lays out its axes, as the user gave it (for messages in their words).
        mode: ``"theoretical"`` or ``"weights"``.
        draws: weights mode: how many random inputs.
        seed: weights mode: the seed of the private generator.
        dtype: the floating type the copy runs in.
        guard: whether a float32 gradient near underflow asks for the float64 retry (the user chose no dtype).
        device: where the copy runs.
    """

    input_shape: tuple[int, ...]
    layer: str | None = None
    element: int | str | None = None
    layout: str | Tokens = CHANNELS_FIRST
    mode: str = "theoretical"
    draws: int = 1
    seed: int = 0
    dtype: torch.dtype = torch.float32
    guard: bool = False
    device: torch.device = torch.device("cpu")

    @classmethod
    def checked(
        cls,
        model: nn.Module,
        input_shape: Sequence[int],
        *,
        layer: str | None = None,
        mode: str = "theoretical",
        draws: int = 8,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        element: int | str | None = None,
        layout: str | Tokens = CHANNELS_FIRST,
        device: str | torch.device | None = None,
    ) -> ProbeRequest:
        """The request for a user's arguments, each checked (see :func:`rf_callback.probe_rf` for their meaning).

        Args:
            model: the model, for its device when ``device`` is ``None``.
            input_shape: the full input shape ``(N, C, *spatial)``.
            layer: the probed submodule's dotted name, or ``None``.
            mode: ``"theoretical"`` or ``"weights"``.
            draws: weights mode: how many random inputs.
            seed: weights mode: the seed of the private generator.
            dtype: the floating type, or ``None`` for float32 with a float64 retry near underflow.
            element: which feature map of a tuple, list or dict output.
            layout: how the probed output lays out its axes.
            device: where the copy runs, or ``None`` for the model's device.

        Returns:
            The request.

        Raises:
            ValueError: an argument is not allowed; the message names it, the value given and what is allowed.
        """
        checked_layout(layout)
        return cls(
            input_shape=checked_input_shape(input_shape),
            layer=checked_layer(layer),
            element=checked_element(element),
            layout=layout,
            mode=checked_mode(mode),
            draws=checked_int("draws", draws, minimum=1, meaning="the number of random inputs in weights mode"),
            seed=checked_int(
                "seed", seed, minimum=-(2**63), below=2**64, meaning="the seed of the probe's private generator"
            ),
            dtype=checked_dtype(dtype) or torch.float32,
            guard=dtype is None,
            device=checked_device(device) or model_device(model),
        )

    @property
    def parsed_layout(self) -> str | Tokens:
        """The layout read: ``"channels_first"``, ``"channels_last"`` or a :class:`~rf_callback.Tokens`."""
        return checked_layout(self.layout)

    def replaced(self, **changes) -> ProbeRequest:
        """The same request with some fields changed (as :func:`dataclasses.replace`).

        Args:
            **changes: the fields to change, by name.

        Returns:
            The new request.
        """
        return dataclasses.replace(self, **changes)

    def on(self, input_shape: Sequence[int]) -> ProbeRequest:
        """The same request on another input shape.

        Args:
            input_shape: the other full input shape.

        Returns:
            The request on it.
        """
        return dataclasses.replace(self, input_shape=tuple(input_shape))

    def theoretical(self) -> ProbeRequest:
        """The same output read in theoretical mode (one input of ones).

        Returns:
            The theoretical request.
        """
        return dataclasses.replace(self, mode="theoretical", draws=1)

    def in_dtype(self, dtype: torch.dtype) -> ProbeRequest:
        """The same request in another floating type, without the underflow retry unless it is the same type.

        Args:
            dtype: the floating type.

        Returns:
            The request in ``dtype``.
        """
        return self if dtype == self.dtype else dataclasses.replace(self, dtype=dtype, guard=False)
