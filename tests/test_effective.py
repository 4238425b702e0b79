"""Effective-field metrics on hand-made maps and on linear networks whose maps are derived by hand."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from rf_callback import NoGradientError, ProbeError, effective_rf, probe_rf
from rf_callback.core import geometry_flow
from rf_callback.core.effective import center_of_mass, high_contribution, mass_extent, spread

TRINOMIAL = [1.0, 3.0, 6.0, 7.0, 6.0, 3.0, 1.0]  # three 3-tap unit convolutions: (1 + x + x^2)^3


def constant_chain(conv: type, layers: int) -> nn.Sequential:
    model = nn.Sequential(*[conv(1, 1, 3, bias=False) for _ in range(layers)])
    with torch.no_grad():
        for layer in model:
            layer.weight.fill_(1.0)
    return model


def test_three_tap_chain_marginal_and_extents_are_exact():
    field = effective_rf(constant_chain(nn.Conv1d, 3), torch.rand(4, 1, 20) + 0.1, 7)
    assert field.heatmap[7:14].tolist() == TRINOMIAL
    assert field.heatmap.sum() == 27
    assert field.extent(0.9) == ((8, 12),)  # 5 taps: 3 + 6 + 7 + 6 + 3 = 25 >= 24.3, 4 taps hold at most 22
    assert field.extent(0.5) == ((9, 11),)  # 3 taps: 19 >= 13.5, 2 taps hold at most 13
    metrics = field.metrics((0.9,))
    assert metrics["extent0.9_l"] == 5 and metrics["extent0.9_ratio_l"] == 5 / 7
    assert metrics["com_l"] == 10 and metrics["com_offset_l"] == 0
    assert metrics["std_l"] == pytest.approx(math.sqrt(2))  # 3 layers x variance 2/3


def test_2d_map_is_the_product_of_per_axis_marginals():
    field = effective_rf(constant_chain(nn.Conv2d, 3), torch.rand(3, 1, 16, 16) + 0.1, (4, 5))
    expected = torch.zeros(16, 16, dtype=torch.float64)
    expected[4:11, 5:12] = torch.outer(torch.tensor(TRINOMIAL), torch.tensor(TRINOMIAL)).double()
    assert torch.equal(field.heatmap, expected)
    assert field.extent(0.9) == ((5, 9), (6, 10))


def test_trained_biases_change_which_relus_are_active():
    model = nn.Sequential(nn.Conv1d(1, 1, 3), nn.ReLU(), nn.Conv1d(1, 1, 3))
    with torch.no_grad():
        model[0].weight.fill_(1.0), model[0].bias.fill_(-100.0), model[2].weight.fill_(1.0)
    inputs = torch.rand(4, 1, 16)
    with pytest.raises(NoGradientError, match="the output position is zero everywhere"):
        effective_rf(model, inputs, 5)  # as trained, the bias silences every unit
    assert effective_rf(model, inputs, 5, biases="zero").extent(1.0) == ((5, 9),)


class _OverChannels(nn.Module):
    """A LayerNorm (``"norm"``) or a softmax (``"softmax"``) over the channels of each position, channels first."""

    def __init__(self, kind: str, channels: int):
        super().__init__()
        self.kind, self.norm = kind, nn.LayerNorm(channels)

    def forward(self, x):
        if self.kind == "softmax":
            return x.softmax(dim=1)
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize(
    ("kind", "dtype"), [("norm", torch.float32), ("norm", torch.float64), ("softmax", torch.float32)]
)
def test_a_map_whose_channels_cancel_is_refused_as_rounding_noise(kind, dtype):
    """The map adds the output's channels at the position; after a LayerNorm with equal scales, or a softmax, over
    the channels their sum is a constant, so its gradient is zero. The rounding left over (1e-8 in float32) was read
    as a field: extent (92, 106) of 200 samples, with metrics, where a single channel's gradient is about 1."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 8, 9, padding=4), nn.GELU(), nn.Conv1d(8, 8, 9, padding=4), _OverChannels(kind, 8)
    )
    with pytest.raises(ProbeError, match="the output position is rounding noise: .* cancel .* layer="):
        effective_rf(model, torch.randn(4, 1, 200), 100, dtype=dtype)
    with torch.no_grad():  # channels scaled apart: their sum is no constant, and the map a field
        model[3].norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    if kind == "norm":
        assert effective_rf(model, torch.randn(4, 1, 200), 100, dtype=dtype).extent(1.0) == ((92, 108),)


