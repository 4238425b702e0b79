"""Every wrong argument or failed probe gets a message naming the argument, the value and what is allowed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rf_callback import ProbeError, effective_rf, probe_rf
from tests.models import TinyResNet, seed_readme_convs


def test_position_outside_the_map_names_the_map_shape():
    with pytest.raises(ValueError, match=r"pos=\(4, 40\) is outside the output map .* spatial shape is \(6, 19\)"):
        probe_rf(seed_readme_convs(), (1, 3, 60, 90), (4, 40))


def test_position_with_wrong_number_of_axes():
    with pytest.raises(ValueError, match=r"pos=\(4,\) must have 2 int index\(es\).*\(6, 19\)"):
        probe_rf(seed_readme_convs(), (1, 3, 60, 90), (4,))


def test_position_of_wrong_kind():
    with pytest.raises(ValueError, match="pos='middle' is not allowed; use an index tuple"):
        probe_rf(seed_readme_convs(), (1, 3, 60, 90), "middle")


def test_input_rank_the_network_rejects_names_the_expected_shape():
    with pytest.raises(
        ValueError, match=r"input_shape=\(1, 3, 60\) has 1 spatial axes.*Conv2d.*takes 2.*\(N, C, H, W\)"
    ):
        probe_rf(seed_readme_convs(), (1, 3, 60), 4)


@pytest.mark.parametrize("shape", [(3, 60), (1, 3, 0, 4), "1,3,4,4", (1, 3, 4.5, 4), (1, 1, 1, 1, 1, 1)])
def test_malformed_input_shape(shape):
    with pytest.raises(ValueError, match="input_shape=.* is not a sequence"):
        probe_rf(seed_readme_convs(), shape)


def test_unknown_layer_lists_the_nearest_names():
    with pytest.raises(ValueError, match=r"layer='layer3' is not a submodule.*nearest names: \['layer2', 'layer1'"):
        probe_rf(TinyResNet(), (1, 3, 32, 32), layer="layer3")


def test_output_without_spatial_axes_suggests_feature_maps():
    with pytest.raises(ValueError, match=r"shape \(1, 10\): no spatial axes.*layer=.*layer2 \(1, 16, 8, 8\)"):
        probe_rf(TinyResNet(), (1, 3, 32, 32))


def test_forward_that_raises_is_chained():
    with pytest.raises(ProbeError, match="the model's forward raised on an input of shape") as info:
        probe_rf(seed_readme_convs(), (1, 5, 60, 90))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_zero_gradient_in_weights_mode_says_why():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with torch.no_grad():
        model[0].weight.zero_()
    with pytest.raises(ProbeError, match="dead .* or the weights on every path are zero; mode='theoretical'"):
        probe_rf(model, (1, 1, 8, 8), mode="weights")
    assert probe_rf(model, (1, 1, 8, 8)).size == (3, 3)


def test_non_finite_weights_are_reported():
    model = nn.Conv2d(1, 1, 3)
    with torch.no_grad():
        model.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ProbeError, match="not finite"):
        probe_rf(model, (1, 1, 8, 8), mode="weights")


def test_a_theoretical_copy_that_overflows_is_refused_with_the_other_mode_as_the_fix():
    """``exp(cumsum(x))`` over a long axis overflows on the copy's ones, although the real weights' values stay
    finite: the refusal said "check the model's weights and buffers", which are finite. It names the copy now.
    Where float64 holds it (12,000 steps), the probe is read again in float64; past float64 too, refused."""

    class ExponentialOfARunningSum(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 2, 3, padding=1)

        def forward(self, x):
            return torch.exp(torch.cumsum(self.conv(x), dim=-1) * 0.01)

    model = ExponentialOfARunningSum()
    assert probe_rf(model, (1, 1, 12000), 10).bounds == ((0, 11),)
    with pytest.raises(ProbeError, match="on the theoretical copy: its constants overflow .* use mode='weights'"):
        probe_rf(model, (1, 1, 12000), 10, dtype=torch.float32)
    with pytest.raises(ProbeError, match="on the theoretical copy: its constants overflow .* use mode='weights'"):
        probe_rf(model, (1, 1, 240000), 10)
    assert probe_rf(model, (1, 1, 240000), 10, mode="weights").bounds == ((0, 11),)


class LogPooling(nn.Module):
    """Attention pooling over all positions by ``log(y - 3)``: NaN on the theoretical copy's values, which are below 3
    (some weights make them all positive, and then the pooling reads every position)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv1d(1, 4, 5, padding=2, bias=False)
        self.a = nn.Conv1d(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.b(x)
        attention = torch.softmax(torch.log(y.mean(1) - 3.0), dim=-1)
        return self.a(y) + torch.einsum("ncl,nl->nc", y, attention)[..., None]


def test_a_softmax_of_nan_scores_on_the_theoretical_copy_is_refused_not_cut():
    """A softmax whose scores were NaN on the copy found no live input and dropped the pooling path: 9..15 for the
    architecture's 0..23, without a word. NaN scores are live now, and the NaN field is refused with the reason."""
    with pytest.raises(ProbeError, match="reaches a log or a square root"):
        probe_rf(LogPooling(), (1, 1, 24), pos=12)


def test_output_that_does_not_depend_on_the_input():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.value = nn.Parameter(torch.ones(1, 1, 4, 4))

        def forward(self, x):
            return self.value.expand(x.shape[0], 1, 4, 4) * 1.0

    with pytest.raises(ProbeError, match="does not depend on the input"):
        probe_rf(Constant(), (1, 1, 4, 4))


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_map_of_one_sample_that_does_not_depend_on_the_input_says_so_in_both_modes(mode):
    """A buffer of one sample as the output: weights mode (8 draws) said the forward folds something into the batch
    axis, where it depends on no input at all."""

    class Buffered(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.register_buffer("prior", torch.randn(1, 1, 8, 8))

        def forward(self, x):
            return self.prior

    with pytest.raises(ProbeError, match="does not depend on the input: nothing to backpropagate"):
        probe_rf(Buffered(), (1, 1, 8, 8), mode=mode)


@pytest.mark.parametrize("pos", ["center", "all"])
def test_an_output_axis_without_positions_is_named_for_center_and_all(pos):
    """``x[..., 1:-1]`` on two samples leaves no position: "center" and "all" raised a bare IndexError."""

    class Cropped(nn.Module):
        def forward(self, x):
            return x[..., 1:-1]

    with pytest.raises(ValueError, match=rf"spatial shape \(0,\): an axis without positions, so pos='{pos}'"):
        probe_rf(Cropped(), (1, 1, 2), pos)


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_an_output_of_another_rank_is_shown_as_one_samples_in_both_modes(mode):
    """A YOLO-style head (anchors, height, width, values): weights mode showed its 8 draws as the batch,
    (8, 2, 8, 8, 5), beside an input of (1, 3, 8, 8)."""

    class Anchors(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 10, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y.view(y.shape[0], 2, 5, *y.shape[2:]).permute(0, 1, 3, 4, 2)

    with pytest.raises(ValueError, match=r"the output of the model is \(1, 2, 8, 8, 5\), which"):
        probe_rf(Anchors(), (1, 3, 8, 8), mode=mode)


@pytest.mark.parametrize(("argument", "value"), [("mode", "exact"), ("draws", 0)])
def test_bad_keyword_arguments(argument, value):
    with pytest.raises(ValueError, match=f"{argument}={value!r}"):
        probe_rf(seed_readme_convs(), (1, 3, 60, 90), **{argument: value})


def test_input_without_the_spatial_axes_a_convolution_takes_is_refused():
    # (1, 5, 16) would reach a Conv2d(1, ...) as one unbatched (C=1, H=5, W=16) image, and give a wrong field.
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    for mode in ("theoretical", "weights"):
        with pytest.raises(ValueError, match=r"input_shape=\(1, 5, 16\) has 1 spatial axes.*takes 2.*\(N, C, H, W\)"):
            probe_rf(model, (1, 5, 16), 4, mode=mode)


def test_a_device_that_is_no_device_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"device='gpu0' is not a device: pass a device name \('cpu'"):
        probe_rf(nn.Conv2d(1, 1, 3), (1, 1, 8, 8), device="gpu0")


def test_a_probe_on_the_device_asked_for_gives_the_same_field():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3, stride=2))
    assert probe_rf(model, (1, 1, 12, 12), device="cpu") == probe_rf(model, (1, 1, 12, 12))


