"""The seed project's check of a theoretical field, by forward passes alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rf_callback._model_copy import model_device, prepared_copy, preserved_random_state
from rf_callback.graph import exact_kernels, forward_to, submodule
from rf_callback.result import ReceptiveField
from rf_callback.support import box_slices


@dataclass(frozen=True)
class RFVerification:
    """What :func:`verify_rf` found; true when the field passed.

    Attributes:
        passed: the output depends on the input, nothing outside the bounds influences it, and every face of the
            bounds does (so the bounds are exact, not merely large enough).
        reaches_output: with an input of ones, the probed output is non-zero.
        outside_influence: with everything inside the bounds zeroed, the probed output is still non-zero.
        faces: per axis, whether the first and the last slice of the bounds each influence the output.
    """

    passed: bool
    reaches_output: bool
    outside_influence: bool
    faces: tuple[tuple[bool, bool], ...]

    def __bool__(self) -> bool:
        return self.passed


def verify_rf(model: nn.Module, field: ReceptiveField, *, dtype: torch.dtype = torch.float64) -> RFVerification:
    """Checks a theoretical field by forward passes alone, as the seed project's demo does.

    It runs on the linearised, bias-free copy the theoretical probe uses (all weights positive, so no contributions
    can cancel).

    An input of ones with the bounds zeroed must give exactly zero at the probed position (nothing outside can
    change it), and an input that is one only on one face of the bounds must give a non-zero value, for every
    face (each edge of the bounds is reached). All inputs go through the network in one batched forward pass.

    Args:
        model: the network the field was measured on.
        field: a field from :func:`probe_rf` (or an entry of a :class:`ReceptiveFieldMap`), theoretical mode.
        dtype: floating type of the copy.

    Returns:
        An :class:`RFVerification`, truthy when the field passed.

    Raises:
        ValueError: ``field`` is not a theoretical field.
    """
    if not isinstance(field, ReceptiveField) or field.mode != "theoretical":
        raise ValueError(
            f"field={field!r} cannot be verified: verify_rf checks theoretical fields (probe_rf(..., "
            f"mode='theoretical')); a weights-mode field depends on random draws"
        )
    device = model_device(model)
    with preserved_random_state(device), torch.inference_mode(False), torch.no_grad(), exact_kernels(device):
        copy = prepared_copy(model, "theoretical", dtype)
        n, channels, *spatial = field.input_shape
        box = (slice(None), *box_slices(field.bounds))
        inputs = [torch.ones((channels, *spatial), dtype=dtype)]
        outside = inputs[0].clone()
        outside[box] = 0
        inputs.append(outside)
        for axis, (first, last) in enumerate(field.bounds):
            for edge in (first, last):
                face = torch.zeros_like(outside)
                face_box = list(box)
                face_box[1 + axis] = slice(edge, edge + 1)
                face[tuple(face_box)] = 1
                inputs.append(face)
        batch = torch.stack(inputs).to(device)
        target = submodule(copy, field.layer)
        output = forward_to(
            copy, target, batch, "theoretical", field.input_shape, field.layer, field.element, layout=field.layout
        )
        values = output[(slice(None), slice(None), *field.position)].abs().sum(dim=1).cpu()
    faces = tuple((bool(values[2 + 2 * a] > 0), bool(values[3 + 2 * a] > 0)) for a in range(len(field.bounds)))
    reaches, leaks = bool(values[0] > 0), bool(values[1] != 0)
    return RFVerification(
        passed=reaches and not leaks and all(all(f) for f in faces),
        reaches_output=reaches,
        outside_influence=leaks,
        faces=faces,
    )