@pytest.mark.parametrize("first", ["blank", "confident"])
def test_rounding_noise_is_refused_whatever_input_comes_first(first):
    """The noise check took its scale from the first input alone: a blank first image (its ReLUs off) or a
    confidently classified one (its softmax saturated) has channels' gradients near zero, and the same noise map was
    returned as a field (extent, spread) with that input first and refused with it last."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1), _OverChannels("softmax", 5)
    )
    inputs = torch.randn(8, 3, 12, 12)
    if first == "blank":
        with torch.no_grad():
            model[0].bias.fill_(-0.5)
        odd = torch.zeros(1, 3, 12, 12)
    else:
        odd = inputs[:1] * 60
    for ordered in (torch.cat([odd, inputs]), torch.cat([inputs, odd])):
        with pytest.raises(ProbeError, match="the output position is rounding noise"):
            effective_rf(model, ordered, (6, 6))


def test_a_small_real_map_beside_cancelling_channels_is_kept_or_asks_for_float64():
    """Scales 1e-4 apart leave a real map 1e-4 of the channels' own gradients, which float32 resolves (it agrees with
    float64's to 2e-4): it is kept, where the first version of the refusal took it for noise. Scales 1e-6 apart
    leave one near float32's rounding: float32 is refused with the fix, float64 measures it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 8, 9, padding=4), nn.GELU(), nn.Conv1d(8, 8, 9, padding=4), _OverChannels("norm", 8)
    )
    inputs = torch.randn(4, 1, 200)
    with torch.no_grad():
        model[3].norm.weight.add_(1e-4 * torch.randn(8))
    narrow = effective_rf(model, inputs, 100)
    wide = effective_rf(model, inputs, 100, dtype=torch.float64)
    assert (narrow.heatmap - wide.heatmap).abs().max() < 1e-3 * wide.heatmap.max()
    with torch.no_grad():
        model[3].norm.weight.fill_(1.0).add_(1e-6 * torch.randn(8))
    with pytest.raises(ProbeError, match=r"below what torch.float32 resolves: .* pass dtype=torch.float64"):
        effective_rf(model, inputs, 100)
    assert effective_rf(model, inputs, 100, dtype=torch.float64).heatmap.max() > 0


def test_a_suspect_map_of_a_model_that_runs_in_float32_alone_says_float64_was_tried():
    """The float64 check of a map near rounding noise ran the model's forward in float64, whose refusal reached the
    user as "the model's forward raised", without a word of float64."""

    class Float32Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv1d(1, 8, 9, padding=4), _OverChannels("norm", 8)

        def forward(self, x):
            if x.dtype != torch.float32:
                raise RuntimeError("float32 only")
            return self.norm(self.conv(x))

    with pytest.raises(ProbeError, match=r"the float64 copy that would tell them apart failed \(.*float32 only"):
        effective_rf(Float32Only(), torch.randn(4, 1, 60), 30)


