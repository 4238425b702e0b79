"""Linear and cubic resizes: the field is what the resize's formula reads, not what float32 rounding adds to it."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rf_callback import probe_rf, verify_rf
from rf_callback.core.resize import exact_grid_sample, exact_resize


class Resize(nn.Module):
    """A 1 × 1 convolution, then ``F.interpolate`` with the given arguments."""

    def __init__(self, n_axes: int, **arguments):
        super().__init__()
        self.conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n_axes - 1](1, 1, 1)
        self.arguments = arguments

    def forward(self, x):
        return F.interpolate(self.conv(x), **self.arguments)


def source(index: int, scale: Fraction, corners: bool) -> Fraction:
    """ATen's source coordinate of an output index, in exact arithmetic."""
    return scale * index if corners else scale * (index + Fraction(1, 2)) - Fraction(1, 2)


def aten_scale(length: int, out: int, corners: bool) -> Fraction:
    """Input indices per output index, as ATen defines it for a resize to a size."""
    if corners:
        return Fraction(length - 1, out - 1) if out > 1 else Fraction(0)
    return Fraction(length, out)


def linear_bounds(index: int, length: int, scale: Fraction, corners: bool) -> tuple[int, int]:
    """The inputs a linear resize reads for one output index: one where the source is an input index, else two."""
    where = max(source(index, scale, corners), Fraction(0))
    first = math.floor(where)
    return first, (min(first + 1, length - 1) if where != first else first)


def cubic_bounds(index: int, length: int, scale: Fraction, corners: bool) -> tuple[int, int]:
    """A cubic resize reads four inputs (clamped to the input), or one where the source is an input index."""
    where = source(index, scale, corners)
    first = math.floor(where)
    if where == first:
        return min(max(first, 0), length - 1), min(max(first, 0), length - 1)
    return max(first - 1, 0), min(max(first + 2, 0), length - 1)


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(2, 24),
    out=st.integers(1, 60),
    corners=st.booleans(),
    mode=st.sampled_from(["theoretical", "weights"]),
)
def test_linear_resize_to_a_size_reads_exactly_its_two_neighbours(length, out, corners, mode):
    model = Resize(1, size=out, mode="linear", align_corners=corners)
    field_map = probe_rf(model, (1, 1, length), "all", mode=mode)
    scale = aten_scale(length, out, corners)
    for index in range(out):
        assert field_map[(index,)].bounds == (linear_bounds(index, length, scale, corners),)


@pytest.mark.parametrize("factor", [1.5, 2.5, 0.75, 1 / 3, 13 / 7, 3.0])
def test_bilinear_resize_by_a_factor_reads_exactly_its_neighbours(factor):
    length = 7
    model = Resize(2, scale_factor=factor, mode="bilinear")
    field_map = probe_rf(model, (1, 1, length, length), "all")
    out = math.floor(length * factor)
    scale = 1 / Fraction(factor).limit_denominator(1000)
    for index in range(out):
        expected = linear_bounds(index, length, scale, corners=False)
        assert field_map[(index, index)].bounds == (expected, expected)


def test_seven_to_thirteen_reads_one_input_where_the_source_is_an_input_index():
    # Output 6 of 7 -> 13 has its source at 6.5 * 7 / 13 - 0.5 = 3 exactly; float32 makes it 3 + 1e-7.
    model = Resize(1, size=13, mode="linear")
    assert probe_rf(model, (1, 1, 7), 6).bounds == ((3, 3),)
    assert probe_rf(model, (1, 1, 7), 6, dtype=torch.float32).bounds == ((3, 3),)


@settings(max_examples=30, deadline=None)
@given(length=st.integers(4, 16), out=st.integers(2, 40), corners=st.booleans())
def test_bicubic_resize_reads_four_inputs_or_one(length, out, corners):
    model = Resize(2, size=(out, length), mode="bicubic", align_corners=corners)
    field_map = probe_rf(model, (1, 1, length, length), "all")
    scale = aten_scale(length, out, corners)
    for index in range(out):
        rows = cubic_bounds(index, length, scale, corners)
        assert field_map[(index, 0)].bounds[0] == rows


