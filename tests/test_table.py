import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rf_callback import LayerField, probe_rf, rf_table


def clip(first: int, last: int, length: int) -> tuple[int, int]:
    return max(first, 0), min(last, length - 1)


class Block(nn.Module):
    """A ResNet basic block: conv3 (stride s) p1, ReLU, conv3 p1, plus a shortcut (identity, or conv1x1 stride s)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class ResNetStyle(nn.Module):
    """stem [conv3 p1, BN, ReLU] -> block(s1) -> block(s2) -> block(s2) -> global average pool -> linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block1 = Block(4, 4, 1)
        self.block2 = Block(4, 8, 2)
        self.block3 = Block(8, 8, 2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.gap(self.block3(self.block2(self.block1(self.stem(x)))))
        return self.head(torch.flatten(x, 1))


# Closed form per stage, r = 1 + sum (k - 1) * jump, S = prod s, P = sum p * jump, along the longest path (a block's
# field is the union of its branches, and the conv branch contains the shortcut's):
#   stem conv3 p1 (jump 1): r 3, S 1, P 1; BatchNorm and ReLU add nothing
#   block1.conv1 k3 p1 (jump 1): r 3 + 2 = 5, P 1 + 1 = 2; block1.conv2: r 7, P 3; identity shortcut: the stem's
#   block2.conv1 k3 s2 p1 (jump 1): r 9, P 4, then jump 2; block2.conv2 (jump 2): r 9 + 4 = 13, P 4 + 2 = 6;
#       block2.shortcut 1x1 s2 on block1's output: r 7, S 2, P 3
#   block3.conv1 k3 s2 p1 (jump 2): r 13 + 4 = 17, P 6 + 2 = 8, then jump 4; block3.conv2 (jump 4): r 25, P 12;
#       block3.shortcut 1x1 s2 on block2's output: r 13, S 4, P 6
RESNET_STAGES = {
    "stem.0": (3, 1, 1),
    "stem.1": (3, 1, 1),
    "stem.2": (3, 1, 1),
    "stem": (3, 1, 1),
    "block1.conv1": (5, 1, 2),
    "block1.conv2": (7, 1, 3),
    "block1.shortcut": (3, 1, 1),
    "block1": (7, 1, 3),
    "block2.conv1": (9, 2, 4),
    "block2.conv2": (13, 2, 6),
    "block2.shortcut": (7, 2, 3),
    "block2": (13, 2, 6),
    "block3.conv1": (17, 4, 8),
    "block3.conv2": (25, 4, 12),
    "block3.shortcut": (13, 4, 6),
    "block3": (25, 4, 12),
}


def test_resnet_style_table_equals_closed_form_at_every_stage():
    # H = 24, W = 20: output lengths 24 x 20 (stride 1), 12 x 10 (stride 2), 6 x 5 (stride 4); centre index x = n // 2,
    # so x * S = 12 on H at every stage, and 10, 10, 8 on W. The field is clip([x*S - P, x*S - P + r - 1]).
    # block3.conv2 and block3 reach 12 - 12 = 0 .. 24 -> 0..23 on H and 8 - 12 = -4 .. 20 -> 0..19 on W: the whole
    # input; block3.shortcut, run after block3.conv2, does not (a branch's field is smaller).
    rows = rf_table(ResNetStyle(), (1, 3, 24, 20))
    assert [row.name for row in rows] == [*RESNET_STAGES, "gap"]  # forward order; the Linear head is not spatial
    for row in rows[:-1]:
        r, s, p = RESNET_STAGES[row.name]
        centres = [row.position[a] * s for a in range(2)]
        expected = tuple(clip(c - p, c - p + r - 1, n) for c, n in zip(centres, (24, 20)))
        assert row.position == tuple(n // 2 for n in row.output_shape[2:])
        assert row.bounds == expected, row.name
        assert row.size == tuple(last - first + 1 for first, last in expected), row.name
        assert (row.stride, row.offset) == ((s, s), (p, p)), row.name
        assert row.covers_input == (expected == ((0, 23), (0, 19))), row.name
    assert [row.name for row in rows if row.covers_input] == ["block3.conv2", "block3", "gap"]
    # The global pool's single output sees the union of every block3 field: the whole input, no lattice.
    gap = rows[-1]
    assert (gap.module_type, gap.output_shape, gap.position) == ("AdaptiveAvgPool2d", (1, 8, 1, 1), (0, 0))
    assert gap.bounds == ((0, 23), (0, 19)) and gap.stride == (None, None)


def test_row_holds_what_probe_rf_gives():
    model = ResNetStyle()
    for row in rf_table(model, (1, 3, 24, 20), layers=["block2", "block1.conv2"]):
        field = probe_rf(model, (1, 3, 24, 20), "center", layer=row.name)
        assert (row.bounds, row.size, row.stride, row.offset) == (field.bounds, field.size, field.stride, field.offset)
        assert row.output_shape[2:] == field.output_shape


class UNetStyle(nn.Module):
    """enc conv3 p1 -> down max-pool 2 -> mid conv3 p1 -> up nearest x2 -> dec conv3 p1 on [enc, up] -> head 1x1."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 4, 3, padding=1)
        self.down = nn.MaxPool2d(2)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        skip = F.relu(self.enc(x))
        deep = self.up(F.relu(self.mid(self.down(skip))))
        return self.head(F.relu(self.dec(torch.cat([skip, deep], dim=1))))


def test_unet_style_table_equals_hand_derived_fields_at_every_stage():
    # Input 16 x 14. Encoder, closed form: enc r 3, S 1, P 1; down (k2 s2) r 4, S 2, P 1; mid (k3 p1 at jump 2)
    # r 8, S 2, P 3, so mid index x sees [2x - 3, 2x + 4].
    # up (nearest x2): y reads mid index y // 2: y even sees [y - 3, y + 4], y odd [y - 4, y + 3]; the fields of y
    # and y + 1 alternate between the same and a shifted interval, so no stride describes them (None).
    # dec (k3 p1 on [enc, up]): z sees up at z - 1, z, z + 1: z even [z - 5, z + 4], z odd [z - 4, z + 5] (size 10;
    # the skip path's [z - 2, z + 2] is inside). head (1x1) keeps dec's field.
    # Centres: H 16 -> 8 (even), 8 -> 4; W 14 -> 7 (odd), 7 -> 3.
    rows = {row.name: row for row in rf_table(UNetStyle(), (1, 1, 16, 14))}
    assert list(rows) == ["enc", "down", "mid", "up", "dec", "head"]
    expected = {
        "enc": (((7, 9), (6, 8)), (1, 1), (1, 1)),
        "down": (((7, 10), (5, 8)), (2, 2), (1, 1)),
        "mid": (((5, 12), (3, 10)), (2, 2), (3, 3)),
        "up": (((5, 12), (3, 10)), (None, None), (None, None)),  # y = 8: [8-3, 8+4]; y = 7: [7-4, 7+3]
        "dec": (((3, 12), (3, 12)), (None, None), (None, None)),  # z = 8: [8-5, 8+4]; z = 7: [7-4, 7+5]
        "head": (((3, 12), (3, 12)), (None, None), (None, None)),
    }
    for name, (bounds, stride, offset) in expected.items():
        row = rows[name]
        assert (row.bounds, row.stride, row.offset) == (bounds, stride, offset), name
        assert row.size == tuple(last - first + 1 for first, last in bounds)
        assert not row.covers_input
    assert rows["up"].output_shape == (1, 4, 16, 14) and rows["mid"].output_shape == (1, 4, 8, 7)


def test_covers_input_is_set_from_the_first_layer_spanning_every_axis():
    # Six conv3 p1 layers on a 7 x 11 input: layer d (1-based) at the centre (3, 5) sees [3 - d, 3 + d] x
    # [5 - d, 5 + d]. H is spanned (0..6) from d = 3, W (0..10) only from d = 5: the flag is set from d = 5 ("4").
    model = nn.Sequential(*(nn.Conv2d(2, 2, 3, padding=1) for _ in range(6)))
    rows = rf_table(model, (1, 2, 7, 11))
    assert [row.name for row in rows] == ["0", "1", "2", "3", "4", "5"]
    for depth, row in enumerate(rows, start=1):
        assert row.bounds == (clip(3 - depth, 3 + depth, 7), clip(5 - depth, 5 + depth, 11))
        assert (row.stride, row.offset) == ((1, 1), (depth, depth))
    assert [row.covers_input for row in rows] == [False, False, False, False, True, True]


def test_one_dimensional_model():
    # conv5 p2 -> conv3 s2 -> conv3 d2: r 5, 7, 7 + 2*2*2 = 15; S 1, 2, 2; P 2, 2, 2.
    model = nn.Sequential(nn.Conv1d(1, 2, 5, padding=2), nn.Conv1d(2, 2, 3, stride=2), nn.Conv1d(2, 2, 3, dilation=2))
    rows = rf_table(model, (1, 1, 40))
    assert [(row.size, row.stride, row.offset) for row in rows] == [((5,), (1,), (2,)), ((7,), (2,), (2,)),
                                                                   ((15,), (2,), (2,))]  # fmt: skip
    assert [row.output_shape for row in rows] == [(1, 2, 40), (1, 2, 19), (1, 2, 15)]


def test_layers_are_listed_in_forward_order_whatever_the_order_given():
    rows = rf_table(ResNetStyle(), (1, 3, 24, 20), layers=["block3", "stem.0", "block3", "block1"])
    assert [row.name for row in rows] == ["stem.0", "block1", "block3"]
    assert [row.name for row in rf_table(ResNetStyle(), (1, 3, 24, 20), layers="block2")] == ["block2"]


def test_unknown_layer_lists_nearest_names():
    with pytest.raises(ValueError, match=r"layer='block4' is not a submodule of the model; nearest names: .*block"):
        rf_table(ResNetStyle(), (1, 3, 24, 20), layers=["block1", "block4"])


def test_layer_never_called_is_an_error():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3)

        def forward(self, x):
            return self.used(x)

    model = WithSpare()
    with pytest.raises(ValueError, match=r"\['unused'\] never produce an output"):
        rf_table(model, (1, 1, 8, 8), layers=["unused"])


def test_named_layer_without_spatial_output_is_an_error():
    with pytest.raises(ValueError, match="no spatial axes"):
        rf_table(ResNetStyle(), (1, 3, 24, 20), layers=["head"])


def test_shape_the_model_rejects_is_a_value_error():
    with pytest.raises(ValueError, match=r"has 1 spatial axes, but the convolution stem.0 \(Conv2d\) receives"):
        rf_table(ResNetStyle(), (1, 3, 24))  # as probe_rf words it
    with pytest.raises(ValueError, match="mode='exact' is not a probe mode"):
        rf_table(ResNetStyle(), (1, 3, 24, 20), mode="exact")


def test_a_head_run_per_sample_is_left_out_and_its_message_says_the_forward_drops_the_batch_axis():
    """A head run in a loop over the samples sees (C, H, W) of the input's rank: the table keeps the backbone's rows
    (the head's row is left out, as before), and probe_rf says the forward drops the batch axis, where it said
    "input_shape=(1, 3, 16, 16) has 2 spatial axes ... pass a shape (N, C, H, W)", the shape given."""

    class PerSampleHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1))
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return torch.stack([self.head(sample) for sample in self.backbone(x)])

    with pytest.warns(UserWarning, match="1 row is left out"):
        rows = rf_table(PerSampleHead(), (1, 3, 16, 16))
    assert [row.name for row in rows] == ["backbone.0", "backbone.1", "backbone"]
    with pytest.raises(ValueError, match=r"head \(Conv2d\) receives an input without a batch axis, though input_"):
        probe_rf(PerSampleHead(), (1, 3, 16, 16))


@pytest.mark.parametrize("channels", [1, 4])
def test_a_shape_that_reaches_a_convolution_without_its_batch_axis_is_refused_as_probe_rf_refuses_it(channels):
    """(1, 1, 40) reaches a Conv2d as an unbatched (C, H, W) image, which torch runs: the table printed 1D rows of a
    2D network (one channel), or no rows with a warning of folded windows (four), where probe_rf refuses it."""
    model = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1))
    message = r"input_shape=\(1, 1, 40\) has 1 spatial axes, but the convolution 0 \(Conv2d\) receives an input"
    for probe in (probe_rf, rf_table):
        with pytest.raises(ValueError, match=message):
            probe(model, (1, 1, 40))


def test_module_whose_output_does_not_depend_on_the_input_is_left_out():
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.bias_map = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.conv(x) + self.bias_map(torch.ones_like(x).detach())

    assert [row.name for row in rf_table(WithConstant(), (1, 1, 8, 8))] == ["conv"]


def test_modules_that_return_several_feature_maps_are_left_out_with_a_warning():
    """A block returning a tuple of maps and one returning a dict got no row and no word (their children do)."""

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return y, self.b(y)

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return {"out": self.a(x)}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.named, self.head = Pair(), Named(), nn.Conv2d(2, 1, 1)

        def forward(self, x):
            first, second = self.pair(x)
            return self.head(self.named(first + second)["out"])

    with pytest.warns(UserWarning, match=r"2 rows are left out, of modules that return several outputs") as caught:
        rows = rf_table(Model(), (1, 1, 16, 16))
    assert [(row.name, row.full_size) for row in rows] == [
        ("pair.a", (3, 3)), ("pair.b", (5, 5)), ("named.a", (7, 7)), ("head", (7, 7))
    ]  # fmt: skip
    message = str(caught[0].message)
    assert "pair (tuple), named (dict)" in message and "layer='pair', element=...)" in message
    assert probe_rf(Model(), (1, 1, 16, 16), layer="pair", element=1).size == (5, 5)


def test_a_backbone_run_under_inference_mode_is_a_cut_not_a_crash():
    """rf_table read each output's in-place count, which an inference tensor does not keep: it raised torch's
    "Inference tensors do not track version counter" as the model's forward failing."""

    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 1, 3)

        def forward(self, x):
            with torch.inference_mode():
                features = self.backbone(x)
            return self.head(features.clone())

    with pytest.warns(UserWarning, match=r"the rows from 'backbone' on are left out"):
        assert rf_table(Frozen(), (1, 1, 12, 12)) == []


def test_model_is_left_untouched():
    model = ResNetStyle().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rf_table(model, (1, 3, 24, 20), layers=["block1"])
    assert model.training and all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_progress_is_called_before_each_layer_and_to_dict_is_json():
    calls = []
    rows = rf_table(ResNetStyle(), (1, 3, 24, 20), layers=["block1", "block2"], progress=lambda *a: calls.append(a))
    assert calls == [(1, 2, "block1"), (2, 2, "block2")]
    assert isinstance(rows[0], LayerField)
    record = json.loads(json.dumps(rows[1].to_dict()))
    assert record == {
        "name": "block2", "module_type": "Block", "output_shape": [1, 8, 12, 10], "position": [6, 5],
        "size": [13, 13], "full_size": [13, 13], "stride": [2, 2], "offset": [6, 6], "bounds": [[6, 18], [4, 16]],
        "covers_input": False,
    }  # fmt: skip


def test_rows_share_one_forward_pass_and_survive_in_place_residual_adds():
    class InPlaceResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 2, 3, padding=1)
            self.point = nn.Conv2d(2, 2, 1)
            self.wide = nn.Conv2d(2, 2, 5, padding=2)

        def forward(self, x):
            x = self.stem(x)
            out = self.point(x)
            out += self.wide(x)  # torchvision-style: modifies the 1x1 conv's output tensor in place
            return out

    model = InPlaceResidual()
    rows = {row.name: row for row in rf_table(model, (1, 1, 20, 20))}
    assert rows["point"].size == (3, 3) == probe_rf(model, (1, 1, 20, 20), layer="point").size  # not the sum's 7
    assert rows["wide"].size == (7, 7)


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise (strided or not), 1x1 project, residual added in place."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        hidden = channels * 2
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True), nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )  # fmt: skip
        self.residual = stride == 1

    def forward(self, x):
        out = self.conv(x)
        if self.residual:
            out += x
        return out