def test_a_window_holding_exactly_q_counts_on_a_float32_map():
    """Two uniform 4-tap convolutions give a map proportional to [1, 2, 3, 4, 3, 2, 1]: [2, 3, 4, 3] holds exactly
    0.75, but the float32 gradients left it 1e-8 short, past a 1e-12 tolerance, so extent(0.75) had 5 cells (4 in
    float64). And [1, 2, 3, 2, 1]'s two halves tie in mass and in distance to the centre: the first wins, where the
    centre of mass's last bit decided."""
    inputs = torch.randn(3, 3, 60, generator=torch.Generator().manual_seed(0))
    for taps, q, expected in ((4, 0.75, ((28, 31),)), (3, 0.5, ((29, 30),))):
        model = nn.Sequential(nn.Conv1d(3, 4, taps, bias=False), nn.Conv1d(4, 4, taps, bias=False))
        for conv in model:
            nn.init.constant_(conv.weight, 0.1)
        for dtype in (torch.float32, torch.float64):
            assert effective_rf(model, inputs, "center", dtype=dtype).extent(q) == expected


def test_box_map_metrics_in_1d_2d_3d():
    for shape, box in [((11,), (slice(3, 8),)), ((9, 12), (slice(2, 5), slice(4, 10))),
                       ((6, 7, 8), (slice(1, 3), slice(2, 5), slice(0, 4)))]:  # fmt: skip
        heatmap = torch.zeros(shape, dtype=torch.float64)
        heatmap[box] = 1
        assert mass_extent(heatmap, 1.0) == tuple((s.start, s.stop - 1) for s in box)
        assert center_of_mass(heatmap) == tuple((s.start + s.stop - 1) / 2 for s in box)
        # a uniform box of n cells has variance (n^2 - 1) / 12
        assert spread(heatmap) == pytest.approx(tuple(math.sqrt(((s.stop - s.start) ** 2 - 1) / 12) for s in box))


def test_gaussian_of_known_sigma():
    x = torch.arange(201, dtype=torch.float64)
    sigma = 7.0
    gaussian = torch.exp(-((x - 100) ** 2) / (2 * sigma**2))
    assert spread(gaussian)[0] == pytest.approx(sigma, rel=1e-6)
    first, last = mass_extent(gaussian, 0.95)[0]
    # Brute force: the shortest integer interval holding 95 %; about 2 x 1.96 sigma = 27.4 cells wide.
    total = float(gaussian.sum())
    shortest = min(
        (j - i, i, j) for i in range(201) for j in range(i, 201) if float(gaussian[i : j + 1].sum()) >= 0.95 * total
    )
    assert last - first == shortest[0] and abs(last - first + 1 - 2 * 1.96 * sigma) < 1.5
    assert center_of_mass(gaussian)[0] == pytest.approx(100)


def test_spread_of_a_long_map_is_exact_to_float64():
    # Masses 1 and 2 at 77777 and 77778: std sqrt(2/9) exactly (float32 indices gave 0.4714117, off by 1.5e-5).
    heatmap = torch.zeros(100_000, dtype=torch.float64)
    heatmap[77777], heatmap[77778] = 1.0, 2.0
    assert spread(heatmap)[0] == pytest.approx(math.sqrt(2 / 9), rel=1e-12)
    assert center_of_mass(heatmap)[0] == pytest.approx(77777 + 2 / 3, rel=1e-15)


def test_fractions_that_print_alike_in_the_metrics_keys_are_refused():
    field = effective_rf(nn.Conv1d(1, 1, 3), torch.randn(2, 1, 9), "center")
    with pytest.raises(ValueError, match=r"qs=\(0.6, 0.6000001\) holds fractions that print alike"):
        field.metrics((0.6, 0.6000001))
    assert set(field.metrics((0.6, 0.95))) >= {"extent0.6_l", "extent0.95_l"}


def test_off_centre_blob_and_ties_go_to_the_centre_of_mass():
    heatmap = torch.zeros(10, 10, dtype=torch.float64)
    heatmap[7, 2] = 4
    heatmap[7, 3] = 4
    assert center_of_mass(heatmap) == (7.0, 2.5)
    assert mass_extent(heatmap, 0.5) == ((7, 7), (2, 2))  # two one-cell windows hold 50 %: equal mass and distance
    heatmap[7, 3] = 5
    assert mass_extent(heatmap, 0.5) == ((7, 7), (3, 3))  # now the heavier cell


