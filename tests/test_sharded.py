"""RFCallback and the probe on sharded models: FSDP2 (``fully_shard``, Lightning's ModelParallelStrategy) on 2 CPU
processes with gloo. The theoretical fields come from the parameters' shapes alone; weights-mode fields and the
effective field from the parameters gathered whole; the ranks stay in step and the training run is unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rf_callback import probe_rf
from tests.lightning_models import ResidualClassifier
from tests.processes import free_port, run_isolated
from tests.sharded_fits import DRAWS

TIMEOUT_S = 240  # each scenario takes 5-15 s on 2 cores; past this it is hung
SHAPE, POSITION = (1, 1, 16, 16), (2, 5)

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no torch.distributed gloo backend",
)


def _scenario(name: str, out: Path) -> SimpleNamespace:
    output = run_isolated(
        ["-m", "tests.sharded_fits", name, str(out)], out.parent / f"{out.name}.log", TIMEOUT_S,
        env={"RF_TEST_PORT": str(free_port())},
    )  # fmt: skip
    ranks = {}
    for path in sorted(out.glob("*-rank*.json")):
        run, rank = path.stem.rsplit("-rank", 1)
        ranks.setdefault(run, []).append(json.loads(path.read_text()))
    return SimpleNamespace(out=out, output=output, **ranks)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    return _scenario("record", tmp_path_factory.mktemp("sharded"))


def _bounds(field) -> list:
    return [list(b) for b in field.bounds]


def _model(state: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ResidualClassifier()
    if state is not None:
        model.load_state_dict(state)
    return model


def test_the_callback_leaves_the_sharded_training_trajectory_bitwise_unchanged(recorded):
    for with_callback, without in zip(recorded.probed, recorded.plain, strict=True):
        assert with_callback["losses"] == without["losses"] and len(without["losses"]) == 4


def test_sharded_fields_are_those_of_the_same_model_whole(recorded):
    rank0, rank1 = recorded.probed
    assert rank0["history"] == rank1["history"]
    history = rank0["history"]
    assert [entry["step"] for entry in history] == [0, 2, 4]
    initial = probe_rf(_model(), SHAPE, POSITION, layer="features", mode="weights", draws=DRAWS)
    final = probe_rf(_model(torch.load(recorded.out / "final.pt")), SHAPE, POSITION, layer="features", mode="weights",
                     draws=DRAWS)  # fmt: skip
    assert history[0]["fields"][0]["bounds"] == _bounds(initial)
    assert history[-1]["fields"][0]["bounds"] == _bounds(final)
    theoretical = probe_rf(_model(), SHAPE, POSITION, layer="features")
    assert _bounds(theoretical) == [[0, 12], [3, 15]]  # r = 16, S = 2, P = 7: [2*2 - 7, 2*2 + 8] clipped, [3, 18]
    assert all("effective" in entry and entry["effective"] for entry in history[1:])


def test_the_fit_says_what_each_probe_gathers(recorded):
    # A stem (72 + 8), 2 blocks of 2 convolutions of 8 x 8 x 3 x 3 (576 + 8) and a head (24 + 3): 2443 parameters in
    # float32, plus the largest (576) whole while it is gathered: (2443 + 576) * 4 bytes = 11.8 KiB.
    assert (
        "RFCallback: the parameters of ResidualClassifier are sharded (FSDP2): each weights-mode probe and effective "
        "field gathers them whole into the probe's copy, 11.8 KiB per rank" in recorded.output
    )


def test_rank_zero_alone_writes_the_logs(recorded):
    files = sorted((recorded.out / "probed").rglob("events.out.tfevents.*"))
    assert len(files) == 1
    events = EventAccumulator(str(files[0]), size_guidance={"scalars": 0}).Reload()
    steps = [s.step for s in events.Scalars("rf/features/pos0/size_h/weights")]
    assert steps == [0, 2, 4]
    assert any(tag.startswith("rf-effective/") for tag in events.Tags()["scalars"])


def test_a_sharded_checkpoint_resumes_with_the_callbacks_state(recorded):
    first, resumed = recorded.probed[0]["history"], recorded.resumed[0]["history"]
    assert resumed[: len(first)] == first  # restored from the distributed checkpoint, fit start not logged twice
    assert [entry["epoch"] for entry in resumed] == [None, 0, 1, 2]
    assert recorded.resumed[0]["history"] == recorded.resumed[1]["history"]


def test_a_probe_that_fails_on_one_rank_only_warns_on_every_rank_and_hangs_none(tmp_path):
    run = _scenario("fails", tmp_path)  # the timeout proves there is no hang
    rank0, rank1 = run.fails
    assert rank0["history"] == rank1["history"]
    assert [(entry["step"], entry["fields"]) for entry in rank0["history"]] == [(2, []), (4, [])]
    assert "the probe failed on rank 1" in run.output
    assert "the probe at fit start failed on another rank, so every rank skips it (this is rank 0)" in run.output


def test_probe_rf_rf_table_and_effective_rf_on_a_fully_sharded_model_equal_the_whole_models(tmp_path):
    run = _scenario("direct", tmp_path)
    for rank in run.direct:
        refused = rank.pop("refused")
        fsdp1 = rank.pop("fsdp1")
        assert fsdp1 == dict.fromkeys(fsdp1, True) and len(fsdp1) == 16
        same = dict.fromkeys(("theoretical", "weights", "table", "effective"), True)
        assert rank == {"same": same, "untouched": True, "forward": True}
        assert "gathering them takes" in refused and "more than some rank has free" in refused
        assert "module=" in refused and "mode='theoretical'" in refused
