"""The geometry carried along the probe's own forward: equal to the measured one, at the cost of no other pass."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rf_callback import ProbeError, probe_rf, rf_table
from rf_callback.core import geometry_flow
from rf_callback.core.geometry import AxisGeometry, consistent
from tests.models import TinyResNet, gated
from tests.test_geometry_probe import count_graphs


def triples(geometry) -> list:
    return [None if g is None else (g.size, g.stride, g.offset) for g in geometry]


def measured_and_flowed(monkeypatch, model, shape, **kwargs):
    """The geometry and reasons measured on other inputs, then read off the flow."""
    monkeypatch.setattr(geometry_flow, "ENABLED", False)
    measured = probe_rf(model, shape, **kwargs)
    measured = triples(measured.geometry), measured.geometry.reasons
    monkeypatch.setattr(geometry_flow, "ENABLED", True)
    shapes = count_graphs(monkeypatch)
    field = probe_rf(model, shape, **kwargs)
    flowed = triples(field.geometry), field.geometry.reasons
    return measured, flowed, shapes


class Inception(nn.Module):
    """Branches of different kernels and paddings at one stride, concatenated; then a DenseNet-style concatenation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2)
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Sequential(nn.Conv2d(4, 4, (1, 7), padding=(0, 3)), nn.ReLU())
        self.c = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Conv2d(4, 4, 5, padding=(4, 2), dilation=(2, 1)))
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.dense = nn.Conv2d(12, 4, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.a(x), self.b(x), self.c(x)[:, :4]], 1)
        x = self.pool(x)
        return torch.cat([x, torch.relu(self.dense(x))], dim=1)


@pytest.mark.parametrize(
    ("model", "shape", "kwargs"),
    [
        (TinyResNet(), (1, 3, 32, 32), {"layer": "layer2"}),
        (TinyResNet(), (1, 3, 32, 24), {"layer": "layer1"}),
        (Inception(), (1, 3, 41, 37), {}),
    ],
    ids=["resnet layer2", "resnet layer1", "inception and dense"],
)
def test_a_flowed_geometry_equals_the_measured_one_without_another_pass(monkeypatch, model, shape, kwargs):
    measured, flowed, shapes = measured_and_flowed(monkeypatch, model, shape, **kwargs)
    assert flowed == measured and None not in measured[0]
    assert shapes == [shape]  # theoretical mode: the probe's own forward carried it


def test_a_gate_over_the_whole_map_gives_no_geometry_at_the_cost_of_the_probe(monkeypatch):
    measured, flowed, shapes = measured_and_flowed(monkeypatch, gated(2), (1, 3, 16, 16))
    assert flowed == measured == ([None, None], (measured[1][0],) * 2) and "mean()" in measured[1][0]
    assert shapes == [(1, 3, 16, 16)]


def test_weights_mode_reads_the_flow_off_one_theoretical_forward(monkeypatch):
    measured, flowed, shapes = measured_and_flowed(monkeypatch, TinyResNet(), (1, 3, 32, 32), layer="layer2",
                                                   mode="weights")  # fmt: skip
    assert flowed == measured and shapes == [(1, 3, 32, 32)] * 2


class Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.roll(self.conv(x), 5, dims=2))  # a call the flow does not follow


def test_a_call_the_flow_does_not_follow_leaves_the_geometry_to_the_measurement(monkeypatch):
    measured, flowed, shapes = measured_and_flowed(monkeypatch, Rolled(), (1, 1, 32))
    assert flowed == measured and len(shapes) > 1


class Branches(nn.Module):
    """Two chains from one map, added or concatenated: the hull of their fields where their strides agree."""

    def __init__(self, left: list[nn.Module], right: list[nn.Module], concatenate: bool):
        super().__init__()
        self.left, self.right, self.concatenate = nn.Sequential(*left), nn.Sequential(*right), concatenate

    def forward(self, x):
        a, b = self.left(x), self.right(x)
        n = min(a.shape[-1], b.shape[-1])
        a, b = a[..., :n], b[..., :n]
        return torch.cat([a, b], 1) if self.concatenate else a + b


