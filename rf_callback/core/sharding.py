"""Models whose parameters no rank holds whole: FSDP2 (``fully_shard``) and FSDP1 (``FullyShardedDataParallel``).

FSDP2 keeps each parameter as a ``DTensor``, FSDP1 each unit's parameters as one flat shard per rank. The probe
copies such a model as it copies any other (:mod:`~rf_callback.core.model_copy`), as the class it was built from
and without the sharding's hooks and state. The theoretical copy needs only the parameters' shapes: an FSDP2
``DTensor`` has them, so nothing is gathered. Weights mode and the effective field need the values: each
``DTensor`` is gathered with ``full_tensor()``, and FSDP1's flat shards (which hide even the shapes) inside
``summon_full_params`` in every mode. A gather is a collective, so every rank probes at the same time, and the ranks
first agree that the gathered copy fits in memory: a rank that refused alone would leave the others waiting.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from rf_callback.core.errors import ProbeError


def sharded_class_origin(cls: type) -> type | None:
    """The class ``fully_shard`` (FSDP2) built ``cls`` from, or None for a class it did not build.

    ``fully_shard`` gives each module it shards a class of its own, ``FSDP<Original>(FSDPModule, Original)``, whose
    ``__deepcopy__`` raises.
    """
    index = getattr(cls, "_orig_cls_mro_index", None)
    if not isinstance(index, int) or not any(base.__name__ == "FSDPModule" for base in cls.__mro__[1:index]):
        return None
    return cls.__mro__[index]


class Unwrapped(nn.Module):
    """Stands in the probe's copy for an FSDP1 ``FullyShardedDataParallel`` wrapper: runs what it wraps.

    The child keeps the wrapper's name for it (``_fsdp_wrapped_module``), so the copy's module names are the live
    model's and ``layer=`` names the same module in both.
    """

    _fsdp_wrapped_module: nn.Module

    def forward(self, *args, **kwargs):
        """Runs the wrapped module."""
        return self._fsdp_wrapped_module(*args, **kwargs)


def _fsdp1_class() -> Any:
    """FSDP1's wrapper class where a model may hold one (its module was imported), else None: no import per probe."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return getattr(fsdp, "FullyShardedDataParallel", None)


