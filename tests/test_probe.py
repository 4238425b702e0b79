"""probe_rf: exact fields on real architectures, many positions at once, weights mode, and the seed's check."""

from __future__ import annotations

import collections
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rf_callback import ProbeError, ReceptiveField, ReceptiveFieldMap, effective_rf, probe_rf, verify_rf
from tests.models import TinyResNet, TinyUNet, seed_readme_convs, vgg_style


def clip(first: int, last: int, length: int) -> tuple[int, int]:
    return max(first, 0), min(last, length - 1)


def test_seed_readme_example_gives_41_by_23():
    field = probe_rf(seed_readme_convs(), [1, 3, 60, 90], pos=(4, 8))
    assert field.bounds == ((18, 58), (28, 50))
    assert field.size == (41, 23)
    assert (field.geometry[0].size, field.geometry[0].stride, field.geometry[0].offset) == (41, 6, 6)
    assert (field.geometry[1].size, field.geometry[1].stride, field.geometry[1].offset) == (23, 4, 4)
    assert field.heatmap.shape == (60, 90)
    assert field.output_shape == (6, 19)


def test_maxpool_does_not_shrink_rf():
    # The seed's constant input sends a 3x3/1 max-pool's gradient to one arg-max, reading 5 here instead of 7.
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(3, stride=1), nn.Conv2d(4, 4, 3))
    field = probe_rf(model, (1, 1, 20, 20), pos=(5, 5))
    assert field.size == (7, 7)
    assert field.bounds == ((5, 11), (5, 11))


def test_functional_relu_and_maxpool_in_forward_are_linearised():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv1d(1, 2, 3), nn.Conv1d(2, 2, 3)

        def forward(self, x):
            x = F.max_pool1d(torch.relu(self.a(x)), 3, stride=1, dilation=2)
            return torch.sigmoid(F.dropout(self.b(F.gelu(x))))

    field = probe_rf(Functional(), (1, 1, 40), pos=10)
    assert field.bounds == ((10, 18),)  # r = 1 + 2 + 4 + 2 = 9


def test_zero_bias_relu_network_does_not_vanish():
    # With zero biases, ReLUs and a constant or negative input, the seed's gradient is zero and min() crashes.
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(-1.0)
    assert probe_rf(model, (1, 1, 12, 12), pos=(3, 3)).size == (5, 5)


def test_signed_weights_do_not_cancel_across_channels():
    conv = nn.Conv1d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0], [-1.0]]]))
    model = nn.Sequential(nn.Conv1d(1, 2, 3, bias=False), conv)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    # In the real network the two channels cancel exactly: the weights-mode field is empty.
    with pytest.raises(ProbeError, match="dead|zero"):
        probe_rf(model, (1, 1, 10), pos=4, mode="weights")
    assert probe_rf(model, (1, 1, 10), pos=4).bounds == ((4, 6),)


@pytest.mark.parametrize(
    ("model", "shape", "pos", "bounds"),
    [
        # r = 1 + 4 + 2*2*2 = 13, S = 2: [14, 26]
        (nn.Sequential(nn.Conv1d(2, 4, 5, stride=2), nn.ReLU(), nn.Conv1d(4, 4, 3, dilation=2)), (1, 2, 50), (7,),
         ((14, 26),)),
        # depth: r = 1 + 2 + 1 = 4, S = 2, P = 1; height, width: r = 1 + 2 + 1 + 2*2 = 8, S = 2, P = 1
        (nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.MaxPool3d(2), nn.Conv3d(2, 2, (1, 3, 3))), (1, 1, 8, 12, 12),
         (1, 2, 2), ((1, 4), (3, 10), (3, 10))),
    ],
)  # fmt: skip
def test_1d_and_3d_networks(model, shape, pos, bounds):
    field = probe_rf(model, shape, pos)
    assert field.bounds == bounds
    assert field.heatmap.shape == shape[2:]
    assert verify_rf(model, field)


def test_vgg_style_equals_hand_derived_value():
    model = vgg_style()
    fmap = probe_rf(model, (1, 3, 32, 32), "all")
    assert fmap.output_shape == (8, 8)
    for pos in fmap.positions():
        expected = tuple(clip(4 * x - 6, 4 * x + 9, 32) for x in pos)
        assert fmap[pos].bounds == expected
    assert [(g.size, g.stride, g.offset) for g in fmap.geometry] == [(16, 4, 6)] * 2


