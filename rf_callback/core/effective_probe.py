"""The effective receptive field on real inputs (Luo et al., 2016): the gradient of a trained network, averaged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from rf_callback.core.arguments import (
    checked_dtype,
    checked_int,
    checked_layout,
    positions_of_index_columns,
)
from rf_callback.core.effective import checked_map
from rf_callback.core.errors import NoGradientError
from rf_callback.core.graph import ProbeError, exact_kernels, forward_to, where
from rf_callback.core.layouts import CHANNELS_FIRST, Tokens
from rf_callback.core.model_copy import prepared_copy, probe_scope, scripted_modules
from rf_callback.core.probe import normalised_positions, probe_rf
from rf_callback.core.request import ProbeRequest
from rf_callback.core.result import EffectiveField, ReceptiveField


def effective_rf(
    model: nn.Module,
    inputs: torch.Tensor,
    pos: str | int | Sequence[int] | Sequence[Sequence[int]] = "center",
    *,
    layer: str | None = None,
    biases: str = "trained",
    chunk_size: int = 32,
    dtype: torch.dtype = torch.float32,
    theoretical: ReceptiveField | list[ReceptiveField] | None = None,
    element: int | str | None = None,
    layout: str | Tokens = CHANNELS_FIRST,
    device: str | torch.device | None = None,
) -> EffectiveField | list[EffectiveField]:
    """Measures the effective receptive field of one output position on real inputs (Luo et al., 2016).

    The map is the magnitude of the gradient of the chosen output position (all channels) with respect to each
    input, summed over input channels and averaged over the inputs, on a deep copy in eval mode. Biases stay as
    trained by default: with ReLUs, a bias decides which units are active, so the zero-bias network of
    :func:`probe_rf` would measure a different function. One backward pass serves each chunk of inputs.

    Args:
        model: the network (not modified).
        inputs: real inputs ``(N, C, *spatial)``.
        pos: the output position: an index tuple (an int for 1D) or ``"center"``; or a list of them (one forward
            pass per chunk serves them all, with one backward pass per position). ``"all"`` is refused: pass the
            positions you need as a list.
        layer: dotted name of the submodule whose output is probed.
        biases: ``"trained"`` (default) or ``"zero"`` (as the theoretical and weights-mode probes).
        chunk_size: inputs per backward pass (1 where the model normalises over the batch in eval mode, a
            BatchNorm without running statistics, so that no input's gradient depends on the others). Where the
            forward mixes samples otherwise (a minibatch standard deviation), one forward of two inputs finds out
            (their whole outputs, both ways), and each input's gradient is then read from its own output alone, one
            backward pass per input.
        dtype: floating type the copy runs in.
        theoretical: the theoretical field of the same position, layer and input shape (a list of them for a list
            of positions), if already probed (it does not depend on the weights, so a caller that measures every
            epoch probes it once).
        element: where the probed output is a tuple, list, dict or dataclass of feature maps, the index (negative
            from the end) or key (field name) of the one to probe.
        layout: how the probed output lays out its axes (``"channels_first"``, ``"channels_last"`` or tokens on a
            grid), as for :func:`~rf_callback.core.probe.probe_rf`; ``pos`` is on its spatial grid.
        device: where the copy runs (the inputs are moved there chunk by chunk); ``None``: the model's device.

    Returns:
        An :class:`EffectiveField` with the averaged map, its metrics and the theoretical field for reference; a
        list of them, in order, for a list of positions.

    Raises:
        NoGradientError: the map of some position is zero everywhere (a ``ValueError``; its ``positions`` say
            which).
        ValueError: an argument is wrong (inputs that are not a batch, hold no sample or hold NaN or inf among
            them), or the map is not finite.
        ProbeError: the forward raised, cuts the gradient, or gives a non-finite output; or the map of some
            position is rounding noise (the output's channels, which the map adds, have gradients that cancel: a
            normalisation or a softmax over them) or below what ``dtype`` resolves.
    """
    if biases not in ("trained", "zero"):
        raise ValueError(f"biases={biases!r} must be 'trained' or 'zero'")
    _check_inputs(inputs)
    chunk_size = checked_int("chunk_size", chunk_size, minimum=1, meaning="inputs per backward pass")
    if checked_dtype(dtype) is None:
        raise ValueError("dtype=None is not allowed here; pass torch.float32 or torch.float64")
    request = ProbeRequest.checked(
        model, (1, *inputs.shape[1:]), layer=layer, mode="weights", dtype=dtype, element=element, layout=layout,
        device=device,
    )  # fmt: skip
    shape, layer, element, device = request.input_shape, request.layer, request.element, request.device
    parsed_layout = request.parsed_layout
    pos = positions_of_index_columns(pos)  # before the check of theoretical=: the arrays' own refusal first
    if isinstance(pos, str) and pos == "all":
        raise ValueError(
            "pos='all' is not allowed here: the effective field costs one backward pass per position over every "
            "input, so effective_rf measures the positions you name; pass a list, e.g. pos=[(2, 2), (4, 4)], or "
            "probe_rf(model, input_shape, 'all') for every position's theoretical bounds"
        )
    if theoretical is None and scripted_modules(model):
        raise ValueError(
            "effective_rf reports the effective field beside the theoretical one, which a TorchScript model cannot "
            "give (its compiled functions hide pixels from the theoretical probe): pass theoretical=probe_rf(...) of "
            "the Python module it was scripted from, at the same positions"
        )
    if theoretical is None:
        try:
            probed = probe_rf(model, shape, pos, layer=layer, element=element, layout=layout, device=device)
            # pos is not 'all' (refused above): no ReceptiveFieldMap
            theoretical = cast("ReceptiveField | list[ReceptiveField]", probed)
        except ValueError as error:
            if not str(error).startswith("input_shape="):
                raise
            raise ValueError(
                f"inputs of shape {tuple(inputs.shape)} are read as a batch (N, C, *spatial), which the model "
                f"refuses: {error}; one unbatched input (C, H, W) is passed as inputs.unsqueeze(0)"
            ) from error
    else:
        _check_theoretical(theoretical, pos, shape, layer, element, parsed_layout, layout)
    fields = theoretical if isinstance(theoretical, list) else [theoretical]
    # The map's mass is what counts, not its exact zeros: cuDNN's fast kernels stay on.
    kernels = exact_kernels(device, exact_zeros=False)
    with probe_scope(device), kernels:
        totals = [torch.zeros(inputs.shape[2:], dtype=torch.float64) for _ in fields]  # outside inference tensors
        copy = prepared_copy(model, "weights", dtype, zero_biases=biases == "zero", device=device)
        if _mixes_samples(copy):  # its gradients would carry cross-sample terms: each input is read alone
            chunk_size = 1
        # Any other forward that mixes samples (a minibatch standard deviation, a functional batch norm in training
        # mode) gets one cotangent per sample, read on that sample alone: the map holds no cross-sample terms.
        mixing = chunk_size > 1 and inputs.shape[0] > 1 and _reads_across_samples(copy, inputs[:2], request)
        # Per position, the sample whose map peaks highest: its channels' gradients are the largest (a blank or
        # saturated input's are near zero), so it sets the scale that tells rounding noise from a map.
        strongest = [(-1.0, 0) for _ in fields]  # (peak, index of the input)
        start = 0
        # Chunks of balanced sizes: a last chunk of one sample would give a batch statistic (a minibatch standard
        # deviation) of one sample, NaN.
        chunks = -(-inputs.shape[0] // chunk_size)
        if chunk_size > 1 and chunks > 1 and inputs.shape[0] // chunks < 2:
            chunks = inputs.shape[0] // 2  # chunk_size=2 of 3 inputs: one chunk of 3, not 2 and 1
        for chunk in inputs.detach().tensor_split(chunks):
            x = chunk.clone().to(device=device, dtype=dtype).requires_grad_(True)
            output = forward_to(copy, x, request)
            if not torch.isfinite(output).all():
                raise _not_finite_error(copy, layer, len(chunk), len(inputs))
            samples: list[slice] = [slice(n, n + 1) for n in range(len(chunk))] if mixing else [slice(None)]
            for index, field in enumerate(fields):
                for sample in samples:
                    cotangent = torch.zeros_like(output)
                    at: tuple[slice | int, ...] = (sample, slice(None), *field.position)
                    cotangent[at] = 1
                    last = index == len(fields) - 1 and sample is samples[-1]
                    (gradient,) = torch.autograd.grad(output, x, cotangent, retain_graph=not last)
                    maps = gradient[sample].abs().sum(dim=1)  # per sample, on the device
                    totals[index] += maps.sum(dim=0).to("cpu", torch.float64)
                    peak, strongest_at = maps.flatten(1).amax(dim=1).max(dim=0)
                    if float(peak) > strongest[index][0]:
                        strongest[index] = (float(peak), start + (sample.start or 0) + int(strongest_at))
            start += len(chunk)
        dead = [field.position for field, total in zip(fields, totals) if not bool(total.any())]
        if dead:
            others = "; the other positions' maps are not: measure them alone" if len(dead) < len(fields) else ""
            if _resolved_in_float64(model, inputs[:1].detach(), request, dead, biases == "zero"):
                why = (
                    f" in {dtype}, though not in float64 on the first input: the gradient rounds to zero in {dtype} "
                    f"(an activation saturated by inputs of a large scale, such as uint8 pixels); pass "
                    f"dtype=torch.float64, or scale the inputs as the model is trained on them"
                )
            else:
                why = ": the output there does not depend on them (dead units, zero weights)"
            raise NoGradientError(
                f"the gradient map of {_positions_named(dead, len(fields))} is zero everywhere on these "
                f"{inputs.shape[0]} inputs{why}{others}",
                dead,
            )
        rounding = _ROUNDING_NOISE * torch.finfo(dtype).eps
        noise: list[tuple[tuple[int, ...], float]] = []
        imprecise: list[tuple[int, ...]] = []
        for strongest_input in dict.fromkeys(n for _, n in strongest):
            chosen = [index for index, (_, n) in enumerate(strongest) if n == strongest_input]
            one_input = inputs[strongest_input : strongest_input + 1].detach()
            (signed,) = _one_sample_maps(copy, one_input, request, [fields[i].position for i in chosen], (True,))
            peaks = [(fields[i].position, float(totals[i].max()) / inputs.shape[0]) for i in chosen]
            suspects = [
                (position, peak / float(scale.max()))
                for (position, peak), scale in zip(peaks, signed)
                if peak <= rounding * float(scale.max())
            ]
            found_noise, found_imprecise = _rounding_noise(model, copy, one_input, request, suspects, biases == "zero")
            noise += found_noise
            imprecise += found_imprecise
        order = [field.position for field in fields]
        noise.sort(key=lambda item: order.index(item[0]))  # as asked, not grouped by input
        imprecise.sort(key=order.index)
    if noise:
        raise ProbeError(
            f"the gradient map of {_positions_named([p for p, _ in noise], len(fields))} is rounding noise: its "
            f"largest value is {noise[0][1]:.1e} of the gradient with the output's channels weighed by random signs, "
            f"so the channels' gradients, which the map adds at the position, cancel (a normalisation or a softmax "
            f"over the channels makes their sum a constant); measure a layer before it with layer="
        )
    if imprecise:
        # A half-precision map is within 1000 epsilons of any scale (bfloat16's are 1/128): coarse, not cancelling.
        why = (
            f"{dtype} is too coarse for this network's gradients"
            if torch.finfo(dtype).eps > 1e-4
            else "the output's channels, which the map adds at the position, nearly cancel (a normalisation over the "
            "channels with nearly equal scales)"
        )
        raise ProbeError(
            f"the gradient map of {_positions_named(imprecise, len(fields))} is below what {dtype} resolves: {why}, "
            f"and in float64 the map of one input differs by more than 1 % from the {dtype} one; pass "
            f"dtype=torch.float64"
        )
    for field in fields:
        if _clipped(field):
            # Its centre, which the metrics' offsets and squares are taken from, is the unclipped span's: read the
            # lazy geometry now, while the kept copy's forward is still the one probed (later, a changed forward
            # gives None, and the centre would fall back to the clipped bounds' midpoint).
            tuple(field.geometry)
    effective = [
        EffectiveField(
            position=field.position,
            heatmap=checked_map(total / inputs.shape[0]),
            theoretical=field,
            samples=int(inputs.shape[0]),
            biases=biases,
            layer=layer,
        )  # fmt: skip
        for field, total in zip(fields, totals)
    ]
    return effective if isinstance(theoretical, list) else effective[0]


# A map at most this many float epsilons of the signed scale (see _one_sample_maps) is rounding noise: the channels'
# gradients cancel exactly, and only their rounding errors are left (a few epsilons over a deep graph).
_ROUNDING_NOISE = 1000


def _one_sample_maps(
    copy: nn.Module, sample: torch.Tensor, request: ProbeRequest, positions: list, signed: Sequence[bool]
) -> list[list[torch.Tensor]]:
    """Per weighing in ``signed``, per position, one sample's map: its input gradient's magnitude, summed over channels.

    The output's channels at the position weigh 1 each, as in the effective field, or (a ``signed`` True) by fixed
    random signs, which keep their gradients from cancelling: the scale of the channels' own gradients. One forward pass
    of one sample, and one backward pass per weighing and position.
    """
    x = sample.clone().to(device=request.device, dtype=request.dtype).requires_grad_(True)
    output = forward_to(copy, x, request)
    signs = (torch.randint(0, 2, output.shape[:2], generator=torch.Generator().manual_seed(0)) * 2 - 1).to(output)
    passes = [(signs if weighed else torch.ones_like(signs), position) for weighed in signed for position in positions]
    maps = []
    for index, (weights, position) in enumerate(passes):
        cotangent = torch.zeros_like(output)
        cotangent[(slice(None), slice(None)) + tuple(position)] = weights
        (gradient,) = torch.autograd.grad(output, x, cotangent, retain_graph=index < len(passes) - 1)
        maps.append(gradient[0].abs().sum(dim=0).to("cpu", torch.float64))
    return [maps[i : i + len(positions)] for i in range(0, len(maps), len(positions))]


def _float64_maps(model, sample, request: ProbeRequest, positions: list, signed: Sequence[bool], zero_biases: bool):
    """:func:`_one_sample_maps` of ``sample`` on a float64 copy of ``model`` (as ``request`` runs it otherwise)."""
    wide = prepared_copy(model, "weights", torch.float64, zero_biases=zero_biases, device=request.device)
    return _one_sample_maps(wide, sample, request.in_dtype(torch.float64), positions, signed)


def _resolved_in_float64(model, sample, request: ProbeRequest, positions: list, zero_biases: bool) -> bool:
    """Whether some of ``positions``, whose maps are zero in ``request.dtype``, have a map on ``sample`` in float64.

    False in float64 itself, and where the float64 copy does not run (a float32-only model): the zeros stand.
    """
    if request.dtype == torch.float64:
        return False
    try:
        (maps,) = _float64_maps(model, sample, request, positions, (False,), zero_biases)
    except (ProbeError, ValueError, RuntimeError, TypeError):
        return False
    return any(bool(m.any()) for m in maps)


def _rounding_noise(model, copy, sample, request: ProbeRequest, suspects: list, zero_biases: bool):
    """Which ``suspects`` (positions, with their map's ratio to the signed scale) are noise, or beyond float32.

    A map at most ``_ROUNDING_NOISE`` epsilons of the signed scale is noise where its channels cancel exactly; in
    float32 that is decided on one sample in float64 (a LayerNorm's scales that differ by 1e-4 leave a real map of
    that size): noise where float64's map is as small in its own epsilons, too imprecise where float32's map of
    that sample differs from float64's by more than 1 %, else real.

    Returns:
        The positions of noise (with their ratio), and those a float32 map cannot resolve.
    """
    if not suspects or request.dtype == torch.float64:
        return suspects, []
    positions = [position for position, _ in suspects]
    try:
        wide_maps, wide_scales = _float64_maps(model, sample, request, positions, (False, True), zero_biases)
    except (ProbeError, ValueError, RuntimeError, TypeError) as error:
        raise ProbeError(
            f"the gradient map of {_positions_named(positions, len(positions))} is at most {suspects[0][1]:.1e} of "
            f"the gradient with the output's channels weighed by random signs: rounding noise where the channels "
            f"cancel (a normalisation or a softmax over them), or a real map below float32's precision, and the "
            f"float64 copy that would tell them apart failed ({error}); measure a layer before it with layer="
        ) from error
    (narrow_maps,) = _one_sample_maps(copy, sample, request, positions, (False,))
    noise, imprecise = [], []
    for (position, ratio), exact, scale, narrow in zip(suspects, wide_maps, wide_scales, narrow_maps):
        largest = float(exact.max())
        if largest <= _ROUNDING_NOISE * torch.finfo(torch.float64).eps * float(scale.max()):
            noise.append((position, ratio))
        elif float((narrow - exact).abs().max()) > 0.01 * largest:
            imprecise.append(position)
    return noise, imprecise


def _not_finite_error(copy: nn.Module, layer: str | None, chunk: int, samples: int) -> ProbeError:
    """Why the map of a chunk of ``chunk`` of the ``samples`` inputs cannot be read: its output is not finite."""
    tensors = [*copy.parameters(), *copy.buffers()]
    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors):
        return ProbeError(
            f"the output of {where(layer)} is not finite (inf or NaN) on the inputs: the model's weights or buffers "
            f"hold non-finite values; check them (a diverged training step, a buffer never initialised)"
        )
    read = "the input" if samples == 1 else f"a chunk of {chunk} of the {samples} inputs"
    return ProbeError(
        f"the output of {where(layer)} is not finite (inf or NaN) on {read}, though the model's weights and buffers "
        f"are finite: its forward computes a non-finite value from them (a statistic over a batch of one sample, a "
        f"log or a division by zero); pass more inputs or a larger chunk_size where the forward reads across "
        f"samples, or measure a layer before that value with layer="
    )


def _positions_named(positions: list[tuple[int, ...]], asked: int) -> str:
    if asked == 1:
        return "the output position"
    named = ", ".join(str(p[0] if len(p) == 1 else p) for p in positions)
    return f"position{'s' if len(positions) > 1 else ''} {named}"


def _clipped(field: ReceptiveField) -> bool:
    """Whether the field's bounds reach an end of the input on some axis (where its span may go beyond)."""
    return any(first == 0 or last == n - 1 for (first, last), n in zip(field.bounds, field.input_shape[2:]))


def _check_theoretical(theoretical, pos, shape, layer, element, parsed_layout, layout) -> None:
    """Refuses ``theoretical`` fields that are not those of ``pos``, ``layer``, ``element`` and ``layout`` on ``shape``.

    ``element`` is compared as given: ``-1`` and the last index name one feature map, but which one only the output
    tells, so a field probed with the other spelling is refused with its own.
    """
    fields = theoretical if isinstance(theoretical, list) else [theoretical]
    first = fields[0] if fields and isinstance(fields[0], ReceptiveField) else None
    try:
        wanted = normalised_positions(pos, first.output_shape, layer) if first is not None else None
    except ValueError:  # pos does not fit that field's map: not the field of pos
        wanted = None
    if (
        wanted is None
        or not all(isinstance(f, ReceptiveField) for f in fields)
        or isinstance(theoretical, list) != (wanted[1] == "list")
        or any(
            f.mode != "theoretical"
            or tuple(f.input_shape[1:]) != shape[1:]
            or f.layer != layer
            or f.element != element
            or checked_layout(f.layout) != parsed_layout
            for f in fields
        )
        or wanted[0] != [f.position for f in fields]
    ):
        described = first.describe(stride=False) if first is not None else repr(theoretical)
        raise ValueError(
            f"theoretical={described}{' ...' if isinstance(theoretical, list) else ''} must be the theoretical "
            f"field of pos={pos!r} (a list of them for a list of positions), layer={layer!r}, element={element!r}, "
            f"layout={layout!r}, on inputs shaped {shape}"
            + (
                f" (it was probed with element={first.element!r})"
                if first is not None and first.element != element
                else ""
            )
            + "; pass theoretical=None to probe it"
        )


def _check_inputs(inputs) -> None:
    allowed = "a tensor (N, C, *spatial) with 1 to 3 spatial axes"
    if not isinstance(inputs, torch.Tensor) or not 3 <= inputs.dim() <= 5:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be {allowed}, got {shape}")
    if inputs.shape[0] < 1 or inputs.numel() == 0:
        raise ValueError(f"inputs of shape {tuple(inputs.shape)} hold no sample: pass at least one input")
    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
        bad = int((~torch.isfinite(inputs)).flatten(1).any(dim=1).sum())
        raise ValueError(
            f"inputs hold NaN or inf values ({bad} of {inputs.shape[0]} samples): the model's output, and so the map, "
            f"would not be finite; drop or clean those samples"
        )


def _reads_across_samples(copy: nn.Module, pair: torch.Tensor, request: ProbeRequest) -> bool:
    """Whether either sample's output, anywhere, depends on the other sample's input.

    A forward of two inputs and two backward passes, as cheap as a sample's share of the measurement, decide it.
    The whole output is read, both ways: a unit dead at one position (a ReLU) does not hide the mixing, and
    neither does a forward where later samples read earlier ones only (``y + y.cumsum(0)``).
    """
    x = pair.clone().to(device=request.device, dtype=request.dtype).requires_grad_(True)
    output = forward_to(copy, x, request)
    for sample, other in ((0, 1), (1, 0)):
        cotangent = torch.zeros_like(output)
        cotangent[sample] = 1
        (gradient,) = torch.autograd.grad(output, x, cotangent, retain_graph=sample == 0)
        if bool(gradient[other].any()):
            return True
    return False


def _mixes_samples(model: nn.Module) -> bool:
    """Whether ``model`` in eval mode normalises over the batch (a BatchNorm without running statistics)."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (not m.track_running_stats or m.running_mean is None)
        for m in model.modules()
    )