def test_high_contribution_area_ratio():
    heatmap = torch.zeros(9, 9, dtype=torch.float64)
    heatmap[3:6, 3:6] = 1
    heatmap[4, 4] = 9999
    side, share = high_contribution(heatmap, 0.5)
    # log10(A + 1) / max: 1 at the centre, log10(2) / 4 = 0.075 on the 8 around it: the centre holds 1 / 1.60 > 0.5
    assert (side, share) == (1, 1 / 81)
    assert high_contribution(heatmap, 0.99) == (3, 9 / 81)


def test_squares_of_an_even_field_are_centred_alike_at_every_position():
    """A 4-tap field's centre lies between two cells: every position takes the upper one, as the map's n // 2
    does (round() took 2.5 down and 3.5 up, so side0.3 alternated 3, 1, 3, 1 along a uniform input)."""
    conv = nn.Conv1d(1, 1, 4, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0, 2.0, 8.0, 1.0]]]))
    inputs = torch.ones(2, 1, 20)
    sides = {
        tuple(v for k, v in effective_rf(conv, inputs, (p,)).metrics().items() if k.startswith("side"))
        for p in range(1, 8)
    }
    # log10(A + 1) / max: the upper centre cell (8) holds log10(9) / (log10(2) * 2 + log10(3) + log10(9)) = 0.47
    assert sides == {(1.0, 1.0, 3.0, 5.0)}


def test_degenerate_maps_are_refused_clearly():
    with pytest.raises(ValueError, match="zero everywhere"):
        mass_extent(torch.zeros(5))
    with pytest.raises(ValueError, match="inf or NaN"):
        spread(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"q=1.5"):
        mass_extent(torch.ones(3), 1.5)


def test_theoretical_field_passed_in_is_reused_and_must_match():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    inputs = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    theoretical = probe_rf(model, (1, 1, 16, 16), (5, 5))
    given = effective_rf(model, inputs, (5, 5), theoretical=theoretical)
    assert given.theoretical is theoretical
    assert torch.equal(given.heatmap, effective_rf(model, inputs, (5, 5)).heatmap)
    with pytest.raises(ValueError, match=r"pos=\(4, 4\).*theoretical=None"):
        effective_rf(model, inputs, (4, 4), theoretical=theoretical)
    with pytest.raises(ValueError, match="theoretical field of pos"):
        effective_rf(model, inputs, (5, 5), theoretical=probe_rf(model, (1, 1, 16, 16), (5, 5), mode="weights"))


def test_a_list_of_positions_gives_one_effective_field_each_equal_to_its_own():
    model = constant_chain(nn.Conv2d, 3)
    inputs = torch.rand(5, 1, 16, 16) + 0.1
    fields = effective_rf(model, inputs, [(4, 5), (0, 0), (9, 9)], chunk_size=2)
    assert [f.position for f in fields] == [(4, 5), (0, 0), (9, 9)]
    for field in fields:
        alone = effective_rf(model, inputs, field.position, chunk_size=2)
        assert torch.equal(field.heatmap, alone.heatmap) and field.theoretical.bounds == alone.theoretical.bounds
    assert fields[1].extent(1.0) == ((0, 6), (0, 6))  # the trinomial square at the corner


def test_a_list_of_theoretical_fields_is_reused_and_must_match():
    model = constant_chain(nn.Conv1d, 3)
    inputs = torch.rand(3, 1, 20) + 0.1
    theoretical = probe_rf(model, (1, 1, 20), [(2,), (7,)])
    given = effective_rf(model, inputs, [(2,), (7,)], theoretical=theoretical)
    assert [f.theoretical for f in given] == theoretical
    with pytest.raises(ValueError, match=r"a list of them for a list of positions.*theoretical=None"):
        effective_rf(model, inputs, [(2,), (8,)], theoretical=theoretical)
    with pytest.raises(ValueError, match=r"a list of them for a list of positions"):
        effective_rf(model, inputs, (7,), theoretical=theoretical)