def test_resnet_style_layer_equals_hand_derived_value():
    model = TinyResNet()
    field = probe_rf(model, (2, 3, 32, 32), (4, 5), layer="layer2")
    assert field.bounds == ((4, 28), (8, 31))
    assert field.span[1] == (8, 32)
    assert [(g.size, g.stride, g.offset) for g in field.geometry] == [(25, 4, 12)] * 2
    assert verify_rf(model, field)


def test_unet_style_field_follows_both_paths():
    fmap = probe_rf(TinyUNet(), (1, 1, 16, 16), "all")
    for pos in fmap.positions():
        expected = tuple(clip(x - 5, x + 4, 16) if x % 2 == 0 else clip(x - 4, x + 5, 16) for x in pos)
        assert fmap[pos].bounds == expected
    assert fmap.geometry == (None, None)


@pytest.mark.parametrize(
    ("make", "shape", "layer"),
    [
        (vgg_style, (1, 3, 24, 28), None),
        (TinyUNet, (1, 1, 12, 14), None),
        (seed_readme_convs, (1, 3, 60, 50), None),
        (TinyResNet, (1, 3, 24, 28), "layer2"),
    ],
)
def test_all_equals_per_position_loop(make, shape, layer):
    model = make()
    fmap = probe_rf(model, shape, "all", layer=layer)
    assert isinstance(fmap, ReceptiveFieldMap)
    for pos in fmap.positions():
        single = probe_rf(model, shape, pos, layer=layer)
        assert fmap[pos].bounds == single.bounds
        assert verify_rf(model, single)


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_position_list_heatmaps_equal_single_probes(mode):
    model = vgg_style()
    positions = [(0, 0), (3, 4), (7, 7), (2, 2), (3, 5), (0, 7)]
    fields = probe_rf(model, (1, 3, 32, 32), positions, mode=mode)
    assert [f.position for f in fields] == positions
    for field in fields:
        single = probe_rf(model, (1, 3, 32, 32), field.position, mode=mode)
        assert field.bounds == single.bounds
        assert torch.equal(field.heatmap, single.heatmap)


def test_a_flat_list_of_ints_on_a_1d_map_is_a_list_of_positions():
    """The docstrings say "an int for 1D ... or a list of them": ``[1, 6]`` was refused as one position of 2
    indices. A list of one int is a list of one field too (it returned a bare field, and a loop over the positions a
    user picked failed when there was one); an int or a tuple is one position."""
    model = nn.Sequential(nn.Conv1d(1, 1, 3), nn.Conv1d(1, 1, 3))
    fields = probe_rf(model, (1, 1, 12), [1, 6])
    assert [f.position for f in fields] == [(1,), (6,)] and [f.bounds for f in fields] == [((1, 5),), ((6, 10),)]
    assert [f.bounds for f in probe_rf(model, (1, 1, 12), [3])] == [((3, 7),)]
    assert probe_rf(model, (1, 1, 12), (3,)).bounds == probe_rf(model, (1, 1, 12), 3).bounds == ((3, 7),)
    with pytest.raises(ValueError, match="must have 1 int index"):  # a tuple is one position's indices
        probe_rf(model, (1, 1, 12), (1, 6))
    assert [f.theoretical.bounds for f in effective_rf(model, torch.rand(2, 1, 12), [1, 6])] == [((1, 5),), ((6, 10),)]


def test_positions_as_rows_of_nonzero_and_as_named_tuples():
    """Rows of ``torch.nonzero(mask)`` (1-D tensors) or numpy arrays were refused ("indices must be ints"), as the
    callback accepted them; the column form (one array per axis) was read transposed; a named tuple stays one
    position."""
    import collections

    import numpy as np

    model = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[1, 2] = mask[3, 4] = True
    for rows in (list(torch.nonzero(mask)), list(np.argwhere(mask.numpy()))):
        assert [f.bounds for f in probe_rf(model, (1, 1, 12, 12), rows)] == [((1, 5), (2, 6)), ((3, 7), (4, 8))]
    # One array of indices per axis (torch.nonzero(as_tuple=True), np.nonzero): the same cells, not transposed.
    for columns in (torch.nonzero(mask, as_tuple=True), np.nonzero(mask.numpy())):
        assert [f.position for f in probe_rf(model, (1, 1, 12, 12), columns)] == [(1, 2), (3, 4)]
    cell = collections.namedtuple("Cell", "row col")
    assert probe_rf(model, (1, 1, 12, 12), cell(3, 4)).bounds == ((3, 7), (4, 8))


