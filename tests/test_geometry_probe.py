"""The geometry (r, S, P) is measured only when asked for, on thin inputs, and equals the closed form where every
field on the given input is clipped; where the thin reading's assumption fails, the exact reading takes over."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from rf_callback import probe_rf, rf_table
from rf_callback.core import geometry_flow
from rf_callback.core.geometry import AxisGeometry, chain_geometry
from rf_callback.core.geometry_probe import ELSEWHERE, TOO_FEW_WHOLE
from rf_callback.core.graph import ProbeGraph
from rf_callback.core.request import ProbeRequest
from tests.chains import Layer, closed_form, runnable
from tests.models import TinyResNet, TinyUNet, gated, seed_readme_convs
from tests.test_probe_closed_form import chains

SEEN_SHAPES: list[tuple[int, ...]] = []


class ShapeRecorder(nn.Module):
    """Records the shape of every input it sees in a module-level list, which deep copies share."""

    def forward(self, x):
        SEEN_SHAPES.append(tuple(x.shape))
        return x


def recorded(*layers: nn.Module) -> nn.Sequential:
    SEEN_SHAPES.clear()
    return nn.Sequential(ShapeRecorder(), *layers)


@pytest.fixture(autouse=True)
def measured_geometry(monkeypatch):
    """The geometry is measured on thin inputs here (the tests of the flow below turn it on)."""
    monkeypatch.setattr(geometry_flow, "ENABLED", False)


def count_graphs(monkeypatch) -> list[tuple[int, ...]]:
    shapes = []
    init = ProbeGraph.__init__
    monkeypatch.setattr(
        ProbeGraph,
        "__init__",
        lambda self, m, request, **k: shapes.append(request.input_shape) or init(self, m, request, **k),
    )
    return shapes


def geometry_triples(field) -> list[tuple[int, int, int] | None]:
    return [None if g is None else (g.size, g.stride, g.offset) for g in field.geometry]


@settings(max_examples=25, deadline=None)
@given(layers=chains(1) | chains(2), data=st.data())
def test_geometry_of_clipped_chains_equals_closed_form(layers, data):
    n_axes = len(layers[0].kernel)
    expected = [closed_form(layers, a) for a in range(n_axes)]
    # Inputs shorter than the field on at least one axis: every field is clipped there.
    lengths = tuple(data.draw(st.integers(max(4, r // 4), max(4, r - 1))) for r, _, _ in expected)
    assume(any(length < r for length, (r, _, _) in zip(lengths, expected)))
    model, shape, _ = runnable(layers, lengths)
    try:
        field = probe_rf(model, shape, "center")
    except Exception as error:  # a centre that sees only padding is refused, and tested elsewhere
        assume("padding" not in str(error))
        raise
    assert geometry_triples(field) == expected


def test_a_trivial_axis_keeps_its_geometry_where_the_other_axis_leaves_its_ends_empty():
    """A draw of the test above: rows 0 and 3 read input rows -8, -2 and 4 (dilation 3 after a stride of 2), none of
    them inside the 4 rows, so the fields at the ends of H are empty. The W axis's border check reads the centre
    column there; before, it took that emptiness for a field that strays from (1, 1, 0) and offered no W geometry."""
    model, shape, _ = runnable(
        [Layer("max", (1, 1), (2, 1), (0, 0), (1, 1)), Layer("conv", (3, 1), (1, 1), (4, 0), (3, 1))], (4, 4)
    )
    field = probe_rf(model, shape, "center")
    assert geometry_triples(field) == [(13, 2, 8), (1, 1, 0)]
    assert field.geometry.reasons == (None, None)


@pytest.mark.parametrize("n_axes", [1, 2, 3])
def test_geometry_of_dilated_strided_stack_clipped_on_every_axis(n_axes):
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n_axes - 1]
    layers = [conv(1, 1, 3, stride=2, padding=2, dilation=2), conv(1, 1, 3, padding=3, dilation=3)]
    layers += [conv(1, 1, 5, stride=2, padding=2), conv(1, 1, 3, padding=4, dilation=4)]
    expected = chain_geometry([(3, 2, 2, 2), (3, 1, 3, 3), (5, 2, 2, 1), (3, 1, 4, 4)])
    assert (expected.size, expected.stride, expected.offset) == (57, 4, 28)  # 1 + 4 + 12 + 8 + 32; 2 + 6 + 4 + 16
    field = probe_rf(nn.Sequential(*layers), (1, 1, *([16] * n_axes)), "center")
    assert all(first <= 1 and last >= 14 for first, last in field.bounds)  # clipped: the span is 57 long
    assert field.geometry == (expected,) * n_axes


def test_residual_network_clipped_on_a_small_input_gets_the_hand_derived_geometry():
    # TinyResNet's layer2: r = 25, S = 4, P = 12 (derived in tests/models.py); the input is 12 x 10.
    field = probe_rf(TinyResNet(), (1, 3, 12, 10), "center", layer="layer2")
    assert field.bounds == ((0, 11), (0, 9))
    assert geometry_triples(field) == [(25, 4, 12), (25, 4, 12)]


def test_thin_input_where_a_dilated_branch_sees_only_padding_falls_back_to_the_exact_field():
    class TwoBranch(nn.Module):
        # Branch a reads columns j - 3 and j + 3 only: on an input a few columns wide it reads only padding, and a
        # field read there would miss its 9 rows (branch b alone spans 7).
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 1, (9, 2), dilation=(1, 6), padding=(4, 3))
            self.b = nn.Conv2d(1, 1, (7, 1), padding=(3, 0))

        def forward(self, x):
            return self.a(x) + self.b(x)

    clipped = probe_rf(TwoBranch(), (1, 1, 6, 32), "center")
    assert clipped.bounds[0] == (0, 5)
    whole = probe_rf(TwoBranch(), (1, 1, 40, 32), "center")
    assert geometry_triples(clipped) == geometry_triples(whole) == [(9, 1, 4), (7, 1, 3)]


def test_upsampling_path_has_no_geometry_even_when_clipped():
    assert probe_rf(TinyUNet(), (1, 1, 6, 6), "center").geometry == (None, None)


@pytest.mark.parametrize("mode, batch", [("theoretical", 1), ("weights", 8)])
def test_bounds_and_heatmaps_cost_one_forward_on_the_given_shape_and_one_backward_per_position(
    mode, batch, monkeypatch
):
    passes = []
    gradient_map = ProbeGraph.gradient_map
    monkeypatch.setattr(
        ProbeGraph, "gradient_map", lambda self, p, *rest: passes.append(len(p)) or gradient_map(self, p, *rest)
    )
    model = recorded(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3))
    fields = probe_rf(model, (1, 3, 40, 40), [(1, 1), (4, 4), (6, 2)], mode=mode)
    assert SEEN_SHAPES == [(batch, 3, 40, 40)]  # no call moved dim 1: no layout check at another size
    assert passes == [1, 1, 1]
    assert not any(f.geometry.measured for f in fields)
    assert fields[1].bounds == ((16, 28), (16, 28)) and fields[0].heatmap.shape == (40, 40)  # r = 1 + 2 + 2 + 8
    assert fields[2].stride == (4, 4)  # measured now, once for all three fields, on other shapes
    assert fields[1].geometry.measured and len(set(SEEN_SHAPES)) > 1


def test_geometry_is_measured_once_and_str_measures_it():
    model = recorded(nn.Conv1d(1, 1, 5, stride=2), nn.Conv1d(1, 1, 5))  # r = 1 + 4 + 4 * 2 = 13, S = 2, P = 0
    field = probe_rf(model, (1, 1, 20), 1)
    assert not field.geometry.measured and SEEN_SHAPES == [(1, 1, 20)]
    assert field.describe(stride=False) == "RF of the output at (1,): 13 (input 2..14) [theoretical]"
    assert not field.geometry.measured
    assert str(field) == "RF of the output at (1,): 13 (input 2..14), stride 2 [theoretical]"
    count = len(SEEN_SHAPES)
    assert field.offset == (0,) and field.span == ((2, 14),) and len(SEEN_SHAPES) == count
    assert "span" not in field.to_dict(geometry=False)
    assert field.to_dict()["geometry"] == [{"size": 13, "stride": 2, "offset": 0}]


def test_table_rows_carry_the_unclipped_size_beside_the_clipped_bounds():
    rows = {r.name: r for r in rf_table(TinyResNet(), (1, 3, 12, 10))}
    assert rows["layer2"].size == (12, 10) and rows["layer2"].covers_input
    assert rows["layer2"].full_size == (25, 25) and rows["layer2"].stride == (4, 4)
    assert rows["stem.0"].full_size == (3, 3) == rows["stem.0"].size


def test_fixed_size_output_has_no_geometry_and_is_not_read_on_enlarged_inputs(monkeypatch):
    # An adaptive pool to 8 x 8 is the identity on this input and pools on a longer one: no single (r, S, P)
    # describes the fields across input lengths, and reading them on inputs enlarged in every axis would cost the
    # most for nothing.
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3, padding=1))
    shapes = count_graphs(monkeypatch)
    field = probe_rf(nn.Sequential(*model, nn.AdaptiveAvgPool2d((8, 8))), (1, 1, 16, 16), "center")
    assert field.bounds == ((5, 12), (5, 12)) and field.geometry == (None, None)
    assert max(s[2] * s[3] for s in shapes) <= 16 * 64  # thin inputs only, never 32 x 32 or larger in both axes


@pytest.mark.parametrize(
    ("pool", "input_shape", "fixed"),
    [
        (nn.AdaptiveAvgPool2d((1, None)), (1, 1, 16, 40), (True, False)),  # a text line's height (CRNN)
        (nn.AdaptiveMaxPool2d((None, 3)), (1, 1, 16, 40), (False, True)),
        (nn.AdaptiveAvgPool3d((2, None, None)), (1, 1, 8, 12, 12), (True, False, False)),  # a clip's time
    ],
)
def test_adaptive_pooling_that_keeps_an_axis_keeps_that_axis_geometry(pool, input_shape, fixed):
    # None in output_size leaves the axis's length free: its fields keep the convolutions' (r, S, P), while an axis
    # pooled to a fixed size has none.
    n = len(input_shape) - 2
    conv, max_pool = (nn.Conv2d, nn.MaxPool2d) if n == 2 else (nn.Conv3d, nn.MaxPool3d)
    model = nn.Sequential(conv(1, 2, 3, padding=1), nn.ReLU(), max_pool(2), conv(2, 2, 3, padding=1), pool)
    for pos in ("center", "all"):
        field = probe_rf(model, input_shape, pos)
        for axis, is_fixed in enumerate(fixed):
            if is_fixed:
                assert field.geometry[axis] is None and "adaptive pooling" in field.geometry.reasons[axis]
            else:
                assert field.geometry[axis] == AxisGeometry(8, 2, 3)  # 3 + 1 + 2 * 2; S = 2; P = 1 + 2 * 1


class _StackedViews(nn.Module):
    """The top half of the map is a 3 x 3 conv of the top half of the input, the bottom half a 5 x 5 conv's."""

    def __init__(self):
        super().__init__()
        self.top, self.bottom = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(2, 4, 5, padding=2)

    def forward(self, x):
        half = x.shape[-2] // 2
        return torch.cat([self.top(x[..., :half, :]), self.bottom(x[..., half:, :])], -2)