class TimesZero(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x) * 0


def test_an_output_that_no_input_reaches_is_refused_as_such_not_as_padding_alone():
    """Before, a single position was said to see only padding, and a map gave every position an empty field that
    said "its window covers only padding"; the map is refused as the single probe is, in both modes."""
    for pos in ((2, 2), "all"):
        with pytest.raises(ProbeError, match=r"at any position of its \(6, 6\) map: the gradient from the whole"):
            probe_rf(TimesZero(), (1, 1, 6, 6), pos)
    with pytest.raises(ProbeError, match=r"at any position of its \(6, 6\) map with the current weights"):
        probe_rf(TimesZero(), (1, 1, 6, 6), "all", mode="weights")


def test_a_position_that_sees_only_padding_is_still_said_so():
    with pytest.raises(ProbeError, match="at \\(0,\\): its window covers only padding"):
        probe_rf(nn.Conv1d(1, 1, 1, padding=2), (1, 1, 5), (0,))


def test_a_forward_undefined_on_the_random_inputs_is_named_as_the_cause():
    """LPPool with an odd p takes x ** 3 of negative values and a cube root of their sum: NaN in the forward itself,
    where the message said to check the weights."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LPPool2d(3, 2))
    with pytest.raises(ProbeError, match="output of the model is not finite .* on the probe's random inputs"):
        probe_rf(model, (1, 1, 12, 12), mode="weights")
    assert probe_rf(model, (1, 1, 12, 12)).bounds == ((4, 7), (4, 7))


def test_an_output_with_an_axis_squeezed_away_says_which_layer_keeps_it():
    """A CRNN's (N, C, W) sequence of a 2D input was told only of tokens and channels last."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d((1, None)), nn.Flatten(1, 2))
    with pytest.raises(ValueError, match="pass layer= naming the module before the squeeze"):
        probe_rf(model, (1, 1, 8, 20))
    assert probe_rf(model, (1, 1, 8, 20), layer="1").bounds == ((0, 7), (9, 11))