class _ParityBranches(nn.Module):
    """Output (i, j) reads input (i // 2, j // 2), and where i and j differ in parity the taps 2 away too.

    A pixel shuffle interleaves a 1 x 1 branch and a dilated 3 x 3 one by the parity of both indices at once; the
    crop to an odd size leaves the corners and the centre on 1 x 1 fields.
    """

    def __init__(self):
        super().__init__()
        self.point, self.dilated = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 3, dilation=2, padding=2)

    def forward(self, x):
        point, dilated = self.point(x), self.dilated(x)
        shuffled = F.pixel_shuffle(torch.cat([point, dilated, dilated, point], 1), 2)
        return shuffled[:, :, :-1, :-1]


def _parity_branch_bounds(i: int, j: int, n: int) -> tuple:
    taps = (-2, 0, 2) if i % 2 != j % 2 else (0,)
    return tuple((min(t), max(t)) for t in ([c // 2 + d for d in taps if 0 <= c // 2 + d < n] for c in (i, j)))


def test_a_field_that_depends_on_both_indices_is_read_whole_in_shared_passes():
    """Positions that share a backward pass each read their predicted box: the fields of mixed parity reach exactly
    into their neighbours' 1 x 1 boxes, which no support check sees, and 36 of 121 positions read 1 x 1 where they
    read 3 x 3. A pass weighted by the members' codes tells."""
    model, shape = _ParityBranches(), (1, 1, 6, 6)
    fmap = probe_rf(model, shape, "all")
    assert {p: fmap[p].bounds for p in fmap.positions()} == {p: _parity_branch_bounds(*p, 6) for p in fmap.positions()}
    mixed = [p for p in fmap.positions() if p[0] % 2 != p[1] % 2]
    fields = probe_rf(model, shape, mixed)  # more than 8: shared passes
    assert [f.bounds for f in fields] == [_parity_branch_bounds(*p, 6) for p in mixed]
    assert all(torch.equal(f.heatmap, probe_rf(model, shape, f.position).heatmap) for f in fields[:12])


def test_weights_mode_all_equals_per_position_loop():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 3, 3, padding=1))
    fmap = probe_rf(model, (1, 1, 20, 20), "all", mode="weights")
    for pos in fmap.positions():
        assert fmap[pos].bounds == probe_rf(model, (1, 1, 20, 20), pos, mode="weights").bounds


def test_pruned_weights_shrink_weights_field_not_theoretical():
    model = nn.Sequential(nn.Conv1d(1, 1, 5, bias=False), nn.Conv1d(1, 1, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[[0.0, 0.0, 1.0, 2.0, 0.0]]]))
        model[1].weight.copy_(torch.tensor([[[1.0, 0.5, 0.0]]]))
    theoretical = probe_rf(model, (1, 1, 20), pos=5)
    weights = probe_rf(model, (1, 1, 20), pos=5, mode="weights")
    assert theoretical.bounds == ((5, 11),)
    assert weights.bounds == ((7, 9),)  # taps 2..3 of the first layer under taps 0..1 of the second
    assert weights.geometry == theoretical.geometry


def test_weights_mode_union_over_draws_covers_max_pool_windows():
    field = probe_rf(nn.MaxPool2d(3, stride=1), (1, 1, 10, 10), (4, 4), mode="weights", draws=32)
    assert field.bounds == ((4, 6), (4, 6))


def test_weights_mode_is_deterministic_and_seeded():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2))
    a = probe_rf(model, (1, 1, 12, 12), mode="weights", seed=3)
    b = probe_rf(model, (1, 1, 12, 12), mode="weights", seed=3)
    assert torch.equal(a.heatmap, b.heatmap)


def test_heatmap_sums_magnitudes_over_input_channels():
    # The seed averages signed gradients over input channels before taking the magnitude: +1 and -1 cancel.
    model = nn.Conv1d(2, 1, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[[1.0], [-1.0]]]))
    field = probe_rf(model, (1, 2, 5), pos=2, mode="weights", draws=1)
    assert field.bounds == ((2, 2),)
    theoretical = probe_rf(nn.Conv1d(3, 2, 3, bias=False), (1, 3, 7), pos=2)
    # Theoretical weights are 1 / fan_in = 1/9 and every output channel has cotangent 1: 2 * 3 * 1/9 per tap.
    assert torch.allclose(
        theoretical.heatmap, torch.tensor([0.0, 0.0, 2 / 3, 2 / 3, 2 / 3, 0.0, 0.0], dtype=torch.float64)
    )