def test_rows_that_share_a_field_equal_their_own_probe():
    # Identities, 1x1 convolutions and containers share the field of the row they apply to; every row, shared or
    # measured, must equal probe_rf of that layer, geometry included.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), _InvertedResidual(4, 1), _InvertedResidual(4, 2),
                          _InvertedResidual(4, 1), nn.Conv2d(4, 8, 1), nn.ReLU())  # fmt: skip
    shape = (1, 3, 20, 18)
    rows = rf_table(model, shape)
    assert len(rows) == 33
    for row in rows:
        field = probe_rf(model, shape, "center", layer=row.name)
        geometry = [(g.size, g.stride, g.offset) if g else None for g in field.geometry]
        assert (row.bounds, row.size) == (field.bounds, field.size), row.name
        assert [(r, s, p) if s else None for r, s, p in zip(row.full_size, row.stride, row.offset)] == geometry


class RolledRows(nn.Module):
    """A roll by 3 rows between two convolutions: output row 0 of ``d`` sees input rows 16..22, which no (r, S, P)
    read near the centre (7, 2, 6: rows -6..0) gives it."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(1, 2, 3, stride=2), nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return self.d(torch.roll(self.c(x), 3, dims=2))


def test_a_row_measured_near_the_centre_offers_no_geometry_that_the_border_does_not_follow():
    """As probe_rf does (before, the row said stride 2, offset 6 along H where probe_rf said None)."""
    model, shape = RolledRows(), (1, 1, 24, 21)
    row = next(r for r in rf_table(model, shape) if r.name == "d")
    field = probe_rf(model, shape, "center", layer="d")
    assert (row.full_size, row.stride, row.offset) == ((None, 7), (None, 2), (None, 0))
    assert (field.geometry[0], field.stride[1]) == (None, 2)
    assert probe_rf(model, shape, (0, 0), layer="d").bounds[0] == (16, 22)


def test_rows_after_a_replicate_padding_offer_no_geometry_that_the_border_does_not_follow():
    """Output 4 of the last row has its span at -16..-6, outside the 33 inputs, yet reads input 0: the replicate
    padding before it copies that input into the band. Its row, and the padding's own, said r = 11, S = 2, P = 24."""
    model = nn.Sequential(
        nn.Conv1d(1, 1, 1, stride=2, dilation=2),
        nn.Conv1d(1, 1, 3, padding=5, padding_mode="replicate"),
        nn.Conv1d(1, 1, 4, padding=7),
    )
    rows = {row.name: row for row in rf_table(model, (1, 1, 33))}
    assert (rows["0"].full_size, rows["0"].stride, rows["0"].offset) == ((1,), (2,), (0,))
    assert probe_rf(model, (1, 1, 33), (4,)).bounds == ((0, 0),)
    assert (rows["2"].full_size, rows["2"].stride) == ((None,), (None,))
    assert (rows["1"].full_size, rows["1"].stride) == ((None,), (None,))


