"""The logged names and the charts: the story reads from the top, and two runs share charts."""

from __future__ import annotations

import functools
import re

import pytest
import torch

from rf_callback import effective_rf, probe_rf
from rf_callback.callback import dashboard
from tests.models import vgg_style


def tensorboard_order(a: str, b: str) -> int:
    """TensorBoard's tag comparator (its web app's ``compareTagNames``), rewritten.

    Digits compare as numbers; ``/``, ``_`` and digits are separators that sort before any other character and
    tie with each other.
    """

    def is_break(c: str) -> bool:
        return c in "/_" or c.isdigit()

    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            i_end, j_end = i, j
            while i_end < len(a) and a[i_end].isdigit():
                i_end += 1
            while j_end < len(b) and b[j_end].isdigit():
                j_end += 1
            x, y = int(a[i:i_end]), int(b[j:j_end])
            if x != y:
                return -1 if x < y else 1
            i, j = i_end, j_end
            continue
        if is_break(a[i]):
            if not is_break(b[j]):
                return -1
        elif is_break(b[j]):
            return 1
        elif a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1


@pytest.fixture(scope="module")
def fields():
    torch.manual_seed(0)
    model = vgg_style()
    theoretical = probe_rf(model, (1, 3, 32, 32), (4, 4))
    return theoretical, effective_rf(model, torch.randn(4, 3, 32, 32), (4, 4), theoretical=theoretical)


@pytest.mark.parametrize("layer", ["a", "features", "output", "zeta", "backbone.layer4"])
def test_the_sizes_come_first_in_tensorboards_order_whatever_the_layer(fields, layer):
    theoretical, effective = fields
    metrics = effective.metrics()
    tags = [
        *dashboard.field_scalars(layer, 0, theoretical, "theoretical"),
        *dashboard.field_scalars(layer, 0, theoretical, "weights"),
        *dashboard.target_scalars(layer, 0, (8, 8)),
        *dashboard.effective_scalars(layer, 0, effective, metrics, 0.95, full=False),
        *dashboard.coverage_scalars(layer, 0, True, 1.0),
    ]
    ordered = sorted(tags, key=functools.cmp_to_key(tensorboard_order))
    groups = list(dict.fromkeys(tag.split("/")[0] for tag in ordered))
    assert groups == ["rf", "rf-effective", "rf-span"]
    headline = [tag for tag in ordered if tag.startswith("rf/")]
    assert headline[:4] == [f"rf/{layer}/pos0/size_h/{k}" for k in ("effective", "target", "theoretical", "weights")]
    assert headline[-2:] == [f"rf/{layer}/pos0/target/covered", f"rf/{layer}/pos0/target/margin"]


def test_summary_scalars_are_the_extent_ratio_offset_and_spread(fields):
    _, effective = fields
    metrics = effective.metrics()
    logged = dashboard.effective_scalars("f", 0, effective, metrics, 0.95, full=False)
    assert logged == {
        **{f"rf/f/pos0/size_{a}/effective": metrics[f"extent0.95_{a}"] for a in "hw"},
        **{f"rf-effective/f/pos0/ratio_{a}": metrics[f"extent0.95_ratio_{a}"] for a in "hw"},
        **{f"rf-effective/f/pos0/offset_{a}": metrics[f"com_offset_{a}"] for a in "hw"},
        **{f"rf-effective/f/pos0/spread_{a}": metrics[f"std_{a}"] for a in "hw"},
    }
    full = dashboard.effective_scalars("f", 0, effective, metrics, 0.95, full=True)
    extra = {k.rsplit("/", 1)[1] for k in set(full) - set(logged)}
    assert extra == set(metrics) - {
        f"{m}_{a}" for m in ("extent0.95", "extent0.95_ratio", "com_offset", "std") for a in "hw"
    }


def test_chart_titles_hold_no_coordinates_so_runs_share_them():
    shallow = dashboard.chart_layout("features", positions=1, axes=2)
    deep = dashboard.chart_layout("features", positions=1, axes=2)
    assert shallow == deep
    (charts,) = shallow.values()
    assert list(charts)[:2] == ["features · pos0 · size along h", "features · pos0 · size along w"]
    assert not any(re.search(r"\d+_\d+|\(\d+, \d+\)", title) for title in charts)


def test_charts_only_for_what_is_logged():
    (charts,) = dashboard.chart_layout("f", positions=1, axes=2, target=False, effective=True).values()
    assert not any("target" in title for title in charts) and "f · pos0 · effective extent / theoretical size" in charts
    (charts,) = dashboard.chart_layout("f", positions=1, axes=3, target=True, effective=False).values()
    assert list(charts) == [f"f · pos0 · size along {axis}" for axis in "dhw"]  # coverage needs the effective field
    (charts,) = dashboard.chart_layout("f", positions=1, axes=2).values()
    assert charts["f · pos0 · covers the target (1 = yes)"] == ["^rf/f/pos0/target/covered$"]
    assert charts["f · pos0 · margin: effective extent − target"] == ["^rf/f/pos0/target/margin$"]


def test_chart_regexes_escape_the_layer_name():
    (charts,) = dashboard.chart_layout("backbone.layer4", positions=2, axes=1).values()
    (regex,) = charts["backbone.layer4 · pos1 · size along l"]
    assert re.match(regex, "rf/backbone.layer4/pos1/size_l/effective")
    assert not re.match(regex, "rf/backboneXlayer4/pos1/size_l/effective")


def test_positions_note_names_each_index_its_cell(fields):
    theoretical, _ = fields
    note = dashboard.positions_note("features", [theoretical, theoretical], (16, 16))
    assert "- **pos0**: output cell (4, 4)" in note and "- **pos1**: output cell (4, 4)" in note
    assert f"theoretical field {theoretical.size[0]} × {theoretical.size[1]}" in note
    assert note.endswith("Target object size: 16 × 16.")
