"""Coverage alerts: does the effective field cover the target object size, and when to say it does not."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

ON_MISS = ("warn", "stop", "raise")


class CoverageError(RuntimeError):
    """Raised by ``RFCallback(on_miss="raise")`` when the effective field stops covering the target size.

    Attributes:
        event: the :class:`CoverageEvent` that triggered it.
    """

    def __init__(self, event: CoverageEvent):
        super().__init__(event.message)
        self.event = event


@dataclass(frozen=True)
class CoverageEvent:
    """One coverage alert, as passed to ``on_alert`` and kept in the callback's history.

    Attributes:
        reason: ``"lost"`` (covered at the previous check, not now) or ``"not_reached"`` (not covered within
            ``patience`` checks).
        epoch: the training epoch of the check.
        layer: the probed layer's name in the logs.
        position: the output position.
        extent: per axis, the effective extent's size at ``coverage_mass``.
        target: per axis, the target size.
        theoretical: per axis, the theoretical field's size.
        coverage_mass: the mass fraction of the extent.
    """

    reason: str
    epoch: int
    layer: str
    position: tuple[int, ...]
    extent: tuple[int, ...]
    target: tuple[int, ...]
    theoretical: tuple[int, ...]
    coverage_mass: float

    @property
    def message(self) -> str:
        """A one-paragraph explanation with the numbers."""
        what = "stopped covering" if self.reason == "lost" else "has not covered"
        extent = (
            f"its extent holding {self.coverage_mass:g} of the gradient mass is {_sizes(self.extent)}"
            if any(self.extent)
            else "the output there no longer depends on the input (its gradient map is zero everywhere: dead units "
            "or zero weights)"
        )
        return (
            f"RFCallback: at epoch {self.epoch}, the effective receptive field of {self.layer} at {self.position} "
            f"{what} the target size: {extent}, the target {_sizes(self.target)}, the theoretical field "
            f"{_sizes(self.theoretical)}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-serialisable built-in types."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _sizes(values) -> str:
    return " x ".join(str(v) for v in values)


def uncoverable_message(
    layer: str,
    position,
    theoretical,
    target,
    *,
    input_size: Sequence[int] | None = None,
    unclipped: Sequence[int] | None = None,
) -> str | None:
    """The fit-start warning when the theoretical field cannot cover ``target``; ``None`` when it can.

    Args:
        layer: the probed layer's name in the logs.
        position: the output position.
        theoretical: per axis, the theoretical field's size on the input (clipped to it).
        target: per axis, the target size.
        input_size: per axis, the input's size; a target larger than the input is said to be so (no field on that
            input could cover it, however large).
        unclipped: per axis, the field's size before the input's border clips it (the geometry's ``r``); where it
            covers the target, the field is large enough and the border cuts it at this position, which is said
            instead of the advice to enlarge the field.

    Returns:
        The message, or ``None`` when the field covers the target on every axis.
    """
    if all(t >= g for t, g in zip(theoretical, target)):
        return None
    where = f"{layer} at {tuple(position)}"
    if input_size is not None and any(g > n for g, n in zip(target, input_size)):
        return (
            f"RFCallback: the target size {_sizes(target)} is larger than the input, {_sizes(input_size)}: no "
            f"receptive field on this input can cover it, however large (the theoretical field of {where} is "
            f"{_sizes(theoretical)}). target_size is in input pixels (samples): pass the size the objects have in "
            f"the input the model is given, at most {_sizes(input_size)}"
        )
    whole = theoretical if unclipped is None else tuple(max(u, t) for u, t in zip(unclipped, theoretical))
    if all(w >= g for w, g in zip(whole, target)):
        return (
            f"RFCallback: the theoretical receptive field of {where} is {_sizes(theoretical)} on the input, smaller "
            f"than the target size {_sizes(target)} because the input's border cuts it: unclipped it is "
            f"{_sizes(whole)}, large enough for the target. Nothing needs enlarging; at this position part of the "
            f"field lies outside the input, so an object of the target size cannot lie whole inside it. To check "
            f"coverage of whole objects, probe a position whose field lies inside the input (e.g. pos='center')"
        )
    return (
        f"RFCallback: the theoretical receptive field of {where} is {_sizes(theoretical)}"
        + ("" if whole == tuple(theoretical) else f" ({_sizes(whole)} before the input's border cuts it)")
        + f", smaller than the target size {_sizes(target)}: no amount of training can make it see whole objects. "
        f"Enlarge the field: more downsampling (strided convolutions or pooling) before this layer, dilated "
        f"convolutions, larger kernels, or a deeper stage"
    )


@dataclass
class CoverageTracker:
    """Decides, check after check, whether the effective extent covers the target and when to alert.

    It alerts when coverage is lost (covered at the previous check, not at this one), or when it has not been
    reached within the first ``patience`` checks; once per loss, not at every uncovered check.

    Attributes:
        target: per axis, the target size.
        patience: how many checks coverage may take to be reached before an alert.
        checks: how many checks were made.
        covered: whether the last check covered the target (``None`` before the first).
        ever_covered: whether any check covered it.
        alerted: whether the current uncovered stretch was already alerted.
        events: the alerts so far, as dicts.
    """

    target: tuple[int, ...]
    patience: int = 1
    checks: int = 0
    covered: bool | None = None
    ever_covered: bool = False
    alerted: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)

    def update(self, extent: tuple[int, ...]) -> str | None:
        """Records one check; returns ``"lost"`` or ``"not_reached"`` when it calls for an alert, else ``None``."""
        self.checks += 1
        covers = all(e >= t for e, t in zip(extent, self.target))
        reason = None
        if covers:
            self.alerted = False
        elif self.covered and not self.alerted:
            reason = "lost"
        elif not self.ever_covered and not self.alerted and self.checks >= self.patience:
            reason = "not_reached"
        self.covered, self.ever_covered = covers, self.ever_covered or covers
        if reason is not None:
            self.alerted = True
        return reason

    def margin(self, extent: tuple[int, ...]) -> int:
        """The smallest ``extent - target`` over the axes (negative where the target is not covered)."""
        return min(e - t for e, t in zip(extent, self.target))

    def state_dict(self) -> dict[str, Any]:
        """The tracker's state, for checkpoints."""
        return {k: getattr(self, k) for k in ("checks", "covered", "ever_covered", "alerted", "events")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the state saved by :meth:`state_dict`."""
        for key in ("checks", "covered", "ever_covered", "alerted", "events"):
            if key in state:
                setattr(self, key, state[key])


class CoverageWatch:
    """Watches every probed position's coverage of the target size, check after check, and makes the alerts.

    Args:
        patience: how many checks coverage may take to be reached before an alert.
        coverage_mass: the mass fraction q of the effective extent compared with the target.

    Attributes:
        trackers: one :class:`CoverageTracker` per position label, in the order they were first checked.
    """

    def __init__(self, patience: int, coverage_mass: float):
        self.patience = patience
        self.coverage_mass = coverage_mass
        self.trackers: dict[str, CoverageTracker] = {}

    def tracker(self, label: str) -> CoverageTracker:
        """The tracker of one position, made at its first check (or when a checkpoint restores it).

        Args:
            label: the position's label, e.g. ``"3_4"``.

        Returns:
            Its tracker.
        """
        if label not in self.trackers:
            self.trackers[label] = CoverageTracker(target=(), patience=self.patience)
        return self.trackers[label]

    def check(
        self, label: str, theoretical, field, target: tuple[int, ...], *, epoch: int, layer: str
    ) -> tuple[bool, int, CoverageEvent | None]:
        """Checks one effective field against the target.

        Args:
            label: the position's label.
            theoretical: the :class:`~rf_callback.ReceptiveField` of that position (theoretical).
            field: its :class:`~rf_callback.EffectiveField`, or ``None`` where its output does not depend on the
                inputs (a gradient map zero everywhere): an extent of 0, which covers nothing.
            target: per axis, the target size.
            epoch: the epoch of the check, for the alert.
            layer: the probed layer's name, for the alert.

        Returns:
            Whether the extent covers the target, the smallest extent minus target over the axes, and the alert
            when the check calls for one (also kept in the tracker's events), else ``None``.
        """
        tracker = self.tracker(label)
        tracker.target = target
        if field is None:
            extent = (0,) * len(target)
        else:
            extent = tuple(last - first + 1 for first, last in field.extent(self.coverage_mass))
        reason = tracker.update(extent)
        event = None
        if reason is not None:
            event = CoverageEvent(
                reason=reason, epoch=epoch, layer=layer, position=theoretical.position, extent=extent, target=target,
                theoretical=theoretical.size, coverage_mass=self.coverage_mass,
            )  # fmt: skip
            tracker.events.append(event.to_dict())
        return bool(tracker.covered), tracker.margin(extent), event

    def state_dict(self) -> dict[str, Any]:
        """Every tracker's state, by position label, for checkpoints."""
        return {label: tracker.state_dict() for label, tracker in self.trackers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the trackers saved by :meth:`state_dict`."""
        for label, tracker_state in state.items():
            self.tracker(label).load_state_dict(tracker_state)