def test_geometry_maps_output_to_input_and_back():
    field = probe_rf(seed_readme_convs(), [1, 3, 60, 90], pos=(4, 8))
    h, w = field.geometry
    assert h.span(0) == (-6, 34)
    assert field.center == (38.0, 39.0)
    assert h.index_of(38.0) == 4 and w.index_of(39.0) == 8
    assert [h.index_of(h.center(i)) for i in range(6)] == list(range(6))
    # Halfway between the centres of outputs i and i + 1 (stride 6): always i + 1, whatever the parity of i.
    assert [h.index_of(h.center(i) + 3) for i in range(6)] == list(range(1, 7))


def test_to_dict_is_json_serialisable_and_complete():
    field = probe_rf(seed_readme_convs(), [1, 3, 60, 90], pos=(4, 8))
    data = json.loads(json.dumps(field.to_dict()))
    assert data["bounds"] == [[18, 58], [28, 50]]
    assert data["size"] == [41, 23]
    assert data["stride"] == [6, 4] and data["offset"] == [6, 4]
    assert data["span"] == [[18, 58], [28, 50]]
    assert "heatmap" not in data
    fmap = probe_rf(seed_readme_convs(), [1, 3, 60, 90], "all")
    assert json.loads(json.dumps(fmap.to_dict()))["bounds"][4][8] == [[18, 58], [28, 50]]


def test_str_is_a_one_line_summary():
    field = probe_rf(seed_readme_convs(), [1, 3, 60, 90], pos=(4, 8))
    assert str(field) == "RF of the output at (4, 8): 41 x 23 (input 18..58, 28..50), stride 6 x 4 [theoretical]"


def test_a_map_position_that_sees_only_padding_says_so_in_words():
    fmap = probe_rf(nn.Conv1d(1, 1, 1, padding=2), (1, 1, 5), "all")
    assert fmap[0].bounds == ((0, -1),) and fmap[2].bounds == ((0, 0),)
    assert str(fmap[0]) == "RF of the output at (0,): empty (its window covers only padding) [theoretical]"
    assert str(fmap[2]) == "RF of the output at (2,): 1 (input 0..0), stride 1 [theoretical]"


