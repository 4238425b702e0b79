"""RFCallback in a real 2-process DDP run on CPU (gloo, ddp_spawn): no deadlock, images once, ranks agree."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rf_callback import RFCallback, effective_rf, probe_rf
from tests.lightning_models import ConvClassifier, ShrinkingField, loaders, trainer_kwargs
from tests.processes import run_isolated

SHAPE = (1, 1, 16, 16)
FIT_TIMEOUT_S = 180  # the run takes ~10 s on 2 cores; past this it is hung
WORLD_SIZE = 2
EXPECTED_STEPS = [0, 2, 4]  # 32 samples over 2 ranks, batch 8: 2 steps per epoch; fit start, then 2 epochs
SCALAR_NAMES = {  # the weights' field: short name -> tag
    **{f"size_{axis}": f"rf/features/pos0/size_{axis}/weights" for axis in "hw"},
    **{f"{end}_{axis}": f"rf-span/features/pos0/weights/{end}_{axis}" for end in ("first", "last") for axis in "hw"},
}
IMAGE_TAGS = {
    "rf/features/pos0/heatmap/theoretical": [0],
    "rf/features/pos0/heatmap/weights": EXPECTED_STEPS,
    "rf/features/pos0/figure": [0, EXPECTED_STEPS[-1]],  # figures at fit start and fit end only
    "rf/features/pos0/heatmap/effective": EXPECTED_STEPS[1:],  # the effective field: after each validation epoch
    "rf/features/pos0/overlay": EXPECTED_STEPS[-1:],
    "rf/features/pos0/growth": EXPECTED_STEPS[-1:],  # at fit end
}
PREFIXES = ("rf/", "rf-span/", "rf-effective/")
VALIDATION_SAMPLES = 31

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no torch.distributed gloo backend, which CPU DDP needs",
)


class _RecordRank(pl.Callback):
    """Writes what each rank's RFCallback recorded and logged through pl_module.log, one JSON file per rank."""

    def __init__(self, out: str):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        rf = next(c for c in trainer.callbacks if isinstance(c, RFCallback))
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "history": rf.history,
            "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(PREFIXES)},
        }
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
        torch.save(rf.erf_inputs, Path(self.out) / f"erf_inputs{trainer.global_rank}.pt")


def fit_ddp(out_dir: str) -> None:
    """The run under test, in its own process: 2 epochs of ddp_spawn on 2 CPU processes, then the final weights."""
    out = Path(out_dir)
    torch.manual_seed(0)
    model = ConvClassifier()
    trainer = pl.Trainer(
        callbacks=[RFCallback(layer="features"), _RecordRank(out_dir)],
        logger=TensorBoardLogger(out),
        **trainer_kwargs(out, devices=WORLD_SIZE, strategy="ddp_spawn"),
    )
    train, val = loaders()
    # 31 validation samples: the distributed sampler gives each rank 16, padding one rank's share with sample 0.
    val = torch.utils.data.DataLoader(torch.utils.data.Subset(val.dataset, range(VALIDATION_SAMPLES)), batch_size=8)
    trainer.fit(model, train, val)
    torch.save(model.state_dict(), out / "final.pt")  # ddp_spawn brings rank 0's trained weights back here
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(PREFIXES)}
    (out / "main.json").write_text(json.dumps({"callback_metrics": metrics}))


def _spawn(function: str, out: Path) -> str:
    """Runs ``tests.test_callback_ddp.<function>(out)`` in a process of its own; returns its output."""
    code = f"from tests.test_callback_ddp import {function}; {function}({str(out)!r})"
    return run_isolated(["-c", code], out.parent / f"{out.name}.log", FIT_TIMEOUT_S)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    output = _spawn("fit_ddp", out)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    return SimpleNamespace(
        out=out, output=output, ranks=ranks, main=json.loads((out / "main.json").read_text()),
        event_files=sorted(out.rglob("events.out.tfevents.*")),
    )  # fmt: skip


class _RecordStop(pl.Callback):
    def __init__(self, out: str):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        rf = next(c for c in trainer.callbacks if isinstance(c, RFCallback))
        record = {"epoch": trainer.current_epoch, "probed": [h["epoch"] for h in rf.history]}
        (Path(self.out) / f"stop{trainer.global_rank}.json").write_text(json.dumps(record))


def fit_ddp_stop(out_dir: str) -> None:
    """A run whose effective field stops covering the target at epoch 1, with on_miss="stop", on 2 processes."""
    trainer = pl.Trainer(
        callbacks=[RFCallback(target_size=5, on_miss="stop", log_images=False), _RecordStop(out_dir)],
        logger=False,
        **trainer_kwargs(out_dir, max_epochs=5, devices=WORLD_SIZE, strategy="ddp_spawn"),
    )
    trainer.fit(ShrinkingField(shrink_epoch=1), *loaders())


