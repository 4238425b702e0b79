"""Choosing the effective field's inputs from the batches a training run already hands over (no loader is read)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch


class InputReservoir:
    """Keeps ``count`` of the distinct samples handed to it, each equally likely, with a private generator.

    Every sample gets a random key from a generator seeded by ``(seed, rank)``, and the samples with the ``count``
    smallest keys are kept (reservoir sampling with random keys): one pass over a stream of unknown length chooses
    uniformly, only samples that enter the reservoir are copied (to CPU, float32), and the reservoirs of several
    ranks merge by the same rule into one choice over all their samples. No global random state is drawn from.
    Samples shaped unlike the first kept one are passed over. A sample met again (a distributed sampler pads the
    ranks' shares with copies of the first samples; ranks that each read the whole set hold the same samples) is
    kept once, with its smallest key: the effective field's mean map weighs each input once.
    """

    _MAX_SAMPLE_DIMS = 4  # (C, D, H, W)

    def __init__(self, count: int, seed: int, *, rank: int = 0):
        self.count = count
        self._generator = np.random.default_rng(np.random.SeedSequence([seed % 2**64, rank]))
        self.keys = torch.empty(0, dtype=torch.float64)
        self.samples: torch.Tensor | None = None
        # Samples offered, and those of them passed over for a shape unlike the first kept one's (see passed_over).
        self.offered = 0
        self.passed_over = 0
        self._common: tuple[int, ...] | None = None  # the shape the ranks' pooled choice keeps (see _pooled)

    def add(self, inputs: torch.Tensor | None) -> None:
        """Offers the samples of one batch ``(N, C, *spatial)``; anything else is passed over."""
        if not isinstance(inputs, torch.Tensor) or not 3 <= inputs.dim() <= 5 or len(inputs) == 0:
            return
        keys = torch.from_numpy(self._generator.random(len(inputs)))
        self.offered += len(inputs)
        if self.samples is not None and inputs.shape[1:] != self.samples.shape[1:]:
            self.passed_over += len(inputs)
            return
        if len(self.keys) < self.count:
            chosen = torch.arange(len(inputs))
        else:
            chosen = (keys < self.keys.max()).nonzero().flatten()
            if len(chosen) == 0:
                return
        with torch.inference_mode(False), torch.no_grad():
            new = inputs.detach()[chosen.to(inputs.device)].to("cpu", torch.float32, copy=True)
        keys = torch.cat([self.keys, keys[chosen]])
        samples = new if self.samples is None else torch.cat([self.samples, new])
        order = _smallest_distinct(keys, samples, self.count)
        self.keys, self.samples = keys[order], samples[order]

    def passed_over_note(self) -> str | None:
        """What was passed over for its shape, in words, or ``None`` where every sample offered could be chosen."""
        shape = self._common if self._common is not None else None if self.samples is None else self.samples.shape[1:]
        if not self.passed_over or shape is None:
            return None
        return (
            f"{self.passed_over} of the {self.offered} validation samples were shaped unlike the first batch's "
            f"{tuple(shape)} and passed over (batches padded to their longest sample, validation at "
            f"several sizes): the effective field is measured on inputs of that one shape; pad the validation batches "
            f"to one size where it should describe them all"
        )

    def chosen(self, strategy, world_size: int) -> torch.Tensor | None:
        """The chosen inputs, the same on every rank (pooled over the ranks under DDP); ``None`` if none was seen."""
        if world_size > 1:
            return self._pooled(strategy)
        return self.samples

    def _pooled(self, strategy) -> torch.Tensor | None:
        """The ``count`` samples of smallest key over every rank's reservoir: two all-gathers, the same on all ranks."""
        device = strategy.root_device
        shape = tuple(self.samples.shape[1:]) if self.samples is not None else ()
        counts = [self.offered, self.passed_over]
        meta = [len(self.keys), len(shape), *shape, *[0] * (self._MAX_SAMPLE_DIMS - len(shape)), *counts]
        metas = strategy.all_gather(torch.tensor(meta, dtype=torch.int64, device=device)).cpu().tolist()
        reference = next((m for m in metas if m[0] > 0), None)
        if reference is None:
            return None
        common = tuple(reference[2 : 2 + reference[1]])  # ranks whose inputs are shaped otherwise offer none
        # Every rank's counts, and the samples a rank kept of another shape than the common one: passed over too.
        self.offered = sum(m[-2] for m in metas)
        self.passed_over = sum(m[-2] if m[0] and tuple(m[2 : 2 + m[1]]) != common else m[-1] for m in metas)
        self._common = common
        keys = torch.full((self.count,), float("inf"), dtype=torch.float64)
        samples = torch.zeros((self.count, *common), dtype=torch.float32)
        if self.samples is not None and shape == common:
            keys[: len(self.keys)], samples[: len(self.keys)] = self.keys, self.samples
        all_keys = strategy.all_gather(keys.to(device)).cpu().flatten()
        all_samples = strategy.all_gather(samples.to(device)).cpu().flatten(0, 1)
        return all_samples[_smallest_distinct(all_keys, all_samples, self.count)]


def _smallest_distinct(keys: torch.Tensor, samples: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of the ``count`` smallest finite keys whose samples differ, each sample at its smallest key."""
    seen: set[bytes] = set()
    kept: list[int] = []
    for index in keys.argsort(stable=True).tolist():
        if len(kept) == count or not math.isfinite(keys[index]):
            break
        digest = hashlib.blake2b(samples[index].numpy().tobytes(), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append(index)
    return torch.tensor(kept, dtype=torch.int64)
