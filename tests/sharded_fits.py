"""Fits under Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes, run as ``python -m tests.sharded_fits``.

Lightning's launcher starts the second rank by running this module again, so each scenario is one command line:

- ``record OUT``: the same 2-epoch fit with and without RFCallback (weights mode, the effective field on), a checkpoint
  of the first, a fit resumed from it for a third epoch, and the final weights gathered whole;
- ``fails OUT``: a fit whose epoch-end weights probe raises on rank 1 only, after the parameters were gathered;
- ``direct OUT``: ``probe_rf`` and ``effective_rf`` on a model sharded with ``fully_shard`` outside Lightning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from rf_callback import RFCallback
from tests.lightning_models import ResidualClassifier, loaders, trainer_kwargs

WORLD_SIZE = 2
DRAWS = 3  # the weights probe's batch: no training or validation batch has 3 samples


class RecordRank(pl.Callback):
    """Writes each rank's training losses and what its RFCallback recorded, as ``<name>-rank<r>.json``."""

    def __init__(self, out: Path, name: str):
        self.out, self.name, self.losses = out, name, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        rf = next((c for c in trainer.callbacks if isinstance(c, RFCallback)), None)
        record = {"losses": self.losses, "history": None if rf is None else rf.history}
        (self.out / f"{self.name}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


class FailsOnRankOne(torch.nn.Module):
    """Wraps a module; on rank 1, a forward on ``DRAWS`` samples (the weights probe's copy) raises."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if len(x) == DRAWS and torch.distributed.get_rank() == 1:
            raise RuntimeError("a failure on rank 1 only")
        return self.inner(x)


def _trainer(out: Path, name: str, callback: bool, **overrides) -> pl.Trainer:
    callbacks: list[pl.Callback] = [RecordRank(out, name)]
    if callback:
        callbacks.insert(0, RFCallback((2, 5), layer="features", mode="weights", draws=DRAWS, target_size=12))
    strategy = ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1)
    kwargs = trainer_kwargs(out / name, devices=WORLD_SIZE, strategy=strategy, **overrides)
    return pl.Trainer(callbacks=callbacks, logger=pl.loggers.TensorBoardLogger(out / name), **kwargs)


def _model() -> ResidualClassifier:
    torch.manual_seed(0)
    return ResidualClassifier()


def record(out: Path) -> None:
    """The fits with and without the callback, a checkpoint, its resumption, and the final weights whole."""
    model, trainer = _model(), _trainer(out, "probed", callback=True)
    trainer.fit(model, *loaders())
    trainer.save_checkpoint(out / "probed.ckpt")
    whole = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    if trainer.global_rank == 0:
        torch.save(whole, out / "final.pt")
    _trainer(out, "plain", callback=False).fit(_model(), *loaders())
    resumed = _trainer(out, "resumed", callback=True, max_epochs=3)
    resumed.fit(_model(), *loaders(), ckpt_path=out / "probed.ckpt")
    _leave_the_group()


def fails(out: Path) -> None:
    """A fit whose weights probe raises on rank 1 only, after every rank gathered the parameters."""
    model = _model()
    model.features[3] = FailsOnRankOne(model.features[3])
    _trainer(out, "fails", callback=True).fit(model, *loaders())
    _leave_the_group()


def _leave_the_group() -> None:
    """Ends the process group before the interpreter exits: gloo's threads torn down at exit aborted a run now and
    then ("terminate called without an active exception", exit code -6) after every record was written."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _direct_rank(rank: int, out: Path) -> None:
    """One rank of ``direct``: the probes of a ``fully_shard``-ed model beside those of the same model whole."""
    import os

    from torch.distributed.fsdp import fully_shard

    from rf_callback import ProbeError, effective_rf, probe_rf, rf_table
    from rf_callback.core import sharding

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["RF_TEST_PORT"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    whole, sharded = _model().features, _model().features
    for block in sharded:
        if not isinstance(block, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
            fully_shard(block)
    fully_shard(sharded)
    shards = {name: p.to_local().clone() for name, p in sharded.named_parameters()}
    inputs = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    same = {}
    for mode in ("theoretical", "weights"):
        a, b = probe_rf(whole, (1, 1, 16, 16), (2, 5), mode=mode), probe_rf(sharded, (1, 1, 16, 16), (2, 5), mode=mode)
        same[mode] = a == b and torch.equal(a.heatmap, b.heatmap)
    same["table"] = str(rf_table(whole, (1, 1, 16, 16))) == str(rf_table(sharded, (1, 1, 16, 16)))
    a, b = effective_rf(whole, inputs, (2, 5)), effective_rf(sharded, inputs, (2, 5))
    same["effective"] = torch.equal(a.heatmap, b.heatmap)
    untouched = all(
        type(p).__name__ == "DTensor" and torch.equal(p.to_local(), shards[name])
        for name, p in sharded.named_parameters()
    )
    record = {"same": same, "untouched": untouched, "forward": torch.equal(whole(inputs), sharded(inputs))}
    record["fsdp1"] = _fsdp1_probes(whole, inputs)
    # Rank 1 alone has no memory to gather into: every rank refuses, none waits in a gather.
    if rank == 1:
        sharding.free_memory = lambda device: 0.0
    try:
        probe_rf(sharded, (1, 1, 16, 16), (2, 5), mode="weights")
        record["refused"] = ""
    except ProbeError as error:
        record["refused"] = str(error)
    (out / f"direct-rank{rank}.json").write_text(json.dumps(record))
    # FSDP1 on the CPU aborts now and then at interpreter exit ("terminate called without an active exception",
    # torch's teardown of its gloo threads, with no probe in the script): the results are written, so leave at once.
    os._exit(0)


def _fsdp1_probes(whole: torch.nn.Module, inputs: torch.Tensor) -> dict:
    """FSDP1 (``FullyShardedDataParallel``, blocks wrapped by the auto-wrap policy) beside the whole model.

    Directly (``probe_rf`` on the wrapper), and as the callback does under ``FSDPStrategy``: a LightningModule wrapped
    whole, probed at ``features`` through ``FieldProber`` with the root gathered around each probe.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from rf_callback import ProbeError, effective_rf, probe_rf
    from rf_callback.callback.fields import FieldProber
    from rf_callback.core.sharding import fsdp1_parameters_whole, gather_note
    from tests.lightning_models import ResidualBlock

    def wrapped(module: torch.nn.Module, orig: bool) -> FullyShardedDataParallel:
        policy = ModuleWrapPolicy({ResidualBlock})
        return FullyShardedDataParallel(
            module, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=orig
        )

    same = {}
    for orig in (True, False):
        flat = wrapped(_model().features, orig)
        flat(inputs)  # as in training: FSDP1 initialises lazily
        local = [p.detach().clone() for p in flat.parameters()]
        for mode in ("theoretical", "weights"):
            a, b = probe_rf(whole, (1, 1, 16, 16), (2, 5), mode=mode), probe_rf(flat, (1, 1, 16, 16), (2, 5), mode=mode)
            same[f"{mode} use_orig_params={orig}"] = a == b and torch.equal(a.heatmap, b.heatmap)
        # A layer inside a wrapped block, by the name in the user's code (the live name has _fsdp_wrapped_module).
        a, b = (probe_rf(m, (1, 1, 16, 16), (2, 5), layer="1.conv1", mode="weights") for m in (whole, flat))
        same[f"layer use_orig_params={orig}"] = a == b and torch.equal(a.heatmap, b.heatmap)
        a, b = effective_rf(whole, inputs, (2, 5)), effective_rf(flat, inputs, (2, 5))
        same[f"effective use_orig_params={orig}"] = torch.equal(a.heatmap, b.heatmap)
        same[f"untouched use_orig_params={orig}"] = all(map(torch.equal, local, flat.parameters()))

        pl_module = _model()
        root = wrapped(pl_module, orig)
        root(inputs)
        prober = FieldProber(
            [(2, 5)], layer="features", module=None, element=None, layout="channels_first", draws=DRAWS, seed=0,
            device=None,
        )  # fmt: skip
        try:
            prober.probe(pl_module, "weights", (1, 1, 16, 16))
            same[f"refused without the root use_orig_params={orig}"] = False
        except ProbeError as error:
            same[f"refused without the root use_orig_params={orig}"] = "unit around it" in str(error)
        note = gather_note(pl_module, root) or ""
        same[f"note use_orig_params={orig}"] = "gathers the whole model's (FullyShardedDataParallel" in note
        prober.whole_parameters = lambda module, root=root: fsdp1_parameters_whole(module, root)
        expected = probe_rf(_model(), (1, 1, 16, 16), (2, 5), layer="features", mode="weights", draws=DRAWS)
        got = prober.probe(pl_module, "weights", (1, 1, 16, 16))[0]
        same[f"callback use_orig_params={orig}"] = got == expected and torch.equal(got.heatmap, expected.heatmap)
    return same


def direct(out: Path) -> None:
    """``probe_rf``, ``rf_table`` and ``effective_rf`` on a ``fully_shard``-ed model outside Lightning, every rank."""
    torch.multiprocessing.spawn(_direct_rank, args=(out,), nprocs=WORLD_SIZE)


if __name__ == "__main__":
    {"record": record, "fails": fails, "direct": direct}[sys.argv[1]](Path(sys.argv[2]))