def is_fsdp1_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP1 ``FullyShardedDataParallel`` wrapper."""
    wrapper = _fsdp1_class()
    return wrapper is not None and isinstance(module, wrapper)


@contextlib.contextmanager
def fsdp1_parameters_whole(model: nn.Module, root: nn.Module | None = None) -> Iterator[None]:
    """Inside it, the FSDP1 (``FullyShardedDataParallel``) parameters of ``model`` are whole on every rank.

    FSDP1 keeps each unit's parameters as one flat shard per rank, which hides even their shapes: the copy is made
    inside ``summon_full_params`` (an all-gather, a collective: every rank calls the probe at the same time), without
    writing back, after the ranks agree that the whole parameters fit in memory. The units inside ``model`` are
    gathered; where ``model`` also holds parameters of a unit around it, ``root`` (the outermost unit) is. Inside a
    gathering already (the caller's, or this function's), ``model`` is read as it is.

    Args:
        model: the module to copy.
        root: the outermost FSDP1 unit, gathered where ``model`` holds parameters of a unit around it.

    Raises:
        ProbeError: ``model`` holds parameters of a unit around it and no ``root`` is given; or the whole
            parameters would not fit in some rank's memory.
    """
    gathered, _, need = _fsdp1_gathered(model, root)
    if gathered is None:
        yield
        return
    if need:
        device = next(f.device for unit in gathered.modules() if (f := getattr(unit, "_flat_param", None)) is not None)
        _agree_it_fits(
            need, device, device,
            f"the parameters of {type(gathered).__name__} are FSDP1 flat shards, and the probe's copy needs them "
            f"whole in every mode (the shards hide even their shapes)",
            "name a module= that is an FSDP1 unit of its own (wrapped by the auto-wrap policy), or shard the model "
            "with ModelParallelStrategy and fully_shard (FSDP2), whose theoretical probe gathers nothing",
        )  # fmt: skip
    token = _FSDP1_WHOLE.set(True)
    try:
        with _fsdp1_class().summon_full_params(gathered, writeback=False, recurse=True):
            yield
    finally:
        _FSDP1_WHOLE.reset(token)


# True inside fsdp1_parameters_whole's gathering: the FSDP1 units around a submodule probed inside it are whole.
_FSDP1_WHOLE = contextvars.ContextVar("rf_callback_fsdp1_whole", default=False)


def is_distributed_hook(hook) -> bool:
    """Whether ``hook`` belongs to ``torch.distributed`` (FSDP's gathering hooks), not to the model."""
    function = getattr(hook, "__func__", hook)
    return (getattr(function, "__module__", None) or "").startswith("torch.distributed")


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a distributed tensor (a ``DTensor``: FSDP2's sharded parameters), whole on no rank."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "full_tensor")


def check_gathered_fits(model: nn.Module, dtype: torch.dtype, device: torch.device | None) -> None:
    """Refuses, on every rank at once, to gather a sharded model's parameters where they would not fit in memory.

    The copy holds every parameter whole in ``dtype`` on ``device`` (where each shard is, for None), plus, while it is
    gathered, the largest parameter whole in its own dtype. Each rank compares that with its free memory, and the
    ranks agree (an all-reduce on the default process group): a rank that refused alone would leave the others
    waiting in the gathers.

    Raises:
        ProbeError: the gathered copy would not fit on some rank; says how much it needs and the fix.
    """
    sharded = [p for p in model.parameters() if is_sharded(p)]
    if not sharded:
        return
    need = _dtensor_gather_bytes(model, dtype)
    where = torch.device(device) if device is not None else sharded[0].device
    name = (sharded_class_origin(type(model)) or type(model)).__name__
    _agree_it_fits(
        need, where, sharded[0].device,
        f"the parameters of {name} are sharded, and weights mode and the effective field need them whole",
        "name a smaller module= (a submodule whose parameters fit), probe on another device (device=, "
        "RFCallback(probe_device=)), or use mode='theoretical', which reads the shapes alone",
    )  # fmt: skip


def _dtensor_gather_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """The peak bytes of a copy of ``model`` gathered from ``DTensor`` shards (0 where none is sharded).

    Every parameter whole in ``dtype``, plus the largest sharded one whole in its own dtype while it is gathered.
    """
    sharded = [p.numel() * p.element_size() for p in model.parameters() if is_sharded(p)]
    if not sharded:
        return 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in model.parameters()) * itemsize + max(sharded)


def _fsdp1_gathered(model: nn.Module, root: nn.Module | None) -> tuple[nn.Module | None, bool, int]:
    """What gathering ``model``'s FSDP1 parameters takes.

    Returns the module to gather (None: nothing to gather), whether it is ``model`` itself, and the bytes of its flat
    parameters whole.

    Raises:
        ProbeError: ``model`` holds parameters of an ungathered unit around it and no ``root`` is given.
    """
    wrapper = _fsdp1_class()
    if wrapper is None:
        return None, True, 0
    modules = list(model.modules())
    units = [m for m in modules if isinstance(m, wrapper)]
    if _FSDP1_WHOLE.get() or any("SUMMON" in str(unit.training_state) for unit in units):
        return None, True, 0  # gathered already (by the caller, or around this call)
    inside = {id(p) for unit in units for p in unit.parameters()}
    outside = [
        p
        for m in modules
        for p in m._parameters.values()
        if p is not None and id(p) not in inside and getattr(p, "_fsdp_flattened", False)
    ]
    if not (units or outside):
        return None, True, 0
    if outside and root is None:
        raise ProbeError(
            f"{type(model).__name__} holds parameters of an FSDP1 unit around it (FullyShardedDataParallel), "
            f"sharded flat: their shapes and values are not its own; pass the FullyShardedDataParallel module "
            f"itself, or call inside FullyShardedDataParallel.summon_full_params(root, writeback=False)"
        )
    gathered = root if outside and root is not None else model
    flat = [f for unit in gathered.modules() if (f := getattr(unit, "_flat_param", None)) is not None]
    return gathered, gathered is model, sum(f._unpadded_unsharded_size.numel() * f.element_size() for f in flat)


def gather_note(model: nn.Module, root: nn.Module | None = None) -> str | None:
    """What a probe of sharded ``model`` gathers per rank, in words; None where its parameters are whole.

    Args:
        model: the module the probe copies.
        root: the outermost FSDP1 unit, for a module whose parameters belong to one around it.

    Returns:
        A sentence for the user, or None.
    """
    name = (sharded_class_origin(type(model)) or type(model)).__name__
    dtensors = _dtensor_gather_bytes(model, torch.float32)
    if dtensors:
        return (
            f"the parameters of {name} are sharded (FSDP2): each weights-mode probe and effective field gathers them "
            f"whole into the probe's copy, {_in_mib(dtensors)} per rank; the theoretical probe gathers nothing"
        )
    gathered, itself, flat = _fsdp1_gathered(model, root)
    if gathered is None:
        return None
    whose = "its" if itself else f"the whole model's ({type(gathered).__name__}, as {name} is not an FSDP1 unit)"
    return (
        f"the parameters of {name} are FSDP1 flat shards: each probe gathers {whose} parameters whole, "
        f"{_in_mib(flat)} per rank, for as long as it copies them"
    )


def _agree_it_fits(need: float, where: torch.device, collective_device: torch.device, why: str, fix: str) -> None:
    """Refuses on every rank where gathering ``need`` bytes on ``where`` would not fit on some rank (an all-reduce)."""
    free = free_memory(where)
    fits = torch.tensor([int(need <= free)], device=collective_device)
    torch.distributed.all_reduce(fits, op=torch.distributed.ReduceOp.MIN)
    if not int(fits.item()):
        raise ProbeError(
            f"{why}: gathering them takes {_in_mib(need)} on {where}, more than some rank has free ({_in_mib(free)} "
            f"here); {fix}"
        )


def _in_mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 / 10 else f"{size / 2**10:.1f} KiB"


def free_memory(device: torch.device) -> float:
    """The bytes free on ``device``, infinity where unknown.

    On CUDA, the free memory plus what the caching allocator holds unused; on the CPU, ``MemAvailable``.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return float(line.split()[1]) * 1024
        except OSError:
            pass
    return math.inf