def test_an_empty_position_of_a_weights_map_does_not_blame_the_padding_alone():
    """Before, an interior position whose units were dead on every random draw read "its window covers only padding"."""

    class DeadInTheMiddle(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("threshold", torch.tensor([0.0, 0.0, 100.0, 0.0, 0.0]))

        def forward(self, x):
            return torch.relu(x - self.threshold)  # no random input passes 100 at position 2

    fmap = probe_rf(DeadInTheMiddle(), (1, 1, 5), "all", mode="weights")
    assert fmap[1].bounds == ((1, 1),) and fmap[2].bounds == ((0, -1),)
    assert str(fmap[2]) == (
        "RF of the output at (2,): empty (the gradient is zero on every random input: its window covers only "
        "padding, or its units are dead there) [weights]"
    )


def test_center_is_middle_of_the_map_and_negative_indices_count_from_the_end():
    model = nn.Conv2d(1, 1, 3)
    assert probe_rf(model, (1, 1, 10, 11)).position == (4, 4)
    assert probe_rf(model, (1, 1, 10, 11), (-1, -2)).position == (7, 7)


def test_map_indexing_and_iteration():
    fmap = probe_rf(nn.Conv1d(1, 1, 3), (1, 1, 6), "all")
    assert len(fmap) == 4
    assert [f.bounds for f in fmap] == [((i, i + 2),) for i in range(4)]
    assert isinstance(fmap[2], ReceptiveField) and fmap[2].heatmap is None
    assert fmap.size.flatten().tolist() == [3, 3, 3, 3]
    with pytest.raises(IndexError, match="outside"):
        fmap[4]


def test_verify_rejects_wrong_bounds():
    import dataclasses

    model = seed_readme_convs()
    field = probe_rf(model, [1, 3, 60, 90], pos=(4, 8))
    assert verify_rf(model, field).passed
    too_small = verify_rf(model, dataclasses.replace(field, bounds=((19, 58), (28, 50))))
    assert not too_small and too_small.outside_influence
    too_large = verify_rf(model, dataclasses.replace(field, bounds=((17, 58), (28, 50))))
    assert not too_large and too_large.faces[0] == (False, True)
    with pytest.raises(ValueError, match="theoretical"):
        verify_rf(model, probe_rf(model, [1, 3, 60, 90], pos=(4, 8), mode="weights"))
    # A list or a map of fields was refused as if it were a weights-mode field.
    for many in (probe_rf(model, [1, 3, 60, 90], pos=[(0, 0), (1, 1)]), probe_rf(model, [1, 3, 60, 90], "all")):
        with pytest.raises(ValueError, match=r"verify_rf checks one ReceptiveField: verify each") as refused:
            verify_rf(model, many)
        assert "weights-mode" not in str(refused.value)


def test_deep_field_tails_do_not_underflow():
    # 100 three-tap layers: the extreme taps carry (1/3)^100 ~ 2e-48 of the centre's weight, below float32's range.
    model = nn.Sequential(*[nn.Conv1d(1, 1, 3, bias=False) for _ in range(100)])
    assert probe_rf(model, (1, 1, 260), pos=10).bounds == ((10, 210),)
    with pytest.raises(ProbeError, match="float32's range"):  # float32 alone would cut the tails: refused
        probe_rf(model, (1, 1, 260), pos=10, dtype=torch.float32)


class Doubles(nn.Module):
    """A residual 1 x 1 convolution: on the theoretical copy's constants each block doubles what it is given."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 1, bias=False)

    def forward(self, x):
        return x + self.conv(x)


def test_a_theoretical_copy_that_overflows_float32_is_read_again_in_float64():
    """A deep residual stack doubles the copy's constants at every block, past float32's range (2^128) after 130
    blocks (torchvision's ViT-B/16 at its last encoder layer): the probe refused it as an overflow of the model's
    own, where float64 holds it. Read again in float64, as a gradient near underflow is; refused where a dtype is
    asked for."""
    model = nn.Sequential(nn.Conv1d(1, 1, 3, bias=False), *[Doubles() for _ in range(130)])
    assert probe_rf(model, (1, 1, 20), pos=8).bounds == ((8, 10),)
    with pytest.raises(ProbeError, match="not finite"):
        probe_rf(model, (1, 1, 20), pos=8, dtype=torch.float32)


class StarReLUBlock(nn.Module):
    """MetaFormer's MLP block: norm, 1 x 1 expansion, StarReLU (``s * relu(x) ** 2 + b``), 1 x 1 projection."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.norm, self.fc1, self.fc2 = (
            nn.GroupNorm(1, channels),
            nn.Conv1d(channels, 4 * channels, 1),
            nn.Conv1d(4 * channels, channels, 1),
        )
        self.scale, self.bias = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + self.fc2(self.scale * nn.functional.relu(self.fc1(self.norm(x))) ** 2 + self.bias)


class SelfAttention(nn.Module):
    """Residual single-head attention over the positions of a (N, C, L) map."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)

    def forward(self, x):
        q, k, v = self.qkv(x).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        return x + nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)


def test_squares_compounded_through_a_deep_stack_do_not_overflow_the_theoretical_copy():
    """The copy kept a power's real values with the identity's gradient: squares compounded block after block, and
    attention scores of those values overflowed float64 (timm's CAFormer-S18 was refused as an overflow)."""
    model = nn.Sequential(nn.Conv1d(1, 4, 3), *[StarReLUBlock() for _ in range(12)], SelfAttention(), StarReLUBlock())
    assert probe_rf(model, (1, 1, 20), pos=8).bounds == ((0, 19),)


class LogDistancePooling(nn.Module):
    """Attention pooling over all positions by the log distance of each to a fixed point: ``log((y - 3) ** 2)``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(1, 4, 3, padding=1, bias=False)
        self.b = nn.Conv1d(4, 4, 5, padding=2, bias=False)
        self.a = nn.Conv1d(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.b(self.stem(x))
        attention = torch.softmax(torch.log(((y - 3.0) ** 2).mean(1) + 1e-3), dim=-1)
        return self.a(y) + torch.einsum("ncl,nl->nc", y, attention)[..., None]


def test_a_square_of_a_negative_value_stays_positive_on_the_copy():
    """A square run as the identity in its values too left ``y - 3`` negative on the copy: the log of it was NaN, the
    softmax over NaN scores found no live input, and the pooled path vanished (8..16 for 0..23)."""
    assert probe_rf(LogDistancePooling(), (1, 1, 24), pos=12).bounds == ((0, 23),)


class CachesAComputedWeight(nn.Module):
    """A convolution whose eval-mode forward caches a weight computed with gradient in a dict, as timm's attention
    bias cache does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, bias=False)
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        if "weight" not in self.cache:
            self.cache["weight"] = self.conv.weight * 2
        return nn.functional.conv1d(x, self.cache["weight"])


def test_a_cache_of_tensors_computed_with_gradient_is_copied_without_its_graph():
    """After a forward with gradient in eval mode, the deep copy refused the cache's non-leaf tensor and the probe
    failed with "the model cannot be deep-copied" (timm's EfficientFormer, LeViT, EfficientViT-M, TinyViT). The copy
    leaves such entries out of its dict, and its forward computes them again (a cache of the live values would be
    read as a fixed filter: 9..9 for 8..10)."""
    model = CachesAComputedWeight().eval()
    with torch.no_grad():  # live weights with a centre tap only: the cache computed from them must not be read
        model.conv.weight[..., 0] = model.conv.weight[..., 2] = 0
    model(torch.randn(1, 1, 20)).sum().backward()
    assert probe_rf(model, (1, 1, 20), pos=8).bounds == ((8, 10),)  # computed again from the copy's constants
    assert probe_rf(model, (1, 1, 20), pos=8, mode="weights").bounds == ((9, 9),)
    assert not model.cache["weight"].is_leaf  # the live cache is left as it was


def test_importing_the_probe_does_not_import_lightning():
    import subprocess
    import sys

    code = (
        "import sys, rf_callback; rf_callback.probe_rf; assert 'lightning' not in sys.modules; rf_callback.RFCallback"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_drop_path_residual_block_is_the_union_over_paths():
    class DropPath(nn.Module):  # stochastic depth, as in timm: a random per-sample mask in training only
        def forward(self, x):
            if not self.training:
                return x
            keep = (torch.rand(x.shape[0], 1, 1, 1) > 0.5).to(x.dtype)
            return x * keep / 0.5

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.drop = nn.Conv2d(2, 2, 5, padding=2), DropPath()

        def forward(self, x):
            return x + self.drop(self.conv(x))

    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), Block()).train()
    assert probe_rf(model, (1, 1, 16, 16), (8, 8)).bounds == ((5, 11), (5, 11))  # 1 + 2 + 4 = 7, via the conv path