class _Stripes(nn.Module):
    """Even rows from a 3 x 3 conv, odd rows from a 5 x 5 one: ``torch.where`` with a fixed mask of rows."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(2, 4, 5, padding=2)

    def forward(self, x):
        even = (torch.arange(x.shape[-2]) % 2 == 0).view(1, 1, -1, 1)
        return torch.where(even, self.a(x), self.b(x))


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
@pytest.mark.parametrize(
    "pos", ["center", (3, 5), (3, 6), (4, 6), [(3, 5), (10, 5)], [(10, 5), (3, 5)], "all"], ids=str
)
@pytest.mark.parametrize("make", [_StackedViews, _Stripes])
def test_fields_that_depend_on_another_axis_index_have_no_geometry(make, pos, mode):
    """No (r, S, P) holds along either axis: the fields are 3 or 5 wide by the row. Each was reported by some
    choice of positions: (5, 1, 2) read at the centre (the flow took where()'s hull), at (3, 6) (the centre's field
    of column 6 stood for the probed one's), in weights mode (checked on the first position's theoretical field
    alone), or by a list's order, while its span disagreed with a field inside the input."""
    torch.manual_seed(0)
    result = probe_rf(make(), (1, 2, 14, 12), pos, mode=mode)
    assert tuple((result[0] if isinstance(result, list) else result).geometry) == (None, None)


@pytest.mark.parametrize("flow", [True, False])
def test_a_single_position_that_picks_another_branch_leaves_no_geometry(flow, monkeypatch):
    """Index 3 alone reads a 5-wide conv, the others a 3-wide one: the centre probe read (3, 1, 1) off the thin
    input's lattice, which holds every 11th index and missed index 3, whose field 1..5 its span (2, 4) contradicts."""

    class OneIndex(nn.Module):
        def __init__(self):
            super().__init__()
            self.narrow, self.wide = nn.Conv1d(2, 2, 3, padding=1), nn.Conv1d(2, 2, 5, padding=2)

        def forward(self, x):
            picked = (torch.arange(x.shape[2]) == 3).view(1, 1, -1)
            return torch.where(picked, self.wide(x), self.narrow(x))

    monkeypatch.setattr(geometry_flow, "ENABLED", flow)
    for pos, mode in itertools.product(("center", 3, "all"), ("theoretical", "weights")):
        result = probe_rf(OneIndex(), (1, 2, 13), pos, mode=mode)
        assert tuple(result.geometry) == (None,)
        assert "by position" in result.geometry.reasons[0]


class Stitched(nn.Module):
    """Rows 8..10 from a (1, 7) convolution, the others from a 3 x 3 one (``join``: "cat" or "where"); or one
    branch's rows joined again ("padded": a reflection made of border slices; "chunks": halves rejoined in order);
    or a stitch in a side branch the output does not read ("aside")."""

    def __init__(self, join: str):
        super().__init__()
        self.square, self.line = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, (1, 7), padding=(0, 3))
        self.tall = nn.Conv2d(3, 4, (7, 3), padding=(3, 1))
        self.out, self.join, self.aside = nn.Identity(), join, None

    def forward(self, x):
        square, line = self.square(x), self.line(x)
        if self.join == "tall":  # rows 8..10 taller, as wide
            return self.out(torch.cat([square[:, :, :8], self.tall(x)[:, :, 8:11], square[:, :, 11:]], 2))
        if self.join == "tiles":  # the same convolution on two overlapping tiles, joined without a seam
            return self.out(torch.cat([self.square(x[..., :14])[..., :12], self.square(x[..., 10:])[..., 2:]], 3))
        if self.join == "rolled":  # the first column put back through a roll
            return self.out(torch.cat([square.roll(1, -1)[..., 1:2], square[..., 1:]], 3))
        if self.join == "scaled":  # the first column scaled
            return self.out(torch.cat([square[..., :1] * 0.5, square[..., 1:]], 3))
        stitched = torch.cat([square[:, :, :8], line[:, :, 8:11], square[:, :, 11:]], 2)
        if self.join == "cat":
            return self.out(stitched)
        if self.join == "where":
            rows = torch.zeros(x.shape[-2], 1, dtype=torch.bool)
            rows[8:11] = True
            return self.out(torch.where(rows, line, square))
        if self.join == "padded":
            return self.out(torch.cat([square[:, :, 1:2], square, square[:, :, -2:-1]], 2)[:, :, 1:-1])
        if self.join == "chunks":
            return self.out(torch.cat(square.chunk(2, dim=3), 3))
        if self.join == "shifted":  # one branch written into zeros, a row down
            shifted = torch.zeros_like(square)
            shifted[:, :, 1:] = square[:, :, :-1]
            return self.out(shifted[:, :, 1:])
        if self.join == "aside":
            self.aside = stitched.sum()  # read by no later layer
            return self.out(square)
        return self.out(_written(self.join, square, line))