def test_all_positions_are_refused_with_what_to_pass():
    with pytest.raises(ValueError, match=r"pos='all' is not allowed here.*pass a list, e.g. pos=\[\(2, 2\)"):
        effective_rf(constant_chain(nn.Conv2d, 1), torch.rand(2, 1, 8, 8), "all")


def test_extent_ties_in_mass_go_to_the_window_nearest_the_centre_of_mass_whatever_the_rounding():
    # Weights a, b, a, b at cells 4..7: (4, 5), (5, 6) and (6, 7) each hold a + b, half the mass, exactly; their
    # prefix-sum differences round apart (by one ulp for this pair). The centre of mass is 5.29: (5, 6) is nearest.
    a, b = 0.6183689966753316, 0.25050634136244054
    model = torch.nn.Conv1d(1, 1, 4, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[[a, b, a, b]]], dtype=torch.float64))
    field = effective_rf(model, torch.randn(3, 1, 12, dtype=torch.float64), 4, dtype=torch.float64)
    assert field.extent(0.5) == ((5, 6),)


def test_a_batchnorm_without_running_statistics_gives_the_same_map_at_any_chunk_size():
    # In eval mode it normalises over the batch: one backward pass over a chunk would mix the inputs' gradients.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(), nn.Conv2d(3, 2, 3)
    ).double()
    inputs = torch.randn(6, 2, 14, 14, dtype=torch.float64)
    alone = torch.stack([effective_rf(model, x[None], (5, 5), dtype=torch.float64).heatmap for x in inputs]).mean(0)
    for chunk_size in (1, 2, 6):
        field = effective_rf(model, inputs, (5, 5), chunk_size=chunk_size, dtype=torch.float64)
        assert torch.allclose(field.heatmap, alone, rtol=1e-12, atol=0)


def test_the_whole_mass_extent_keeps_cells_of_the_least_mass():
    """q = 1 is every cell with mass: edge cells under 1e-12 of the total fell to the rounding tolerance."""
    assert mass_extent(torch.tensor([0.0, 1e-13, 1.0, 1.0, 1e-13, 0.0]), 1.0) == ((1, 4),)
    # 28 stacked 3-tap box filters spread a one-hot over 57 cells, the outermost with 1 / 3**28 of the mass (4e-14).
    spread = torch.zeros(1, 1, 77, dtype=torch.float64)
    spread[..., 38] = 1.0
    for _ in range(28):
        spread = torch.nn.functional.conv1d(spread, torch.ones(1, 1, 3, dtype=torch.float64), padding=1)
    assert mass_extent(spread[0, 0], 1.0) == ((10, 66),)


def test_a_position_whose_map_is_zero_is_named_and_the_others_measure_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(-0.5), model[0].weight.abs_()
    inputs = torch.rand(4, 1, 12, 12) + 1
    inputs[..., :6] = 0  # the left half is blank: the outputs there never fire
    with pytest.raises(NoGradientError, match=r"position \(5, 1\) is zero everywhere on these 4 inputs") as raised:
        effective_rf(model, inputs, [(5, 8), (5, 1), (2, 7)])
    assert raised.value.positions == [(5, 1)] and "measure them alone" in str(raised.value)
    fields = effective_rf(model, inputs, [(5, 8), (2, 7)])
    assert [field.extent(1.0) for field in fields] == [((5, 7), (8, 10)), ((2, 4), (7, 9))]