def test_a_weights_probe_that_fails_on_its_batch_of_draws_says_so():
    """Weights mode runs its draws as one batch: a model with a buffer of batch 1 failed with a message that named
    an input of batch 1, and no way out."""

    class BatchOfOne(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.register_buffer("offset", torch.zeros(1, 1, 9, 11))

        def forward(self, x):
            return self.conv(torch.cat([x, self.offset], dim=1).sum(dim=1, keepdim=True))

    with pytest.raises(ProbeError, match=r"a batch of 8 random inputs of shape \(1, 9, 11\).*pass draws=1"):
        probe_rf(BatchOfOne(), (1, 1, 9, 11), (4, 5), mode="weights")
    assert probe_rf(BatchOfOne(), (1, 1, 9, 11), (4, 5), mode="weights", draws=1).bounds == ((3, 5), (4, 6))


def test_a_distributed_data_parallel_wrapper_names_the_module_to_probe(tmp_path):
    """A DistributedDataParallel wrapper's reducer cannot be deep-copied (torch raises an internal assertion that
    asks to report a bug to PyTorch); the message said to make an attribute copyable. It names ``model.module``."""
    import torch.distributed as dist

    from rf_callback.core.model_copy import CopyError

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'rendezvous'}")
    try:
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        with pytest.raises(CopyError, match=r"DistributedDataParallel wrapper.*probe the module it wraps, model\.mod"):
            probe_rf(model, (1, 3, 16, 16))
        assert probe_rf(model.module, (1, 3, 16, 16)).bounds == ((6, 10), (6, 10))
    finally:
        dist.destroy_process_group()


class _FrozenFeatures(nn.Module):
    """Lightning's transfer-learning forward: a frozen backbone run inside ``torch.no_grad()``, then a head."""

    def __init__(self, off=torch.no_grad):
        super().__init__()
        self.off = off
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).requires_grad_(False)
        self.head = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        with self.off():
            features = self.backbone(x)
        return self.head(features)


@pytest.mark.parametrize("off", [torch.no_grad, torch.inference_mode])
def test_a_frozen_part_run_without_gradients_names_a_fix_that_works(off):
    """Every layer inside the block was refused with "probe a layer before it", which no layer inside it is; under
    inference_mode the reason said no_grad. The fix named works: requires_grad_(False) alone freezes it."""
    model = _FrozenFeatures(off)
    spelled = "inference_mode" if off is torch.inference_mode else "no_grad"
    for layer in (None, "backbone", "backbone.0"):
        with pytest.raises(ProbeError, match=rf"conv2d\(\) inside torch\.{spelled}\(\).*requires_grad_\(False\)"):
            probe_rf(model, (1, 3, 16, 16), (4, 4), layer=layer)
    model.off = torch.enable_grad
    assert probe_rf(model, (1, 3, 16, 16), (4, 4)).bounds == ((4, 10), (4, 10))
    assert probe_rf(model.backbone, (1, 3, 16, 16), (4, 4)).bounds == ((4, 8), (4, 8))