def _written(how: str, square: torch.Tensor, line: torch.Tensor) -> torch.Tensor:
    """Rows 8..10 of ``line`` written into ``square``'s other rows, as ``how`` spells the write."""
    rows = torch.tensor([8, 9, 10])
    if how == "setitem":
        joined = square.clone()
        joined[:, :, 8:11] = line[:, :, 8:11]
        return joined
    if how == "copy_":
        joined = square.clone()
        joined[:, :, 8:11].copy_(line[:, :, 8:11])
        return joined
    if how == "slice_scatter":
        return torch.slice_scatter(square, line[:, :, 8:11], dim=2, start=8, end=11)
    if how == "index_copy":
        return square.index_copy(2, rows, line[:, :, 8:11])
    if how == "scatter":
        index = rows.view(1, 1, 3, 1).expand(square.shape[0], square.shape[1], 3, square.shape[3])
        return square.scatter(2, index, line[:, :, 8:11])
    if how == "cat_by_keyword":
        return torch.cat(tensors=[square[:, :, :8], line[:, :, 8:11], square[:, :, 11:]], dim=2)
    picked = torch.zeros(square.shape[2], dtype=torch.bool)
    picked[8:11] = True
    if how == "mask_setitem":
        joined = square.clone()
        joined[:, :, picked] = line[:, :, picked]
        return joined
    if how == "blend":  # by a fixed mask of rows
        weight = picked.float().view(-1, 1)
        return square * (1 - weight) + line * weight
    mask = torch.zeros(square.shape, dtype=torch.bool)
    mask[:, :, 8:11] = True
    return square.masked_scatter(mask, line[:, :, 8:11])


@pytest.mark.parametrize("flow", [True, False])
@pytest.mark.parametrize(
    "join",
    [
        "cat", "where", "setitem", "copy_", "slice_scatter", "index_copy", "masked_scatter", "scatter",
        "cat_by_keyword", "mask_setitem", "blend",
    ],
)  # fmt: skip
def test_rows_stitched_from_two_branches_have_no_geometry_in_probes_and_tables(join, flow, monkeypatch):
    """Rows 8..10 read 1 x 7 fields, the others 3 x 3: the centre probe of the ``cat`` or of a write of one
    branch's rows into the other gave (3, 1, 1) on both axes (its checks read the centre, the ends, the borders and
    every 11th row, none of those rows), and rf_table's row after any of the joins did too, whose span (8, 10) at
    row 9 its field (9, 9) contradicts."""
    monkeypatch.setattr(geometry_flow, "ENABLED", flow)
    for pos, mode in itertools.product(("center", (0, 0)), ("theoretical", "weights")):
        field = probe_rf(Stitched(join), (1, 3, 24, 24), pos, mode=mode)
        assert tuple(field.geometry) == (None, None)
        call = {"setitem": "__setitem__", "mask_setitem": "__setitem__", "cat_by_keyword": "cat", "blend": "mul"}
        assert (
            f"{call.get(join, join)}() " in field.geometry.reasons[0]
            and "lies on the path" in field.geometry.reasons[0]
        )
        assert "chosen by position" in field.geometry.reasons[0]
    row = [r for r in rf_table(Stitched(join), (1, 3, 24, 24)) if r.name == "out"][0]
    assert row.full_size == row.stride == row.offset == (None, None)
    assert probe_rf(Stitched(join), (1, 3, 24, 24), (9, 12)).bounds == ((9, 9), (9, 15))


def test_rows_stitched_taller_but_as_wide_keep_the_geometry_of_the_columns():
    """Every index of every axis is checked after a stitch: rows 8..10 are 7 tall, so the rows have no geometry;
    every row's columns are 3 wide, so the columns keep (3, 1, 1)."""
    field = probe_rf(Stitched("tall"), (1, 3, 24, 24), "center")
    assert tuple(field.geometry) == (None, AxisGeometry(3, 1, 1))
    assert "lies on the path" in field.geometry.reasons[0]


def test_checking_every_index_after_a_pick_stops_at_its_pass_limit():
    """The left half reads a convolution as wide as the input, the right half a 1 x 1 one: the centre's field
    (1 wide) planned two passes, and the table took a thousand on a 1024-long input. It stops at 64 passes, and the
    reason says so."""

    class HalfWide(nn.Module):
        def __init__(self, length: int):
            super().__init__()
            self.point, self.wide = nn.Conv1d(1, 1, 1), nn.Conv1d(1, 1, 2 * length - 1, padding=length - 1)
            self.left = torch.arange(length) < length // 2

        def forward(self, x):
            return torch.where(self.left, self.wide(x), self.point(x))

    model = HalfWide(512)
    field = probe_rf(model, (1, 1, 512), "center")
    passes = []
    original = ProbeGraph.gradient_map

    def counted(self, *args, **kwargs):
        passes.append(1)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProbeGraph, "gradient_map", counted)
        assert tuple(field.geometry) == (None,)
    assert "more than 64 passes" in field.geometry.reasons[0] and len(passes) < 100