class MinibatchStd(nn.Module):
    """StyleGAN's minibatch standard deviation: one feature from the spread of every sample, beside the others."""

    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(5, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        spread = (y.var(dim=0, keepdim=True, correction=0) + 1e-8).sqrt().mean(dim=(1, 2, 3), keepdim=True)
        return self.out(torch.cat([y, spread.expand(y.shape[0], 1, *y.shape[2:])], dim=1))


class ReadsItsNeighbour(nn.Module):
    """Each sample's output also reads the sample before it, six columns to the right."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y + y.roll(1, dims=0).roll(6, dims=-1)


class ReadsTheSampleBefore(ReadsItsNeighbour):
    """As its parent, but the first sample reads no other (the last is read by none): mixing one way only."""

    def forward(self, x):
        y = self.conv(x)
        return y + torch.cat([torch.zeros_like(y[:1]), y[:-1]]).roll(6, dims=-1)


def _first_sample_dead(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``inputs`` reordered so that the first one's output at (8, 8) is zero (dead after the model's ReLU)."""
    with torch.no_grad():
        alive = model.eval()(inputs)[:, :, 8, 8].abs().sum(dim=1) > 0
    assert (~alive).any() and alive.sum() >= 2
    return torch.cat([inputs[~alive][:1], inputs[alive]])


@pytest.mark.parametrize(
    "model, dead_first",
    [
        (MinibatchStd, False),
        (ReadsItsNeighbour, False),
        (ReadsTheSampleBefore, False),
        (lambda: nn.Sequential(MinibatchStd(), nn.Conv2d(2, 1, 1, bias=False), nn.ReLU()), True),
    ],
    ids=["minibatch_std", "neighbour", "sample_before", "minibatch_std_first_dead"],
)
def test_a_forward_that_mixes_samples_reads_each_sample_alone(model: Callable[[], nn.Module], dead_first: bool):
    """Each input's gradient is read from its own output only (Luo et al.), as with a BatchNorm of batch statistics:
    the gradients of the other samples' outputs (a minibatch statistic, a shifted neighbour) were summed in, and
    still were where the first sample's output was dead at the position, or where only later samples read earlier
    ones."""
    torch.manual_seed(0)
    model = model()
    inputs = torch.randn(12 if dead_first else 6, 1, 16, 16)
    if dead_first:
        inputs = _first_sample_dead(model, inputs)
    x = inputs.clone().requires_grad_(True)
    output, expected = model.eval()(x), torch.zeros(16, 16, dtype=torch.float64)
    for n in range(len(inputs)):
        cotangent = torch.zeros_like(output)
        cotangent[n, :, 8, 8] = 1
        (gradient,) = torch.autograd.grad(output, x, cotangent, retain_graph=True)
        expected += gradient[n].abs().sum(dim=0).double() / len(inputs)
    field = effective_rf(model, inputs, (8, 8), biases="trained")
    assert torch.allclose(field.heatmap, expected, rtol=1e-5, atol=1e-12)
    if isinstance(model, ReadsItsNeighbour):
        assert field.extent(1.0) == ((7, 9), (7, 9))  # the neighbour's columns 1..3 are another sample's


@pytest.mark.filterwarnings("ignore:std\\(\\)")
def test_a_batch_statistic_never_sees_a_chunk_of_one_sample():
    """33 inputs in chunks of 32 left a last chunk of one, whose minibatch standard deviation is NaN: refused as
    "check the model's weights and buffers for non-finite values", which were finite. Chunks are balanced now, and
    a single input says what is not finite."""

    class UnbiasedStd(MinibatchStd):  # std(dim=0) with Bessel's correction: NaN over one sample
        def forward(self, x):
            y = self.conv(x)
            spread = y.std(dim=0, keepdim=True).mean(dim=(1, 2, 3), keepdim=True)
            return self.out(torch.cat([y, spread.expand(y.shape[0], 1, *y.shape[2:])], dim=1))

    torch.manual_seed(0)
    model = UnbiasedStd()
    for samples, chunk_size in ((33, 32), (9, 4), (3, 2), (5, 2)):
        field = effective_rf(model, torch.randn(samples, 1, 16, 16), (8, 8), chunk_size=chunk_size)
        assert field.samples == samples and field.extent(1.0) == ((0, 15), (0, 15))  # the spread reads every pixel
    with pytest.raises(ProbeError, match=r"not finite .* on the input, though the model.s weights"):
        effective_rf(model, torch.randn(1, 1, 16, 16), (8, 8))


class _ConfidentHead(nn.Module):
    """Two logits per sample: channel 0 reads one sample, channel 1 (``gap`` below it) nine; then a log of the
    class probabilities, spelled as ``log_softmax``, ``log(softmax + eps)`` or ``log(softmax)``."""

    def __init__(self, gap: float, spelling: str):
        super().__init__()
        self.conv, self.spelling = nn.Conv1d(1, 2, 9, padding=4), spelling
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 4] = 1.0
            self.conv.weight[1, 0, :] = 1.0 / 9
            self.conv.bias.copy_(torch.tensor([0.0, -gap]))

    def forward(self, x):
        logits = self.conv(x)
        if self.spelling == "log_softmax":
            return torch.log_softmax(logits, dim=1)
        probabilities = torch.softmax(logits, dim=1)
        return torch.log(probabilities + 1e-30) if self.spelling == "eps" else probabilities.log()