@settings(max_examples=30, deadline=None)
@given(length=st.integers(4, 30), out=st.integers(2, 12), mode=st.sampled_from(["theoretical", "weights"]))
def test_antialiased_shrink_reads_the_inputs_under_its_stretched_triangle(length, out, mode):
    """Shrinking by s = n / out, output i reads the inputs whose centres lie strictly within s of its centre
    s * (i + 1/2) (the triangle filter stretched by s); float32 gave 132 of 754 such resizes a stray neighbour."""
    out = min(out, length)
    model = Resize(2, size=(out, 1), mode="bilinear", antialias=True)
    field_map = probe_rf(model, (1, 1, length, 3), "all", mode=mode)
    scale = Fraction(length, out)
    for index in range(out):
        center = scale * (index + Fraction(1, 2))
        read = [j for j in range(length) if abs(j + Fraction(1, 2) - center) < scale]
        assert field_map[(index, 0)].bounds == ((read[0], read[-1]), (0, 2))


@pytest.mark.parametrize(
    "arguments",
    [
        dict(size=11, mode="linear"),
        dict(size=5, mode="linear", align_corners=True),
        dict(scale_factor=13 / 7, mode="linear"),
        dict(scale_factor=1.7, mode="linear", recompute_scale_factor=True),
        dict(size=(9, 4), mode="bilinear"),
        dict(scale_factor=(0.5, 2.25), mode="bilinear", align_corners=True),
        dict(size=(13, 6), mode="bicubic"),
        dict(scale_factor=2, mode="bicubic", align_corners=True),
        dict(size=(5, 9, 3), mode="trilinear"),
        dict(size=(3, 4), mode="bilinear", antialias=True),
        dict(scale_factor=0.6, mode="bilinear", antialias=True, align_corners=True),
        dict(size=(2, 9), mode="bicubic", antialias=True),
        dict(scale_factor=(0.3, 1.5), mode="bicubic", antialias=True),
    ],
)
def test_exact_resize_computes_what_interpolate_computes(arguments):
    n_axes = {"linear": 1, "bilinear": 2, "bicubic": 2, "trilinear": 3}[arguments["mode"]]
    x = torch.randn(2, 3, *(7, 6, 5)[:n_axes], dtype=torch.float64)
    expected = F.interpolate(x, **arguments)
    resized = exact_resize((x,), arguments, unsigned=False)
    assert resized is not None and resized.shape == expected.shape
    torch.testing.assert_close(resized, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "arguments",
    [dict(scale_factor=2, mode="bilinear"), dict(size=(14, 9), mode="bilinear"), dict(scale_factor=1.7, mode="linear")],
)
def test_a_resize_whose_sources_miss_every_input_index_runs_pytorchs_own_kernel(arguments):
    """No weight is exactly 0 there (output i of a doubling reads i/2 - 1/4), so PyTorch's support is exact: the
    exact resize, several passes, is skipped. In theoretical mode a cubic one still runs, for its weights' signs."""
    x = torch.randn(1, 2, *(7, 6)[: 1 if arguments["mode"] == "linear" else 2])
    assert exact_resize((x,), arguments, unsigned=True) is None
    assert exact_resize((torch.randn(1, 2, 7, 6),), dict(scale_factor=2, mode="bicubic"), unsigned=True) is not None


@pytest.mark.parametrize(
    "arguments",
    [
        dict(size=11, mode="nearest"),
        dict(size=(4, 4), mode="area"),
        dict(size=(4, 4), mode="linear"),  # linear needs a 3D input: the call raises as it is
    ],
)
def test_other_resizes_run_as_they_are(arguments):
    assert exact_resize((torch.randn(1, 1, 8, 8),), arguments, unsigned=False) is None


class Warp(nn.Module):
    """A spatial transformer's sampling with a fixed affine ``theta`` (the identity: no warp)."""

    def __init__(self, theta, **arguments):
        super().__init__()
        self.theta, self.arguments = theta, arguments

    def forward(self, x):
        theta = torch.tensor(self.theta, dtype=x.dtype).expand(x.shape[0], 2, 3)
        corners = self.arguments.get("align_corners", False)
        return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=corners), **self.arguments)


@pytest.mark.parametrize("sampling", ["bilinear", "bicubic"])
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
@pytest.mark.parametrize("corners", [False, True])
def test_an_identity_warp_reads_each_pixel_alone(mode, corners, sampling):
    """float32's grid puts pixel i at i + 1e-7, and bilinear sampling gave i + 1 a weight of 6e-8: each field was
    one row and one column too wide (288 of 1344 warped positions); bicubic sampling's rows i - 1 .. i + 2 (a
    bicubic warp before a 3 x 3 convolution: 147 of 196 fields too wide)."""
    model = Warp([[1.0, 0, 0], [0, 1.0, 0]], align_corners=corners, mode=sampling)
    field_map = probe_rf(model, (1, 2, 6, 7), "all", mode=mode)
    for i, j in field_map.positions():
        assert field_map[(i, j)].bounds == ((i, i), (j, j)), (i, j)