@dataclasses.dataclass
class _Record:
    logits: torch.Tensor
    features: torch.Tensor


_Pair = collections.namedtuple("_Pair", "features pooled")


class _Returns(nn.Module):
    """A 3 x 3 conv whose output comes in a record; ``alias`` names the conv a second time."""

    def __init__(self, kind: str):
        super().__init__()
        self.conv, self.kind = nn.Conv2d(1, 2, 3), kind
        self.alias = self.conv

    def forward(self, x):
        features = self.conv(x)
        if self.kind == "dataclass":
            return _Record(features.mean((2, 3)), features)
        if self.kind == "namedtuple":
            return _Pair(features, features.mean((2, 3)))
        return features.mean((2, 3)), features


@pytest.mark.parametrize(("kind", "element"), [("dataclass", "features"), ("namedtuple", "features"), ("tuple", -1)])
def test_element_picks_a_dataclass_field_a_namedtuple_field_or_an_index_from_the_end(kind, element):
    """They were refused ("is a _Record, not a tensor"; "is not a index")."""
    assert probe_rf(_Returns(kind), (1, 1, 8, 8), element=element).bounds == ((3, 5), (3, 5))


def test_a_module_registered_under_two_names_answers_to_both():
    """``layer="alias"`` was refused as "not a submodule of the model"."""
    assert probe_rf(_Returns("tuple"), (1, 1, 8, 8), layer="alias").bounds == ((3, 5), (3, 5))
    with pytest.raises(ValueError, match="is not an index of the output"):
        probe_rf(_Returns("tuple"), (1, 1, 8, 8), element=2)


class SelectsPerPixel(nn.Module):
    """A soft choice between two 3-wide branches per position, by logits from a 9-wide context (ASFF, SKNet)."""

    def __init__(self, gumbel: bool = False):
        super().__init__()
        self.narrow, self.other = nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(2, 4, 3, padding=1)
        self.gate = nn.Conv1d(2, 2, 9, padding=4)
        self.gumbel = gumbel

    def forward(self, x):
        logits = self.gate(x)
        weights = F.gumbel_softmax(logits, tau=1.0, dim=1) if self.gumbel else logits.softmax(dim=1)
        return self.narrow(x) * weights[:, :1] + self.other(x) * weights[:, 1:]


@pytest.mark.parametrize("gumbel", [False, True], ids=["softmax", "gumbel_softmax"])
def test_verify_rf_sees_the_paths_through_a_softmax_over_branches(gumbel):
    """On the copy's equal values the softmax is uniform whatever the input: verify_rf failed the right field and
    passed a field without the gate's context. A soft gumbel_softmax gate's field followed the random state (3 wide
    under some seeds), as the noise fell on the copy's equal values."""
    model = SelectsPerPixel(gumbel)
    for seed in range(3):
        torch.manual_seed(seed)
        field = probe_rf(model, (1, 2, 32), 16)
        assert field.bounds == ((12, 20),)
        assert verify_rf(model, field)
    assert not verify_rf(model, dataclasses.replace(field, bounds=((15, 17),)))