def test_arguments_refused_naming_them():
    """A seed past torch.Generator's range raised "Overflow when unpacking long long"; verify_rf's dtype was not
    checked (a str blamed the model as uncopyable); bools indexed a field map as 0 and 1."""
    import numpy as np

    from rf_callback import verify_rf

    model = nn.Conv2d(1, 1, 3)
    with pytest.raises(ValueError, match=r"seed=18446744073709551616 must be an int >= .* < 18446744073709551616"):
        probe_rf(model, (1, 1, 8, 8), mode="weights", seed=2**64)
    assert probe_rf(model, (1, 1, 8, 8), mode="weights", seed=2**64 - 1).bounds == ((3, 5), (3, 5))
    field = probe_rf(model, (1, 1, 8, 8))
    for dtype in ("float64", torch.int64, 64):
        with pytest.raises(ValueError, match=r"dtype=.* must be a floating torch dtype"):
            verify_rf(model, field, dtype=dtype)
    fields = probe_rf(model, (1, 1, 8, 8), "all")
    for index in ((True, 1), torch.tensor([True, False]), np.array([False, True])):
        with pytest.raises(IndexError, match="must be integer indices"):
            fields[index]
    assert fields[np.array([1, 2])].bounds == ((1, 3), (2, 4))
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[1, 2] = True  # a mask's one cell, as torch.where gives it, and one-element index arrays beside ints
    for index in (torch.where(mask), np.nonzero(mask.numpy()), (torch.tensor([1]), 2), (np.array([1]), 2)):
        assert fields[index].bounds == ((1, 3), (2, 4))
    axis = field.geometry[0]  # an output index, not a coordinate: span(2.7) gave (1.7, 4.7), span(True) index 1
    for index in (2.7, True, np.float64(2.0)):
        with pytest.raises(TypeError, match=r"must be an int, the index of an output cell"):
            axis.span(index)
        with pytest.raises(TypeError, match=r"must be an int"):
            axis.center(index)
    assert axis.span(np.int64(2)) == axis.span(torch.tensor(2)) == (2, 4) and axis.center(2) == 3.0


def test_index_arrays_of_unequal_lengths_are_refused():
    """``zip`` of the arrays stopped at the shortest: (array([1, 2, 5]), array([3, 4])) probed two cells and
    dropped the third index without a word."""
    import numpy as np

    model = nn.Conv2d(1, 1, 3)
    for columns in ((np.array([1, 2, 5]), np.array([3, 4])), (torch.tensor([1, 2, 5]), torch.tensor([3]))):
        with pytest.raises(ValueError, match=r"index arrays, one per axis .* of lengths \[3, \d\]"):
            probe_rf(model, (1, 1, 12, 12), columns)
    inputs = torch.rand(2, 1, 12, 12)
    with pytest.raises(ValueError, match=r"of lengths \[2, 1\]"):  # not "theoretical= must be the field of pos"
        effective_rf(model, inputs, (np.array([1, 2]), np.array([3])), theoretical=probe_rf(model, inputs.shape))
    assert [f.position for f in probe_rf(model, (1, 1, 12, 12), (np.array([1, 5]), np.array([6, 2])))] == [
        (1, 6),
        (5, 2),
    ]


class _DoubleHead(nn.Module):
    """A float32 body and a float64 head, the forward casting to the head's dtype by name (``.double()``)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, stride=2)
        self.head = nn.Conv2d(4, 4, 3, stride=2).double()

    def forward(self, x):
        return self.head(self.body(x).double())


class _DoubleLinearHead(_DoubleHead):
    """The same with a float64 ``Linear`` over the channels (torch says "expected m1 and m2 to have the same dtype")."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 4).double()

    def forward(self, x):
        return self.head(self.body(x).double().movedim(1, -1)).movedim(-1, 1)


class _BranchesOfTwoSizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 5)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_the_dtype_note_comes_with_torchs_dtype_errors_alone():
    with pytest.raises(ProbeError, match=r"runs every floating parameter and buffer in torch.float32"):
        probe_rf(_DoubleLinearHead(), (1, 3, 31, 33), (2, 3))
    with pytest.raises(ProbeError, match=r"must match the size") as raised:
        probe_rf(_BranchesOfTwoSizes(), (1, 3, 16, 16), (2, 3))
    assert "dtype" not in str(raised.value)


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_forward_casting_to_a_dtype_of_its_own_is_refused_with_why_and_the_fix(mode):
    # The copy runs every tensor in one dtype: the message said only "Input type (double) and bias type (float)
    # should be the same", which blames the model that runs; it says why and what to pass.
    with pytest.raises(ProbeError, match=r"runs every floating parameter and buffer in torch.float32.*dtype="):
        probe_rf(_DoubleHead(), (1, 3, 31, 33), (2, 3), mode=mode)
    # the fix it names gives the closed form: r = 3 + 2 * 2 = 7, S = 4
    assert probe_rf(_DoubleHead(), (1, 3, 31, 33), (2, 3), mode=mode, dtype=torch.float64).bounds == (
        (8, 14),
        (12, 18),
    )