@pytest.mark.parametrize("spelling", ["log_softmax", "eps", "log"])
@pytest.mark.parametrize("gap", [10.0, 60.0])
def test_a_log_of_class_probabilities_keeps_the_gradient_of_a_class_far_below_the_others(gap, spelling):
    """d log p_1 / d z_1 = 1 - p_1 is near 1, however far z_1 lies below z_0: the masked-softmax convention (no
    gradient to an input 50 below every live one, whose probability weighs under exp(-50)) cut that path, and the
    map held channel 0's single sample (extent 1 for 9; a log of the zeroed probability gave no gradient at all, or
    a refusal as not finite). The map is autograd's: 8/9 at the centre, 1/9 on the 8 samples around it."""
    torch.manual_seed(0)
    model, inputs = _ConfidentHead(gap, spelling), torch.rand(4, 1, 32)
    field = effective_rf(model, inputs, (16,))
    reference = torch.zeros(32, dtype=torch.float64)
    for sample in inputs:
        x = sample[None].clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(model(x)[0, :, 16].sum(), x)
        reference += gradient[0].abs().sum(0).double() / len(inputs)
    assert torch.allclose(torch.as_tensor(field.heatmap, dtype=torch.float64), reference, atol=1e-6)
    assert field.extent(0.95) == ((12, 20),)


def test_a_bfloat16_map_too_coarse_is_not_said_to_cancel():
    """Every bfloat16 map lies within 1000 of its epsilons of the signed scale, so a plain convolution stack's was
    refused as "the output's channels nearly cancel (a normalisation over the channels ...)", which it has not."""
    for seed in range(6):
        torch.manual_seed(seed)
        model = nn.Sequential(*(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(4)))
        try:
            effective_rf(model, torch.randn(4, 8, 16, 16), (8, 8), dtype=torch.bfloat16)
        except ProbeError as error:
            assert "torch.bfloat16 is too coarse" in str(error) and "cancel" not in str(error)


class _TwoHeads(nn.Module):
    """A tuple of two maps: a 3 x 3 convolution's and a 9 x 9 field's (four 3 x 3 convolutions)."""

    def __init__(self):
        super().__init__()
        self.near = nn.Conv2d(2, 2, 3, padding=1)
        self.far = nn.Sequential(*[nn.Conv2d(2, 2, 3, padding=1) for _ in range(4)])

    def forward(self, x):
        return self.near(x), self.far(x)