def test_a_map_indexed_by_numpy_or_torch_integers_gives_a_field_of_plain_ints():
    """``fmap[np.int64(2), np.int64(3)]`` (an index from ``np.argmax``) kept the numpy integers: the field printed
    ``(np.int64(2), np.int64(3))``, its ``to_dict()`` was no JSON, and a 1D map refused ``np.int64(3)``."""
    import numpy as np

    field_map = probe_rf(nn.Sequential(nn.Conv2d(2, 2, 3, 2), nn.Conv2d(2, 2, 3)), (1, 2, 20, 20), "all")
    expected = field_map[2, 3]
    for index in [
        (np.int64(2), np.int64(3)),
        (torch.tensor(2), torch.tensor(3)),
        np.array([2, 3]),
        torch.tensor([2, 3]),
    ]:
        field = field_map[index]
        assert field == expected and type(field.position[0]) is int and type(field.center[0]) is float
        assert json.loads(json.dumps(field.to_dict())) == expected.to_dict()
    line = probe_rf(nn.Conv1d(2, 2, 3), (1, 2, 10), "all")
    assert line[np.int64(3)] == line[3]
    with pytest.raises(IndexError, match="integer indices"):
        field_map[2.0, 3]


def test_verify_rf_passes_a_forward_that_adds_noise():
    """Each input of verify_rf's batch drew its own noise, so every input seemed to change the output: the right
    field failed with an influence from outside."""

    class AddsNoise(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            y = self.first(x)
            return self.second(y + 0.1 * torch.randn_like(y))

    model = AddsNoise()
    field = probe_rf(model, (1, 2, 16, 16), (6, 6))
    assert field.bounds == ((6, 10), (6, 10))
    state = torch.get_rng_state()
    assert verify_rf(model, field)
    assert torch.equal(torch.get_rng_state(), state)
    assert not verify_rf(model, dataclasses.replace(field, bounds=((6, 9), (6, 10))))


class OnePositionReadsFurther(nn.Module):
    """Output 21 alone adds a weak dilated branch (taps 19, 21, 23); every other output is a 1 x 1 conv."""

    def __init__(self, scale: float):
        super().__init__()
        self.point, self.dilated = nn.Conv1d(1, 1, 1), nn.Conv1d(1, 1, 3, padding=2, dilation=2)
        self.scale = scale

    def forward(self, x):
        point = self.point(x)
        return torch.where(torch.arange(x.shape[-1]) != 21, point, point + self.scale * self.dilated(x))


class ReadsFurtherIn16Bits(OnePositionReadsFurther):
    def forward(self, x):
        return super().forward(x).to(torch.bfloat16)


def test_a_weak_far_tap_is_seen_in_shared_passes_of_a_16_bit_output():
    """A tolerance of twice bfloat16's unit let a 3 % leak pass where the output alone was cast: 21..21 again."""
    model = ReadsFurtherIn16Bits(0.03)
    assert probe_rf(model, (1, 1, 32), 21).bounds == ((19, 23),)
    assert probe_rf(model, (1, 1, 32), "all")[21].bounds == ((19, 23),)


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
@pytest.mark.parametrize("scale", [0.05, 0.5])
def test_a_weak_far_tap_of_one_position_is_seen_in_shared_passes(scale, mode):
    """The taps at 19 and 23 land in the neighbours' one-pixel boxes, and the coded check of the shared pass let a
    leak of up to a quarter of the owner's gradient (times the owner's code over the member count) pass:
    pos='all' and a list of 32 read 21..21 where the single probe reads 19..23."""
    model = OnePositionReadsFurther(scale)
    assert probe_rf(model, (1, 1, 32), 21, mode=mode).bounds == ((19, 23),)
    assert probe_rf(model, (1, 1, 32), "all", mode=mode)[21].bounds == ((19, 23),)
    listed = probe_rf(model, (1, 1, 32), list(range(32)), mode=mode)
    assert [field.bounds for field in listed] == [((i, i),) if i != 21 else ((19, 23),) for i in range(32)]


def test_verify_rf_passes_causal_attention():
    """With the softmax twin's values following its inputs, the masked future got a share too and seemed to change
    the output: every causal field failed."""

    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Conv1d(2, 12, 1)

        def forward(self, x):
            q, k, v = self.qkv(x).transpose(1, 2).chunk(3, dim=-1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    model = Causal()
    for position in (1, 6, 10):
        field = probe_rf(model, (1, 2, 12), position)
        assert field.bounds == ((0, position),) and verify_rf(model, field)
    assert not verify_rf(model, dataclasses.replace(field, bounds=((0, 9),)))


class _BandedAttention(nn.Module):
    """Attention over a band of +-2 positions, its 0/-inf mask a frozen parameter named ``name``."""

    def __init__(self, name: str, length: int = 16):
        super().__init__()
        self.q, self.k, self.v = (nn.Conv1d(2, 4, 1, bias=False) for _ in range(3))
        i = torch.arange(length)
        band = torch.zeros(length, length).masked_fill((i[:, None] - i[None, :]).abs() > 2, float("-inf"))
        self.name = name
        setattr(self, name, nn.Parameter(band, requires_grad=False))

    def forward(self, x):
        logits = torch.einsum("ncl,ncm->nlm", self.q(x), self.k(x)) / 2 + getattr(self, self.name)
        return torch.einsum("nlm,ncm->ncl", logits.softmax(-1), self.v(x))


@pytest.mark.parametrize("name", ["attn_bias", "attn_mask"])
def test_a_frozen_mask_named_as_a_bias_is_kept_in_weights_mode(name):
    """Weights mode zeroes biases: an "attn_bias" holding the band's -inf mask was zeroed, and the field read every
    position (0..15) where the band reads 6..10, wider than the theoretical field."""
    model = _BandedAttention(name)
    for mode in ("theoretical", "weights"):
        assert probe_rf(model, (1, 2, 16), 8, mode=mode).bounds == ((6, 10),)


class _DeepWithAPositionTerm(nn.Module):
    """40 3-tap convolutions (r = 81, P = 40) and a term of the position added at the end, as an embedding is."""

    def __init__(self, depth: int = 40, length: int = 100):
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv1d(2, 2, 3, padding=1) for _ in range(depth)))
        self.position = nn.Parameter(torch.randn(1, 2, length))

    def forward(self, x):
        return self.convs(x) + self.position