def test_a_constant_mask_that_empties_the_first_outputs_keeps_the_geometry():
    """A causal stack whose first three outputs a buffer masks: their fields are empty, which leaves no full table;
    a product by a constant's zeros is then read as before (4, 1, 3), not dropped as a branch chosen by position."""

    class CausalMasked(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Conv1d(1, 8, 2), nn.Conv1d(8, 8, 2, dilation=2)
            mask = torch.ones(64)
            mask[:3] = 0
            self.register_buffer("mask", mask)

        def forward(self, x):
            return self.second(F.pad(F.relu(self.first(F.pad(x, (1, 0)))), (2, 0))) * self.mask

    for mode in ("theoretical", "weights"):
        assert tuple(probe_rf(CausalMasked(), (1, 1, 64), mode=mode).geometry) == (AxisGeometry(4, 1, 3),)


@pytest.mark.parametrize("join", ["padded", "chunks", "shifted", "aside", "tiles", "rolled", "scaled"])
def test_rows_of_one_branch_joined_again_keep_their_geometry(join):
    """Slices of one tensor joined again (a reflection made of its border rows, cropped again; halves rejoined in
    order; its rows written a row down into zeros, cropped; a column put back through a roll, or scaled), the same
    convolution on overlapping tiles joined without a seam, or a stitch the output does not read: every field is
    3 x 3, checked at every index where a join may pick, and the geometry stands."""
    field = probe_rf(Stitched(join), (1, 3, 24, 24), "center")
    assert tuple(field.geometry) == (AxisGeometry(3, 1, 1),) * 2
    row = [r for r in rf_table(Stitched(join), (1, 3, 24, 24)) if r.name == "out"][0]
    assert row.full_size == (3, 3) and row.stride == row.offset == (1, 1)


class Reordered(nn.Module):
    """A 3 x 3 convolution, then the columns picked by a fixed index, spelt ``how``."""

    def __init__(self, how: str, index: torch.Tensor):
        super().__init__()
        self.how, self.index, self.conv = how, index, nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        y, index = self.conv(x), self.index
        if self.how == "getitem":
            return y[..., index]
        if self.how == "list":
            return y[:, :, :, index.tolist()]
        if self.how == "index_select":
            return y.index_select(-1, index)
        if self.how == "gather":
            return y.gather(3, index.expand(*y.shape[:3], -1))
        if self.how == "take_along_dim":
            return torch.take_along_dim(y, index.view(1, 1, 1, -1), dim=3)
        return y[..., torch.isin(torch.arange(y.shape[-1]), index)]  # a fixed mask


def _swapped(length: int, first: int, second: int) -> torch.Tensor:
    index = torch.arange(length)
    index[first], index[second] = second, first
    return index


@pytest.mark.parametrize("how", ["getitem", "list", "index_select", "gather", "take_along_dim"])
def test_columns_in_a_fixed_order_other_than_a_slice_have_no_geometry(how):
    """Columns 5 and 10 swapped by a fixed index: column 5 reads 9..11, column 10 reads 4..6. The centre probe gave
    (3, 1, 1) on both axes (its checks read the centre, the ends and the borders, not those columns), whose span
    (4, 6) at column 5 its field contradicts; rf_table's row did too. The rows keep theirs."""
    model = Reordered(how, _swapped(16, 5, 10))
    for mode in ("theoretical", "weights"):
        field = probe_rf(model, (1, 1, 16, 16), "center", mode=mode)
        assert tuple(field.geometry) == (AxisGeometry(3, 1, 1), None)
        assert "by a fixed index" in field.geometry.reasons[1] and "lies on the path" in field.geometry.reasons[1]
    assert probe_rf(model, (1, 1, 16, 16), (8, 5)).bounds == ((7, 9), (9, 11))
    row = [r for r in rf_table(model, (1, 1, 16, 16)) if r.name == "conv"][0]
    assert row.full_size == (3, 3)  # before the pick
    assert probe_rf(model, (1, 1, 16, 16), "center").stride == (1, None)


@pytest.mark.parametrize("how", ["getitem", "index_select", "gather", "take_along_dim", "mask"])
def test_columns_picked_in_even_steps_keep_their_geometry(how):
    """Every other column by a fixed index or mask reads as the slice ``[..., 1::2]`` does: (3, 2, 0)."""
    field = probe_rf(Reordered(how, torch.arange(1, 16, 2)), (1, 1, 16, 16), "center")
    assert tuple(field.geometry) == (AxisGeometry(3, 1, 1), AxisGeometry(3, 2, 0))


class _Rejoined(nn.Module):
    """One tensor's slices joined again out of their order: ``how`` is ``"swap"`` (outputs 4 and 5 swapped inside a
    border padded by 6), ``"flip"`` (row 1 flipped along the width), ``"gap"`` (row 5 left out) or ``"chunks"``
    (halves joined again in order)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv1d(1, 1, 3) if how == "swap" else nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        if self.how == "swap":
            y = self.conv(F.pad(x, (6, 6)))
            return torch.cat([y[..., :4], y[..., 5:6], y[..., 4:5], y[..., 6:]], -1)
        y = self.conv(x)
        if self.how == "flip":
            return torch.cat([y[:, :, :1], y[:, :, 1:2].flip(-1), y[:, :, 2:]], 2)
        if self.how == "gap":
            return torch.cat([y[:, :, :5], y[:, :, 6:]], 2)
        if self.how == "reflect":  # a padding made of border rows, then a convolution that reads it
            return self.conv(torch.cat([y[:, :, 1:3].flip(2), y, y[:, :, -3:-1].flip(2)], 2))
        if self.how == "replicate":
            return self.conv(torch.cat([y[:, :, :1], y[:, :, :1], y, y[:, :, -1:]], 2))
        if self.how == "symmetric":  # by an index, as torchvision's symmetric padding does
            index = torch.cat([torch.tensor([1, 0]), torch.arange(y.shape[2]), torch.tensor([y.shape[2] - 1])])
            return self.conv(y[:, :, index])
        if self.how == "tokens":  # two constant tokens before the rows
            token = torch.zeros_like(y[:, :, :1])
            return self.conv(torch.cat([token, token + 1, y], 2))
        return torch.cat(y.split([5, 7], dim=2), 2)


@pytest.mark.parametrize(("how", "shape", "axis"), [("swap", (1, 1, 20), 0), ("flip", (1, 1, 12, 14), 1),
                                                    ("gap", (1, 1, 12, 14), 0)])  # fmt: skip
def test_slices_of_one_tensor_joined_out_of_order_have_no_geometry_there(how, shape, axis):
    """Outputs 4 and 5 swapped read 1..1 and 0..1 against spans clipped to 0..0 and 0..1 of (3, 1, 6); a row flipped
    reads columns 5..7 at column 7 for a span of 6..8; a row left out shifts the rows after it. The centre probe
    gave the geometry of the tensor they were cut from (its border checks read the ends, not those indices; the
    row's flip lies on another axis); every index is measured now."""
    field = probe_rf(_Rejoined(how), shape, "center")
    assert field.geometry[axis] is None
    assert "out of their order" in field.geometry.reasons[axis]


@pytest.mark.parametrize(
    ("how", "rows"),
    [("chunks", (3, 1, 1)), ("reflect", None), ("replicate", None), ("symmetric", None), ("tokens", (5, 1, 4))],
)  # fmt: skip
def test_slices_of_one_tensor_joined_in_order_keep_the_geometry_without_a_pick(how, rows):
    """Pieces split and joined again in order read as the tensor they were cut from; a padding before and after
    them (border rows reflected or repeated, by a cat or an index; constant tokens) is read at the axis's ends, as
    ``F.pad``'s is (a reflection folds the end rows' fields: no geometry, as after ``F.pad(mode="reflect")``). The
    first version took each for a pick: every index measured, and on a 128 x 128 input with 12 convolutions the
    64-pass limit left (77, 4, 38) as None."""
    model = _Rejoined(how)
    field = probe_rf(model, (1, 1, 12, 14), "center")
    columns = AxisGeometry(3, 1, 1) if how == "chunks" else AxisGeometry(5, 1, 2)
    assert tuple(field.geometry) == (None if rows is None else AxisGeometry(*rows), columns)
    if rows is None:
        assert "at an end of the axis" in field.geometry.reasons[0]
    assert not ProbeGraph(model, ProbeRequest.checked(model, (1, 1, 12, 14))).position_picks


class _PaddedByPieces(nn.Module):
    """A convolution, a padding made of ``pad(y)``'s pieces of its output, then six 3-wide convolutions."""

    def __init__(self, pad):
        super().__init__()
        self.pad, self.first = pad, nn.Conv1d(2, 4, 3, padding=1)
        self.rest = nn.Sequential(*[nn.Conv1d(4, 4, 3, padding=1) for _ in range(6)])

    def forward(self, x):
        return self.rest(self.pad(self.first(x)))


def _reflected(y: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([y[..., 1 : width + 1].flip(-1), y, y[..., -width - 1 : -1].flip(-1)], -1)


@pytest.mark.parametrize(
    "pad",
    [
        lambda y: F.pad(_reflected(y, 3), (12, 12)),  # a reflection by pieces, then zeros
        lambda y: F.pad(torch.cat([y[..., :1].expand(1, 4, 2), y, y[..., -1:].expand(1, 4, 2)], -1), (6, 6)),
        lambda y: F.pad(y[..., torch.cat([torch.tensor([2, 1]), torch.arange(64), torch.tensor([62, 61])])], (6, 6)),
        lambda y: torch.cat([y, y[..., 52:56], torch.zeros_like(y[..., :20])], -1),  # an interior slice: no padding
        lambda y: torch.cat([y, y], -1),  # a tiling
    ],
    ids=["reflected then zeros", "replicated then zeros", "symmetric index then zeros", "interior slice", "tiled"],
)
def test_a_geometry_after_a_padding_made_of_pieces_holds_at_every_index(pad):
    """A padding made of the tensor's own border pieces is read at the axis's ends index by index, as F.pad's
    reflections are: followed by zeros, the outermost index reads only zeros and the band read as a union hid the
    folded fields (a reflection by pieces then 12 zeros gave (15, 1, 22), where index 8 reads 0..4 for a span
    clipped to 0..0). Every geometry given must hold at every index."""
    model = _PaddedByPieces(pad)
    field = probe_rf(model, (1, 2, 64), "center")
    geometry = field.geometry[0]
    if geometry is None:
        return
    every = probe_rf(model, (1, 2, 64), "all")
    for index, (first, last) in enumerate(zip(every.first[:, 0].tolist(), every.last[:, 0].tolist())):
        clipped = max(geometry.span(index)[0], 0), min(geometry.span(index)[1], 63)
        if clipped[0] > clipped[1]:
            assert first > last, index  # no field where the span lies outside the input
        else:
            assert (first, last) == clipped, index


def test_a_padding_cut_from_the_other_half_of_a_split_is_no_border():
    """The halves of a split share one autograd node: a piece of the first half (its index 0, 29 positions from the
    core's start) passed for a border piece of the second, and (7, 1, -23) was given where index 1 reads 0..29
    against a span of 24..30. The halves are told apart now, and the pieces are a pick."""

    class OtherHalf(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.last = nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(4, 4, 5)

        def forward(self, x):
            head, tail = self.first(x).split(32, -1)
            pieces = [head[..., -8:-3], head[..., 0:1], head[..., -2:], tail[..., :16], tail[..., 16:]]
            return self.last(torch.cat(pieces, -1))

    field = probe_rf(OtherHalf(), (1, 2, 64), "center")
    assert field.geometry[0] is None and "out of their order" in field.geometry.reasons[0]
    assert probe_rf(OtherHalf(), (1, 2, 64), 1).bounds == ((0, 29),)


def test_a_gather_whose_columns_shift_from_row_to_row_has_no_column_geometry():
    """A shear (row i reads columns j + i // 4): every row's index steps evenly, but not from the same first column."""
    shear = (torch.arange(16).view(-1, 1) // 4 + torch.arange(16)).clamp(max=15)

    class Sheared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            return self.conv(x).gather(3, shear.expand(1, 1, 16, 16))

    assert probe_rf(Sheared(), (1, 1, 16, 16), "center").geometry[1] is None


def test_where_with_a_fixed_condition_reads_the_branch_it_picks():
    """A condition that picks one branch everywhere gives that branch's field (the flow took the hull of both); a
    condition made from the input may pick either, so the field is the hull."""

    class Picked(_Stripes):
        def __init__(self, condition):
            super().__init__()
            self.condition = condition

        def forward(self, x):
            a, b = self.a(x), self.b(x)
            mask = torch.ones(a.shape, dtype=torch.bool) if self.condition == "fixed" else a > 0
            return torch.where(mask, a, b)

    assert probe_rf(Picked("fixed"), (1, 2, 14, 12)).geometry == (AxisGeometry(3, 1, 1),) * 2
    assert probe_rf(Picked("input"), (1, 2, 14, 12)).geometry == (AxisGeometry(5, 1, 2),) * 2


class _HardGate(nn.Module):
    """Three 3 x 3 convs gated by a hard mask, from a dilated context path (r = 63) or from their own mean."""

    def __init__(self, gate: str):
        super().__init__()
        self.gate = gate
        self.local = nn.Sequential(*[nn.Conv2d(1 if i == 0 else 4, 4, 3, padding=1) for i in range(3)])
        self.context = nn.Sequential(
            *[nn.Conv2d(1 if i == 0 else 4, 4, 3, padding=2**i, dilation=2**i) for i in range(5)]
        )

    def forward(self, x):
        y = self.local(x)
        mask = self.context(x) > 0 if self.gate == "context" else y > y.mean(dim=(2, 3), keepdim=True)
        return y * mask if self.gate != "where" else torch.where(condition=self.context(x) > 0, input=y, other=y * 2)


@pytest.mark.parametrize("flow", [True, False])
@pytest.mark.parametrize("gate", ["context", "mean", "where"])
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_hard_mask_adds_no_field_to_what_it_gates(gate, mode, flow, monkeypatch):
    """A mask passes no gradient: the field is the gated convs' (7, 1, 3). A flow that gave comparisons their
    operand's field reported the context's (63, 1, 31), or a global field for a gate by the mean; the measured
    reading took a mean that only a comparison reads for a coupling of the whole axis, on an input the field spans."""
    monkeypatch.setattr(geometry_flow, "ENABLED", flow)
    for shape in [(1, 1, 6, 6), (1, 1, 32, 32)]:
        field = probe_rf(_HardGate(gate), shape, mode=mode)
        assert field.geometry == (AxisGeometry(7, 1, 3),) * 2


def test_a_reduction_written_in_place_couples_the_whole_axis():
    """``z[:] = y.amax(...)`` returns nothing: the coupling it carries was never counted, and the axis was grown to
    32 times its length before it read "the field spans every input read"."""

    class WrittenMax(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            z = torch.zeros_like(y)
            z[:, :, :, :] = y.amax((2, 3), keepdim=True)
            return z + y

    geometry = probe_rf(WrittenMax(), (1, 1, 12, 12)).geometry
    assert tuple(geometry) == (None, None)
    assert all(reason.startswith("a amax() along the whole axis") for reason in geometry.reasons), geometry.reasons


def test_map_of_fields_whose_holes_the_input_hides_equals_the_exact_fields():
    # Output o reads inputs 3(o - 4), 3(o - 2) and 3o (a 1x1 stride-3 conv, then a 3-tap conv dilated by 2): on a
    # 7-long input the centre field is one pixel that looks whole; lattice passes spaced by it would interleave
    # the fields of o = 0 ({0}) and o = 4 ({0, 6}) and read 4 as (6, 6).
    model = nn.Sequential(nn.Conv2d(2, 2, 1, (3, 1)), nn.Conv2d(2, 2, (3, 1), padding=(4, 0), dilation=(2, 1)))
    fmap = probe_rf(model, (1, 2, 7, 6), "all")
    assert [fmap[i, 0].bounds[0] for i in range(7)] == [(0, 0), (3, 3), (0, 6), (3, 3), (0, 6), (3, 3), (6, 6)]


class _Period3(nn.Module):
    """Fields [i - 3, i + 3], and one more input (i + 4) at the outputs i = 2 (mod 3): no single (r, S, P)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(1, 1, 7, padding=3)

    def forward(self, x):
        shifted = F.pad(x, (0, 4))[..., 4:]
        extra = torch.zeros_like(shifted)
        extra[..., 2::3] = shifted[..., 2::3]
        return self.a(x) + extra


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_fields_that_repeat_with_a_period_have_no_geometry(mode):
    field = probe_rf(_Period3(), (1, 1, 24), 14, mode=mode)
    assert field.bounds == ((11, 18),) and field.geometry == (None,)


def test_a_named_table_row_that_shares_an_unlisted_rows_field_still_gets_its_geometry():
    model = nn.Sequential(nn.Conv2d(1, 4, 7, 2, 3), nn.Conv2d(4, 4, 7, padding=3), nn.Conv2d(4, 4, 7, padding=3),
                          nn.BatchNorm2d(4), nn.ReLU())  # fmt: skip
    (row,) = rf_table(model, (1, 1, 24, 24), layers=["3"])
    assert (row.size, row.full_size, row.stride) == ((24, 24), (31, 31), (2, 2))


# -- a field reports the model as it was probed, whatever happens to the live model afterwards (issue 15)


def convs_16() -> nn.Sequential:
    """Four 3 x 3 convolutions, the second strided: on 16 x 16 every field is clipped, so the geometry is read later.

    By hand, (k - 1) times the jumps 1, 1, 2, 2: r = 1 + 2 + 2 + 4 + 4 = 13, S = 2, P = 1 + 1 + 2 + 2 = 6; with a 7 x 7
    third convolution (padding 3), r = 1 + 2 + 2 + 12 + 4 = 21 and P = 1 + 1 + 6 + 2 = 10.
    """
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1),
    )


def _probed_unmeasured(model, mode="theoretical"):
    field = probe_rf(model, (1, 1, 16, 16), (4, 4), mode=mode)
    assert not field.geometry.measured
    return field


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_layer_replaced_after_the_probe_does_not_change_the_field_probed(mode):
    model = convs_16()
    field = _probed_unmeasured(model, mode)
    model[2] = nn.Conv2d(4, 4, 7, padding=3)  # the live model's field grows to 21
    assert geometry_triples(field) == [(13, 2, 6), (13, 2, 6)]
    assert str(field) == f"RF of the output at (4, 4): 13 x 13 (input 2..14, 2..14), stride 2 x 2 [{mode}]"
    assert geometry_triples(probe_rf(model, (1, 1, 16, 16), (4, 4))) == [(21, 2, 10), (21, 2, 10)]


def test_layers_deleted_after_the_probe_keep_the_fields_stride():
    model = convs_16()
    field = _probed_unmeasured(model)
    del model[1:]
    assert field.stride == (2, 2) and field.to_dict()["geometry"][0] == {"size": 13, "stride": 2, "offset": 6}


def test_a_model_moved_to_the_meta_device_after_the_probe_keeps_its_field_readable():
    model = convs_16()
    field = _probed_unmeasured(model)
    model.to("meta")
    assert field.span == ((2, 14), (2, 14)) and field.center == (8.0, 8.0)


def test_weights_changed_after_a_weights_probe_do_not_change_its_geometry():
    model = convs_16()
    field = _probed_unmeasured(model, "weights")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    assert geometry_triples(field) == [(13, 2, 6), (13, 2, 6)]


BLOCKS = {"count": 4}  # read by _ConvsOfAGlobalCount's forward


class _ConvsOfAGlobalCount(nn.Module):
    """``BLOCKS["count"]`` 3 x 3 convolutions (of 8 held): 4 give r = 9, S = 1, P = 4 by hand; 8 give r = 17, P = 8.

    This module's probes carry no geometry along the forward (see ``measured_geometry``): it is measured on first use.
    """

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(1, 1, 3, padding=1) for _ in range(8))

    def forward(self, x):
        for conv in self.convs[: BLOCKS["count"]]:
            x = conv(x)
        return x


class _ConvsOfAClassCount(_ConvsOfAGlobalCount):
    count = 4

    def forward(self, x):
        for conv in self.convs[: type(self).count]:
            x = conv(x)
        return x


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
@pytest.mark.parametrize("where", ["global", "class"])
def test_a_forward_whose_global_or_class_attribute_changed_after_the_probe_measures_no_other_network(where, mode):
    # The copy a field keeps holds the modules as probed, but its class code reads the globals and class attributes
    # as they are: the field probed with 4 convolutions reported the 8's r = 17, P = 8 (its bounds 0..15 are
    # clipped, so they fit either geometry). It says why it has none instead.
    model = _ConvsOfAGlobalCount() if where == "global" else _ConvsOfAClassCount()
    unchanged = probe_rf(model, (1, 1, 16, 16), (8, 8), mode=mode)
    field = probe_rf(model, (1, 1, 16, 16), (8, 8), mode=mode)
    assert not field.geometry.measured and field.bounds == ((4, 12), (4, 12))
    try:
        if where == "global":
            BLOCKS["count"] = 8
        else:
            _ConvsOfAClassCount.count = 8
        assert tuple(field.geometry) == (None, None)
        assert "the model's forward is no longer the one probed" in field.geometry.reasons[0]
        assert str(field) == f"RF of the output at (8, 8): 9 x 9 (input 4..12, 4..12) [{mode}]"
    finally:
        BLOCKS["count"] = _ConvsOfAClassCount.count = 4
    assert geometry_triples(unchanged) == [(9, 1, 4), (9, 1, 4)]  # read with the forward as probed


def test_the_theoretical_copy_a_field_keeps_holds_no_copy_of_the_weights():
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, stride=2, padding=1))
    field = probe_rf(model, (1, 64, 8, 8), (1, 1))
    skeleton = field.geometry._measure.__closure__  # the lazily measured geometry's kept state
    kept = [c.cell_contents for c in skeleton if isinstance(c.cell_contents, nn.Module)]
    assert kept and all(p.untyped_storage().nbytes() <= 8 for m in kept for p in m.parameters())
    assert field.stride == (2, 2)


# -- fields that span any input get None at once, and every reading is bounded (issue 14)


class GlobalContext(nn.Module):
    """A 1D convolution, then the map plus its mean along the sequence (global pooling broadcast back)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        return x + x.sum(dim=-1, keepdim=True)


class TokenAttention(nn.Module):
    """Global self-attention over the positions of a 1D map (softmax over all keys)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv1d(2, 4, 3, padding=1)

    def forward(self, x):
        tokens = self.embed(x).transpose(1, 2)
        return ((tokens @ tokens.transpose(1, 2)).softmax(-1) @ tokens).transpose(1, 2)


class FusedTokenAttention(TokenAttention):
    """The same attention in one fused call: ``F.scaled_dot_product_attention``, or ``nn.MultiheadAttention``."""

    def __init__(self, module: bool = False):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True) if module else None

    def forward(self, x):
        tokens = self.embed(x).transpose(1, 2)
        if self.attention is not None:
            return self.attention(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2)
        return F.scaled_dot_product_attention(tokens, tokens, tokens).transpose(1, 2)


class BandedAttention(nn.Module):
    """Three fused attentions, each over the keys within 3 positions (a band mask): a local field, r = 19."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv1d(2, 4, 1)

    def forward(self, x):
        tokens = self.embed(x).transpose(1, 2)
        index = torch.arange(tokens.shape[1])
        band = (index[:, None] - index[None, :]).abs() <= 3
        for _ in range(3):
            tokens = F.scaled_dot_product_attention(tokens, tokens, tokens, attn_mask=band)
        return tokens.transpose(1, 2)


class BiRecurrence(nn.Module):
    """A convolution, then a bidirectional recurrence along the sequence (batch first)."""

    def __init__(self, recurrence):
        super().__init__()
        self.conv, self.recurrence = (
            nn.Conv1d(2, 4, 3, padding=1),
            recurrence(4, 4, batch_first=True, bidirectional=True),
        )

    def forward(self, x):
        return self.recurrence(self.conv(x).transpose(1, 2))[0].transpose(1, 2)


def test_a_masked_fused_attention_is_no_global_coupling():
    """A fused attention counts as a softmax over every key only without a mask: a band keeps the field local."""
    field = probe_rf(BandedAttention(), (1, 2, 16))
    assert field.size == (16,) and geometry_triples(field) == [(19, 1, 9)]


@pytest.mark.parametrize(
    ("model", "shape", "call"),
    [
        (gated(1), (1, 3, 24, 24), "mean"),
        (GlobalContext(), (1, 2, 30), "sum"),
        (TokenAttention(), (1, 2, 30), "softmax"),
        # A fused attention's softmax is inside the call: it read thin inputs up to 32 times longer (PVT-v2: its
        # geometry cost 32 times its forward and backward pass, for "spans every input read").
        (FusedTokenAttention(), (1, 2, 30), "scaled_dot_product_attention"),
        (FusedTokenAttention(module=True), (1, 2, 30), "multi_head_attention_forward"),
        # A bidirectional recurrence read thin inputs up to 32 times longer too (timm's Sequencer2D: 5.8x).
        (BiRecurrence(nn.LSTM), (1, 2, 30), "lstm"),
        (BiRecurrence(nn.GRU), (1, 2, 30), "gru"),
    ],
)
def test_a_field_that_spans_any_input_gets_none_at_once_with_the_reason(model, shape, call, monkeypatch):
    passes = []
    gradient_map = ProbeGraph.gradient_map
    monkeypatch.setattr(
        ProbeGraph, "gradient_map", lambda self, p, *rest: passes.append(len(p)) or gradient_map(self, p, *rest)
    )
    field = probe_rf(model, shape)
    assert field.size == shape[2:]
    assert list(field.geometry) == [None] * len(shape[2:])
    assert all(f"a {call}() along the whole axis" in reason for reason in field.geometry.reasons)
    # The centre field on an input half as long on every axis decides for all axes at once (it grew 32 times
    # before, then read the whole table on inputs enlarged along every axis; then two thin inputs per axis).
    assert len(passes) <= 2


class OneSize(nn.Module):
    """Runs on one input size only (as timm's Swin and CoAtNet at their image size), around ``inner``."""

    def __init__(self, inner: nn.Module, size: tuple[int, ...]):
        super().__init__()
        self.inner, self.size = inner, size

    def forward(self, x):
        if tuple(x.shape[2:]) != self.size:
            raise ValueError(f"input size {tuple(x.shape[2:])} does not match the model ({self.size})")
        return self.inner(x)


def test_a_global_field_of_a_model_that_runs_on_one_input_size_is_none_at_once_with_the_reason(monkeypatch):
    # Every field spans the input, and no other input runs: no reading can tell a global field from r beyond the
    # input. It took an axis table of every index (12 backward passes on timm's CoAtNet) to say "no fit".
    passes = []
    gradient_map = ProbeGraph.gradient_map
    monkeypatch.setattr(
        ProbeGraph, "gradient_map", lambda self, p, *rest: passes.append(len(p)) or gradient_map(self, p, *rest)
    )
    field = probe_rf(OneSize(gated(1), (24, 24)), (1, 3, 24, 24))
    assert field.size == (24, 24) and list(field.geometry) == [None, None]
    assert all("the model runs on no input twice as long" in reason for reason in field.geometry.reasons)
    assert len(passes) <= 3  # the centre, then the fields of the first and the last output


def test_a_finite_field_of_a_model_that_runs_on_one_input_size_is_not_called_global():
    # r = 11 on an 11-pixel input: the centre field spans it, the end fields do not, so the fields are finite: the
    # table of the user's input is read (too clipped to fit here), and nothing says the field spans any input.
    chain = nn.Sequential(*[nn.Conv1d(1, 1, 3, padding=1) for _ in range(5)])
    field = probe_rf(OneSize(chain, (11,)), (1, 1, 11))
    assert field.bounds == ((0, 10),) and list(field.geometry) == [None]
    assert field.geometry.reasons == (TOO_FEW_WHOLE,)
    assert geometry_triples(probe_rf(OneSize(chain, (20,)), (1, 1, 20))) == [(11, 1, 5)]  # where fields fit inside


def test_a_coupling_of_one_axis_does_not_make_the_other_global_where_both_fields_span_the_input():
    # A mean over H, and along W a 1 x 19 kernel (r = 19 on a 16-pixel axis): both centre fields span the input, but
    # only H's span any input. The input half as long on both axes shows the mean's dim grow twice, not four times.
    class MeanOverH(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, (1, 19), padding=(0, 9))

        def forward(self, x):
            x = self.conv(x)
            return x + x.mean(2, keepdim=True)

    field = probe_rf(MeanOverH(), (1, 1, 16, 16))
    assert field.size == (16, 16)
    assert geometry_triples(field) == [None, (19, 1, 9)]
    assert "a mean() along the whole axis" in field.geometry.reasons[0]


def test_a_u_net_says_its_upsampling_gives_neighbours_the_same_field():
    # Its reason said "attention inside windows", for a network without attention.
    field = probe_rf(TinyUNet(), (1, 1, 32, 32))
    assert list(field.geometry) == [None, None]
    assert all("(an upsampling, or attention in windows)" in reason for reason in field.geometry.reasons)


def test_a_reduction_over_channels_alone_does_not_make_a_field_global():
    class ChannelContext(nn.Module):  # a map plus its mean over the channels: statistics of one pixel's channels
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            x = self.conv(x)
            return x + x.mean(1, keepdim=True)

    field = probe_rf(ChannelContext(), (1, 1, 2, 2))  # clipped: read on thin inputs, where the channel mean stays
    assert geometry_triples(field) == [(3, 1, 1), (3, 1, 1)]


def test_a_geometry_past_its_budget_is_none_and_says_so(monkeypatch):
    import rf_callback.core.geometry_probe as geometry_probe

    monkeypatch.setattr(geometry_probe, "BUDGET_PASSES", 1)
    monkeypatch.setattr(geometry_probe, "_SMALL_BUDGET", 0)
    field = probe_rf(TinyResNet(), (1, 3, 12, 10), layer="layer2")  # clipped: thin inputs cost more than a pass
    assert list(field.geometry) == [None, None]
    assert all(reason.startswith("not measured: the fields did not settle") for reason in field.geometry.reasons)
    monkeypatch.undo()
    assert geometry_triples(probe_rf(TinyResNet(), (1, 3, 12, 10), layer="layer2")) == [(25, 4, 12)] * 2


def test_a_long_field_that_fades_in_float32_on_a_thin_input_redoes_only_the_longer_inputs_in_float64(monkeypatch):
    """37 averaging convolutions: the field's edge (7^-37 of its centre) fades past float32 only on inputs long enough
    to hold it (256), not on the user's 64. The geometry's reading used to start over in float64 (the user's input
    and every thin input again, costing MambaOut 2-3 times its geometry); now the inputs already read in float32
    stay read."""
    seen: list[tuple[int, torch.dtype]] = []
    init = ProbeGraph.__init__

    def recording(self, model, request, **kwargs):
        seen.append((request.input_shape[2], request.dtype))
        init(self, model, request, **kwargs)

    depth = 37
    field = probe_rf(nn.Sequential(*[nn.Conv1d(1, 1, 7, padding=3) for _ in range(depth)]), (1, 1, 64))
    monkeypatch.setattr(ProbeGraph, "__init__", recording)
    assert geometry_triples(field) == [(6 * depth + 1, 1, 3 * depth)]
    wide = {length for length, dtype in seen if dtype == torch.float64}
    assert wide and (64, torch.float32) in seen
    assert wide == {length for length, _ in seen if length >= min(wide)}  # float64 from the first that faded on


def test_neighbours_that_look_alike_on_a_short_input_are_not_taken_for_windows():
    # On a 4-pixel axis a dilated convolution's inner map is 2 long, and its borders give both outputs the field
    # 1..2, whole by its margins: read as windows, the axis lost its geometry (hypothesis found it).
    model = nn.Sequential(nn.Conv2d(2, 2, (5, 1), padding=(5, 0), dilation=(3, 1)), nn.AvgPool2d((3, 1), 1, (1, 0)))
    field = probe_rf(model, (1, 2, 4, 4), "center")
    assert geometry_triples(field) == [(15, 1, 6), (1, 1, 0)]  # r = 1 + 4 * 3 + 2, P = 5 + 1


def test_a_stride_longer_than_the_input_is_not_taken_for_windows():
    # Stride 18 on a 9-pixel axis: two or three outputs, whose fields the inner maps' borders cut to the same pixel
    # on two lengths; windows are read off longer maps only (hypothesis found it).
    model = nn.Sequential(
        nn.AvgPool2d(1, (1, 2)), nn.Conv2d(2, 2, 1, (1, 3)), nn.Conv2d(2, 2, (1, 3), (1, 3), (0, 5), (1, 3))
    )
    expected_w = chain_geometry([(1, 2, 0, 1), (1, 3, 0, 1), (3, 3, 5, 3)])  # r = 1 + 2 * 3 * 6 = 37, S = 18, P = 30
    field = probe_rf(model, (1, 2, 4, 9), "center")
    assert geometry_triples(field) == [(1, 1, 0), (expected_w.size, expected_w.stride, expected_w.offset)]


def test_a_plain_chain_reads_its_geometry_off_its_forward_without_another_pass(monkeypatch):
    monkeypatch.setattr(geometry_flow, "ENABLED", True)
    shapes = count_graphs(monkeypatch)
    field = probe_rf(seed_readme_convs(), (1, 3, 60, 90), (4, 8))
    assert geometry_triples(field) == [(41, 6, 6), (23, 4, 4)] and field.bounds == ((18, 58), (28, 50))
    assert shapes == [(1, 3, 60, 90)]  # the probe's own graph, nothing for the geometry


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_the_flow_equals_the_measured_geometry_on_nested_chains_with_same_padding(monkeypatch, mode):
    model = nn.Sequential(
        nn.Conv2d(2, 4, 4, padding="same", dilation=(2, 1)), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 4, (1, 5), stride=(1, 2), padding=(0, 2)), nn.GELU()),
        nn.AvgPool2d(2), nn.Dropout(), nn.Conv2d(4, 3, 3, padding="valid"),
    )  # fmt: skip
    for layer in (None, "3", "3.1", "5"):
        measured = probe_rf(model, (1, 2, 48, 40), "center", layer=layer, mode=mode)
        monkeypatch.setattr(geometry_flow, "ENABLED", True)
        flowed = probe_rf(model, (1, 2, 48, 40), "center", layer=layer, mode=mode)
        monkeypatch.setattr(geometry_flow, "ENABLED", False)
        assert None not in geometry_triples(measured)
        assert geometry_triples(flowed) == geometry_triples(measured) and flowed.bounds == measured.bounds


class Doubled(nn.Module):
    def forward(self, x):
        return torch.cat([x, x], dim=-1)  # doubles the length: a concatenation along the axis ends the flow


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv1d(1, 1, 3), Doubled(), nn.Conv1d(1, 1, 3)),
        nn.Sequential(nn.Conv1d(1, 1, 3, padding=1, padding_mode="reflect"), nn.Conv1d(1, 1, 3)),
        nn.Sequential(nn.Conv1d(1, 1, 3), nn.Upsample(scale_factor=2), nn.Conv1d(1, 1, 3)),
    ],
    ids=["user module", "reflect padding", "upsample"],
)
def test_a_chain_with_a_call_the_flow_does_not_follow_is_measured(monkeypatch, model):
    monkeypatch.setattr(geometry_flow, "ENABLED", True)
    shapes = count_graphs(monkeypatch)
    field = probe_rf(model, (1, 1, 32), "center")
    list(field.geometry)
    assert len(shapes) > 1  # measured on other inputs


def test_a_hook_on_a_layer_runs_under_the_flow(monkeypatch):
    model = nn.Sequential(nn.Conv1d(1, 1, 3), nn.Conv1d(1, 1, 3))
    model[0].register_forward_hook(lambda module, args, output: output * 2)
    monkeypatch.setattr(geometry_flow, "ENABLED", True)
    shapes = count_graphs(monkeypatch)
    assert geometry_triples(probe_rf(model, (1, 1, 32), "center")) == [(5, 1, 0)]
    assert shapes == [(1, 1, 32)]  # the hook's product is a call the flow follows


def test_swapped_spatial_axes_have_no_geometry_and_say_why():
    """Output axis 1 follows input H and axis 0 input W: the reasons said a global operation or an exhausted budget
    (every field is 4 x 5)."""

    class Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.d = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, (3, 2), stride=(2, 1))

        def forward(self, x):
            return self.d(self.c(x).transpose(2, 3))

    field = probe_rf(Swapped(), (1, 1, 26, 23), "center")
    assert field.size == (4, 5) and field.output_shape == (10, 23)
    assert field.geometry == (None, None) and field.geometry.reasons == (ELSEWHERE, ELSEWHERE)