def test_a_crop_to_fixed_indices_that_empties_thin_inputs_gets_its_row():
    class Crop(nn.Module):
        def forward(self, x):
            return x[:, :, 2:12, 2:12]

    rows = rf_table(nn.Sequential(nn.Conv2d(1, 2, 3), Crop()), (1, 1, 20, 20))
    crop = rows[-1]
    assert (crop.full_size, crop.stride, crop.offset, crop.bounds) == ((3, 3), (1, 1), (-2, -2), ((7, 9), (7, 9)))


def test_a_layer_asked_for_by_its_second_name_gets_its_row():
    """``self.alias = self.b``: the table hooked each module under its first name only, and refused ``layers=
    ["alias"]`` as a layer that never runs, where ``probe_rf(layer="alias")`` measures it."""

    class TwoNames(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 5, stride=2)
            self.alias = self.b

        def forward(self, x):
            return self.b(self.a(x))

    model, shape = TwoNames(), (1, 1, 31, 31)
    assert [row.name for row in rf_table(model, shape)] == ["a", "b"]  # listed once, under its first name
    rows = rf_table(model, shape, layers=["alias", "b"])
    assert [row.name for row in rows] == ["b", "alias"]  # in the order of the forward, the first name first
    assert probe_rf(model, shape, "center", layer="alias").bounds == ((12, 18), (12, 18))
    for row in rows:
        assert (row.bounds, row.stride, row.full_size) == (((12, 18), (12, 18)), (2, 2), (7, 7))