def test_verify_rf_refuses_a_check_below_the_rounding_of_an_input_independent_term():
    # The field's edges reach the output by 8e-20 beside a term of 5e-3: compared with zeros in float64, the right
    # field's faces changed nothing and failed, and a field one input too small on each side passed.
    model = _DeepWithAPositionTerm()
    field = probe_rf(model, (1, 2, 100), 50)
    assert field.bounds == ((10, 90),)  # the closed form
    too_small = dataclasses.replace(field, bounds=((11, 89),), heatmap=None)
    for checked in (field, too_small):
        with pytest.raises(ProbeError, match=r"cannot check the field at \(50,\) by forward passes.*input-independent"):
            verify_rf(model, checked)
    shallow = _DeepWithAPositionTerm(depth=4)  # effects of 1e-3 beside it: checked as before
    field = probe_rf(shallow, (1, 2, 100), 50)
    assert verify_rf(shallow, field).passed
    assert not verify_rf(shallow, dataclasses.replace(field, bounds=((47, 53),), heatmap=None)).passed


class _ConvsAndABufferedShift(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv2d(4, 4, 3, padding=1) for _ in range(12)))
        self.register_buffer("shift", torch.full((1, 4, 1, 1), 10.0))

    def forward(self, x):
        return self.convs(x) + self.shift


def test_verify_rf_checks_a_field_whose_faces_stand_well_above_a_shift_it_cannot_zero():
    # Its corner pixels reach the output by 3.5e-12 beside 10, but each face as a whole by 2e-6: the faces are what
    # the comparisons see (the first version of the refusal took the weakest pixel, and refused this one in float64).
    model = _ConvsAndABufferedShift()
    field = probe_rf(model, (1, 4, 40, 40))
    assert field.bounds == ((8, 32), (8, 32))  # r = 25 at (20, 20)
    too_small = dataclasses.replace(field, bounds=((9, 31), (9, 31)), heatmap=None)
    assert verify_rf(model, field).passed and not verify_rf(model, too_small).passed
    # in float32 a face's 2e-6 lies within 16 units of rounding of 10: refused, with the dtype that sees it
    with pytest.raises(ProbeError, match=r"within the rounding of an input-independent term.*dtype=torch.float64"):
        verify_rf(model, field, dtype=torch.float32)