class CausalAttention(nn.Module):
    """A strided 1D embedding, then one causal self-attention (two heads): output t reads every input up to it."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.embed, self.qkv = nn.Conv1d(1, width, 4, stride=2, padding=1), nn.Linear(width, 3 * width)

    def forward(self, x):
        tokens = self.embed(x).transpose(1, 2)
        n, length, width = tokens.shape
        q, k, v = self.qkv(tokens).view(n, length, 3, 2, width // 2).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attended.transpose(1, 2).reshape(n, length, width).transpose(1, 2)


@pytest.mark.parametrize("pos", [8, "all"])
def test_the_geometry_of_a_causal_attention_costs_a_bounded_multiple_of_the_probe(pos, monkeypatch):
    """Output t reads 0..t, so the fields never settle, and the thin reading grew a 32-sample input to 65,536
    samples: an attention matrix of 10^9 elements per head, killed for memory (28 s and 5 GB where memory was
    limited). Each pass's cost, counted in the elements its calls return (the attention scores included), now stays
    under 64 of the probe's own, foreseen as growing with the square of the input."""
    shapes = []
    init = ProbeGraph.__init__
    monkeypatch.setattr(
        ProbeGraph,
        "__init__",
        lambda self, m, request, *a, **k: shapes.append(request.input_shape) or init(self, m, request, *a, **k),
    )
    field = probe_rf(CausalAttention(), (1, 1, 32), pos)
    assert list(field.geometry) == [None]
    assert "more than 64 of the user's passes" in field.geometry.reasons[0]
    assert max(shape[-1] for shape in shapes) <= 4096
    if pos == 8:
        assert field.bounds == ((0, 18),)