class MelNormalised(nn.Module):
    """PANNs' front: a batch norm over the mel bins, which a transpose puts on dim 1, then a 3 x 3 convolution."""

    def __init__(self, mels: int = 8):
        super().__init__()
        self.bn0, self.conv = nn.BatchNorm2d(mels), nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):  # (N, 1, T, mels)
        return self.conv(self.bn0(x.transpose(1, 3)).transpose(1, 3))


def test_a_batch_norm_over_a_transposed_map_gets_no_row_read_channels_first():
    """Its output (1, mels, T, 1) read channels first gave a row (bounds ((32, 32), (0, 7)), stride (1, None)) where
    probe_rf(layer='bn0') refuses: its dim 1 is the input's mel axis, not channels."""
    with pytest.warns(UserWarning, match=r"1 row is left out.*bn0 \(1, 8, 64, 1\).*moved a spatial axis"):
        rows = rf_table(MelNormalised(), (1, 1, 64, 8))
    assert [row.name for row in rows] == ["conv"] and rows[0].bounds == ((31, 33), (3, 5))
    with pytest.raises(ValueError, match=r"moved a spatial axis of the input there"):
        rf_table(MelNormalised(), (1, 1, 64, 8), layers=["bn0"])
    with pytest.raises(ValueError, match=r"moved its spatial axes"):
        probe_rf(MelNormalised(), (1, 1, 64, 8), "center", layer="bn0")