def test_a_theoretical_field_of_another_element_is_refused():
    """``effective_rf(..., element=0, theoretical=<element 1's field>)`` was accepted: the effective field of the
    3 x 3 map was measured against the 9 x 9 field (an extent ratio of 0.33 where it is 1)."""
    model = _TwoHeads()
    inputs = torch.randn(4, 2, 20, 20, generator=torch.Generator().manual_seed(0))
    far = probe_rf(model, (1, 2, 20, 20), (10, 10), element=1)
    assert far.bounds == ((6, 14), (6, 14))
    with pytest.raises(ValueError, match=r"element=0.*\(it was probed with element=1\); pass theoretical=None"):
        effective_rf(model, inputs, (10, 10), element=0, theoretical=far)
    given = effective_rf(model, inputs, (10, 10), element=1, theoretical=far)
    assert given.theoretical is far


def test_extent_and_metrics_under_a_meta_default_device():
    """Inside ``with torch.device("meta")`` the probe ran (its scope sets its own device), but ``extent`` and
    ``metrics`` of the field made their index tensors on the meta device and raised torch's device error."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    inputs = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    outside = effective_rf(model, inputs, (6, 6))
    with torch.device("meta"):
        inside = effective_rf(model, inputs, (6, 6))
        assert inside.extent(0.95) == outside.extent(0.95)
        assert inside.metrics() == outside.metrics()


class _ConvsOfAClassCount(nn.Module):
    """``count`` 3-tap convolutions, ``count`` read from the class when the forward runs."""

    count = 4

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(1, 1, 3, padding=1) for _ in range(8))

    def forward(self, x):
        for conv in self.convs[: type(self).count]:
            x = conv(x)
        return x


@pytest.mark.parametrize("flow", [True, False])
def test_metrics_read_after_the_forward_changed_are_those_of_the_network_measured(flow, monkeypatch):
    # At position 1, four convolutions span -3..5 (centre 1), clipped to 0..5. The metrics' offsets are from the
    # span's centre: where the probe's forward carried no geometry (flow=False), it was read lazily, and after the
    # class attribute changed it was None, the centre the clipped bounds' 2.5: com_offset_l moved by -1.5 unsaid.
    monkeypatch.setattr(geometry_flow, "ENABLED", flow)
    inputs = torch.rand(4, 1, 16) + 0.1
    field = effective_rf(_ConvsOfAClassCount(), inputs, 1)
    try:
        _ConvsOfAClassCount.count = 8
        metrics = field.metrics()
    finally:
        _ConvsOfAClassCount.count = 4
    assert field.theoretical.bounds == ((0, 5),) and field.theoretical.center == (1.0,)
    assert metrics["com_offset_l"] == pytest.approx(metrics["com_l"] - 1)


def test_a_map_that_rounds_to_zero_in_float32_alone_is_not_said_to_be_dead():
    # uint8-scale inputs saturate the tanh: its derivative rounds to 0 in float32 (tanh(18) == 1), not in float64
    # (4 exp(-36)): the refusal said "dead units, zero weights", and pointed away from dtype=torch.float64.
    model = nn.Sequential(nn.Conv2d(1, 1, 3, bias=False), nn.Tanh(), nn.Conv2d(1, 1, 3, bias=False))
    nn.init.constant_(model[0].weight, 1.0)
    inputs = torch.full((2, 1, 12, 12), 2, dtype=torch.uint8)
    with pytest.raises(NoGradientError, match=r"zero everywhere on these 2 inputs in torch.float32, though not in "
                       r"float64 .* pass dtype=torch.float64") as refused:  # fmt: skip
        effective_rf(model, inputs, (4, 4))
    assert refused.value.positions == [(4, 4)]
    assert effective_rf(model, inputs, (4, 4), dtype=torch.float64).heatmap.sum() > 0
    nn.init.zeros_(model[2].weight)
    with pytest.raises(NoGradientError, match=r"2 inputs: the output there does not depend on them \(dead units"):
        effective_rf(model, inputs, (4, 4))