def test_on_miss_stop_ends_cleanly_on_both_ranks(tmp_path):
    output = _spawn("fit_ddp_stop", tmp_path)
    records = [json.loads((tmp_path / f"stop{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert records == [{"epoch": 2, "probed": [None, 0, 1]}] * WORLD_SIZE  # both stopped after epoch 1
    assert "stopped covering" in output


_FIT_START_PROBES = {"failed": False}


class _FailsOnRankOneAtFitStart(torch.nn.Module):
    """Wraps features; on rank 1, the first forward on one sample (the fit-start probe's copy) raises."""

    def __init__(self, features: torch.nn.Module):
        super().__init__()
        self.inner = features

    def forward(self, x):
        if len(x) == 1 and torch.distributed.get_rank() == 1 and not _FIT_START_PROBES["failed"]:
            _FIT_START_PROBES["failed"] = True
            raise RuntimeError("a failure on rank 1 only")
        return self.inner(x)


def fit_ddp_one_rank_fails_at_fit_start(out_dir: str) -> None:
    """A run whose fit-start probe fails on rank 1 only: the ranks must still log the same synced keys."""
    model = ConvClassifier()
    model.features = _FailsOnRankOneAtFitStart(model.features)
    trainer = pl.Trainer(
        callbacks=[RFCallback(layer="features"), _RecordRank(out_dir)],
        logger=False,
        **trainer_kwargs(out_dir, devices=WORLD_SIZE, strategy="ddp_spawn"),
    )
    trainer.fit(model, *loaders())


def test_a_fit_start_probe_that_fails_on_one_rank_skips_it_on_all(tmp_path):
    _spawn("fit_ddp_one_rank_fails_at_fit_start", tmp_path)  # no deadlock on mismatched synced keys
    rank0, rank1 = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert rank0["callback_metrics"] == rank1["callback_metrics"]
    # rank 0's own fit-start probe succeeded, but no fit-start entry: the ranks agreed to skip it
    assert [h["epoch"] for h in rank0["history"]] == [h["epoch"] for h in rank1["history"]] == [0, 1]


class _CountsOnRankOne(ConvClassifier):
    """A submodule value that changes on rank 1 only (a count of its own validation batches)."""

    def validation_step(self, batch, batch_idx):
        if self.global_rank == 1:
            self.features.seen = getattr(self.features, "seen", 0) + 1
        return super().validation_step(batch, batch_idx)


def fit_ddp_value_changed_on_one_rank(out_dir: str) -> None:
    """A run where the theoretical fields' values change on rank 1 only: both ranks must probe them again."""
    trainer = pl.Trainer(
        callbacks=[RFCallback(layer="features", log_images=False, effective=False), _RecordRank(out_dir)],
        logger=False,
        **trainer_kwargs(out_dir, devices=WORLD_SIZE, strategy="ddp_spawn"),
    )
    trainer.fit(_CountsOnRankOne(), *loaders())


def test_a_value_changed_on_one_rank_probes_the_theoretical_field_again_on_all(tmp_path):
    """Each rank decided alone whether a value had changed, and the theoretical probe that followed on rank 1 only
    ran a collective that rank 0 never joined (gloo aborted: collective mismatch; NCCL hangs)."""
    _spawn("fit_ddp_value_changed_on_one_rank", tmp_path)
    rank0, rank1 = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert rank0["callback_metrics"] == rank1["callback_metrics"]
    assert [h["epoch"] for h in rank0["history"]] == [h["epoch"] for h in rank1["history"]] == [None, 0, 1]


def _final_model(ddp_run) -> ConvClassifier:
    model = ConvClassifier()
    model.load_state_dict(torch.load(ddp_run.out / "final.pt"))
    return model


def _counts(ddp_run, kind: str) -> Counter:
    """How many events of `kind` ('images' or 'scalars') each (tag, step) has, over every event file of the run."""
    counts: Counter = Counter()
    for path in ddp_run.event_files:
        events = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0}).Reload()
        for tag in events.Tags()[kind]:
            items = events.Images(tag) if kind == "images" else events.Scalars(tag)
            counts.update((tag, item.step) for item in items)
    return counts


def test_ddp_fit_finishes_on_two_processes(ddp_run):
    assert [r["rank"] for r in ddp_run.ranks] == list(range(WORLD_SIZE))
    assert all(r["world_size"] == WORLD_SIZE for r in ddp_run.ranks)
    assert "Trainer.fit` stopped: `max_epochs=2` reached" in ddp_run.output
    assert "RFCallback: the probe failed" not in ddp_run.output


def test_each_rank_probes_at_fit_start_and_after_each_validation_epoch(ddp_run):
    for rank in ddp_run.ranks:
        assert [entry["step"] for entry in rank["history"]] == EXPECTED_STEPS


def test_images_are_written_once_per_step_by_rank_zero_only(ddp_run):
    assert len(ddp_run.event_files) == 1  # rank 1 opens no writer
    images = {key: n for key, n in _counts(ddp_run, "images").items() if key[0].startswith(PREFIXES)}
    assert {key: n for key, n in images.items() if n != 1} == {}
    for tag, steps in IMAGE_TAGS.items():
        assert sorted(step for t, step in images if t == tag) == steps, tag


def test_scalars_are_written_once_per_step(ddp_run):
    scalars = _counts(ddp_run, "scalars")
    callback_scalars = {key: n for key, n in scalars.items() if key[0].startswith(PREFIXES)}
    assert {key: n for key, n in callback_scalars.items() if n != 1} == {}
    erf_steps = {step for tag, step in callback_scalars if tag.startswith("rf-effective/") or "/effective" in tag}
    assert erf_steps == set(EXPECTED_STEPS[1:])
    for name in SCALAR_NAMES.values():
        assert {step: n for (tag, step), n in scalars.items() if tag == name} == dict.fromkeys(EXPECTED_STEPS, 1)
        theoretical = name.replace("/weights", "/theoretical")
        # the theoretical size is a flat line beside the weights' at every probe; its span is logged once
        expected_steps = EXPECTED_STEPS if name.startswith("rf/") else [0]
        assert {step: n for (tag, step), n in scalars.items() if tag == theoretical} == dict.fromkeys(expected_steps, 1)


def test_ranks_agree_on_every_probe_and_logged_value(ddp_run):
    rank0, *others = ddp_run.ranks
    assert set(SCALAR_NAMES.values()) <= set(rank0["callback_metrics"])
    assert any(name.startswith("rf-effective/") for name in rank0["callback_metrics"])  # same inputs on every rank
    for other in others:
        assert other["history"] == rank0["history"]
        assert other["callback_metrics"] == rank0["callback_metrics"]
    assert ddp_run.main["callback_metrics"] == rank0["callback_metrics"]


def test_logged_values_are_the_probe_of_the_final_weights(ddp_run):
    field = probe_rf(_final_model(ddp_run), SHAPE, "center", layer="features", mode="weights")
    expected = {}
    for axis, (first, last) in zip("hw", field.bounds):
        expected.update({f"size_{axis}": last - first + 1, f"first_{axis}": first, f"last_{axis}": last})
    assert (field.size[0], field.size[1]) == (expected["size_h"], expected["size_w"])
    logged_last = {}
    for path in ddp_run.event_files:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload()
        for short, name in SCALAR_NAMES.items():
            series = events.Scalars(name)
            assert series[-1].step == EXPECTED_STEPS[-1]
            logged_last[short] = series[-1].value
    assert logged_last == {k: float(v) for k, v in expected.items()}
    for rank in ddp_run.ranks:
        logged = {k: v for k, v in rank["callback_metrics"].items() if k in SCALAR_NAMES.values()}
        assert logged == {SCALAR_NAMES[k]: float(v) for k, v in expected.items()}
        assert rank["history"][-1]["fields"][0]["bounds"] == [list(b) for b in field.bounds]


def test_the_effective_fields_inputs_are_the_distinct_validation_samples_despite_the_samplers_padding(ddp_run):
    """Before, the padded copy of sample 0 was chosen twice (32 inputs of 31 samples) and weighed double."""
    dataset = loaders()[1].dataset.tensors[0][:VALIDATION_SAMPLES]
    chosen = [torch.load(ddp_run.out / f"erf_inputs{r}.pt") for r in range(WORLD_SIZE)]
    assert all(torch.equal(chosen[0], other) for other in chosen[1:])
    matches = [(dataset == x).flatten(1).all(dim=1).nonzero().flatten().tolist() for x in chosen[0]]
    assert sorted(m[0] for m in matches if len(m) == 1) == list(range(VALIDATION_SAMPLES))
    expected = effective_rf(_final_model(ddp_run), chosen[0], "center", layer="features").metrics()
    spread = ddp_run.ranks[0]["callback_metrics"]["rf-effective/features/pos0/spread_w"]
    assert spread == pytest.approx(expected["std_w"], rel=1e-5)