def test_a_weights_table_leaves_out_a_head_run_per_draw_and_a_model_with_no_register_tokens_is_copied():
    """Weights mode runs its 8 draws as one batch: a head run in a loop over the samples runs more than once there,
    and its row's refusal refused the whole table (the theoretical one lists it). A parameter of zero tokens made
    the theoretical constant 1 / 0 ("the model cannot be deep-copied")."""

    class LoopedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            y = self.c1(x)
            return torch.cat([self.head(y[i : i + 1]) for i in range(len(y))])

    with pytest.warns(UserWarning, match="1 row is left out, whose centre has no field"):
        rows = rf_table(LoopedHead(), (1, 1, 16, 16), mode="weights")
    assert [(row.name, row.bounds) for row in rows] == [("c1", ((7, 9), (7, 9)))]

    class NoRegisters(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.registers = nn.Conv2d(1, 4, 2, stride=2), nn.Parameter(torch.zeros(1, 0, 4))

        def forward(self, x):
            tokens = self.embed(x).flatten(2).transpose(1, 2)
            return torch.cat([tokens, self.registers.expand(len(x), -1, -1)], dim=1)

    assert probe_rf(NoRegisters(), (1, 1, 6, 10), (1, 2), layout="tokens:3x5").bounds == ((2, 3), (4, 5))


class _RareThenDead(nn.Module):
    """Inputs above 2 pass a ReLU (about 2% of normal draws), a 9-tap sum reads them, then a ReLU never fires."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()
        self.sum = nn.Conv1d(1, 1, 9, bias=False)
        self.flip = nn.Conv1d(1, 1, 1, bias=False)
        self.dead = nn.ReLU()
        with torch.no_grad():
            self.sum.weight.fill_(1.0)
            self.flip.weight.fill_(-1.0)

    def forward(self, x):
        return self.dead(self.flip(self.sum(self.relu(x - 2.0))))


def test_weights_rows_are_probe_rfs_own_fields_beside_a_dead_row():
    """A dead row (float32 flushes every value) made rf_table redo the whole table in float64, whose 8 draws are
    other inputs: the rows before it held other fields than probe_rf's of the same layer (here 16..20 for 19..19),
    and where the other draws left another row dead, the table raised a bare TypeError."""
    model, shape = _RareThenDead(), (1, 1, 40)
    with pytest.warns(UserWarning, match=r"1 row is left out, whose centre has no field \(dead\)"):
        rows = rf_table(model, shape, mode="weights")
    assert [row.name for row in rows] == ["relu", "sum", "flip"]
    for row in rows:
        assert row.bounds == probe_rf(model, shape, layer=row.name, mode="weights").bounds, row.name


class StepsMixedByAConvolution(nn.Module):
    """A 1D forecaster laid out channels last: an embedding, a transpose and a layer norm (N, 16 steps, 8 features),
    then a 1 x 1 Conv1d that maps the 16 steps to 12 (the steps as its channels), then a linear head."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Conv1d(3, 8, 3, padding=1), nn.LayerNorm(8)
        self.steps, self.head = nn.Conv1d(16, 12, 1), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.steps(self.norm(self.embed(x).transpose(1, 2))))


@pytest.mark.filterwarnings("ignore:the output of layer")
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_1x1_convolution_of_a_map_read_channels_last_has_its_own_field(mode):
    """A 1 x 1 convolution keeps its input's field where both are read alike; this one reads the layer norm's map
    channels first (its 16 steps as channels, its features as positions): its row copied the layer norm's field,
    7..9 with (3, 1, 1), where every output reads all 16 steps (as probe_rf(layer='steps') and a brute force say)."""
    torch.manual_seed(0)
    model = StepsMixedByAConvolution()
    row = next(r for r in rf_table(model, (1, 3, 16), layout="channels_last", mode=mode) if r.name == "steps")
    probed = probe_rf(model, (1, 3, 16), row.position, layer="steps", mode=mode)
    assert row.bounds == probed.bounds == ((0, 15),)
    assert (row.full_size, row.stride, row.offset) == ((None,), (None,), (None,))