@pytest.mark.parametrize(
    "transposed, last, centre",
    [
        (nn.ConvTranspose1d(1, 1, 1, stride=2), 3, ((30, 32),)),  # odd outputs of the transposed conv are empty
        (nn.ConvTranspose1d(1, 1, 3, stride=2, dilation=2), 5, ((26, 36),)),  # its odd outputs read one tap fewer
    ],
    ids=["kernel_1", "dilation_2"],
)
def test_fields_that_alternate_by_parity_after_a_transposed_conv_have_no_geometry(transposed, last, centre):
    """A lattice through the centre spaced by an even number read one parity of outputs only: the geometry fitted to
    it (r = 3, S = 1, P = 0; r = 11, S = 1, P = 6) was wrong for every other output (the field of output 31 is
    30..34, its span 31..33), in the field's geometry and in rf_table's rows alike."""
    model = nn.Sequential(nn.Conv1d(1, 1, 3, stride=2), transposed, nn.Conv1d(1, 1, last, padding=last // 2))
    shape = (1, 1, 63)
    field = probe_rf(model, shape)
    assert field.bounds == centre
    fields = probe_rf(model, shape, "all")
    odd, even = fields[31].bounds[0], fields[32].bounds[0]
    assert odd[1] - odd[0] != even[1] - even[0] or fields[31].bounds == ((0, -1),)  # no single r fits both
    assert tuple(field.geometry) == (None,) and tuple(fields.geometry) == (None,)
    rows = [row for row in rf_table(model, shape) if row.name in ("1", "2")]
    assert [row.full_size for row in rows] == [(None,), (None,)]


class _GuardedOnItsValues(nn.Module):
    """Four 3-tap convolutions, then a Python guard on the values (refused on the theoretical copy)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv1d(1, 1, 3, padding=1) for _ in range(4)))

    def forward(self, x):
        x = self.convs(x)
        return x / 2 if x.max() > 1e3 else x


class _BranchesOnItsBatch(_GuardedOnItsValues):
    def forward(self, x):
        x = self.convs(x)
        return x.contiguous() if x.shape[0] > 1 else x


def test_a_weights_field_whose_theoretical_copy_refuses_or_branches_on_the_batch_says_why_it_has_no_geometry():
    # The check that the forward is the one probed ran before the refusal was turned into a reason: str(field)
    # raised. A branch on the batch's size (weights mode probes its draws as one batch) says what to pass.
    field = probe_rf(_GuardedOnItsValues(), (1, 1, 64), 32, mode="weights")
    assert tuple(field.geometry) == (None,) and "no longer runs" in field.geometry.reasons[0]
    assert str(field) == "RF of the output at (32,): 9 (input 28..36) [weights]"
    field = probe_rf(_BranchesOnItsBatch(), (1, 1, 64), 32, mode="weights")
    assert tuple(field.geometry) == (None,) and "probe with draws=1" in field.geometry.reasons[0]
    assert geometry_triples(probe_rf(_BranchesOnItsBatch(), (1, 1, 64), 32, mode="weights", draws=1)) == [(9, 1, 4)]


def test_a_changed_forward_is_seen_on_the_float64_attempt_too(monkeypatch):
    # Where the float32 reading of the geometry underflows, it is read again on a float64 twin of the kept copy: that
    # attempt returned the changed network's r = 17 unchecked (the float32 one was checked). A float32 reading that
    # fades is made to happen here; the float64 twin's calls are compared by name.
    from rf_callback.core import graph as graph_module
    from rf_callback.core import probe as probe_module

    measured = probe_module.measure_geometry

    def fading_in_float32(theory, *args, **kwargs):
        if theory.dtype == torch.float32:
            raise graph_module.Underflow
        return measured(theory, *args, **kwargs)

    monkeypatch.setattr(probe_module, "measure_geometry", fading_in_float32)
    model = _ConvsOfAGlobalCount()
    assert geometry_triples(probe_rf(model, (1, 1, 16, 16), (8, 8))) == [(9, 1, 4), (9, 1, 4)]
    field = probe_rf(model, (1, 1, 16, 16), (8, 8))
    try:
        BLOCKS["count"] = 8
        assert tuple(field.geometry) == (None, None)
        assert "the model's forward is no longer the one probed" in field.geometry.reasons[0]
    finally:
        BLOCKS["count"] = 4
