"""The seed project's check of a theoretical field, by forward passes alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rf_callback.core.arguments import checked_dtype
from rf_callback.core.errors import ProbeError
from rf_callback.core.graph import exact_kernels, forward_to
from rf_callback.core.model_copy import (
    model_device,
    prepared_copy,
    probe_functions,
    probe_scope,
    shares_in_values,
    with_materialised_fallback,
)
from rf_callback.core.request import ProbeRequest
from rf_callback.core.result import ReceptiveField
from rf_callback.core.support import box_of, box_slices


@dataclass(frozen=True)
class RFVerification:
    """What :func:`verify_rf` found; true when the field passed.

    Attributes:
        passed: the output depends on the input, nothing outside the bounds influences it, and every face of the
            bounds does (so the bounds are exact, not merely large enough).
        reaches_output: with an input of ones, the probed output differs from that on an input of zeros.
        outside_influence: with everything inside the bounds zeroed, the probed output still differs from that on an
            input of zeros (or ones outside the bounds change it).
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

    An input of ones with the bounds zeroed must give exactly what an input of zeros gives at the probed position
    (nothing outside can change it), and an input that is one only on one face of the bounds must give something
    else, for every face (each edge of the bounds is reached). Comparing with zeros, not with zero, keeps
    input-independent terms (a ViT's position embeddings) out of it. A gate that multiplies a map by its mean passes
    a change only where the map is not zero, so the outside is also checked as a change to an input of ones, and a
    face that changes nothing alone is checked once more that way. All inputs go through the network in one batched
    forward pass (two where a face is checked again).

    Args:
        model: the network the field was measured on.
        field: a field from :func:`probe_rf` (or an entry of a :class:`ReceptiveFieldMap`), theoretical mode.
        dtype: floating type of the copy.

    Returns:
        An :class:`RFVerification`, truthy when the field passed.

    Raises:
        ValueError: ``field`` is not one field (a list, a map), or not a theoretical one; ``dtype`` is not a
            floating torch dtype.
        ProbeError: forward passes cannot see the effect of the field's weakest face (its gradient lies within the
            rounding of an input-independent term the output holds, or of ``dtype``'s range), so a field too small
            could pass.
    """
    checked_dtype(dtype)
    if not isinstance(field, ReceptiveField):
        kind = "a list of fields" if isinstance(field, list) else f"a {type(field).__name__}"
        raise ValueError(
            f"field= is {kind}, but verify_rf checks one ReceptiveField: verify each, e.g. all(verify_rf(model, f) "
            f"for f in fields) (for a ReceptiveFieldMap, its fields: field_map[position])"
        )
    if field.mode != "theoretical":
        raise ValueError(
            f"field={field!r} cannot be verified: verify_rf checks theoretical fields (probe_rf(..., "
            f"mode='theoretical')); a weights-mode field depends on random draws"
        )
    return with_materialised_fallback(lambda: _verified(model, field, dtype))


def _verified(model: nn.Module, field: ReceptiveField, dtype: torch.dtype) -> RFVerification:
    device = model_device(model)
    # Gradients on, though nothing is backpropagated: the copy recognises the products of two input-dependent
    # tensors (gates, attention) by their gradient, and rescales them so that they neither overflow nor underflow.
    # A softmax's twin passes its gradient's share in its values too (a gate over branches, attention).
    kernels = exact_kernels(device)
    with probe_scope(device), kernels, shares_in_values():
        copy = prepared_copy(model, "theoretical", dtype)
        n, channels, *spatial = field.input_shape
        box = (slice(None), *box_slices(field.bounds))
        ones = torch.ones((channels, *spatial), dtype=dtype)
        outside = ones.clone()
        outside[box] = 0
        faces = []
        for axis, (first, last) in enumerate(field.bounds):
            for edge in (first, last):
                face = torch.zeros_like(outside)
                face_box = list(box)
                face_box[1 + axis] = slice(edge, edge + 1)
                face[tuple(face_box)] = 1
                faces.append(face)
        request = ProbeRequest(
            input_shape=field.input_shape, layer=field.layer, element=field.element, layout=field.layout,
            dtype=dtype, device=device,
        )  # fmt: skip
        # Everything is compared with the output on an input of zeros, which is not zero where the network adds
        # input-independent tensors (a ViT's position embeddings and class token). A gate that multiplies a map by a
        # global statistic of it passes a change only where the map is not zero, so the outside is also checked as a
        # change to an input of ones.
        zeros = torch.zeros_like(ones)
        batch = torch.stack([zeros, ones, outside, ones + outside, *faces])
        at, sensitivity = _influence(copy, request, batch, field.position, sensitivity_of=1)
        _check_resolution(at[0], sensitivity, dtype, field)
        changed = [not torch.equal(at[i], at[0]) for i in range(len(batch))]
        leaks = changed[2] or not torch.equal(at[3], at[1])
        # For the same reason a face alone (zeros elsewhere) can reach nothing: it is checked as a change too.
        unseen = [i for i in range(len(faces)) if not changed[4 + i]]
        if unseen:
            again, _ = _influence(
                copy, request, torch.stack([ones, *(ones + faces[i] for i in unseen)]), field.position
            )
            for k, i in enumerate(unseen):
                changed[4 + i] = not torch.equal(again[1 + k], again[0])
    reached = tuple((changed[4 + 2 * a], changed[5 + 2 * a]) for a in range(len(field.bounds)))
    reaches = changed[1]
    return RFVerification(
        passed=reaches and not leaks and all(all(f) for f in reached),
        reaches_output=reaches,
        outside_influence=leaks,
        faces=reached,
    )


def _influence(
    copy: nn.Module, request: ProbeRequest, batch: torch.Tensor, position, *, sensitivity_of: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per input of ``batch``, the probed output position's channels, on the CPU (one forward pass).

    With ``sensitivity_of``, also |d (those channels summed) / d input| of that input of the batch, summed over the
    input's channels (one backward pass; ``None`` where the forward draws at random). A forward that draws at random
    (noise added to a map) would draw other values for each input, which would all seem to change the output: each
    input then runs alone, on the same draws.
    """
    functions = probe_functions("theoretical", exact_values=True)
    inputs = batch.to(request.device).requires_grad_(True)
    output = forward_to(copy, inputs, request, functions)
    at: tuple[slice | int, ...] = (slice(None), slice(None), *position)
    if functions.drew_at_random and len(batch) > 1:
        alone = []
        for one in batch:
            torch.manual_seed(0)  # inside probe_scope: the user's random state is restored
            alone.append(_influence(copy, request, one.unsqueeze(0), position)[0])
        return torch.cat(alone), None
    sensitivity = None
    if sensitivity_of is not None:
        (gradient,) = torch.autograd.grad(output[at][sensitivity_of].sum(), inputs)
        sensitivity = gradient[sensitivity_of].abs().sum(dim=0).cpu()
    return output[at].detach().cpu(), sensitivity


# How far above the rounding of the output's input-independent term the weakest face's effect must lie to be seen
# by comparing two forward passes (the forward's own roundings add up over its calls).
_RESOLUTION_MARGIN = 64.0


def _check_resolution(baseline: torch.Tensor, sensitivity: torch.Tensor | None, dtype, field: ReceptiveField) -> None:
    """Refuses a check by forward passes that could not see the weakest face of the field's effect.

    Every comparison is with the output on zeros, which holds the network's input-independent terms (a position or
    time embedding added to the maps): a slab of inputs whose effect lies below their rounding changes nothing, so
    the face of a true field that a field too small leaves outside would go unseen and the smaller field pass, and
    the right field's faces fail (a diffusion UNet's time embedding before 16 residual blocks: 1e-20 against 5e-3
    in float64). Effects below the dtype's smallest normal number are lost the same way. Each face of the field the
    gradient shows (its outermost slab along an axis) is what one comparison must see.

    Raises:
        ProbeError: the weakest face's effect lies within the rounding of the output, or of ``dtype``'s range.
    """
    if sensitivity is None:
        return
    box = box_of(sensitivity > 0)
    if box is None:
        return
    info = torch.finfo(dtype)
    term = float(baseline.abs().max())
    resolution = max(info.eps * term, info.tiny) * _RESOLUTION_MARGIN
    faces = []
    for axis, (first, last) in enumerate(box):
        for edge in (first, last):
            faces.append(float(sensitivity.select(axis, edge).sum()))
    # on the output channel it moves most, at least its share of the sum over channels
    weakest = min(faces) / max(baseline.numel(), 1)
    if weakest > resolution:
        return
    kind = str(dtype).removeprefix("torch.")
    why = (
        f"an input-independent term of {term:.1e} (a position or time embedding, a constant the forward adds)"
        if info.eps * term >= info.tiny
        else f"{kind}'s smallest normal number, {info.tiny:.1e}"
    )
    wider = "" if dtype == torch.float64 else ", or dtype=torch.float64"
    raise ProbeError(
        f"verify_rf cannot check the field at {field.position} by forward passes: the effect of the field's weakest "
        f"face on the output there ({weakest:.1e}, from its gradient) lies within the rounding of {why} in {kind}, so "
        f"pixels outside the bounds could change nothing it can see and a field too small would pass; the field is "
        f"read off the gradient (probe_rf), which no such term reaches: check it against a brute force of the "
        f"gradient instead{wider}"
    )