@st.composite
def branch(draw):
    layers, stride = [], 1
    for _ in range(draw(st.integers(1, 3))):
        k, s, d = draw(st.integers(1, 5)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        layers.append(nn.Conv1d(2, 2, k, s, padding=draw(st.integers(0, (k - 1) * d)), dilation=d))
        stride *= s
    return layers, stride


@settings(max_examples=30, deadline=None)
@given(left=branch(), right=branch(), concatenate=st.booleans(), length=st.integers(24, 64))
def test_branches_flow_to_the_measured_geometry(left, right, concatenate, length):
    model = Branches(left[0], right[0], concatenate)
    try:
        model(torch.zeros(1, 2, length))
    except RuntimeError:
        return  # too short for a branch
    with pytest.MonkeyPatch.context() as monkeypatch:
        measured, flowed, _ = measured_and_flowed(monkeypatch, model, (1, 2, length))
    # The trim a[..., :n] is a slice along the axis, which the flow does not follow: both measure then.
    assert flowed == measured


class Fusion(nn.Module):
    """HRNet's fusion: a branch at the input's resolution plus a strided one upsampled back (nearest), then a tail."""

    def __init__(self, high: list[nn.Module], low: list[nn.Module], factor: int, tail: list[nn.Module]):
        super().__init__()
        self.high, self.low, self.tail = nn.Sequential(*high), nn.Sequential(*low), nn.Sequential(*tail)
        self.up = nn.Upsample(scale_factor=factor, mode="nearest")

    def forward(self, x):
        high, low = self.high(x), self.up(self.low(x))
        n = min(high.shape[-1], low.shape[-1])
        return self.tail(high[..., :n] + low[..., :n])


def test_an_upsampling_fusion_flows_to_its_closed_form(monkeypatch):
    # high: conv 3 (fields [i-1, i+1]); low: conv 3 stride 2, upsampled by 2: output i sees input i // 2's field
    # [2(i//2) - 1, 2(i//2) + 1], so [i-1, i+1] at even i and [i-2, i] at odd i; their sum [i-1, i+1] and
    # [i-2, i+1]. The tail, conv 3 stride 2 padding 1, reads i = 2o-1, 2o, 2o+1: [2o-3, 2o+2], r = 6, S = 2, P = 3.
    conv = lambda s: nn.Conv1d(2, 2, 3, s, 1)  # noqa: E731
    model = Fusion([conv(1)], [conv(2)], 2, [conv(2)])
    measured, flowed, shapes = measured_and_flowed(monkeypatch, model, (1, 2, 40))
    assert flowed == measured and flowed[0] == [(6, 2, 3)]
    assert shapes == [(1, 2, 40)]  # the probe's own forward carried it


@st.composite
def fusion(draw):
    factor = draw(st.sampled_from([2, 4]))
    high = draw(branch())[0]
    low = draw(branch())[0] + [nn.Conv1d(2, 2, 3, factor, 1)]
    tail = draw(branch())[0]
    return Fusion(high, low, factor, tail)


@settings(max_examples=30, deadline=None)
@given(model=fusion(), length=st.integers(24, 64))
def test_upsampling_fusions_flow_to_the_measured_geometry(model, length):
    # Fields of several classes (an upsampling no later stride merges) have no (r, S, P): the flow offers none, and
    # the measurement says so; where the classes merge, the flow equals the measurement.
    try:
        model(torch.zeros(1, 2, length))
    except RuntimeError:
        return  # too short for a branch
    with pytest.MonkeyPatch.context() as monkeypatch:
        try:
            measured, flowed, _ = measured_and_flowed(monkeypatch, model, (1, 2, length))
        except ProbeError as error:  # a centre whose window reads only padding (an output of length 1) is refused
            assert "padding" in str(error)
            return
    assert flowed[0] == measured[0]


def test_rf_table_rows_read_the_flow(monkeypatch):
    monkeypatch.setattr(geometry_flow, "ENABLED", False)
    measured = [(row.name, row.full_size, row.stride, row.offset) for row in rf_table(TinyResNet(), (1, 3, 32, 32))]
    monkeypatch.setattr(geometry_flow, "ENABLED", True)
    rows = rf_table(TinyResNet(), (1, 3, 32, 32))
    assert [(row.name, row.full_size, row.stride, row.offset) for row in rows] == measured


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXt block: a 7 x 7 depthwise convolution, then channels last: layer norm, linear layers, scale."""

    def __init__(self, channels: int):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm, self.fc1, self.fc2 = (
            nn.LayerNorm(channels),
            nn.Linear(channels, 4 * channels),
            nn.Linear(4 * channels, channels),
        )
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6))

    def forward(self, x):
        shortcut = x
        x = self.dw(x).permute(0, 2, 3, 1)
        x = self.fc2(nn.functional.gelu(self.fc1(self.norm(x)))) * self.gamma
        return x.permute(0, 3, 1, 2) + shortcut


def test_a_channels_last_stretch_inside_a_block_keeps_the_flow(monkeypatch):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 4, stride=4), ConvNeXtBlock(8), nn.Conv2d(8, 8, 2, stride=2), ConvNeXtBlock(8)
    )
    measured, flowed, shapes = measured_and_flowed(monkeypatch, model, (1, 3, 64, 48))
    # stem k4 s4 (r 4), 7 x 7 at jump 4 (+24, P 12), k2 s2 (+4, S 8), 7 x 7 at jump 8 (+48, P +24)
    assert flowed == measured and flowed[0] == [(80, 8, 36)] * 2
    assert shapes == [(1, 3, 64, 48)]


class ChannelsLastStage(nn.Module):
    """A stem and a depthwise 7 x 7, then channels last to the end (a Linear, a LayerNorm), as MambaOut ends."""

    def __init__(self, move: str):
        super().__init__()
        self.move = move
        self.stem, self.mix = nn.Conv2d(3, 8, 4, stride=4), nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.linear, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        x = self.mix(self.stem(x))
        x = x.permute(0, 2, 3, 1) if self.move == "permute" else x.movedim(1, -1)
        return self.norm(self.linear(x))


@pytest.mark.parametrize("move", ["permute", "movedim"])
def test_a_channels_last_output_keeps_the_flow_through_the_layouts_own_move(monkeypatch, move):
    """``layout="channels_last"`` moved the output's channels back after the forward, out of the flow's sight: the
    geometry was measured again on thin inputs (20 backward passes here, 19.6x a forward+backward pass on timm's
    MambaOut). A ``movedim`` in the forward ended the flow too."""
    measured, flowed, shapes = measured_and_flowed(
        monkeypatch, ChannelsLastStage(move), (1, 3, 64, 48), layout="channels_last"
    )
    assert flowed == measured and flowed[0] == [(28, 4, 12)] * 2  # k4 s4, then 7 x 7 at jump 4: +24, P 12
    assert shapes == [(1, 3, 64, 48)]


class Conv2dSame(nn.Conv2d):
    """TensorFlow's "SAME" padding, as timm's tf_* models pad: amounts computed from the input's length, the
    smaller half first, then an unpadded convolution."""

    def forward(self, x):
        pads = []
        for axis in (1, 0):
            length, k, s, d = x.shape[2 + axis], self.kernel_size[axis], self.stride[axis], self.dilation[axis]
            total = max((-(-length // s) - 1) * s + (k - 1) * d + 1 - length, 0)
            pads += [total // 2, total - total // 2]
        return nn.functional.conv2d(nn.functional.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation)


@pytest.mark.parametrize(("side", "offset"), [(31, 9), (32, 8)])
def test_a_padding_computed_from_the_inputs_length_flows_to_its_closed_form(side, offset):
    """By hand on 31: the three layers pad 1, 0, 2 before (of 2, 1, 4), so P = 1 + 0 * 2 + 2 * 4 = 9; on 32 they pad
    0, 0, 2 (of 1, 1, 4), P = 8. r = 3 + 2 * 2 + 4 * 4 = 23, S = 4. Measured on inputs of other lengths, whose
    paddings differ, the fields fit no single (r, S, P), and the geometry was None."""
    model = nn.Sequential(Conv2dSame(1, 2, 3, stride=2), Conv2dSame(2, 2, 3, stride=2), Conv2dSame(2, 1, 5))
    field = probe_rf(model, (1, 1, side, side))
    assert triples(field.geometry) == [(23, 4, offset)] * 2
    rows = rf_table(model, (1, 1, side, side))
    assert [(row.full_size[0], row.stride[0], row.offset[0]) for row in rows][-1] == (23, 4, offset)


def test_an_upsampling_fusion_whose_only_output_reads_padding_is_refused():
    conv = lambda k=1, s=1, p=0, d=1: nn.Conv1d(2, 2, k, s, p, d)  # noqa: E731
    model = Fusion([conv(1, 2)] * 3, [conv(1), conv(3, 2, 1)], 2, [conv(2, 1, 0, 2), conv(2, 1, 1, 2)])
    assert model(torch.zeros(1, 2, 24)).shape[-1] == 1
    with pytest.raises(ProbeError, match="every window covers only padding"):
        probe_rf(model, (1, 2, 24))


class SliceOfAConcatenation(nn.Module):
    """A 1-wide and a 9-wide branch concatenated along the channels, then (after a layer) the first branch's slice."""

    def __init__(self, between: str, select: str):
        super().__init__()
        self.a, self.b = nn.Conv1d(2, 3, 1), nn.Conv1d(2, 3, 9, padding=4)
        self.between = {
            "nothing": nn.Identity(),
            "a depthwise convolution": nn.Conv1d(6, 6, 3, padding=1, groups=6),
            "a pooling": nn.AvgPool1d(3, 1, 1),
            "a dense convolution": nn.Conv1d(6, 6, 1),
        }[between]
        self.select = select

    def forward(self, x):
        y = self.between(torch.cat([self.a(x), self.b(x)], 1))
        if self.select == "slice across both":
            return y[:, 2:4]
        return y[:, :3] if self.select == "slice" else y.chunk(2, dim=1)[0]


@pytest.mark.parametrize("select", ["slice", "chunk"])
@pytest.mark.parametrize(
    ("between", "size"),
    [("nothing", 1), ("a depthwise convolution", 3), ("a pooling", 3), ("a dense convolution", 9)],
)
def test_a_slice_of_the_channels_of_a_concatenation_keeps_the_fields_of_its_branches(between, size, select):
    """The flow carries one geometry per tensor: across a concatenation, the hull of its branches. A slice of its
    channels kept the hull: on 6 inputs, a field of 1 input got r = 9, P = 4 (span -1..7, bounds 3..3), in
    `probe_rf`, `rf_table` and `rf-probe`; a random network's row gave (67, 12, 27) for (43, 12, 15). Channels that
    a layer keeps apart stay apart; a dense convolution mixes them all again."""
    model = nn.Sequential(SliceOfAConcatenation(between, select))
    for length in (6, 40):
        field = probe_rf(model, (1, 2, length), "center")
        middle = length // 2
        assert triples(field.geometry) == [(size, 1, size // 2)], length
        assert field.span == ((middle - size // 2, middle + size // 2),)
    rows = {row.name: row for row in rf_table(model, (1, 2, 6))}
    assert (rows["0"].full_size, rows["0"].offset) == ((size,), (size // 2,))


def test_a_slice_straight_out_of_a_concatenation_reads_its_segments_off_the_flow(monkeypatch):
    """GhostNet's modules concatenate two branches and slice the channels they keep: the flow keeps the segments,
    and the slice's fields are the hull of those it keeps, without another pass."""
    for select, size in (("slice", 1), ("chunk", 1), ("slice across both", 9)):
        model = SliceOfAConcatenation("nothing", select)
        measured, flowed, shapes = measured_and_flowed(monkeypatch, model, (1, 2, 40), pos="center")
        assert flowed == measured and flowed[0] == [(size, 1, size // 2)], select
        assert shapes == [(1, 2, 40)], select  # the probe's own forward carried it


class NearestByScale(nn.Module):
    """A stride-4 convolution, a nearest upsampling by ``scale_factor`` (4 -> 8 for 2.2), a stride-2 convolution."""

    def __init__(self, scale: float, mode: str = "nearest-exact"):
        super().__init__()
        self.down, self.merge, self.scale, self.mode = (
            nn.Conv1d(1, 1, 4, stride=4),
            nn.Conv1d(1, 1, 2, stride=2),
            scale,
            mode,
        )

    def forward(self, x):
        return self.merge(nn.functional.interpolate(self.down(x), scale_factor=self.scale, mode=self.mode))


class WrittenThroughAView(nn.Module):
    """Two 3 x 3 convolutions, the first one's last columns zeroed (``y[..., -3:] = 0``) or wrapped (``copy_``)."""

    def __init__(self, write: str):
        super().__init__()
        self.first, self.second, self.write = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), write

    def forward(self, x):
        y = self.first(x)
        if self.write == "zeroed":
            y[..., -3:] = 0
        elif self.write == "zeroed under a view":  # a view taken before the write sees it too
            view = y.view(y.shape)
            y[..., -3:] = 0
            return self.second(view)
        else:
            y[..., -2:].copy_(y[..., :2])
        return self.second(y)


class ViewThenWrite(nn.Module):
    """A convolution, a view of two of its channels, then the whole tensor written in place, and the view read on."""

    def __init__(self, write: str):
        super().__init__()
        self.first = nn.Conv1d(1, 4, 3, padding=1)
        self.wrapped = nn.Conv1d(1, 4, 3, padding=1, padding_mode="circular")
        self.second, self.write = nn.Conv1d(2, 2, 3, padding=1), write  # the last child: the table's row read
        self.register_buffer("mask", (torch.arange(16) >= 4).float())

    def forward(self, x):
        y = self.first(x)
        view = y[:, :2]
        if self.write == "wrapped":
            y += self.wrapped(x)
        elif self.write == "masked":
            y.mul_(self.mask)
        else:
            torch.relu_(y)
        return self.second(view)


class PaddedValidBranch(nn.Module):
    """A valid 7-tap convolution padded back to its input's size by a zero ``F.pad``, plus a 3-tap branch (1D) or the
    input (2D: a residual block), then a 1 x 1 convolution."""

    def __init__(self, dims: int):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.valid, self.dims = conv(1, 1, 7), dims
        self.same = conv(1, 1, 3, padding=1) if dims == 1 else nn.Identity()
        self.out = conv(1, 1, 1)  # the last child: the table's row read

    def forward(self, x):
        return self.out(nn.functional.pad(self.valid(x), (3, 3) * self.dims) + self.same(x))


class PaddedAlongEachAxis(nn.Module):
    """A 3 x 3 convolution plus two 7 x 7 ones, valid along the rows or along the columns and padded back there: at
    a corner both read nothing, and the field is the 3 x 3 one's."""

    def __init__(self):
        super().__init__()
        self.base = nn.Conv2d(1, 1, 3, padding=1)
        self.rows, self.columns = nn.Conv2d(1, 1, 7, padding=(0, 3)), nn.Conv2d(1, 1, 7, padding=(3, 0))
        self.out = nn.Conv2d(1, 1, 1)  # the last child: the table's row read

    def forward(self, x):
        pad = nn.functional.pad
        return self.out(self.base(x) + pad(self.rows(x), (0, 0, 3, 3)) + pad(self.columns(x), (3, 3, 0, 0)))


class CroppedAtTheEnd(nn.Module):
    """Two 3-tap convolutions, the first one's map cropped at its end (``y[..., :12]``) before the second pads it."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv1d(1, 1, 3, padding=1), nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.second(self.first(x)[..., :12])


class Windowed(nn.Module):
    """A Hann window multiplied into the signal (periodic: its first value is 0), held or made in the forward."""

    def __init__(self, length: int | None = None, keyword: bool = False):
        super().__init__()
        self.register_buffer("window", None if length is None else torch.hann_window(length))
        self.conv1, self.conv2 = nn.Conv1d(1, 4, 3), nn.Conv1d(4, 1, 3)
        self.keyword = keyword

    def forward(self, x):
        window = torch.hann_window(x.shape[-1]) if self.window is None else self.window
        return self.conv2(self.conv1(torch.mul(x, other=window) if self.keyword else x * window))


@pytest.mark.parametrize(
    "model, shape",
    [
        (Windowed(32), (1, 1, 32)),
        (Windowed(), (1, 1, 32)),
        (Windowed(32, keyword=True), (1, 1, 32)),
        (NearestByScale(2.2), (1, 1, 16)),
        (NearestByScale(2.2, "nearest"), (1, 1, 16)),
        (WrittenThroughAView("zeroed"), (1, 1, 8, 12)),
        (WrittenThroughAView("copied"), (1, 1, 8, 12)),
        (WrittenThroughAView("zeroed under a view"), (1, 1, 8, 12)),
        (ViewThenWrite("wrapped"), (1, 1, 16)),
        (ViewThenWrite("masked"), (1, 1, 16)),
        (PaddedValidBranch(1), (1, 1, 24)),
        (PaddedValidBranch(2), (1, 1, 14, 12)),
        (PaddedAlongEachAxis(), (1, 1, 16, 16)),
        (CroppedAtTheEnd(), (1, 1, 16)),
    ],
    ids=[
        "a window's zeros",
        "a window made in the forward",
        "a window passed by keyword",
        "nearest-exact by 2.2",
        "nearest by 2.2",
        "columns zeroed through a view",
        "columns copied through a view",
        "a view taken before the write",
        "a view taken before a wrapped branch is added in place",
        "a view taken before a mask is multiplied in place",
        "a valid convolution padded back, beside a 3-tap branch",
        "a valid convolution padded back, beside the input",
        "valid convolutions padded back along each axis (the corners)",
        "a crop of the end before a padded convolution",
    ],
)
def test_a_flow_that_no_rule_follows_offers_no_geometry_the_border_breaks(model, shape):
    """A nearest upsampling by 2.2 reads input floor(i / 2.2), not i // 2 (indices 0 0 1 1 2 2 2 3), and a write
    through a view changes the written columns' fields: the flow kept (4, 4, 0) and (5, 1, 2), which position 3 (of
    the upsampling: 8..15, not 12..15) and column 9 (7..9, not 7..11) break; a window's 0 hides input 0 from output
    0 (1..4, where (5, 1, 0) said 0..4); a view taken before its tensor is written whole in place reads the new
    values (of a circular branch: output 0 reads 0..15, where (5, 1, 2) said 0..2); a valid convolution padded back
    by a zero ``F.pad`` reads nothing at the padded positions, where the other branch's field is the sum's (3..5 at
    position 4, where (7, 1, 3) said 1..7), and two padded along different axes leave the corners to the third
    branch (0..1 at (0, 0), where (7, 1, 3) said 0..3); a map cropped at its end reads nothing where the next
    convolution pads it (9..12 at its last position 11, where (5, 1, 2) said 9..13). Every offered geometry, of
    the probe (both modes) and of the table's row, now holds at every position."""
    torch.manual_seed(0)
    fields = probe_rf(model, shape, "all")
    row = [r for r in rf_table(model, shape) if r.name == list(dict(model.named_children()))[-1]][0]
    from_row = [
        None if r is None or s is None else AxisGeometry(size=r, stride=s, offset=p)
        for r, s, p in zip(row.full_size, row.stride, row.offset)
    ]
    weights_mode = probe_rf(model, shape, "center", mode="weights").geometry  # the theoretical fields' geometry
    for geometry in (probe_rf(model, shape, "center").geometry, weights_mode, from_row):
        for axis, g in enumerate(geometry):
            if g is None:
                continue
            for position in itertools.product(*(range(n) for n in fields.output_shape)):
                bounds = fields[position].bounds[axis]
                if bounds[0] <= bounds[1]:  # an empty field (zeroed columns) says nothing about the other axis
                    assert consistent(g, {position[axis]: bounds}, shape[2 + axis]), (axis, position)


def test_a_view_keeps_its_flow_through_a_pointwise_write_in_place(monkeypatch):
    """An in-place activation of the whole tensor changes no view's fields: the flow stays (no other pass)."""
    shapes = count_graphs(monkeypatch)
    field = probe_rf(ViewThenWrite("relu"), (1, 1, 16))
    assert triples(field.geometry) == [(5, 1, 2)] and len(shapes) == 1


class SamePadded(nn.Module):
    """TensorFlow's "SAME" padding, as timm's ``Conv2dSame`` pads: a zero ``F.pad`` of the map, then a valid
    convolution (a stride-2 stem, then two 3 x 3 convolutions)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(1, 2, 3, stride=2), nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)])

    def forward(self, x):
        x = self.convs[0](nn.functional.pad(x, (0, 1, 0, 1)))
        for conv in self.convs[1:]:
            x = conv(nn.functional.pad(x, (1, 1, 1, 1)))
        return x


def test_a_zero_padding_of_a_map_that_a_convolution_reads_on_keeps_the_flow(monkeypatch):
    """Its padded positions read nothing, but every window of the next convolution reads a position that does, and
    their spans reach no further into the input: the probe's own forward carries the closed form, which holds at
    every position."""
    shapes = count_graphs(monkeypatch)
    field = probe_rf(SamePadded(), (1, 1, 20, 20))
    assert triples(field.geometry) == [(11, 2, 4), (11, 2, 4)] and len(shapes) == 1
    fields = probe_rf(SamePadded(), (1, 1, 20, 20), "all")
    for position in fields.positions():
        for axis in (0, 1):
            assert consistent(field.geometry[axis], {position[axis]: fields[position].bounds[axis]}, 20), position


class PaddedToAMultiple(nn.Module):
    """Inference-style: the input padded at its end to a multiple of 16, strided convolutions and a residual block,
    the output cropped back (``[..., :ceil(n / 4)]``)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(1, 2, 3, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 3, 2, 1))
        self.block = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        height, width = x.shape[2:]
        y = self.down(nn.functional.pad(x, (0, -width % 16, 0, -height % 16)))
        return (torch.relu(self.block(y)) + y)[..., : -(-height // 4), : -(-width // 4)]


class ShiftedPads(nn.Module):
    """The input padded at its end, plus the input padded by two on each side: fields [i - 2, i] at every index."""

    def forward(self, x):
        return nn.functional.pad(x, (0, 4)) + nn.functional.pad(x, (2, 2))


@pytest.mark.parametrize(
    ("model", "shape", "expected"),
    [(PaddedToAMultiple(), (1, 1, 21, 26), [(15, 4, 7)] * 2), (ShiftedPads(), (1, 1, 12), [(3, 1, 2)])],
    ids=["padded to a multiple, cropped back", "two paddings whose empty ends differ"],
)
def test_empty_border_positions_that_no_field_reads_from_keep_the_flow(model, shape, expected, monkeypatch):
    """The padded positions read nothing, but no field's end inside the input comes from one: the flow keeps the
    geometry (a crop of the end keeps the runs it leaves; two operands' boxes join into one), and it holds at every
    position."""
    shapes = count_graphs(monkeypatch)
    field = probe_rf(model, shape)
    assert triples(field.geometry) == expected and len(shapes) == 1
    fields = probe_rf(model, shape, "all")
    for position in fields.positions():
        for axis, g in enumerate(field.geometry):
            bounds = fields[position].bounds[axis]
            read = bounds if bounds[0] <= bounds[1] else None  # the positions both paddings add read nothing
            assert consistent(g, {position[axis]: read}, shape[2 + axis]), (position, axis)


class AddedTerm(Windowed):
    """A position code with zeros added through ``addcmul``: its zeros are added, not multiplied."""

    def forward(self, x):
        return self.conv2(self.conv1(torch.addcmul(self.window, x, torch.ones(32))))


def test_a_window_without_zeros_keeps_the_flow(monkeypatch):
    """A window without zeros cuts no field, nor does an added term's zeros: the geometry is read off the forward,
    with no other pass."""
    no_zeros = Windowed(32)
    no_zeros.window = torch.hann_window(32) + 0.5
    for model in (no_zeros, AddedTerm(32)):
        shapes = count_graphs(monkeypatch)
        field = probe_rf(model, (1, 1, 32))
        assert triples(field.geometry) == [(5, 1, 0)] and len(shapes) == 1


class GhostSlice(nn.Module):
    """GhostNet's module: two convolutions concatenated, a channel slice of them, and a shortcut added in place."""

    def __init__(self):
        super().__init__()
        self.primary, self.cheap = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.after = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        first = self.primary(x)
        out = torch.cat([first, self.cheap(first)], dim=1)[:, :4]
        out += torch.cat([x, x], dim=1)
        return self.after(out)


def test_a_view_added_to_in_place_keeps_its_flow(monkeypatch):
    """``out += shortcut`` on a channel slice writes the whole view: it takes the add's flow, and the probe's own
    forward carries the geometry (an earlier rule ended the flow at every write into a view, and the geometry was
    measured on other inputs: timm's GhostNet 1.3x -> 2.0-2.7x one forward+backward pass)."""
    measured, flowed, shapes = measured_and_flowed(monkeypatch, GhostSlice(), (1, 2, 16, 16))
    assert flowed == measured and measured[0] == [(7, 2, 3), (7, 2, 3)]
    assert shapes == [(1, 2, 16, 16)]