@pytest.mark.parametrize("sampling", ["bilinear", "bicubic"])
@pytest.mark.parametrize(
    ("theta", "padding"),
    [
        ([[1.0, 0, 0], [0, 1.0, 0]], "zeros"),  # the identity
        ([[-1.0, 0, 0], [0, 1.0, 0]], "zeros"),  # a horizontal flip
        ([[1.0, 0, 0.3], [0, 1.0, 0]], "border"),  # a shift by a fraction of a pixel
        ([[1.0, 0, 0.3], [0, 1.0, 0]], "zeros"),
    ],
)
def test_verify_rf_passes_the_fields_of_a_fixed_warp(theta, padding, sampling):
    """verify_rf ran PyTorch's sampling kernel, whose rounding gives inputs the exact sampling does not read weights
    of 1e-16: it failed right fields (15 of 64 positions of an identity warp before a 3 x 3 convolution)."""
    model = nn.Sequential(Warp(theta, padding_mode=padding, mode=sampling, align_corners=False), nn.Conv2d(1, 1, 3))
    field_map = probe_rf(model, (1, 1, 10, 10), "all")
    failed = [p for p in field_map.positions() if not verify_rf(model, field_map[p]).passed]
    assert not failed


class SegmentationHead(nn.Module):
    """Stride-2 convolutions, a 1 x 1 head, and the logits resized to the input (``F.interpolate(size=...)``)."""

    def __init__(self, **resize):
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv2d(1, 1, 3, stride=2, padding=1) for _ in range(3)))
        self.resize = resize

    def forward(self, x):
        return F.interpolate(self.convs(x), size=x.shape[-2:], **self.resize)


@pytest.mark.parametrize(
    "resize",
    [
        {"mode": "bilinear", "align_corners": False},
        {"mode": "bicubic", "align_corners": False},
        {"mode": "bilinear", "align_corners": False, "antialias": True},
    ],
)
def test_verify_rf_passes_a_resize_whose_source_falls_on_an_input_index(resize):
    """verify_rf ran PyTorch's resize kernel, which gives the neighbour of a source that lands exactly on an index a
    weight of 1e-16 (7 to 51 rows: output row 25's source is (25.5 * 7 / 51 - 0.5) = 3): it failed right fields."""
    model = SegmentationHead(**resize)
    field = probe_rf(model, (1, 1, 51, 51), (25, 25))
    assert verify_rf(model, field).passed
    field_map = probe_rf(model, (1, 1, 51, 51), "all")
    failed = [p for p in list(field_map.positions())[::7] if not verify_rf(model, field_map[p]).passed]
    assert not failed


def test_a_warp_by_a_fraction_of_a_pixel_reads_both_neighbours():
    # A shift of 0.25 in [-1, 1] on 7 columns is 0.875 of a column: column j reads j and j + 1 (none past the edge).
    field_map = probe_rf(Warp([[1.0, 0, 0.25], [0, 1.0, 0]]), (1, 1, 6, 7), "all")
    for i, j in field_map.positions():
        assert field_map[(i, j)].bounds == ((i, i), (j, min(j + 1, 6))), (i, j)


