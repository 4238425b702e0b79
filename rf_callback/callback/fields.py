"""What a probe event measures: the fields of the module the user named, and its effective field on real inputs."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from typing import cast

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from rf_callback.callback.failures import NoInputsError, copy_fix, inputs_fix, memory_fix
from rf_callback.core.arguments import checked_layout
from rf_callback.core.effective_probe import effective_rf
from rf_callback.core.errors import NoGradientError
from rf_callback.core.graph import ProbeError
from rf_callback.core.layouts import Tokens
from rf_callback.core.model_copy import is_fixed_mask, names_read
from rf_callback.core.probe import probe_rf
from rf_callback.core.result import EffectiveField, ReceptiveField


class FieldProber:
    """Probes the live LightningModule the way the callback's arguments say, always on a copy.

    The theoretical fields depend on the architecture and the input shape, not on the weights: they are probed
    once per input shape and kept while the probed module's architecture stays (see :meth:`architecture_changed`).

    Args:
        positions: the output positions to probe (indices, or ``"center"``).
        layer: the probed layer within ``module``, or ``None`` for its output.
        module: the submodule to copy and probe, or ``None`` for the whole LightningModule.
        element: which feature map of a tuple, list or dict output.
        layout: the probed output's layout.
        draws: weights mode's random inputs.
        seed: the seed of the probe's private generators.
        device: where the copies run (``None``: the model's device).
    """

    def __init__(
        self,
        positions: Sequence,
        *,
        layer: str | None,
        module: str | None,
        element: int | str | None,
        layout: str | Tokens,
        draws: int,
        seed: int,
        device: str | torch.device | None,
    ):
        self.positions = list(positions)
        self.layer, self.module, self.element, self.layout = layer, module, element, layout
        self.draws, self.seed, self.device = draws, seed, device
        self.theoretical: list[ReceptiveField] | None = None  # on the input shape the fields are probed on
        # Around every probe of a module: where its parameters are whole (FSDP1's gathering, see RFCallback.setup).
        self.whole_parameters: Callable[[nn.Module], contextlib.AbstractContextManager] = _as_it_is
        # On the effective field's inputs, if shaped otherwise (None for a position off their map), and their shape
        self._other_theoretical: tuple[tuple[int, ...], list[ReceptiveField | None]] | None = None
        self._architecture: tuple | None = None  # of the module the kept theoretical fields were probed on
        self._values: tuple[tuple, _Constants] | None = None  # the plain values and constant tensors of that module
        self._inside: bool | None = None  # whether the last weights fields lay inside the kept theoretical ones

    def keep_theoretical(self, pl_module: nn.Module, fields: list[ReceptiveField] | None) -> None:
        """Keeps ``fields`` as the theoretical fields of the module as it is now (``None`` forgets them).

        Args:
            pl_module: the live LightningModule.
            fields: its theoretical fields on the callback's input shape, or ``None``.
        """
        self.theoretical, self._other_theoretical, self._inside = fields, None, None
        self._architecture = self._values = None
        if fields is not None:
            self._remember(pl_module)

    def _remember(self, pl_module: nn.Module) -> None:
        """Keeps what the kept theoretical fields depend on in the probed module as it is now."""
        target = self.target(pl_module)
        self._architecture, self._values = _architecture(target), (_settings(target), _Constants(target))

    def architecture_changed(self, pl_module: nn.Module) -> bool:
        """Whether the probed module's architecture changed since its theoretical fields were kept.

        A layer replaced, added or removed, or one whose kernel, stride, padding or dilation changed (a fit that
        grows its network): the kept fields describe another network.

        Args:
            pl_module: the live LightningModule.

        Returns:
            True where fields are kept and the module's architecture is no longer theirs.
        """
        return self._architecture is not None and _architecture(self.target(pl_module)) != self._architecture

    def values_changed(self, pl_module: nn.Module) -> bool:
        """Whether a value the theoretical copy reads as it is changed since the theoretical fields were kept.

        A plain value a submodule holds (how many blocks its forward runs), or a buffer written in place or replaced
        (a mask of the user's own cut by a pruning step): the forward may have changed without its layers, and grown
        or shrunk (a weights field shows only a forward that grew past the kept field). The caller probes again
        where one did; a value the forward does not read (a step counter) costs a theoretical probe and says nothing.

        Args:
            pl_module: the live LightningModule.

        Returns:
            True where fields are kept and such a value changed.
        """
        if self._values is None:
            return False
        target = self.target(pl_module)
        settings, constants = self._values
        return _settings(target) != settings or _Constants(target).changed_since(constants)

    def forward_changed(self, fields: Sequence[ReceptiveField | None]) -> bool:
        """Whether ``fields``, probed now, show a forward that changed where the layers did not.

        A network grown by an attribute its forward reads (how many blocks it runs) keeps its layers, so
        :meth:`architecture_changed` cannot see it; its fields can. Theoretical fields other than the kept ones, or
        weights fields that lay inside the kept theoretical fields and now reach past them, show it. (A weights
        field may lie outside from the start: the statistics of a GroupNorm join every position of the real
        network, which the theoretical copy holds constant. Only a change from inside to outside counts.)

        Args:
            fields: the fields probed now on the callback's input shape, one per position (``None``: its probe failed).

        Returns:
            True where the kept theoretical fields no longer describe the forward.
        """
        probed = [(field, kept) for field, kept in zip(fields, self.theoretical or []) if field is not None]
        if not probed:
            return False
        if probed[0][0].mode == "theoretical":
            return any(field.bounds != kept.bounds for field, kept in probed)
        inside = all(
            first >= kept_first and last <= kept_last
            for field, kept in probed
            for (first, last), (kept_first, kept_last) in zip(field.bounds, kept.bounds)
        )
        was, self._inside = self._inside, inside
        return was is True and not inside

    def target(self, pl_module: nn.Module) -> nn.Module:
        """The module that is copied and probed: ``module`` inside the LightningModule (unwrapped if compiled).

        Args:
            pl_module: the live LightningModule.

        Returns:
            The live submodule (never changed: the probe copies it).

        Raises:
            MisconfigurationException: ``module`` names no submodule.
        """
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

    def probe(
        self, pl_module: nn.Module, mode: str, input_shape: Sequence[int], positions: Sequence | None = None
    ) -> list[ReceptiveField]:
        """Probes every position (or ``positions``) in ``mode`` on ``input_shape``.

        Args:
            pl_module: the live LightningModule.
            mode: ``"theoretical"`` or ``"weights"``.
            input_shape: the input shape ``(N, C, *spatial)``.
            positions: some of the positions, or ``None`` for all.

        Returns:
            One field per position, in the order of ``positions``.
        """
        asked = self.positions if positions is None else list(positions)
        target = self.target(pl_module)
        with self.whole_parameters(target):
            fields = probe_rf(
                target, tuple(input_shape), asked if len(asked) > 1 else asked[0],
                layer=self.layer, mode=mode, draws=self.draws, seed=self.seed, element=self.element,
                layout=self.layout, device=self.device,
            )  # fmt: skip
        # The positions are indices or "center", never "all": probe_rf returns fields, not a ReceptiveFieldMap.
        fields = cast("ReceptiveField | list[ReceptiveField]", fields)
        fields = fields if isinstance(fields, list) else [fields]
        if positions is None and len(fields) != len(self.positions):  # a list of ints, positions on a 1D map
            self.positions = [(index,) for index in self.positions[0]]  # as given: -1 is the end of every map
        return fields

    def probe_each(
        self, pl_module: nn.Module, mode: str, input_shape: Sequence[int]
    ) -> list[ReceptiveField | ProbeError] | None:
        """Probes each position alone, in ``mode`` on ``input_shape``.

        Args:
            pl_module: the live LightningModule.
            mode: ``"theoretical"`` or ``"weights"``.
            input_shape: the input shape ``(N, C, *spatial)``.

        Returns:
            Per position, its field or the ``ProbeError`` its probe raised; ``None`` where the positions are one
            (a single position, or a list of ints not yet read as positions on a 1D map).
        """
        if len(self.positions) < 2 or not all(isinstance(p, tuple) or p == "center" for p in self.positions):
            return None
        fields: list[ReceptiveField | ProbeError] = []
        for position in self.positions:
            try:
                fields.append(self.probe(pl_module, mode, input_shape, [position])[0])
            except ProbeError as error:
                fields.append(error)
        return fields

    def theoretical_fields(
        self, pl_module: nn.Module, input_shape: Sequence[int], inputs_shape: Sequence[int] | None = None
    ) -> list[ReceptiveField | None]:
        """The theoretical fields on ``input_shape`` (or on inputs shaped otherwise), probed once and kept.

        Args:
            pl_module: the live LightningModule.
            input_shape: the input shape the callback probes on.
            inputs_shape: the shape of other inputs (the effective field's), if they are shaped otherwise.

        Returns:
            One field per position (on inputs shaped otherwise, ``None`` for a position off their output map).
        """
        if self.architecture_changed(pl_module):
            self.keep_theoretical(pl_module, None)
        if inputs_shape is None or tuple(inputs_shape[1:]) == tuple(input_shape[1:]):
            if self.theoretical is None:
                self.keep_theoretical(pl_module, self.probe(pl_module, "theoretical", input_shape))
            return cast("list[ReceptiveField | None]", self.theoretical)
        shape = (1, *inputs_shape[1:])
        if isinstance(checked_layout(self.layout), Tokens):
            raise ValueError(
                f"the validation inputs are {tuple(inputs_shape[1:])} where the fields are probed on "
                f"{tuple(input_shape[1:])}, and layout={self.layout!r} names the token grid of the probed input "
                f"only (on other inputs the same number of tokens may lie on another grid, and another cell would be "
                f"read): pass input_shape= the validation inputs' shape, or validation inputs of the probed shape"
            )
        if self._other_theoretical is None or self._other_theoretical[0] != shape:
            self._other_theoretical = shape, self._on_other_inputs(pl_module, shape)
            if self._architecture is None:
                self._remember(pl_module)
        return self._other_theoretical[1]

    def _on_other_inputs(self, pl_module: nn.Module, shape: tuple[int, ...]) -> list[ReceptiveField | None]:
        """The theoretical fields on inputs of ``shape``; ``None`` for a position off their output map.

        A position is the same index on every input: on a smaller one it can lie off the map, and the others'
        effective fields are measured all the same.
        """
        wanted: list = list(self.positions)
        if any(position != "center" for position in wanted):
            grid = self.probe(pl_module, "theoretical", shape, ["center"])[0].output_shape
            wanted = [p if p == "center" or _on_grid(p, grid) else None for p in wanted]
        fitting = [p for p in wanted if p is not None]
        fields = iter(self.probe(pl_module, "theoretical", shape, fitting) if fitting else [])
        return [None if p is None else next(fields) for p in wanted]

    def effective(
        self, pl_module: nn.Module, inputs: torch.Tensor | None, input_shape: Sequence[int]
    ) -> list[tuple[ReceptiveField | None, EffectiveField | None]]:
        """The effective field of every position on ``inputs``, in one forward pass per chunk of inputs.

        Args:
            pl_module: the live LightningModule.
            inputs: the validation inputs chosen for the effective field, or ``None`` when none were found.
            input_shape: the input shape the callback probes on.

        Returns:
            Per position, its theoretical field on the inputs and its effective field, or ``None`` where its output
            does not depend on the inputs (its gradient map is zero everywhere); both ``None`` for a position off
            the inputs' output map (inputs smaller than those the fields are probed on).

        Raises:
            NoInputsError: ``inputs`` is ``None``.
        """
        if inputs is None:
            raise NoInputsError(
                "no validation batch handed to the callback had an input tensor (N, C, *spatial) as its first "
                "element, so there is nothing to measure the effective field on"
            )
        theoretical = list(self.theoretical_fields(pl_module, input_shape, inputs.shape))
        target = self.target(pl_module)
        live = [field for field in theoretical if field is not None]
        measured = cast("list[EffectiveField]", [])
        with self.whole_parameters(target):
            while live:
                try:
                    measured = cast("list[EffectiveField]", effective_rf(
                        target, inputs, [field.position for field in live], layer=self.layer, theoretical=live,
                        element=self.element, layout=self.layout, device=self.device,
                    ))  # fmt: skip
                    break
                except NoGradientError as error:  # measured again without them: one pass more, only then
                    still = [field for field in live if field.position not in error.positions]
                    if len(still) == len(live):
                        raise
                    live = still
        by_position = {field.position: field for field in measured}
        return [(field, None if field is None else by_position.get(field.position)) for field in theoretical]


def _on_grid(position: Sequence[int], grid: tuple[int, ...]) -> bool:
    """Whether an index tuple (negative indices from the end) lies on a map of ``grid``'s shape."""
    return len(position) == len(grid) and all(-n <= i < n for i, n in zip(position, grid))


def _architecture(module: nn.Module) -> tuple:
    """What a theoretical field depends on in ``module``: each submodule's name, type, settings and parameter shapes.

    Not the weights' values (the copy's constants stand for any); the values it reads as they are, see
    :func:`_settings` and :class:`_Constants`.
    """
    return tuple(
        (
            name,
            type(m).__qualname__,
            _layer_settings(m),
            tuple(sorted(tuple(p.shape) for p in m.parameters(recurse=False))),
        )
        for name, m in module.named_modules()
    )


def _layer_settings(module: nn.Module) -> str:
    """A module's ``extra_repr()``, without a normalisation's ``momentum`` (see :data:`_STATISTICS_ONLY`)."""
    settings = module.extra_repr()
    if isinstance(module, nn.modules.batchnorm._NormBase):
        for key in _STATISTICS_ONLY:
            settings = settings.replace(f", {key}={getattr(module, key)}", "")
    return settings


# What only the running statistics of a normalisation read, which the theoretical copy does not: Lightning's
# StochasticWeightAveraging sets every BatchNorm's momentum to None for the epoch that recomputes them, and a fit
# may anneal it, where no field changes.
_STATISTICS_ONLY = frozenset({"momentum"})


_SCALARS = (bool, int, float, str, type(None))
# Lightning's own, which change between hooks, and the train/eval mode (the copy runs in eval mode)
_HOOK_STATE = frozenset({"training", "_current_fx_name"})


def _settings(module: nn.Module) -> tuple:
    """The plain values each submodule holds (numbers, strings, tuples of them), which its forward may read.

    How many blocks the forward runs (``self.depth``), a fade-in weight that is 0 until a stage grows (ProGAN's
    ``alpha``): a field kept from before such a value changed described another forward. A LightningModule's own
    values are mostly its bookkeeping (a best validation loss, a counter): only those its ``forward`` names are
    kept; a torchmetrics metric's counts are left out.
    """
    settings = []
    for name, m in module.named_modules():
        if type(m).__module__.startswith("torchmetrics"):
            continue
        read = None  # every value, but of the LightningModule itself, those its forward names
        if name == "" and _is_lightning_module(m):
            code = getattr(type(m).forward, "__code__", None)
            read = frozenset() if code is None else frozenset(names_read(code))
        settings += [
            (name, key, value)
            for key, value in vars(m).items()
            if key not in _HOOK_STATE
            and not (key in _STATISTICS_ONLY and isinstance(m, nn.modules.batchnorm._NormBase))
            and (read is None or key in read)
            and (isinstance(value, _SCALARS) or (type(value) is tuple and all(isinstance(v, _SCALARS) for v in value)))
        ]
    return tuple(settings)


def _is_lightning_module(module: nn.Module) -> bool:
    """Whether ``module`` is a LightningModule of ``lightning`` or of ``pytorch_lightning`` (its twin)."""
    return any(
        cls.__name__ == "LightningModule" and cls.__module__.endswith("core.module") for cls in type(module).__mro__
    )


class _Constants:
    """The tensors a theoretical field reads as they are, by identity and version: changed when one is written.

    Buffers (a mask held in one, a fixed filter, a grid, a relative position index) and masks held in frozen
    parameters keep their values on the theoretical copy, so a field kept from before a custom pruning step
    described the old mask: a 5 x 5 kernel cut to its 3 x 3 centre by a buffer kept the field of the 5 x 5. Each
    tensor's version counter tells an in-place write; no value is compared, so the check costs nothing on a GPU
    (a frozen parameter written in place counts where it holds a mask, which is read then: the copy replaces the
    others by its constants). Left out: a normalisation's statistics (they change at every step, and the copy's
    normalisations are identities) and ``torch.nn.utils.prune``'s masks (the copy holds them at one). A tensor made
    under inference mode has no version: its identity stands for it.

    Args:
        module: the probed live module.
    """

    def __init__(self, module: nn.Module):
        self._held = [
            (f"{name}.{key}", weakref.ref(tensor), _version(tensor))
            for name, m in module.named_modules()
            if not isinstance(m, nn.modules.batchnorm._NormBase)
            for key, tensor in (*m.named_buffers(recurse=False), *m.named_parameters(recurse=False))
            if tensor is not None
            and not (isinstance(tensor, nn.Parameter) and tensor.requires_grad)
            and not (key.endswith("_mask") and f"{key[:-5]}_orig" in m._parameters)
        ]

    def changed_since(self, before: _Constants) -> bool:
        """Whether a tensor was written in place or replaced since ``before`` was taken.

        Args:
            before: the tensors as they were.

        Returns:
            True where one changed in a way the theoretical copy reads.
        """
        if [name for name, _, _ in self._held] != [name for name, _, _ in before._held]:
            return True
        for (_, held, version), (_, held_before, version_before) in zip(self._held, before._held):
            tensor = held()
            if tensor is None or tensor is not held_before():
                return True
            if version != version_before and not (isinstance(tensor, nn.Parameter) and not is_fixed_mask(tensor)):
                return True
        return False


def _version(tensor: torch.Tensor) -> int | None:
    """A tensor's version counter, or None for one that has none (made under inference mode, not yet made)."""
    try:
        return None if tensor.is_inference() else tensor._version
    except (RuntimeError, ValueError):  # a lazy module's uninitialised buffer
        return None


def _as_it_is(module: nn.Module) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def probe_fix(error: Exception, input_shape: Sequence[int] | None, shape_source: str | None) -> str:
    """The fix to say when a probe fails with ``error``.

    Args:
        error: the failure.
        input_shape: the input shape the probe ran on.
        shape_source: where that shape came from, in words.

    Returns:
        The fix, or ``""`` when the message says it already.
    """
    fix = copy_fix(error) or memory_fix(error)
    if fix is not None:
        return fix
    text = str(error)
    raw = not isinstance(error, (ProbeError, ValueError))  # the forward's own error, unwrapped
    if raw or "forward raised" in text or text.startswith("input_shape"):
        return (
            f"The probe runs the model's forward on an input shaped {input_shape}, taken from {shape_source}: if "
            f"that is not the model's input (the first tensor of a dict batch may be a mask), pass "
            f"RFCallback(input_shape=(N, C, H, W)); if the forward does not take one tensor, pass module= naming a "
            f"submodule that does (the backbone), with layer= inside it"
        )
    return ""


def effective_fix(error: Exception, inputs: torch.Tensor | None) -> str:
    """The fix to say when the effective field fails with ``error``.

    Args:
        error: the failure.
        inputs: the inputs it was measured on, or ``None``.

    Returns:
        The fix, or ``""`` when the message says it already.
    """
    fix = copy_fix(error) or memory_fix(error, effective=True)
    if fix is not None:
        return fix
    if isinstance(error, NoInputsError):
        return inputs_fix(error)
    raw = not isinstance(error, (ProbeError, ValueError))  # the forward's own error, unwrapped
    if inputs is not None and (raw or "forward raised" in str(error)):
        return (
            f"The effective field runs the model on the first tensor of the validation batches (shaped "
            f"{tuple(inputs.shape[1:])} per sample): if that is not the model's input, put the input first in the "
            f"batch, pass module= naming a submodule that takes it, or pass effective=False"
        )
    return ""