class HalfPrecisionWarp(nn.Module):
    """A warp by a fixed grid (a buffer) that the forward samples in 16-bit floats, shifted by ``shift`` pixels."""

    def __init__(self, dtype: torch.dtype, shift: float, size=(9, 40)):
        super().__init__()
        theta = torch.tensor([[[1.0, 0, 2 * shift / size[1]], [0, 1.0, 0]]])
        self.register_buffer("grid", F.affine_grid(theta, [1, 1, *size], align_corners=False))
        self.dtype = dtype

    def forward(self, x):
        grid = self.grid.to(self.dtype).expand(len(x), -1, -1, -1)
        return F.grid_sample(x.to(self.dtype), grid, align_corners=False).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_sub_pixel_warp_in_half_precision_reads_both_neighbours(dtype, mode):
    """A coordinate within 8 units of 1's last place (times the length) of an index was taken for it: in float16
    that is 0.31 of a pixel on 40 pixels, and a 0.3-pixel shift read one column where it reads two (bfloat16 on 96
    pixels too, with half a unit). An identity warp in 16 bits still reads each pixel alone."""
    for width in (40, 96, 160):  # bfloat16's unit of 1 is 0.375 of a pixel on 96 pixels
        field = probe_rf(HalfPrecisionWarp(dtype, 0.3, (5, width)), (1, 1, 5, width), (2, width // 2), mode=mode)
        assert field.bounds == ((2, 2), (width // 2, width // 2 + 1))
    for width in (16, 40, 224):
        field = probe_rf(HalfPrecisionWarp(dtype, 0.0, (5, width)), (1, 1, 5, width), (2, width // 3), mode=mode)
        assert field.bounds == ((2, 2), (width // 3, width // 3))


@pytest.mark.parametrize(("n_axes", "sampling"), [(2, "bilinear"), (3, "bilinear"), (2, "bicubic")])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("corners", [False, True])
def test_exact_grid_sample_computes_what_grid_sample_computes(n_axes, sampling, padding, corners):
    generator = torch.Generator().manual_seed(n_axes)
    x = torch.randn(2, 3, *(5, 6, 7)[:n_axes], dtype=torch.float64, generator=generator)
    grid = torch.rand(2, *(4, 3, 5)[:n_axes], n_axes, dtype=torch.float64, generator=generator) * 3 - 1.5
    grid[0, 0, 0] = 0.0  # the centre, (n - 1) / 2: an input index on the odd axes, whose sampling is read exactly
    arguments = dict(mode=sampling, padding_mode=padding, align_corners=corners)
    torch.testing.assert_close(
        exact_grid_sample((x, grid), arguments), F.grid_sample(x, grid, **arguments), rtol=1e-12, atol=1e-12
    )
    assert exact_grid_sample((x, grid), dict(arguments, mode="nearest")) is None


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_the_theoretical_bicubic_sampling_reads_the_same_inputs_with_positive_weights(padding):
    """The cubic kernel's outer lobes are negative: on the theoretical copy they could cancel another path to the
    same input. Its twin weighs the same taps by their magnitudes."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 6, 7, dtype=torch.float64, generator=generator)
    grid = torch.rand(1, 3, 4, 2, dtype=torch.float64, generator=generator) * 2.4 - 1.2
    grid[0, 2, 2] = 0.0  # one coordinate on an input index (the exact sampling runs), the others between them
    arguments = dict(mode="bicubic", padding_mode=padding, align_corners=False)
    for row, column in [(0, 0), (1, 2), (2, 3)]:
        real, twin = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        F.grid_sample(real, grid, **arguments)[0, 0, row, column].backward()
        exact_grid_sample((twin, grid), arguments, unsigned=True)[0, 0, row, column].backward()
        assert torch.equal(real.grad != 0, twin.grad != 0) and bool((real.grad < 0).any())
        assert bool((twin.grad >= 0).all())


def test_a_grid_with_no_coordinate_on_an_input_index_runs_pytorchs_own_kernel():
    """A learned flow rarely lands on an index: there the kernel's weights have the exact support."""
    grid = torch.full((1, 3, 3, 2), 0.3)  # column and row 0.3 * 3.5 + 3 = 4.05 of 8 (not aligned): no index
    assert exact_grid_sample((torch.randn(1, 1, 8, 8), grid), dict(align_corners=False)) is None


class GridInInputType(nn.Module):
    """An identity warp whose grid ``F.affine_grid`` computes in the input's type, then a 3 x 3 convolution."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode, self.conv = mode, nn.Conv2d(1, 1, 3)

    def forward(self, x):
        theta = torch.eye(2, 3, dtype=x.dtype)[None].expand(len(x), 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return self.conv(F.grid_sample(x, grid, mode=self.mode, align_corners=False))


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_bicubic_warp_probed_in_16_bits_reads_each_pixel_alone(dtype, mode):
    """A 16-bit grid computed in 16 bits lies up to 0.013 of a pixel off the index, more than the snap allows:
    float64 bicubic weights read the neighbours (3..7 for 4..6), where PyTorch's kernel, in the grid's type, lands
    on the index. 16-bit bicubic grids run PyTorch's kernel."""
    field = probe_rf(GridInInputType("bicubic"), (1, 1, 9, 11), (3, 4), mode=mode, dtype=dtype)
    assert field.bounds == ((3, 5), (4, 6))
