"""The probe's field is right or refused with the reason: every way a number could be silently wrong is detected,
and every bad argument is refused at the door with its name, its value and the fix."""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import re
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rf_callback import ProbeError, effective_rf, probe_rf, rf_table, verify_rf
from rf_callback.core.geometry import consistent
from rf_callback.core.model_copy import _contracted_dims
from tests.models import gated
from tests.processes import run_isolated

SHAPE = (1, 1, 20, 20)


def small() -> nn.Sequential:
    """conv 3, max-pool 2, conv 3: r = 1 + 2 + 1 + 4 = 8, S = 2."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3))


# --- silently wrong numbers, now detected ------------------------------------------------------------------------


def test_module_whose_forward_attribute_is_compiled_is_probed_on_the_copy_and_left_untouched():
    model = small().train()
    model.forward = torch.compile(model.forward, backend="eager")  # what Lightning does to a compiled module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    field = probe_rf(model, SHAPE, "center")
    assert field.size == (8, 8)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model[3].weight.zero_()  # the live model changes; the theoretical field of the architecture does not
    assert probe_rf(model, SHAPE, "center").size == (8, 8)


def test_layer_that_never_runs_is_refused():
    class SpareHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.spare = small(), nn.Conv2d(2, 2, 5)

        def forward(self, x):
            return self.body(x)

    with pytest.raises(ValueError, match=r"layer='spare' never runs.*e\.g\. one of \[.*'body'"):
        probe_rf(SpareHead(), SHAPE, "center", layer="spare")


class TwoMaps(nn.Module):
    """Returns a tuple (or a dict) of a 3x3 map and a 5x5 map."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.small, self.large, self.as_dict = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 5, padding=2), as_dict

    def forward(self, x):
        a, b = self.small(x), self.large(x)
        return {"fine": a, "coarse": b} if self.as_dict else (a, b)


def test_tuple_or_dict_output_needs_an_explicit_element():
    with pytest.raises(
        ValueError, match=r"is a tuple of 2 \(0: tensor \(1, 1, 20, 20\), 1: .*pass element= with the index"
    ):
        probe_rf(TwoMaps(), SHAPE, "center")
    assert probe_rf(TwoMaps(), SHAPE, "center", element=1).size == (5, 5)
    assert probe_rf(TwoMaps(as_dict=True), SHAPE, "center", element="fine").size == (3, 3)
    with pytest.raises(ValueError, match=r"element='medium' is not a key .*'fine'"):
        probe_rf(TwoMaps(as_dict=True), SHAPE, "center", element="medium")
    with pytest.raises(ValueError, match="element=0 picks from a tuple.*leave element=None"):
        probe_rf(small(), SHAPE, "center", element=0)
    field = probe_rf(TwoMaps(), SHAPE, "center", element=1)
    assert field.to_dict()["element"] == 1 and verify_rf(TwoMaps(), field).passed


class Permuted(nn.Module):
    """``layers`` after ``permute(order)`` of the raw input (``None``: no permute)."""

    def __init__(self, order, *layers):
        super().__init__()
        self.order, self.layers = order, nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x if self.order is None else x.permute(*self.order))


class Moved(nn.Module):
    """``move(x)``, then a Conv1d of 7 channels."""

    def __init__(self, move):
        super().__init__()
        self.move, self.conv = move, nn.Conv1d(7, 4, 3)

    def forward(self, x):
        return self.conv(self.move(x))


class Recurrent(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.lstm = nn.LSTM(features, 4, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


INPUTS_READ_OTHERWISE = {
    # (N, L, C) series, 321 variables: the field came out along the variables, 0..320 for 30..34 along L
    "a series (N, L, C) permuted before its Conv1d": (
        lambda: Permuted((0, 2, 1), nn.Conv1d(321, 4, 3), nn.Conv1d(4, 4, 3)), (1, 96, 321), 30, "conv1d()"),
    "a series (N, L, C) into an LSTM": (lambda: Recurrent(64), (1, 48, 64), 10, "lstm()"),
    "a series (N, L, C) moved by .mT before its Conv1d": (lambda: Moved(lambda x: x.mT), (1, 96, 7), 30, "conv1d()"),
    "a series (N, L, C) moved by an einsum before its Conv1d": (
        lambda: Moved(lambda x: torch.einsum("nlc->ncl", x)), (1, 96, 7), 30, "conv1d()"),
    # Informer's TokenEmbedding: a circular padding (a pad that changes the shape) before the Conv1d
    "a series (N, L, C) permuted before a circular Conv1d": (
        lambda: Permuted((0, 2, 1), nn.Conv1d(7, 4, 3, padding=1, padding_mode="circular")), (1, 96, 7), 30,
        "conv1d()"),
    # (N, T, C, H, W) video: T read as the RGB axis, size 3 for 5
    "a video (N, T, C, H, W) permuted before its Conv3d": (
        lambda: Permuted((0, 2, 1, 3, 4), nn.Conv3d(3, 4, 5, padding=2)), (1, 16, 3, 24, 24), (5, 8, 8), "conv3d()"),
    "an image (N, H, W, C) permuted before its Conv2d": (
        lambda: Permuted((0, 3, 1, 2), nn.Conv2d(3, 4, 5, padding=2)), (1, 24, 24, 3), (5, 8), "conv2d()"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(INPUTS_READ_OTHERWISE))
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_an_input_laid_out_otherwise_than_channels_first_is_refused(mode, name):
    build, shape, pos, reader = INPUTS_READ_OTHERWISE[name]
    with pytest.raises(ValueError, match=rf"input_shape={re.escape(str(shape))} is read channels first.*{reader}"):
        probe_rf(build(), shape, pos, mode=mode)


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_an_input_channels_first_that_the_model_permutes_to_its_features_is_probed(mode):
    """(N, C, L) moved to (N, L, C) before a per-step Linear reads its channels there: probed, one step wide; and a
    Linear over the positions of an (N, C, L) input (a token mixer, DLinear) is no layout the probe can tell apart."""
    model = Permuted((0, 2, 1), nn.Linear(7, 4), Transposed())
    assert probe_rf(model, (1, 7, 32), 10, mode=mode).bounds == ((10, 10),)
    scaled = Permuted(None, nn.Identity(), nn.Conv1d(7, 4, 3))  # pointwise on the raw input: still channels first
    assert probe_rf(Permuted(None, nn.Linear(32, 32)), (1, 7, 32), 10, mode=mode).bounds == ((0, 31),)
    assert probe_rf(Scaled(scaled), (1, 7, 32), 10, mode=mode).bounds == ((10, 12),)


class Transposed(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


class Scaled(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model((x / 255 - 0.5).float())


def test_a_model_with_lazy_modules_not_yet_run_is_refused_with_the_fix():
    """It was refused as a model that "cannot be deep-copied" (make that attribute copyable)."""
    lazy = nn.Sequential(nn.LazyConv2d(2, 3), nn.LazyConv2d(2, 3))
    for mode in ("theoretical", "weights"):
        with pytest.raises(ValueError, match=r"lazy modules \['0', '1'\] have no parameters yet.*run one forward"):
            probe_rf(lazy, SHAPE, "center", mode=mode)
    lazy(torch.randn(SHAPE))
    assert probe_rf(lazy, SHAPE, "center").size == (5, 5)


def test_scripted_model_is_refused_in_theoretical_mode_and_measured_in_weights_mode():
    scripted = torch.jit.script(small().eval())
    with pytest.raises(ValueError, match="TorchScript.*Python module it was scripted from.*mode='weights'"):
        probe_rf(scripted, SHAPE, "center")
    assert probe_rf(scripted, SHAPE, "center", mode="weights").size == (8, 8)
    for mode in ("theoretical", "weights"):  # its rows are read on the theoretical copy in either mode
        with pytest.raises(ValueError, match="rf_table.*TorchScript.*scripted from") as refused:
            rf_table(scripted, SHAPE, mode=mode)
        assert "mode='weights'" not in str(refused.value)
    with pytest.raises(ValueError, match="effective_rf.*TorchScript.*pass theoretical=probe_rf"):
        effective_rf(scripted, torch.rand(SHAPE))
    eager = probe_rf(small().eval(), SHAPE, "center")
    assert effective_rf(scripted, torch.rand(SHAPE), theoretical=eager).theoretical is eager


class AtenPooled(nn.Module):
    """conv 3, a max-pool 2 called as the aten overload an exported graph calls, conv 3: r = 8, S = 2."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return self.second(torch.ops.aten.max_pool2d.default(self.first(x), [2, 2], [2, 2]))


OPERATOR_GRAPHS = {
    "torch.export": lambda m: torch.export.export(
        m, (torch.randn(2, *SHAPE[1:]),), dynamic_shapes=({0: torch.export.Dim.AUTO},)
    ).module(),
    "make_fx": lambda m: torch.fx.experimental.proxy_tensor.make_fx(m)(torch.randn(SHAPE)),
    "a forward calling aten overloads": lambda m: AtenPooled().eval(),
}


@pytest.mark.parametrize("name", list(OPERATOR_GRAPHS))
def test_a_graph_of_aten_overloads_is_refused_in_theoretical_mode_and_measured_in_weights_mode(name):
    """The copy's twins are keyed on torch's functions: an exported max-pool ran as a max on equal constants, and its
    ties sent every window's gradient to one element (7 x 7 where the architecture reads 8 x 8)."""
    import torch.fx.experimental.proxy_tensor  # noqa: F401  (make_fx)

    graph = OPERATOR_GRAPHS[name](small().eval())
    with pytest.raises(
        ProbeError, match=r"calls aten's operator overloads.*aten\.max_pool2d.*eager module.*mode='weights'"
    ):
        probe_rf(graph, SHAPE, "center")
    assert probe_rf(graph, SHAPE, "center", mode="weights").size == (8, 8)
    # rf_table's rows are submodules' outputs, which an exported graph never calls: it returned [] without a word.
    # Where submodules run (an eager forward calling one overload), the rows after the overload are left out.
    for mode in ("theoretical", "weights"):
        if name == "a forward calling aten overloads":
            with pytest.warns(UserWarning, match=r"rows from 'second' on are left out.*aten\.max_pool2d"):
                assert [row.name for row in rf_table(graph, SHAPE, mode=mode)] == ["first"]
            continue
        with pytest.raises(ProbeError, match=r"rf_table: the forward calls aten's operator overloads.*eager module"):
            rf_table(graph, SHAPE, mode=mode)


def test_weights_mode_reads_an_exported_graphs_operators_by_their_torch_names():
    """``aten.randperm.default`` then ``aten.index.Tensor``: the field followed the global random state (23..25 at
    output 5) where the eager module is refused."""
    shuffled = MixedBranch(RANDOM_CHOICES["a random permutation of positions"]).eval()
    graph = torch.export.export(
        shuffled, (torch.randn(2, 1, 32),), dynamic_shapes=({0: torch.export.Dim.AUTO},)
    ).module()
    for model in (shuffled, graph):
        with pytest.raises(ProbeError, match=r"depends on a random draw in its forward \(randperm\(\) chooses"):
            probe_rf(model, (1, 1, 32), 5, mode="weights")


def test_a_custom_op_is_refused_in_theoretical_mode_with_its_name():
    """A custom op is one call the copy cannot see inside (a ReLU in it would hide pixels): refused by name, and
    measured in weights mode."""

    @torch.library.custom_op("rf_callback_tests::shifted", mutates_args=())
    def shifted(x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 1, -1)

    shifted.register_fake(lambda x: torch.empty_like(x))
    shifted.register_autograd(lambda ctx, grad: torch.roll(grad, -1, -1))
    model = MixedBranch(lambda m, a, b: shifted(a)).eval()
    with pytest.raises(
        ProbeError, match=r"calls custom ops on values of the input \(rf_callback_tests.shifted.default\)"
    ):
        probe_rf(model, (1, 1, 32), 16)
    assert probe_rf(model, (1, 1, 32), 16, mode="weights").bounds == ((14, 16),)


def test_an_integer_quantized_model_is_refused_with_the_reason_where_its_forward_reaches_one():
    """It raised torch's internal assertion (``cannot call qscheme on UnknownQuantizer``) or a cut on
    ``quantize_per_tensor``; a layer before a dynamically quantized head is probed as before."""
    import torch.ao.quantization as quantization

    model = nn.Sequential(quantization.QuantStub(), nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), quantization.DeQuantStub())
    model.eval().qconfig = quantization.get_default_qconfig("fbgemm")
    prepared = quantization.prepare(model)
    prepared(torch.randn(4, *SHAPE[1:]))
    converted = quantization.convert(prepared)
    for mode in ("theoretical", "weights"):
        with pytest.raises(ValueError, match=r"runs Quantize .* integer quantization.*float model before convert"):
            probe_rf(converted, SHAPE, "center", mode=mode)
    head = quantization.quantize_dynamic(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6, 4)))
    assert probe_rf(head, (1, 1, 8), 3, layer="0").bounds == ((3, 5),)
    # reference modules (convert_to_reference_fx) compute in floats, with a gradient: probed
    import torch.ao.nn.quantized.reference as reference

    floats = nn.Sequential(
        reference.Conv2d.from_float(
            nn.Conv2d(1, 2, 3),
            {"qscheme": torch.per_tensor_affine, "dtype": torch.quint8, "scale": 1.0, "zero_point": 0},
        )
    )
    assert probe_rf(floats, SHAPE, (4, 4)).bounds == ((4, 6), (4, 6))


@pytest.mark.parametrize("script", [torch.jit.script, lambda m: torch.jit.trace(m, torch.randn(1, 3, 16, 16))])
def test_a_scripted_model_is_probed_bias_free_in_weights_mode_as_its_python_module(script):
    """TorchScript clones itself without the deep copy's memo: the copy kept the real biases (of -0.36, which keep
    some ReLUs shut), and (5, 5) read 7 x 5 pixels where the bias-free network reads 7 x 7; float64 was refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 3)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-0.36), model[2].bias.fill_(-0.36)
    python = probe_rf(model, (1, 3, 16, 16), (5, 5), mode="weights")
    assert python.bounds == ((5, 11), (5, 11))
    for dtype in (None, torch.float64):
        scripted = probe_rf(script(model), (1, 3, 16, 16), (5, 5), mode="weights", dtype=dtype)
        assert scripted.bounds == python.bounds and torch.equal(scripted.heatmap > 0, python.heatmap > 0)
    assert model[0].bias.eq(-0.36).all()  # the live model keeps its biases


class Autocast(nn.Module):
    """``net`` run under ``torch.autocast`` on the CPU, its output cast to the input's dtype or not."""

    def __init__(self, net: nn.Module, dtype: torch.dtype, cast_back: bool = True):
        super().__init__()
        self.net, self.dtype, self.cast_back = net, dtype, cast_back

    def forward(self, x):
        with torch.autocast("cpu", dtype=self.dtype):
            y = self.net(x)
        return y.to(x.dtype) if self.cast_back else y


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_float16_autocast_inside_the_forward_does_not_cut_the_fields_tails(mode):
    """The backward of 20 convolutions under a float16 autocast flushes the field's tails to zero below 6e-8, while
    the input's float32 gradient stays above float32's guard: position 12 read 14..50 (weights mode 17..47) where
    the closed form reads 12..52. A float16 result inside the forward now brings float16's guard: redone in
    float64, where the autocast leaves the convolutions alone."""
    torch.manual_seed(0)
    chain = nn.Sequential(*[nn.Conv1d(4, 4, 3) for _ in range(20)]).eval()
    assert probe_rf(Autocast(chain, torch.float16), (1, 4, 64), 12, mode=mode).bounds == ((12, 52),)


class BandAttention(nn.Module):
    """``depth`` 3-tap convolutions, then attention within 2 positions, its float mask made at the default dtype."""

    def __init__(self, depth: int, length: int, mask_in_forward: bool):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv1d(1 if i == 0 else 4, 4, 3, padding=1) for i in range(depth)])
        self.attention = nn.MultiheadAttention(4, 1, batch_first=True)
        self.mask_in_forward = mask_in_forward
        self.mask = self.band(length)  # a plain attribute: the copy's dtype does not reach it

    @staticmethod
    def band(length: int) -> torch.Tensor:
        rows, columns = torch.arange(length)[:, None], torch.arange(length)[None]
        return torch.zeros(length, length).masked_fill((rows - columns).abs() > 2, float("-inf"))

    def forward(self, x):
        h = self.convs(x).transpose(1, 2)
        mask = self.band(h.shape[1]) if self.mask_in_forward else self.mask
        return (h + self.attention(h, h, h, attn_mask=mask, need_weights=False)[0]).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_narrower_probe_makes_the_forwards_masks_at_the_default_dtype(dtype):
    """A -1e9 mask made with torch.zeros in the forward overflowed float16 once factories followed the probe's dtype
    (only a wider one, float64, needs them to)."""

    class MinusBillion(BandAttention):
        @staticmethod
        def band(length: int) -> torch.Tensor:
            rows, columns = torch.arange(length)[:, None], torch.arange(length)[None]
            return torch.zeros(length, length).masked_fill((rows - columns).abs() > 2, -1e9)

    assert probe_rf(MinusBillion(3, 32, True), (1, 1, 32), 16, dtype=dtype).bounds == ((11, 21),)


@pytest.mark.parametrize("mask_in_forward", [True, False])
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_float64_probe_reads_a_float32_attention_mask_as_the_model_does(mode, mask_in_forward):
    """torch misreads a float32 mask beside float64 queries: a float64 probe of a band of +-2 behind 3 convolutions
    read 5..31 at position 16 for 11..21, and a 90-deep stack, redone in float64 where float32 underflows, the whole
    input 0..255 for the closed form's 128 +- 92 = 36..220."""
    shallow = BandAttention(3, 32, mask_in_forward)
    assert probe_rf(shallow, (1, 1, 32), 16, mode=mode, dtype=torch.float64).bounds == ((11, 21),)
    if mode == "theoretical":
        assert probe_rf(BandAttention(90, 256, mask_in_forward), (1, 1, 256), 128).bounds == ((36, 220),)


class AvgPooledBackbone(nn.Module):
    """Three 3 x 3 convolutions, each followed by a 4 x 4 average pooling (a gradient of 1e-6 per input), and a head
    that ``head`` runs (in float16, or beside a float16 constant)."""

    def __init__(self, head):
        super().__init__()
        layers = [m for _ in range(3) for m in (nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(4))]
        self.backbone, self.head = nn.Sequential(nn.Conv2d(3, 4, 1), *layers), head

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.mark.parametrize(
    "head",
    [lambda y: y.half().float(), lambda y: y * torch.ones(1, dtype=torch.float16).float()],
    ids=["a float16 round trip after the probed layer", "a float16 constant"],
)
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_float16_off_the_probed_path_keeps_float32s_guard(mode, head):
    """Only an input-dependent float16 tensor on the way to the probed output brings float16's guard: a small but
    exact gradient (1e-6) was refused as fading to the edge of float16's range."""
    model = AvgPooledBackbone(head)
    assert probe_rf(model, (1, 3, 128, 128), (1, 1), mode=mode, layer="backbone").bounds == ((43, 127), (43, 127))


def test_an_einsum_sums_the_dims_its_ellipsis_stands_for_where_the_output_has_none():
    """``"...t,...t->t"`` sums the ellipsis dims: a zero beside live values along them is no dead contraction (it
    was searched elementwise, and a masked probability opened its path)."""
    operands = [torch.ones(2, 3, 4), torch.ones(2, 3, 4)]
    assert _contracted_dims("einsum", "...t,...t->t", operands, [0, 1]) == [(0, 1), (0, 1)]
    assert _contracted_dims("einsum", "b...t,b...t->b...", operands, [0, 1]) == [(2,), (2,)]
    assert _contracted_dims("einsum", "bct,bct", operands, [0, 1]) == [(0, 1, 2), (0, 1, 2)]  # implicit: ""
    assert _contracted_dims("einsum", "bct,bcs", operands, [0, 1]) == [(0, 1), (0, 1)]  # implicit: "st"
    assert _contracted_dims("einsum", "...ct,...cs", operands, [0, 1]) == [(1,), (1,)]  # implicit: "...st"


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_an_output_of_another_dtype_than_the_probes_is_probed(mode):
    """A bfloat16 output (an autocast that does not cast back), or a float32 one under dtype=torch.float64, raised
    "Index put requires the source and destination dtypes match" from the probe's own backward."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    bfloat16 = probe_rf(Autocast(net, torch.bfloat16, cast_back=False), (1, 3, 16, 16), mode=mode)
    float32 = probe_rf(Autocast(net, torch.float32), (1, 3, 16, 16), mode=mode, dtype=torch.float64)
    assert bfloat16.bounds == float32.bounds == ((6, 10), (6, 10))


class AlwaysDroppedPath(nn.Module):
    """A 3 x 3 convolution and a residual 5 x 5 one behind a drop-path written without ``if self.training``."""

    def __init__(self, drop: float, draw):
        super().__init__()
        self.first, self.branch, self.drop, self.draw = (
            nn.Conv2d(3, 4, 3, padding=1),
            nn.Conv2d(4, 4, 5, padding=2),
            drop,
            draw,
        )

    def forward(self, x):
        x = self.first(x)
        keep = self.draw(x.new_empty(x.shape[0], 1, 1, 1), 1.0 - self.drop)  # timm's and torchvision's draw
        return x + self.branch(x) * keep / (1.0 - self.drop)


@pytest.mark.parametrize(
    "draw",
    [
        lambda t, p: t.bernoulli_(p),
        lambda t, p: t.bernoulli_(),  # p=0.5 by default, not the target's values
        lambda t, p: torch.bernoulli(torch.full_like(t, p)),
        lambda t, p: (torch.bernoulli(torch.full_like(t, p), out=t), t)[1],  # the out= tensor is what is read
    ],
    ids=["bernoulli_(p)", "bernoulli_()", "bernoulli(probabilities)", "bernoulli(out=)"],
)
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_drop_path_that_is_always_on_keeps_its_branch_whatever_the_random_state(mode, draw):
    """Each of the probe's draws dropped the 5 x 5 branch at random (9 of 20 global seeds in weights mode at a drop
    rate of 0.9, and half the seeds in theoretical mode): (8, 8) read 3 x 3 where the branch reads 7 x 7."""
    for seed in range(6):
        torch.manual_seed(seed)
        field = probe_rf(AlwaysDroppedPath(0.9, draw).eval(), (1, 3, 16, 16), (8, 8), mode=mode)
        assert field.bounds == ((5, 11), (5, 11)), seed


class GatheredByScore(nn.Module):
    """Features gathered at the positions a score picks (token selection), by ``pick(score)``'s indices."""

    def __init__(self, pick):
        super().__init__()
        self.features, self.score, self.pick = nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(4, 1, 1), pick

    def forward(self, x):
        features = self.features(x)
        indices = self.pick(self.score(features))
        return torch.gather(features, 2, indices.expand(-1, features.shape[1], -1))


@pytest.mark.parametrize(
    "pick",
    {
        "topk": lambda score: score.topk(12, dim=2).indices,
        "max": lambda score: score.max(dim=2, keepdim=True).indices,
        "sort": lambda score: torch.sort(score, dim=2, descending=True)[1][:, :, :12],
    }.items(),
    ids=lambda item: item[0],
)
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_gather_at_the_positions_a_pick_chose_is_refused_as_argmax_is(mode, pick):
    """Any position can be picked, but the theoretical copy's ties picked a fixed few: position 0 read 11..18 after a
    topk (0..2 after a max) where any input can reach it. The indices of ``topk``, ``max``, ``sort`` now cut the
    gradient as ``argmax``'s do, and the probe says so."""
    with pytest.raises(ProbeError, match=rf"cuts the gradient.*the indices of {pick[0]}\(\)"):
        probe_rf(GatheredByScore(pick[1]), (1, 2, 24), 0, mode=mode)


def test_the_values_of_a_pick_are_probed_where_its_indices_are_not_used():
    model = WideAndNarrow(lambda w, t, n: torch.stack([w, n]).max(dim=0).values)
    assert probe_rf(model, (1, 1, 12), 6).bounds == ((4, 8),)
    # returned beside the probed element, as torch.max(x, dim) returns them, they cut nothing that is probed
    returned = WideAndNarrow(lambda w, t, n: torch.cat([w, n], dim=1).max(dim=1, keepdim=True))
    for mode in ("theoretical", "weights"):
        assert probe_rf(returned, (1, 1, 12), 6, mode=mode, element=0).bounds == ((4, 8),)


class IndexedAlongLength(nn.Module):
    """Two convolutions of 3 joined by an ``index_add`` or an ``index_fill`` along the length."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv1d(1, 1, 3, padding=1), nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x):
        positions = torch.arange(x.shape[-1])
        if self.how == "index_add":
            return self.a(x).index_add(2, positions, self.b(x))
        if self.how == "index_add reversed":
            return self.a(x).index_add(2, positions.flip(0), self.b(x))
        return self.a(x).index_fill(2, torch.tensor([0]), 0.0) + self.b(x)


@pytest.mark.parametrize(
    "how, pos, support",
    [("index_add", 10, [9, 10, 11]), ("index_add reversed", 0, [0, 1, 19, 20]), ("index_fill", 10, [9, 10, 11])],
)
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_an_index_add_or_fill_along_a_spatial_dim_reads_the_positions_its_index_names(mode, how, pos, support):
    """Both raised "Dimension out of range" inside the probe, though the model runs; the fields are the brute force's
    union over random weights and inputs."""
    field = probe_rf(IndexedAlongLength(how), (1, 1, 21), pos, mode=mode)
    assert torch.nonzero(field.heatmap > 0).flatten().tolist() == support


CUTS_INSIDE_A_LIST = {
    "a detached branch in cat's list": lambda w, t, n: torch.cat([w.detach(), n], dim=1).sum(1, keepdim=True),
    "an argsort in an index tuple": lambda w, t, n: w[..., n.sum(1)[0].argsort()],
    "an argmax-chosen phase in an index tuple": lambda w, t, n: torch.stack([w, n])[
        torch.stack([w.norm(), n.norm()]).argmax(), ...
    ],
}


@pytest.mark.parametrize("name", list(CUTS_INSIDE_A_LIST))
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_cut_inside_a_list_or_an_index_tuple_is_refused(mode, name):
    """Only a call's direct arguments were searched for cuts: ``cat([wide.detach(), narrow])`` read 6..6 (the narrow
    branch alone), and a phase chosen by an argmax of norms (adaptive polyphase downsampling) read one phase."""
    with pytest.raises(ProbeError, match="cuts the gradient"):
        probe_rf(WideAndNarrow(CUTS_INSIDE_A_LIST[name]), (1, 1, 12), 6, mode=mode)


class MixedBranch(nn.Module):
    """A 3-tap and a 9-tap branch, of which ``choose(x)`` picks positions or a branch."""

    def __init__(self, choose):
        super().__init__()
        self.narrow, self.wide, self.choose = nn.Conv1d(1, 1, 3, padding=1), nn.Conv1d(1, 1, 9, padding=4), choose
        self.logits = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return self.choose(self, self.narrow(x), self.wide(x))


RANDOM_CHOICES = {
    "a random permutation of positions": lambda m, a, b: (a + b)[..., torch.randperm(a.shape[-1])],
    "random positions": lambda m, a, b: (a + b)[..., torch.randint(0, a.shape[-1], (a.shape[-1],))],
    "positions shuffled by the argsort of noise (masked autoencoders)": lambda m, a, b: (a + b)[
        ..., torch.argsort(torch.rand(a.shape[-1]))
    ],
    "a branch picked by a hard Gumbel softmax": lambda m, a, b: (
        torch.stack([a, b], -1) * nn.functional.gumbel_softmax(m.logits, hard=True)
    ).sum(-1),
    "a branch picked by multinomial sampling": lambda m, a, b: (a, b)[int(torch.multinomial(m.logits.softmax(0), 1))],
    "a drop-path by a threshold on torch.rand": lambda m, a, b: a + b * (torch.rand(a.shape[0], 1, 1) < 0.5) / 0.5,
    "a drop-path by the floor of keep + rand": lambda m, a, b: a + b * (0.5 + torch.rand(a.shape[0], 1, 1)).floor_(),
}


@pytest.mark.parametrize("name", list(RANDOM_CHOICES))
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_positions_or_branches_chosen_at_random_are_refused(mode, name):
    """The field of such a forward is one draw's: output 5 of a shuffled map read 1..3, 6..8 or 10..12 by the global
    random seed, and a branch picked by a hard Gumbel softmax gave 12..20 or 15..17 at output 16."""
    for seed in range(3):
        torch.manual_seed(seed)
        with pytest.raises(ProbeError, match=r"depends on a random draw in its forward.*self.training"):
            probe_rf(MixedBranch(RANDOM_CHOICES[name]).eval(), (1, 1, 32), 16, mode=mode)


PYTHON_BRANCHES = {
    "if on any() of a comparison": lambda m, a, b: b if (a < 0).any() else a,
    "if on a mean against a threshold": lambda m, a, b: a if (a + b).mean() > 0 else b,
    "an early exit on a confidence": lambda m, a, b: a if (a.sigmoid() > 0.9).all() else a + b,
    "torch.equal of two maps": lambda m, a, b: a if torch.equal(a, b) else b,
    "a mask made of a comparison and a NaN check": lambda m, a, b: a if (torch.isnan(a) | (a > 0)).all() else b,
    "a count of a mask against 0": lambda m, a, b: b if torch.count_nonzero(a < 0) > 0 else a,
    "a mask iterated in Python": lambda m, a, b: b if any(bool(v) for v in (a < 0).any(-1).any(-1)) else a,
    "torch.equal of two masks": lambda m, a, b: b if not torch.equal(a < 0, a < -1) else a,
    "an item read inside torch.no_grad()": lambda m, a, b: b if _lowest_without_gradient(a) < 0 else a,
}


def _lowest_without_gradient(y: torch.Tensor) -> float:
    with torch.no_grad():
        return y.min().item()


@pytest.mark.parametrize("name", list(PYTHON_BRANCHES))
def test_a_branch_taken_in_python_on_the_input_is_refused_in_theoretical_mode(name):
    """The copy's constant input takes one side: ``b if (a < 0).any() else a`` read the 3-tap side's 15..17 at
    output 16 where the 9-tap side reads 12..20. Weights mode takes the union over its random inputs' sides."""
    model = MixedBranch(PYTHON_BRANCHES[name]).eval()
    with pytest.raises(ProbeError, match=r"depends on a branch the forward takes in Python.*mode='weights'"):
        probe_rf(model, (1, 1, 32), 16)
    assert probe_rf(model, (1, 1, 32), 16, mode="weights", draws=16).bounds[0][0] >= 12


def test_a_check_that_the_input_holds_numbers_is_no_branch():
    """``if isnan(x).any(): raise`` takes the side every finite input takes: probed as the model without it."""

    def checked(m, a, b):
        if torch.isnan(a).any() or not torch.isfinite(b).all() or (a != a).any():
            raise ValueError("not a number")
        return a + b

    assert probe_rf(MixedBranch(checked).eval(), (1, 1, 32), 16).bounds == ((12, 20),)


def test_a_branch_on_the_weights_alone_is_no_branch_of_the_input():
    """``if (self.logits != 0).any():`` reads the weights: the copy's constants take a side as they do anywhere."""
    model = MixedBranch(lambda m, a, b: a + b if (m.logits != 0).any() else a).eval()
    with torch.no_grad():
        model.logits.fill_(1.0)
    assert probe_rf(model, (1, 1, 32), 16).bounds == ((12, 20),)


@pytest.mark.parametrize(
    "gate",
    [
        lambda a: (a > 0).sum(-1, keepdim=True) / a.shape[-1],  # a share of a count
        lambda a: torch.count_nonzero(a > 0, dim=-1).unsqueeze(-1) / a.shape[-1],
        lambda a: (a > 0).long(),  # an integer mask
    ],
)
def test_a_gate_made_of_a_count_or_an_integer_mask_keeps_both_paths(gate):
    """On the copy's constant input a count is all or nothing: the gate was exactly 0 or 1, and cut the 9-tap
    path (15..17 at output 16 for 12..20)."""
    model = MixedBranch(lambda m, a, b: a * gate(a) + b * (1 - gate(a))).eval()
    assert probe_rf(model, (1, 1, 32), 16).bounds == ((12, 20),)


def test_a_one_hot_of_positions_counted_from_a_mask_selects_as_an_index_does():
    """A one-hot of those positions became 0.5 everywhere once numbers made of masks did: the whole input (0..31)
    where the index reads 12..20."""

    def selected(m, a, b):
        positions = (a > -1e9).long().cumsum(-1) - 1
        one_hot = F.one_hot(positions[0, 0], 32).to(b.dtype)  # (32, 32): row i picks position i
        return (one_hot @ b[0, 0]).view(1, 1, -1)

    assert probe_rf(MixedBranch(selected).eval(), (1, 1, 32), 16).bounds == ((12, 20),)


def test_positions_counted_from_a_mask_of_the_input_index_as_they_do():
    """An integer index made from a mask (``m.long().cumsum(-1) - 1``) is no mask: it was read as one (every
    position 1, 0..2 at output 16 where the index reads 14..18)."""

    def counted(m, a, b):
        positions = (a > -1e9).long().cumsum(-1) - 1  # 0, 1, 2, ... on any finite input
        return b[0, 0][positions[0, 0]].view(1, 1, -1)

    assert probe_rf(MixedBranch(counted).eval(), (1, 1, 32), 16).bounds == ((12, 20),)


def test_a_fractional_max_pool_is_refused_where_its_regions_are_random_or_unread():
    """Its pooling regions are drawn on every forward: the field followed the global random state (output (0, 1)
    read columns 2..4 or 3..5 by the draw). With fixed regions, theoretical mode has no mean-pool twin over them and
    read one element of a 2 x 2 region (3 x 3 where the architecture reads 4 x 4); weights mode reads the real max."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.FractionalMaxPool2d(2, output_ratio=0.5))
    with pytest.raises(ProbeError, match=r"drawn at random on every forward.*_random_samples="):
        probe_rf(model, (1, 1, 17, 19), "center", mode="weights")
    samples = torch.full((8, 2, 2), 0.5)  # one per draw of weights mode
    fixed = nn.Sequential(nn.Conv2d(1, 2, 3), nn.FractionalMaxPool2d(2, output_ratio=0.5, _random_samples=samples))
    for pooled in (model, fixed):
        with pytest.raises(ProbeError, match=r"theoretical mode cannot read as a mean \(use mode='weights'\)"):
            probe_rf(pooled, (1, 1, 17, 19), "center")
    low, high = probe_rf(fixed, (1, 1, 17, 19), "center", mode="weights").bounds[0]
    assert high - low + 1 in (3, 4)  # a max over a 2 x 2 region of 3 x 3 convolutions


DRAWS_THAT_DECIDE_NOTHING = {
    "noise added to a map": lambda m, a, b: a + b + 0.1 * torch.randn_like(a),
    "noise masked at random": lambda m, a, b: a + b + torch.randn_like(a) * (torch.rand_like(a) < 0.1),
    "a coefficient a random timestep picks (diffusion)": lambda m, a, b: (
        torch.linspace(0.1, 1.0, 10)[torch.randint(0, 10, (1,))] * (a + b)
    ),
}


@pytest.mark.parametrize("name", list(DRAWS_THAT_DECIDE_NOTHING))
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_random_draws_that_decide_no_position_or_mask_change_no_field(mode, name):
    """Noise, a mask on the noise alone and a positive coefficient picked by a random timestep read what the
    branches read, for every seed (the reviewer's diffusion forward was refused as a cut)."""
    for seed in range(3):
        torch.manual_seed(seed)
        model = MixedBranch(DRAWS_THAT_DECIDE_NOTHING[name]).eval()
        assert probe_rf(model, (1, 1, 32), 16, mode=mode).bounds == ((12, 20),)


def test_a_mask_inside_a_list_keeps_the_constants_beside_it_in_theoretical_mode():
    """``cat([mask.float(), zeros])`` as a gate: the zeros switch a branch off, but the mask in the list made the
    whole result 0.5 (both halves a mask) and the branch came back, 12..20 where it reads 15..17."""

    def gated(m, a, b):
        gate = torch.cat([(a > 0).float(), torch.zeros_like(b)], dim=1)
        return a + (torch.cat([a, b], dim=1) * gate)[:, 1:]

    for mode in ("theoretical", "weights"):
        assert probe_rf(MixedBranch(gated), (1, 1, 32), 16, mode=mode).bounds == ((15, 17),)


class CutPath(nn.Module):
    """A 3x3 path and a 5x5 path; ``cut`` hides the 5x5 one from gradients in one of several ways."""

    def __init__(self, cut: str):
        super().__init__()
        self.a, self.b, self.cut = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 5, padding=2), cut

    def forward(self, x):
        b = self.b(x)
        if self.cut == "detach":
            b = b.detach()
        elif self.cut == "no_grad":
            with torch.no_grad():
                b = self.b(x)
        elif self.cut == "int":
            b = b.long().float()
        elif self.cut == "round":
            b = torch.round(b)
        elif self.cut == "new_tensor":
            b = x.new_tensor(b)
        elif self.cut == "in_place":
            out = self.a(x)
            with torch.no_grad():
                out.add_(self.b(x))
            return out
        elif self.cut == "item":
            return self.a(x) - b.mean().item()
        return self.a(x) + b


@pytest.mark.parametrize("cut, named", [("detach", "detach()"), ("no_grad", "inside torch.no_grad()"),
                                        ("int", "long()"), ("round", "round()"), ("new_tensor", "new_tensor()"),
                                        ("in_place", r"add_\(\) inside torch.no_grad\(\)"),
                                        ("item", "item()")])  # fmt: skip
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_path_the_gradient_cannot_see_is_refused_not_measured_too_small(cut, named, mode):
    with pytest.raises(ProbeError, match=rf"cuts the gradient on a path from the input \(.*{named}.*remove the cut"):
        probe_rf(CutPath(cut), SHAPE, "center", mode=mode)


def test_a_cut_after_the_probed_layer_does_not_matter_and_the_table_leaves_out_rows_after_a_cut():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.features, self.head = small(), nn.Conv2d(2, 2, 3)

        def forward(self, x):
            return self.head(self.features(x).detach()).mean((2, 3)).argmax(1)

    assert probe_rf(Classifier(), SHAPE, "center", layer="features").size == (8, 8)
    with pytest.warns(UserWarning, match=r"rows from 'head' on are left out \(head\).*detach\(\)"):
        rows = rf_table(Classifier(), SHAPE)
    assert [r.name for r in rows] == ["features.0", "features.1", "features.2", "features.3", "features"]
    with pytest.raises(
        ProbeError, match=r"or runs a call the theoretical copy cannot replace, before the output of 'head'"
    ):
        rf_table(Classifier(), SHAPE, layers=["head"])


def test_table_refuses_a_named_layer_with_a_tuple_output():
    with pytest.raises(ValueError, match=r"'' returns|returns a tuple of feature maps.*element="):
        rf_table(nn.Sequential(TwoMaps()), SHAPE, layers=["0"])


def test_squeeze_and_excitation_gates_do_not_overflow_the_theoretical_copy():
    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.fc1, self.fc2 = (
                nn.Conv2d(c, c, 3, padding=1),
                nn.Conv2d(c, c // 2, 1),
                nn.Conv2d(c // 2, c, 1),
            )

        def forward(self, x):
            y = self.conv(x)
            return x + y * torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *[SE(8) for _ in range(24)])
    field = probe_rf(model, (1, 3, 24, 24), "center")
    assert field.bounds == ((0, 23), (0, 23))  # the gate pools globally: the whole input, exactly
    assert field.geometry == (None, None)  # every field spans any input: no (r, S, P)


def test_global_module_hooks_do_not_run_on_the_probe_copy():
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: calls.append(1))
    try:
        probe_rf(small(), SHAPE, "center", mode="weights")
        effective_rf(small(), torch.randn(2, 1, 20, 20), "center")
        assert calls == []
        small()(torch.zeros(SHAPE))
        assert calls  # still registered for the user's own forwards
    finally:
        handle.remove()


# --- effective_rf's inputs ----------------------------------------------------------------------------------------


def test_effective_rf_refuses_nan_inputs_empty_batches_and_unbatched_images():
    model = small()
    bad = torch.randn(4, 1, 20, 20)
    bad[2, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"inputs hold NaN or inf values \(1 of 4 samples\).*drop or clean"):
        effective_rf(model, bad)
    with pytest.raises(ValueError, match=r"inputs of shape \(0, 1, 20, 20\) hold no sample"):
        effective_rf(model, torch.zeros(0, 1, 20, 20))
    with pytest.raises(ValueError, match=r"inputs of shape \(1, 20, 20\) are read as a batch.*inputs\.unsqueeze\(0\)"):
        effective_rf(model, torch.zeros(1, 20, 20))
    with pytest.raises(ValueError, match=r"chunk_size=0 must be an int >= 1"):
        effective_rf(model, torch.zeros(2, 1, 20, 20), chunk_size=0)


def test_effective_rf_refuses_a_model_whose_output_is_not_finite():
    model = small()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ProbeError, match="not finite"):
        effective_rf(model, torch.randn(2, 1, 20, 20))


# --- arguments at the door ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pos": (4.0, 4.0)}, r"pos=\(4\.0, 4\.0\) has the index 4\.0 \(float\): indices must be ints.*pos=\(4, 4\)"),
        ({"pos": (True, 1)}, r"has the index True \(bool\)"),
        ({"pos": "middle"}, r"pos='middle' is not allowed; use an index tuple"),
        ({"pos": [(1, 1), 2]}, r"pos=\[\(1, 1\), 2\] is not allowed"),
        ({"pos": (1, 2, 3)}, r"must have 2 int index\(es\)"),
        ({"pos": (9, 0)}, r"outside the output map of the model, whose spatial shape is \(7, 7\)"),
        ({"draws": True, "mode": "weights"}, r"draws=True must be an int >= 1 \(the number of random inputs"),
        ({"draws": 0, "mode": "weights"}, r"draws=0 must be an int >= 1"),
        ({"seed": "0"}, r"seed='0' must be an int .*got str"),
        ({"dtype": torch.int32}, r"dtype=torch\.int32 must be a floating torch dtype"),
        ({"layer": 2}, r"layer=2 must be a dotted submodule name \(a str"),
        ({"layer": "conv9"}, r"layer='conv9' is not a submodule of the model; nearest names"),
        ({"element": 1.5}, r"element=1\.5 must be an int \(the index in a tuple"),
        ({"mode": "exact"}, r"mode='exact' is not a probe mode"),
    ],
)
def test_bad_arguments_are_refused_with_their_name_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        probe_rf(small(), SHAPE, **{"pos": "center", **kwargs})


def test_layer_given_as_the_module_object_says_a_name_is_needed():
    model = small()
    with pytest.raises(ValueError, match=r"must be a dotted submodule name \(a str, as in model\.named_modules\(\)"):
        probe_rf(model, SHAPE, "center", layer=model[3])


def test_numpy_and_torch_integers_are_accepted_where_ints_are():
    model = small()
    expected = probe_rf(model, SHAPE, (3, 2))
    assert probe_rf(model, SHAPE, (np.int64(3), np.int32(2))) == expected
    assert probe_rf(model, SHAPE, np.array([3, 2])) == expected
    assert probe_rf(model, SHAPE, torch.tensor([3, 2])) == expected
    assert probe_rf(model, SHAPE, (3, 2), mode="weights", draws=np.int64(2), seed=np.int32(1)).size == (8, 8)


def test_model_on_the_meta_device_is_refused_with_the_way_out():
    with torch.device("meta"):
        model = small()
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        probe_rf(model, SHAPE, "center")


def test_model_that_cannot_be_copied_is_refused_with_the_way_out():
    model = small()
    model.lock = threading.Lock()
    with pytest.raises(ProbeError, match=r"cannot be deep-copied \(TypeError.*probe a submodule without it"):
        probe_rf(model, SHAPE, "center")


class _Doubled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return (x * 2).clone()  # runs without gradient, as every custom forward does

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def test_custom_autograd_functions_and_boolean_masks_are_not_gradient_cuts():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 5, padding=2)

        def forward(self, x):
            y = _Doubled.apply(self.a(x))
            return self.b(y * (y > 0))  # a hand-written ReLU

    assert probe_rf(Custom(), SHAPE, "center").size == (7, 7)
    assert probe_rf(Custom(), SHAPE, "center", mode="weights").size == (7, 7)


def test_tensors_made_from_another_tensors_shape_are_not_gradient_cuts():
    class ShapedMask(nn.Module):
        # Shifted-window attention builds its mask with x.new_zeros(...): the shape of x, none of its values.
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            mask = y.new_zeros(y.shape).masked_fill(torch.ones_like(y, dtype=torch.bool), 0.5)
            return y + mask

    assert probe_rf(ShapedMask(), SHAPE, "center").size == (3, 3)


def test_a_forward_delegated_to_another_module_runs_that_module_on_the_copy():
    class Net(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, k, padding=k // 2)

        def forward(self, x):
            return self.conv(x)

    class Wrapper(Net):  # its own 3x3 conv is unused: the inner 9x9 network runs
        def __init__(self):
            super().__init__(3)
            self.inner = Net(9)
            self.forward = self.inner.forward

    assert probe_rf(Wrapper(), (1, 1, 32, 32), (16, 16)).bounds == ((12, 20), (12, 20))


def test_max_along_a_dim_does_not_hide_pixels_in_theoretical_mode():
    class GlobalMax(nn.Module):  # a feature map plus its global maximum: every output sees the whole input
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.c2(self.c1(x))
            return y + y.max(dim=3, keepdim=True).values.max(dim=2, keepdim=True).values

    assert probe_rf(GlobalMax(), (1, 1, 16, 16), (3, 3)).bounds == ((0, 15), (0, 15))


class PickOfBranches(nn.Module):
    """Two branches of one input, a 3-tap one (i-1..i+1) and a dilated one (i-4, i, i+4), joined by a pick."""

    def __init__(self, pick):
        super().__init__()
        self.a, self.b = nn.Conv1d(1, 1, 3, padding=1), nn.Conv1d(1, 1, 3, padding=4, dilation=4)
        self.pick = pick

    def forward(self, x):
        return self.pick(self.a(x), self.b(x))


PICKS = {
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "fmax": torch.fmax,
    "max of two": torch.max,
    "maximum by keyword": lambda a, b: torch.maximum(a, other=b),  # read 5..7 at position 6, not 2..10
    "fmin by keyword": lambda a, b: torch.fmin(a, other=b),
    "max of two by keyword": lambda a, b: torch.max(input=a, other=b),
    "amax": lambda a, b: torch.stack([a, b]).amax(0),
    "amin": lambda a, b: torch.stack([a, b]).amin(dim=0),
    "where by value": lambda a, b: torch.where(a > b, a, b),
    "topk": lambda a, b: torch.stack([a, b], -1).topk(1, -1).values[..., 0],
    "sort": lambda a, b: torch.stack([a, b], -1).sort(-1).values[..., 1],
    "median": lambda a, b: torch.stack([a, b, a], -1).median(-1).values,
    "nanquantile": lambda a, b: torch.stack([a, b], -1).nanquantile(0.0, -1),
    "quantiles": lambda a, b: torch.stack([a, b], -1).quantile(torch.tensor([0.0, 1.0]), -1, keepdim=True)[0, ..., 0],
    "clamp to a branch": lambda a, b: a.clamp(min=b),
    "linalg.norm of order inf": lambda a, b: torch.linalg.norm(torch.stack([a, 0.5 * b]), ord=float("inf"), dim=0),
    "scatter_reduce by amax": lambda a, b: torch.zeros_like(a).scatter_reduce(
        1, torch.zeros(1, 2, a.shape[-1], dtype=torch.long), torch.cat([a, 0.5 * b], 1), "amax", include_self=False
    ),
    "index_reduce by amin": lambda a, b: torch.zeros_like(a).index_reduce(
        1, torch.tensor([0, 0]), torch.cat([a, 2 * b], 1), "amin", include_self=False
    ),
    "segment_reduce by max": lambda a, b: torch.segment_reduce(
        torch.stack([a, 0.5 * b]), "max", lengths=torch.tensor([2]), axis=0
    )[0],
    "clamp in place, read through its target": lambda a, b: (a.clamp_(min=b), a)[1],
}


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta:UserWarning")
@pytest.mark.parametrize("name", list(PICKS))
def test_a_pick_between_branches_keeps_every_branch_in_theoretical_mode(name):
    """Before, on the copy's equal values a pick followed ties and dropped a branch: position 1 of a maximum read
    0..2, not 0..5, and the weights field (0..5) lay outside the theoretical one. A branch scaled down never won a
    max of order inf, a ``scatter_reduce``, ``index_reduce`` or ``segment_reduce`` by max or min."""
    model = PickOfBranches(PICKS[name])
    field_map = probe_rf(model, (1, 1, 12), "all")
    for i in range(12):
        read = [j for j in (i - 4, i - 1, i, i + 1, i + 4) if 0 <= j < 12]
        assert field_map[(i,)].bounds == ((min(read), max(read)),), i
    weights = probe_rf(model, (1, 1, 12), "all", mode="weights")
    for i in range(12):
        (low, high), (first, last) = field_map[(i,)].bounds[0], weights[(i,)].bounds[0]
        assert low <= first and last <= high, i


class PickOfAlwaysOneBranch(PickOfBranches):
    """The same branches, the first squared and shifted (at least 10), the second squashed (below 1): the pick
    always takes the first on these weights, whatever the input."""

    def forward(self, x):
        return self.pick(self.a(x) ** 2 + 10, torch.sigmoid(self.b(x)))


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta:UserWarning")
@pytest.mark.parametrize("name", ["amax", "scatter_reduce by amax", "index_reduce by amin", "segment_reduce by max"])
def test_a_pick_by_value_reads_every_candidate_in_weights_mode(name):
    """The input, not a weight, decides which candidate a max picks: weights mode reads all of them, as for a
    max-pool's window. A scatter_reduce, index_reduce or segment_reduce by max or min read the winner alone (5..7,
    the 3-tap branch's, where amax reads 2..10; a min, the dilated branch's 2, 6 and 10 alone)."""
    torch.manual_seed(0)
    field = probe_rf(PickOfAlwaysOneBranch(PICKS[name]), (1, 1, 12), 6, mode="weights")
    assert field.heatmap.nonzero().flatten().tolist() == [2, 5, 6, 7, 10]


def test_a_weights_map_of_a_maximum_equals_its_single_probes():
    """The map reads many positions per pass and attributes each support by the theoretical boxes: with a pick that
    dropped a branch there, positions 0, 1, 9, 10 and 11 got wrong fields (single probes were right)."""
    torch.manual_seed(0)
    model = PickOfBranches(torch.maximum)
    field_map = probe_rf(model, (1, 1, 12), "all", mode="weights")
    assert [field_map[(i,)].bounds for i in range(12)] == [
        probe_rf(model, (1, 1, 12), i, mode="weights").bounds for i in range(12)
    ]


class PoolAndUnpool(nn.Module):
    """SegNet's decoder step: a max-pool that keeps its arg-max indices, then the unpooling that puts values back."""

    def __init__(self, n_axes: int, kernel: int, stride: int):
        super().__init__()
        self.pool = (nn.MaxPool1d, nn.MaxPool2d)[n_axes - 1](kernel, stride, return_indices=True)
        self.unpool = (nn.MaxUnpool1d, nn.MaxUnpool2d)[n_axes - 1](kernel, stride)
        self.conv = (nn.Conv1d, nn.Conv2d)[n_axes - 1](1, 1, 1)

    def forward(self, x):
        return self.conv(self.unpool(*self.pool(x)))


def test_an_unpooling_reaches_every_position_of_its_window_in_theoretical_mode():
    """Any element of a window may be its maximum: unpooled position p sees the windows that hold it. Before, the
    copy's equal values sent every window's value to its first element, and 12 of 16 positions of a 2 x 2 unpooling
    got an empty field (a single probe said "its window covers only padding")."""
    field_map = probe_rf(PoolAndUnpool(2, 2, 2), (1, 1, 4, 4), "all")
    for p in field_map.positions():
        assert field_map[p].bounds == tuple((i // 2 * 2, i // 2 * 2 + 1) for i in p), p
    # Overlapping windows (3, stride 2) on 9 inputs: 4 windows, at 0..2, 2..4, 4..6, 6..8.
    field_map = probe_rf(PoolAndUnpool(1, 3, 2), (1, 1, 9), "all")
    for (p,) in field_map.positions():
        windows = [j for j in range(4) if 2 * j <= p <= 2 * j + 2]
        assert field_map[(p,)].bounds == ((2 * min(windows), 2 * max(windows) + 2),), p
    torch.manual_seed(0)
    weights = probe_rf(PoolAndUnpool(2, 2, 2), (1, 1, 4, 4), (1, 1), mode="weights")
    assert weights.bounds == ((1, 1), (1, 1))  # the real unpooling: only where (1, 1) was its window's maximum


class StandardisedConv2d(nn.Conv2d):
    """Weight standardisation (Qiao et al.) written by hand: the copy's equal constants standardise to zeros."""

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_a_weight_standardised_from_the_copys_constants_does_not_cut_every_path():
    """Before, every field of the map was empty without a word, and a single probe said "its window covers only
    padding"."""
    model = nn.Sequential(StandardisedConv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1))
    field_map = probe_rf(model, (1, 2, 8, 7), "all")
    assert field_map[(4, 3)].bounds == ((2, 6), (1, 5)) and field_map[(0, 0)].bounds == ((0, 2), (0, 2))
    assert probe_rf(model, (1, 2, 8, 7), (4, 3)).bounds == ((2, 6), (1, 5))
    assert [row.size for row in rf_table(model, (1, 2, 8, 7))] == [(3, 3), (5, 5)]


class MaskedConv2d(nn.Conv2d):
    """PixelCNN's mask A: the kernel's centre and everything after it are zero, so a pixel never sees itself."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mask = torch.ones_like(self.weight)
        k = self.kernel_size[0]
        mask[:, :, k // 2, k // 2 :] = 0
        mask[:, :, k // 2 + 1 :] = 0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


def test_a_kernel_masked_by_the_architecture_keeps_its_zeros():
    field = probe_rf(MaskedConv2d(1, 1, 5, padding=2), (1, 1, 9, 9), (4, 4))
    assert field.bounds == ((2, 4), (2, 6))  # the rows above and the left half of the centre row
    assert field.heatmap[4, 4] == 0 and field.heatmap[4, 3] > 0


class ComputedKernel(nn.Module):
    """A convolution whose kernel the forward computes from its parameters (and a fixed buffer)."""

    def __init__(self, kernel, channels: int = 1, size: int = 3, stride: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, size, size))
        self.alpha = nn.Parameter(torch.randn(channels, channels, 4))
        h = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
        self.register_buffer("haar", torch.einsum("am,bn->abmn", h, h).reshape(4, 2, 2))
        mask = torch.ones(size, size)
        mask[size // 2 + 1 :] = 0
        mask[size // 2, size // 2 + 1 :] = 0
        self.register_buffer("mask", mask)  # PixelCNN's mask B: the rows above, the centre row up to the centre
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        w = self.kernel(self)
        return F.conv2d(x, w, stride=self.stride, padding=(w.shape[-1] // 2) * (self.stride == 1))


def _standardised(w):
    w = w - w.mean(dim=(1, 2, 3), keepdim=True)
    return w / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)


def _masked_by_assignment(m):
    kernel = _standardised(m.weight)
    kernel[:, :, 2:] = 0  # the mask of the kernel's centre row and below, written in place
    return kernel


def _largest_tap_kept(m):
    centred = (m.weight - m.weight.mean()).flatten(1)
    largest = centred.topk(1, dim=1).indices  # the tap any weights may make the largest
    return torch.zeros_like(centred).scatter(1, largest, centred.gather(1, largest)).view_as(m.weight)


COMPUTED_KERNELS = {
    # standardised then masked: all zeros on the copy's constants, and the mask was lost with them
    "standardised, masked": (lambda m: _standardised(m.weight) * m.mask, {}, (8, 8), ((6, 8), (6, 10))),
    # a combination of fixed Haar bases: on equal alphas every tap but one cancels
    "haar bases": (lambda m: torch.einsum("oib,bhw->oihw", m.alpha, m.haar), {"stride": 2}, (3, 3), ((6, 7), (6, 7))),
    # a standardised kernel plus a fixed identity: the identity's tap alone was left
    "standardised + dirac": (
        lambda m: _standardised(m.weight) + nn.init.dirac_(torch.empty_like(m.weight)),
        {},
        (8, 8),
        ((7, 9), (7, 9)),
    ),
    # increments of a kernel: zero but the first on equal values
    "increments": (
        lambda m: torch.diff(m.weight, dim=-1, prepend=torch.zeros_like(m.weight[..., :1])),
        {},
        (8, 8),
        ((7, 9), (7, 9)),
    ),
    # zero at the tap of the least weight, which any tap may be: all zeros on the copy, and one draw of generic
    # weights left its least tap out
    "shifted by its least": (
        lambda m: m.weight - m.weight.amin(dim=(2, 3), keepdim=True),
        {},
        (8, 8),
        ((7, 9), (7, 9)),
    ),
    # standardised, then zero at the median tap: all zeros on the copy, and the same tap in both generic orders
    "standardised, shifted by its median": (
        lambda m: _standardised(m.weight) - _standardised(m.weight).flatten(1).median(dim=1).values.view(-1, 1, 1, 1),
        {},
        (8, 8),
        ((7, 9), (7, 9)),
    ),  # fmt: skip
    # standardised, then its lower rows zeroed by an assignment (which returns nothing)
    "standardised, masked by assignment": (_masked_by_assignment, {}, (8, 8), ((7, 8), (7, 9))),
    # standardised and clamped into a tensor given as out=
    "standardised, clamped into out=": (
        lambda m: torch.clamp(_standardised(m.weight), min=0, out=torch.empty_like(m.weight)),
        {},
        (8, 8),
        ((7, 9), (7, 9)),
    ),
    # the largest tap of a centred kernel kept: all zeros on the copy, and a generic draw picks one tap
    "largest tap kept": (_largest_tap_kept, {}, (8, 8), ((7, 9), (7, 9))),
    # the largest tap kept, then PixelCNN's mask B: the positions a pick chose keep the mask's zeros
    "largest tap kept, masked": (lambda m: _largest_tap_kept(m) * m.mask, {}, (8, 8), ((7, 8), (7, 9))),
    # a sigmoid of a kernel padded with zeros: sigmoid(0) is not zero
    "sigmoid of a padded tap": (
        lambda m: torch.sigmoid(F.pad(m.weight[..., 1:2, 1:2], (1, 1, 1, 1))),
        {},
        (8, 8),
        ((7, 9), (7, 9)),
    ),  # fmt: skip
    # rectified increments of negated weights: zero on the copy and on any positive weights
    "rectified increments": (
        lambda m: torch.diff(-m.weight, dim=-1, prepend=torch.zeros_like(m.weight[..., :1])).clamp(min=0),
        {},
        (8, 8),
        ((7, 9), (7, 9)),
    ),
    # standardised without an epsilon: 0 / 0 on the copy's constants
    "standardised without an epsilon": (
        lambda m: (m.weight - m.weight.mean()) / m.weight.std(),
        {},
        (8, 8),
        ((7, 9), (7, 9)),
    ),
    # standardised, then kept where above its mean (a mask the weights pick)
    "standardised, thresholded": (
        lambda m: _standardised(m.weight) * (m.weight > m.weight.mean()),
        {},
        (8, 8),
        ((7, 9), (7, 9)),
    ),
}


@pytest.mark.parametrize("name", list(COMPUTED_KERNELS))
def test_a_kernel_computed_from_the_weights_keeps_every_tap_that_trained_weights_have(name):
    """The copy's equal constants made a computed kernel lose taps that any trained weights have: the probe read a
    single tap of a Haar combination (6..6 for 6..7), the standardised-plus-identity kernel's centre alone, and,
    where standardisation made it all zeros, every tap of the window, the mask's hidden rows too (7..9 for 7..8).
    Beside each kernel the copy computes it on generic weights, whose zeros are the architecture's (the mask's)."""
    kernel, settings, pos, expected = COMPUTED_KERNELS[name]
    channels = 2 if name == "standardised, masked" else 1
    model = nn.Sequential(ComputedKernel(kernel, channels, **settings), nn.Conv2d(channels, 1, 1))
    if name == "standardised, masked":
        model.append(ComputedKernel(kernel, 1))  # two masked layers: rows 6..8, columns 6..10
    theoretical = probe_rf(model, (1, channels, 16, 16), pos)
    assert theoretical.bounds == expected
    if "masked" not in name:  # every tap of the box
        assert (theoretical.heatmap[tuple(slice(a, b + 1) for a, b in expected)] > 0).all()
    assert probe_rf(model, (1, channels, 16, 16), "all")[pos].bounds == expected
    for weights in [model[0].weight.detach().clone(), torch.rand_like(model[0].weight), -model[0].weight.detach()]:
        with torch.no_grad():
            model[0].weight.copy_(weights)
        try:
            field = probe_rf(model, (1, channels, 16, 16), pos, mode="weights")  # trained weights: inside
        except ProbeError:  # weights that hide every tap (the largest one under the mask)
            continue
        assert all(a <= first <= last <= b for (first, last), (a, b) in zip(field.bounds, expected))


def test_a_kernel_undefined_for_every_weight_is_refused_as_not_finite():
    """``w / (w - w)`` is 0 / 0 on the copy and on every generic draw: filling it hid the refusal."""
    with pytest.raises(ProbeError, match="not finite"):
        probe_rf(ComputedKernel(lambda m: m.weight / (m.weight - m.weight)), (1, 1, 9, 9), (4, 4))


def test_a_kernel_of_zeros_that_the_architecture_makes_stays_zero():
    """A tap that every weight makes zero (an antisymmetric kernel's centre, w - w.flip) stays out of the field."""
    field = probe_rf(ComputedKernel(lambda m: m.weight - m.weight.flip(-1), size=3), (1, 1, 9, 9), (4, 4))
    assert field.bounds == ((3, 5), (3, 5))
    heatmap = field.heatmap[3:6]
    assert (heatmap[:, 4] == 0).all() and (heatmap[:, 3] > 0).all() and (heatmap[:, 5] > 0).all()


class FlowWarp(nn.Module):
    """A flow predicted from the features warps them (RAFT's and a spatial transformer's pattern)."""

    def __init__(self):
        super().__init__()
        self.features, self.flow = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        f = self.features(x)
        n, _, h, w = f.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        grid = torch.stack([xs, ys], -1)[None].to(f.dtype) + 0.1 * self.flow(f).permute(0, 2, 3, 1)
        return F.grid_sample(f, grid, align_corners=True)


def test_a_warp_by_a_predicted_flow_may_read_any_input_in_theoretical_mode():
    """The flow decides where each output samples: the architecture lets it sample anywhere. Before, the copy's
    constant features gave the flow no gradient, and at 29 of 72 positions the weights field lay outside the
    theoretical one."""
    torch.manual_seed(0)
    model = FlowWarp()
    theoretical = probe_rf(model, (1, 2, 9, 8), "all")
    weights = probe_rf(model, (1, 2, 9, 8), "all", mode="weights")
    for p in theoretical.positions():
        assert theoretical[p].bounds == ((0, 8), (0, 7)), p
        assert weights[p].bounds == probe_rf(model, (1, 2, 9, 8), p, mode="weights").bounds, p


class ConvThen(nn.Module):
    """A 3-tap convolution over 3 channels, then a function of its output."""

    def __init__(self, then):
        super().__init__()
        self.conv, self.then = nn.Conv1d(3, 3, 3, padding=1, bias=False), then

    def forward(self, x):
        return self.then(self.conv(x))


CANCELLING = {  # name: (function, the inputs output i reads on 12)
    "normalize over channels": (lambda y: F.normalize(y, dim=1), lambda i: (max(i - 1, 0), min(i + 1, 11))),
    "cosine similarity": (
        lambda y: F.cosine_similarity(y, y.flip(1), dim=1).unsqueeze(1),
        lambda i: (max(i - 1, 0), min(i + 1, 11)),
    ),
    "cummax": (lambda y: torch.cummax(y, 2).values, lambda i: (0, min(i + 1, 11))),
    "cummin": (lambda y: torch.cummin(y, 2).values, lambda i: (0, min(i + 1, 11))),
    "diff": (lambda y: torch.diff(y, dim=2), lambda i: (max(i - 1, 0), min(i + 2, 11))),
}


@pytest.mark.parametrize("name", list(CANCELLING))
def test_a_call_whose_gradient_cancels_on_equal_values_keeps_its_paths_in_theoretical_mode(name):
    """Before, normalize and cosine similarity left every field empty ("its window covers only padding"), cummax
    kept one element, and diff (a subtraction inside one call) one neighbour: smaller than the weights field."""
    function, reads = CANCELLING[name]
    torch.manual_seed(0)
    model = ConvThen(function)
    theoretical = probe_rf(model, (1, 3, 12), "all")
    weights = probe_rf(model, (1, 3, 12), "all", mode="weights")
    for (i,) in theoretical.positions():
        assert theoretical[(i,)].bounds == (reads(i),), i
        (low, high), (first, last) = theoretical[(i,)].bounds[0], weights[(i,)].bounds[0]
        assert low <= first and last <= high, i


class ResizeThenUnpool(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool, self.unpool = nn.MaxPool2d(3, 2, return_indices=True), nn.MaxUnpool2d(3, 2)

    def forward(self, x):
        return self.unpool(*self.pool(F.interpolate(x, scale_factor=3, mode="bilinear")))


def test_weights_mode_runs_the_networks_own_values_through_an_exact_resize():
    """The exact resize differs from PyTorch's by rounding; a max-pool with indices after it broke near ties the other
    way, and 11 of 225 unpooled positions got another position's field (output (0, 14) is 0 on every draw, and was
    given input (0, 4))."""
    with pytest.raises(ProbeError, match="with the current weights"):
        probe_rf(ResizeThenUnpool(), (1, 1, 5, 5), (0, 14), mode="weights")


def _layer_norm_by_hand(y):
    mean = y.mean(1, keepdim=True)
    return (y - mean) / torch.sqrt(((y - mean) ** 2).mean(1, keepdim=True) + 1e-6)


class SignedBranch(nn.Module):
    """conv 3, then a 5 x 5 branch behind a signed call beside a 1 x 1 bypass: r = 3 + 5 - 1 = 7 at every position.

    On the theoretical copy every channel of ``y`` is equal, so ``y - y.mean(1)`` is exactly zero and its gradient
    cancels: the 5 x 5 branch vanished and the field was the bypass's 3 x 3 (weights mode said 7 x 7).
    """

    def __init__(self, signed):
        super().__init__()
        self.signed = signed
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 5, padding=2), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(self.signed(y)) + self.c3(y)


SIGNED_CALLS = {
    "centred": lambda y: y - y.mean(1, keepdim=True),
    "torch.sub": lambda y: torch.sub(y.mean(1, keepdim=True), y, alpha=2),
    "in place": lambda y: y.clone().sub_(y.mean(1, keepdim=True)),
    "reversed": lambda y: 1 - y / y.sum(1, keepdim=True),
    "negated": lambda y: y + (-y.mean(1, keepdim=True)),
    "divided": lambda y: y / y.mean(1, keepdim=True),
    "reciprocal": lambda y: y * y.mean(1, keepdim=True).reciprocal() - y * torch.rsqrt(y.mean(1, keepdim=True) ** 2),
    "negative power": lambda y: y - y * y.mean(1, keepdim=True) ** -1.0,
    "layer norm by hand": _layer_norm_by_hand,
    "variance gate": lambda y: y * y.var(1, keepdim=True),
    "standardised": lambda y: y / (y.std(dim=1, keepdim=True) + 1e-5),
    "clamped": lambda y: (8 * y).clamp(0, 6),  # the copy's values are 8: past the bound, the gradient was zero
    "clipped in place": lambda y: (8 * y).clip_(max=6),
}


@pytest.mark.parametrize("signed", SIGNED_CALLS.values(), ids=SIGNED_CALLS.keys())
def test_signed_or_clamping_calls_do_not_hide_paths_in_theoretical_mode(signed):
    model = SignedBranch(signed)
    theoretical = probe_rf(model, (1, 1, 20, 20), (10, 10), mode="theoretical")
    assert theoretical.bounds == ((7, 13), (7, 13))
    assert probe_rf(model, (1, 1, 20, 20), (10, 10), mode="weights").bounds == theoretical.bounds
    assert [(g.size, g.stride, g.offset) for g in theoretical.geometry] == [(7, 1, 3)] * 2


def test_a_mask_subtracted_from_scores_keeps_its_values_in_theoretical_mode():
    # The subtrahend does not depend on the input: the real call runs, so the mask still hides its positions.
    class MaskedMix(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 1)
            self.register_buffer("mask", torch.arange(20.0).ge(10).float() * 1e9)

        def forward(self, x):
            y = self.c(x)
            return torch.softmax(y - self.mask, dim=3) * y.sum(3, keepdim=True)

    assert probe_rf(MaskedMix(), (1, 1, 20, 20), (5, 5)).bounds == ((5, 5), (0, 19))


@pytest.mark.parametrize("blocks", [1, 4, 16])
def test_verify_rf_passes_the_whole_input_field_of_a_gated_network(blocks):
    # The gate makes every output see the whole input. A face alone (zeros elsewhere) reaches nothing through it, so
    # verify_rf found no face and failed a right field (EfficientNet-B0); 16 blocks underflowed even in float64.
    model = gated(blocks)
    field = probe_rf(model, (1, 3, 32, 32))
    assert field.bounds == ((0, 31), (0, 31))
    assert verify_rf(model, field).passed


def test_verify_rf_still_fails_a_field_that_misses_a_face_behind_a_gate():
    model = gated(2)
    field = probe_rf(model, (1, 3, 32, 32))
    too_small = dataclasses.replace(field, bounds=((1, 31), (0, 31)))
    verification = verify_rf(model, too_small)
    assert not verification.passed and verification.outside_influence


def test_a_deep_gated_stack_keeps_its_gradient_in_the_theoretical_copy():
    # Each gate squares the copy's values (a map times its own mean): 0.9 ** (2 ** 16) is 0 even in float64, and the
    # probe refused the field ("its window covers only padding").
    assert probe_rf(gated(16), (1, 3, 32, 32), (3, 12)).bounds == ((0, 31), (0, 31))


class ClampsItsWeights(nn.Module):
    """A convolution that keeps its weights non-negative by clamping them in place in its forward (a constraint)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        with torch.no_grad():
            self.conv.weight.clamp_(min=0)
        return self.conv(x)


def test_a_forward_that_writes_into_its_weights_is_probed_on_constants_held_in_full():
    # The theoretical copy holds each constant weight as one element, which an in-place write refuses; the probe,
    # the geometry, rf_table and verify_rf run again with the constants in full. The live model is the user's.
    model = nn.Sequential(ClampsItsWeights(), nn.Conv2d(1, 1, 3, stride=2))
    before = [p.detach().clone() for p in model.parameters()]
    field = probe_rf(model, (1, 1, 5, 5))
    assert field.bounds == ((0, 4), (0, 4)) and field.stride == (2, 2) and field.span == ((0, 4), (0, 4))
    assert verify_rf(model, field).passed
    assert rf_table(model, (1, 1, 5, 5))[-1].full_size == (5, 5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- maps of every position: fields that do not move along the axis as the index does -------------------------------


class Along(nn.Module):
    """A forward given as a function of the input and a list of convolutions."""

    def __init__(self, forward, *convs: nn.Module):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.function = forward

    def forward(self, x):
        return self.function(x, self.convs)


def _permutation(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(1))


UNORDERED = {  # name: (model, input shape)
    # two branches concatenated along the length: output 8 reads inputs 8..10, output 16 reads 4..6
    "cat along the axis": (
        lambda: Along(lambda x, c: torch.cat([c[0](x), c[1](x)], dim=2), nn.Conv1d(1, 1, 3), nn.Conv1d(1, 1, 3, 2)),
        (1, 1, 16),
    ),
    "cat along width, 2D": (
        lambda: Along(
            lambda x, c: c[2](torch.cat([c[0](x), c[1](x)], dim=3)),
            nn.Conv2d(1, 1, 3),
            nn.Conv2d(1, 1, (3, 5), stride=(1, 2)),
            nn.Conv2d(1, 1, 3),
        ),  # fmt: skip
        (1, 1, 17, 17),
    ),
    "flip": (lambda: Along(lambda x, c: torch.flip(c[0](x), dims=(2,)), nn.Conv1d(1, 1, 3)), (1, 1, 12)),
    "roll": (lambda: Along(lambda x, c: torch.roll(c[0](x), 3, dims=2), nn.Conv1d(1, 1, 3)), (1, 1, 24)),
    "permutation": (lambda: Along(lambda x, c: c[0](x)[..., _permutation(19)], nn.Conv1d(1, 1, 3)), (1, 1, 21)),
    "circular padding, 2D": (
        lambda: Along(lambda x, c: c[0](F.pad(x, (2, 1, 1, 2), mode="circular")), nn.Conv2d(1, 1, 3)),
        (1, 1, 13, 13),
    ),
    # the ends follow (r, S, P) = (6, 1, 2); outputs 1 and 17 see the far end through the wrap
    "circular padding, then dilation": (
        lambda: nn.Sequential(
            nn.Conv1d(1, 1, 2, padding=1, padding_mode="circular"), nn.Conv1d(1, 1, 3, padding=1, dilation=2)
        ),
        (1, 1, 20),
    ),
    # fields that depend on the other axis's index: a nearest resize plus a transposed convolution that feeds
    # only even rows of column 0 (row 18 of column 0 sees rows 9..10, of column 1 row 9 only)
    "resize plus transposed convolution, 2D": (
        lambda: Along(
            lambda x, c: F.interpolate(x, size=(34, 2), mode="nearest") + c[0](x)[:, :, :34, :2],
            nn.ConvTranspose2d(1, 1, 1, stride=2, output_padding=1),
        ),
        (1, 1, 19, 1),
    ),
    # the H stride differs between the two halves of W: row 3 sees rows 5..7 in the right half, row 3 in the left
    "cat along width of branches of other strides along H": (
        lambda: Along(
            lambda x, c: torch.cat([x[:, :, : x.shape[2] // 2], c[0](x)], dim=3),
            nn.Conv2d(1, 1, (3, 1), stride=(2, 1), padding=(1, 0)),
        ),
        (1, 1, 16, 4),
    ),
    # a transpose that keeps the shape (a square map): the fields of (0, 4) lie along W where H's would
    "transpose of a square map": (
        lambda: Along(lambda x, c: c[0](x).transpose(2, 3), nn.Conv2d(1, 1, 3, stride=2, padding=1)),
        (1, 1, 17, 17),
    ),
    # a roll along W of the top rows only
    "roll of some rows, 2D": (
        lambda: Along(
            lambda x, c: c[0](torch.cat([torch.roll(x[:, :, :6], 1, 3), x[:, :, 6:]], 2)),
            nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"),
        ),
        (1, 1, 12, 10),
    ),
    # a crop of the last input: output 14 sees 12..14, not its span's 12..15 (inside the input: no band shows it)
    "crop of the last input": (
        lambda: Along(lambda x, c: c[0](F.pad(x, (0, -1))), nn.Conv1d(1, 1, 4, padding=2)),
        (1, 1, 16),
    ),
    # reflect padding folds output 1's field back inside: it sees inputs 0..2, its span -3..1 (one of a band of two)
    "reflection inside a band": (
        lambda: nn.Sequential(
            nn.Conv1d(1, 1, 3, padding=2, padding_mode="reflect"),
            nn.AvgPool1d(3, 1, 1),
            nn.Conv1d(1, 1, 1, stride=2, padding=2),
        ),
        (1, 1, 22),
    ),
    # a band of 12 indices per side: output 4's span (-16..-6) lies outside the input, yet it reads input 0 (the
    # replication of its border), inside the band's union; likewise a reflection 2 layers deep folds output 2 back
    "replication inside a wide band": (
        lambda: nn.Sequential(
            nn.Conv1d(1, 1, 1, stride=2, dilation=2),
            nn.Conv1d(1, 1, 3, padding=5, padding_mode="replicate"),
            nn.Conv1d(1, 1, 4, padding=7),
        ),
        (1, 1, 33),
    ),
    "reflection inside a wide band, 2D": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 1, 1, stride=(1, 3), padding=(0, 1)),
            nn.Conv2d(1, 1, (1, 5), dilation=(1, 2), padding=(0, 7), padding_mode="reflect"),
            nn.Conv2d(1, 1, (1, 1), padding=(0, 8)),
        ),
        (1, 1, 3, 36),
    ),
    # a zero row where the cropped row 1 was: row 0 sees rows 2..5, not its span's 1..5; the corners see nothing
    "crop beside padding, 2D": (
        lambda: Along(lambda x, c: c[1](c[0](x)[:, :, 2:-1]), nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, (3, 1), padding=1)),
        (1, 1, 12, 7),
    ),
}


def perturbation_field(model: nn.Module, shape, position) -> tuple[tuple[int, int], ...]:
    """The box of the inputs whose change changes the output at ``position``: positive weights, no biases, float64."""
    model = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.zeros_like(parameter) if "bias" in name else torch.rand_like(parameter) + 0.5)
        x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
        base = model(x)[(0, 0, *position)]
        changed = torch.zeros(shape[2:], dtype=torch.bool)
        for index in itertools.product(*(range(n) for n in shape[2:])):
            moved = x.clone()
            moved[(0, 0, *index)] += 1.0
            changed[index] = bool((model(moved)[(0, 0, *position)] - base).abs() > 1e-9 * base.abs())
    found = changed.nonzero()
    if len(found) == 0:
        return None  # a window of padding only
    return tuple((int(found[:, a].min()), int(found[:, a].max())) for a in range(found.shape[1]))


@pytest.mark.parametrize("name", list(UNORDERED))
def test_a_map_pairs_each_field_with_its_own_position_where_fields_do_not_move_with_the_index(name):
    """A map's lattice passes pair runs with indices in sorted order; a swapped pair fills the same support, so a
    coded pass checks the pairing (before, the cat's positions 8 and 16 swapped their bounds)."""
    build, shape = UNORDERED[name]
    torch.manual_seed(0)
    model = build()
    fields = probe_rf(model, shape, "all")
    for position in itertools.product(*(range(n) for n in fields.output_shape)):
        truth = perturbation_field(model, shape, position)
        if truth is None:
            assert all(last < first for first, last in fields[position].bounds), position  # stored empty
            continue
        assert fields[position].bounds == truth, position
        for axis, geometry in enumerate(fields.geometry):
            # a geometry the map reports holds at every position of the map: its span where inside the input
            if geometry is not None:
                assert consistent(geometry, {position[axis]: truth[axis]}, shape[2 + axis]), (position, axis, geometry)


# --- a layer that runs more than once ----------------------------------------------------------------------------


class SharedReLU(nn.Module):
    """torchvision's BasicBlock pattern: one ReLU after conv1 (field 3 x 3) and after the residual sum (5 x 5)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(1)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.conv1(x))))
        out += x  # in place, after the output of bn2: the probe's look further must not change what it captured
        return self.relu(out)


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_layer_that_runs_twice_is_refused_not_read_at_its_first_call(mode):
    """Before, layer="relu" silently gave its first call's 3 x 3; its last output has a 5 x 5 field."""
    model = SharedReLU().eval()
    with pytest.raises(ValueError, match=r"layer='relu' runs more than once.*layer that the call you mean follows"):
        probe_rf(model, (1, 1, 16, 16), (8, 8), layer="relu", mode=mode)
    assert probe_rf(model, (1, 1, 16, 16), (8, 8), layer="bn2", mode=mode).size == (5, 5)
    assert probe_rf(model, (1, 1, 16, 16), (8, 8), layer="conv1", mode=mode).size == (3, 3)
    assert probe_rf(model, (1, 1, 16, 16), (8, 8), mode=mode).size == (5, 5)


class Features(collections.OrderedDict):
    """A mapping output read by attribute, as transformers' ``ModelOutput``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def test_a_layer_with_a_mapping_output_read_by_attribute_that_runs_twice_is_refused():
    """The rest of the forward reads the layer's output by attribute: looking past the layer must keep its type
    (it became a plain dict, the forward raised, and the probe read the first call: 3 where the last call sees 5)."""

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 3, padding=1)

        def forward(self, x):
            return Features(features=self.conv(x))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Body()

        def forward(self, x):
            return self.body(self.body(x).features).features

    with pytest.raises(ValueError, match="layer='body' runs more than once"):
        probe_rf(Twice(), (1, 1, 20), 10, layer="body", element="features")
    assert probe_rf(Twice(), (1, 1, 20), 10).bounds == ((8, 12),)


def test_effective_rf_and_rf_table_refuse_or_leave_out_a_layer_that_runs_twice():
    model = nn.Sequential(SharedReLU(), nn.Conv2d(1, 1, 3)).eval()
    with pytest.raises(ValueError, match="runs more than once"):
        effective_rf(model, torch.randn(2, 1, 16, 16), (8, 8), layer="0.relu")
    with pytest.warns(UserWarning, match=r"1 row is left out, of modules that run more than once.*0\.relu"):
        rows = rf_table(model, (1, 1, 16, 16))
    assert [(row.name, row.size) for row in rows] == [
        ("0.conv1", (3, 3)), ("0.conv2", (5, 5)), ("0.bn2", (5, 5)), ("0", (5, 5)), ("1", (7, 7)),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"layers=\['0.relu'\]: layer='0.relu' runs more than once"):
        rf_table(model, (1, 1, 16, 16), layers=["0.relu"])


def test_looking_past_the_layer_records_nothing_of_the_rest_of_the_forward():
    """The head's global mean and its size-fixed linear run after the layer: the geometry is the features' own."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3, stride=2), nn.Flatten(), nn.Linear(2 * 7 * 7, 3))
    field = probe_rf(model, (1, 1, 17, 17), (3, 3), layer="1")
    assert (field.size, field.stride, field.offset) == ((5, 5), (2, 2), (0, 0))


def test_an_end_field_whose_tail_underflows_float32_is_read_again_in_float64():
    """The first output also sees input 5, through a factor of 1e-35 (below float32's guard): the end check is
    retried in float64, as the probe is, instead of raising the retry's internal signal."""

    class EndReachesFar(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 3, padding=1)

        def forward(self, x):
            far = nn.functional.pad(x[..., 5:6] * 1e-35, (0, x.shape[-1] - 1))
            return self.conv(x) + far

    field = probe_rf(EndReachesFar(), (1, 1, 32), "center")
    assert field.bounds == ((15, 17),)
    assert field.geometry == (None,) and "end of the axis" in field.geometry.reasons[0]


@pytest.mark.parametrize(
    "name",
    ["flip", "roll", "circular padding, 2D", "cat along width, 2D", "circular padding, then dilation",
     "crop beside padding, 2D", "cat along width of branches of other strides along H", "transpose of a square map",
     "crop of the last input", "reflection inside a band", "replication inside a wide band",
     "reflection inside a wide band, 2D"],
)  # fmt: skip
def test_a_single_probe_offers_no_geometry_that_the_border_of_the_map_does_not_follow(name):
    """The geometry read near the centre is the architecture's only if the border follows it too (before, a roll by
    2 gave row 0 the span -2..0 while its field is 5..7; a wrap one index in from the ends, or a crop beside empty
    corners, went unseen)."""
    build, shape = UNORDERED[name]
    torch.manual_seed(0)
    model = build()
    field = probe_rf(model, shape, "center")
    output_shape = field.output_shape
    for axis, geometry in enumerate(field.geometry):
        if geometry is None:
            continue
        # every index of the axis follows it, at the centre and the ends of the others
        lines = [range(n) if a == axis else sorted({0, n // 2, n - 1}) for a, n in enumerate(output_shape)]
        for position in itertools.product(*lines):
            truth = perturbation_field(model, shape, position)
            bounds = None if truth is None else truth[axis]
            assert consistent(geometry, {position[axis]: bounds}, shape[2 + axis]), (axis, position, geometry)


class FakeQuantizedChain(nn.Module):
    """Six residual 3-convolutions, each sum fake-quantized as quantization-aware training does it."""

    def __init__(self, quantize):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(4, 4, 3, padding=1) for _ in range(6))
        self.quantize = quantize

    def forward(self, x):
        for conv in self.convs:
            x = self.quantize(x + conv(x))
        return x


FAKE_QUANTIZERS = {
    "per tensor": lambda x: torch.fake_quantize_per_tensor_affine(x, 0.05, 0, -128, 127),
    "per channel": lambda x: torch.fake_quantize_per_channel_affine(
        x, torch.full((4,), 0.05), torch.zeros(4, dtype=torch.int32), 1, -128, 127
    ),
    "learnable": lambda x: torch._fake_quantize_learnable_per_tensor_affine(
        x, torch.tensor([0.05]), torch.tensor([0.0]), -128, 127
    ),
}


@pytest.mark.parametrize("name", list(FAKE_QUANTIZERS))
def test_fake_quantization_hides_no_path_in_theoretical_mode(name):
    """Fake quantization clamps to its range, and its gradient is zero past it: on the copy's growing values the
    interior fields of the map came out empty (0, -1), and the single probes refused, while the weights fields were
    13 inputs wide. It runs as an identity in theoretical mode, as a clamp does."""
    field_map = probe_rf(FakeQuantizedChain(FAKE_QUANTIZERS[name]), (1, 4, 40), "all")
    for i in range(40):
        assert field_map[(i,)].bounds == ((max(i - 6, 0), min(i + 6, 39)),), i


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
def test_a_quantization_aware_model_is_probed_with_its_observed_ranges():
    """``prepare_qat``'s observers read the activations' ranges through ``detach()``: the probe refused every such
    model as cutting the gradient. The copy quantizes with the ranges observed in training, observers off, as a
    BatchNorm in eval mode uses its running statistics; the live model's observers stay as they were."""
    quantization = pytest.importorskip("torch.ao.quantization")
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(6)))
    model.qconfig = quantization.QConfig(
        activation=quantization.FakeQuantize.with_args(
            observer=quantization.MovingAverageMinMaxObserver, quant_min=0, quant_max=255
        ),
        weight=quantization.default_weight_fake_quant,
    )
    model = quantization.prepare_qat(model.train())
    for _ in range(3):
        model(torch.randn(8, 4, 40))
    before = copy.deepcopy(model.state_dict())
    field_map = probe_rf(model, (1, 4, 40), "all")
    for i in range(40):
        assert field_map[(i,)].bounds == ((max(i - 6, 0), min(i + 6, 39)),), i
    ((first, last),) = probe_rf(model, (1, 4, 40), 20, mode="weights").bounds  # the real fake quantization's
    assert 14 <= first <= 20 <= last <= 26 and last - first >= 6
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fused = nn.Sequential(*(nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(6)))
    fused.qconfig = quantization.get_default_qat_qconfig("x86")  # observing and fake-quantizing in one call
    fused = quantization.prepare_qat(fused.train())
    fused(torch.randn(8, 4, 40))
    assert probe_rf(fused, (1, 4, 40), 39).bounds == ((33, 39),)


class QuantizedWeightBranches(nn.Module):
    """A 3 x 3 convolution whose weight is fake-quantized per channel, then a 7 x 7 branch on its channel 0."""

    def __init__(self, scales):
        super().__init__()
        self.conv, self.big = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(1, 1, 7, padding=3)
        self.small = nn.Conv2d(1, 1, 1)
        self.register_buffer("scales", torch.tensor(scales))

    def forward(self, x):
        zero = torch.zeros(2, dtype=torch.int32)
        weight = torch.fake_quantize_per_channel_affine(self.conv.weight, self.scales, zero, 0, -128, 127)
        y = F.conv2d(x, weight, padding=1)
        return self.big(y[:, :1]) + self.small(y[:, 1:])


def test_a_weights_fake_quantization_cuts_no_branch_in_theoretical_mode():
    """The copy fake-quantized its constant weights (1/18) with the live scales: a channel of a large scale rounded
    to zero and the 7 x 7 branch it feeds was cut (11..13 where the architecture reads 8..16)."""
    model = QuantizedWeightBranches([1.0, 0.01])
    assert probe_rf(model, (1, 2, 24, 24), (12, 12)).bounds == ((8, 16), (8, 16))


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
def test_a_quantization_aware_model_is_probed_in_float64():
    """The fused observer and fake quantization takes float32 alone: ``dtype=torch.float64``, ``verify_rf`` (and the
    retry near underflow) failed with "expected scalar type Float but found Double"."""
    quantization = pytest.importorskip("torch.ao.quantization")
    layers = [nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()) for _ in range(3)]
    model = nn.Sequential(quantization.QuantStub(), *layers, quantization.DeQuantStub())
    model.qconfig = quantization.get_default_qat_qconfig("fbgemm")
    model = quantization.prepare_qat(model.train())
    model(torch.randn(8, 2, 12, 12))
    field = probe_rf(model, (1, 2, 12, 12), (6, 6), dtype=torch.float64)
    assert field.bounds == ((3, 9), (3, 9)) and verify_rf(model, field)
    weights = probe_rf(model, (1, 2, 12, 12), (6, 6), mode="weights", dtype=torch.float64)
    assert all(3 <= first <= 6 <= last <= 9 for first, last in weights.bounds)


def _pruned_bias(model):
    from torch.nn.utils import prune

    prune.l1_unstructured(model[0], "bias", amount=0.0)  # as Lightning's ModelPruning prunes biases by default


def _parametrized_bias(model):
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(model[0], "bias", nn.Identity())


@pytest.mark.parametrize("computed", [_pruned_bias, _parametrized_bias], ids=["pruned", "parametrized"])
def test_a_bias_that_torch_computes_from_another_parameter_is_zeroed_in_weights_mode(computed):
    """Pruning keeps ``bias_orig`` and a parametrization ``parametrizations.bias.original``: the copy took neither for
    a bias and kept it in weights mode, where a negative one killed the ReLU channel of the 5 x 5 path (8..8 for
    6..10)."""
    conv = nn.Conv2d(1, 2, 5, padding=2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 2, 2] = 1.0
        conv.weight[1, 0] = 1.0
        conv.bias.copy_(torch.tensor([0.0, -1000.0]))  # channel 1 dead with its bias only
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(2, 1, 1))
    computed(model)
    assert probe_rf(model, (1, 1, 16, 16), (8, 8), mode="weights").bounds == ((6, 10), (6, 10))


class CheckpointedPicks(nn.Module):
    """A maximum of two branches, a ReLU and a max-pool, run under ``torch.utils.checkpoint``."""

    def __init__(self, use_reentrant: bool | None):
        super().__init__()
        self.picks = PickOfBranches(torch.maximum)
        self.pool = nn.MaxPool1d(3, 1, 1)
        self.use_reentrant = use_reentrant

    def block(self, x):
        return self.pool(torch.relu(self.picks(x)))

    def forward(self, x):
        if self.use_reentrant is None:
            return self.block(x)
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_checkpointed_forward_is_probed_as_the_plain_one(use_reentrant):
    """Gradient checkpointing recomputes the forward in the backward pass, outside the probe's function mode: the
    probe failed ("Recomputed values ... have different metadata", or reentrant checkpoints refusing
    ``torch.autograd.grad``). The checkpointed functions now run as plain calls in the probe's copy."""
    plain, checkpointed = CheckpointedPicks(None), CheckpointedPicks(use_reentrant)
    checkpointed.load_state_dict(plain.state_dict())
    for mode in ("theoretical", "weights"):
        torch.manual_seed(0)
        expected = probe_rf(plain, (1, 1, 12), "all", mode=mode)
        torch.manual_seed(0)
        got = probe_rf(checkpointed, (1, 1, 12), "all", mode=mode)
        assert [got[(i,)].bounds for i in range(12)] == [expected[(i,)].bounds for i in range(12)], mode
    field = probe_rf(checkpointed, (1, 1, 12), 6)
    assert field.bounds == ((1, 11),) and field.geometry == probe_rf(plain, (1, 1, 12), 6).geometry
    assert torch.utils.checkpoint.CheckpointFunction.__module__ == "torch.utils.checkpoint"  # put back


class WideAndNarrow(nn.Module):
    """Two 5-wide branches of one architecture and a 1-wide one, combined by ``combine(wide, twin, narrow)``."""

    def __init__(self, combine):
        super().__init__()
        self.wide, self.twin = nn.Conv1d(1, 1, 5, padding=2), nn.Conv1d(1, 1, 5, padding=2)
        self.narrow = nn.Conv1d(1, 1, 1)
        self.combine = combine

    def forward(self, x):
        return self.combine(self.wide(x), self.twin(x), self.narrow(x))


class HandWrittenSubtraction(torch.autograd.Function):
    """``a - b`` with its backward written by hand, as a fused op's Python fallback is."""

    @staticmethod
    def forward(ctx, a, b):
        return a - b

    @staticmethod
    def backward(ctx, grad):
        return grad, -grad


class GradientReversal(torch.autograd.Function):
    """DANN's gradient reversal layer: the identity forward, the negated gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A column of ``x``'s values, as fused linear code feeds them to ``addmm``."""
    return x.view(-1, 1)


def _assigned_through_a_mask(wide, _twin, narrow):
    wide[narrow > 0] = narrow[narrow > 0]
    return wide


CANCELLING_OR_GATING = {
    "add with alpha=-1": lambda w, t, n: torch.add(w, t, alpha=-1) + n,
    "add_ with alpha=-1": lambda w, t, n: w.add_(t, alpha=-1) + n,
    "times -1, then a sum": lambda w, t, n: w + t * -1 + n,
    "times -1 in place": lambda w, t, n: (t.mul_(-1), w + t + n)[1],
    "times a tensor of -1": lambda w, t, n: w + t * -torch.ones_like(t) + n,
    "divided by -1": lambda w, t, n: w + t / -1 + n,
    "times NumPy's int64 -1": lambda w, t, n: w + t * np.int64(-1) + n,
    "times NumPy's float32 -1": lambda w, t, n: w + t * np.float32(-1) + n,
    "times an int64 tensor(-1)": lambda w, t, n: w + t * torch.tensor(-1) + n,
    "times int64 signs per channel": lambda w, t, n: (
        (torch.cat([w, t], 1) * torch.tensor([1, -1]).view(1, 2, 1)).sum(1, keepdim=True) + n
    ),
    "addcmul with value=-1": lambda w, t, n: w.addcmul(t, torch.ones_like(t), value=-1) + n,
    "addmm with alpha=-1": lambda w, t, n: torch.addmm(_rows(w), _rows(t), torch.ones(1, 1), alpha=-1).view_as(w) + n,
    "addmm with beta=-1": lambda w, t, n: torch.addmm(_rows(t), _rows(w), torch.ones(1, 1), beta=-1).view_as(w) + n,
    "addmm_ with alpha=-1": lambda w, t, n: _rows(w).addmm_(_rows(t), torch.ones(1, 1), alpha=-1).view_as(w) + n,
    "baddbmm with alpha=-1": lambda w, t, n: (
        torch.baddbmm(_rows(w)[None], _rows(t)[None], torch.ones(1, 1, 1), alpha=-1).view_as(w) + n
    ),
    "addmv with alpha=-1": lambda w, t, n: torch.addmv(w.flatten(), _rows(t), torch.ones(1), alpha=-1).view_as(w) + n,
    "addr with alpha=-1": lambda w, t, n: torch.addr(_rows(w), t.flatten(), torch.ones(1), alpha=-1).view_as(w) + n,
    "addmm by keyword": lambda w, t, n: (
        torch.addmm(input=_rows(w), mat1=_rows(t), mat2=torch.ones(1, 1), alpha=-1).view_as(w) + n
    ),
    "a custom Function's negative backward": lambda w, t, n: HandWrittenSubtraction.apply(w, t) + n,
    "a gradient reversal layer": lambda w, t, n: w + GradientReversal.apply(t) + n,
    "lerp by a gate": lambda w, t, n: w.lerp(n, torch.sigmoid(n)),
    "lerp_ by a gate": lambda w, t, n: w.lerp_(n, torch.sigmoid(n)),
    "where on combined masks": lambda w, t, n: torch.where((n > 0) & (n < 10), n, w),
    "masked_fill by a negated mask": lambda w, t, n: w.masked_fill(~(n < 0), 0.0) + n,
    "a mask as a float factor": lambda w, t, n: w * (n < 0).float() + n,
    "a mask as a factor": lambda w, t, n: w * (n < 0) + n,
    "one minus a mask": lambda w, t, n: w * (1 - (n > 0).float()) + n,
    "assignment through a mask": _assigned_through_a_mask,
}


@pytest.mark.parametrize("name", list(CANCELLING_OR_GATING))
def test_negative_scalars_and_masks_hide_no_branch_in_theoretical_mode(name):
    """On the copy's equal values, ``w - t`` spelled with a negative scalar (``alpha=-1``, ``* -1``, NumPy's or an
    integer tensor's -1, ``value=-1``, the fused ``addmm`` family's ``alpha=-1`` or ``beta=-1``, a custom Function's
    hand-written negative backward) cancelled exactly, a ``lerp`` by a gate of 1 cut its start, and a mask computed
    from the input (all True or all False there) picked one branch where it was combined (``&``, ``~``), turned into
    numbers or used as an index: position 6 read 6..6, not 4..8 as in weights mode."""
    _assert_reads_the_wide_branch(WideAndNarrow(CANCELLING_OR_GATING[name]))


def _assert_reads_the_wide_branch(model: WideAndNarrow) -> None:
    """Every position of a 12-long input reads the 5-wide branch in theoretical mode, and contains the weights field."""
    field_map = probe_rf(model, (1, 1, 12), "all")
    torch.manual_seed(0)
    weights = probe_rf(model, (1, 1, 12), "all", mode="weights")
    for i in range(12):
        assert field_map[(i,)].bounds == ((max(i - 2, 0), min(i + 2, 11)),), i
        (low, high), (first, last) = field_map[(i,)].bounds[0], weights[(i,)].bounds[0]
        assert low <= first and last <= high, i


def _multiplied_in_place(target, factor):
    target.mul_(factor)  # the return value unused: the target itself must carry the product
    return target


def _squared_in_place(target):
    target **= 2
    return target


ZERO_ON_THE_COPY = {
    "times (x - 1)": lambda w, t, n: w * (n - 1) + n,
    "times (x - a constant tensor)": lambda w, t, n: w * (n - torch.ones(1)) + n,
    "times (x - 1) in place": lambda w, t, n: w * n.sub_(1) + n,
    "times x - 1, multiplied in place": lambda w, t, n: (n - 1).mul_(w) + n,
    "times log|x|": lambda w, t, n: w * torch.log(n.abs()) + n,
    "divided by a sum, times log|x|": lambda w, t, n: torch.log(n.abs()) / (w + 2),
    "(x - 1) squared": lambda w, t, n: n + (w - 1) ** 2,
    "|x - 1|": lambda w, t, n: n + (w - 1).abs(),
    "(x - 1) squared by pow_": lambda w, t, n: n + (w - 1).pow_(2),
    "(x - 1) squared by **=": lambda w, t, n: n + _squared_in_place(w - 1),
    "(x - 1) squared by square_": lambda w, t, n: n + (w - 1).square_(),
    "|x - 1| by abs_": lambda w, t, n: n + (w - 1).abs_(),
    "torch.mul with other=": lambda w, t, n: torch.mul(w, other=n - 1) + n,
    "addcmul by (x - 1)": lambda w, t, n: torch.addcmul(n, w, n - 1),
    "in place into a signed constant": lambda w, t, n: _multiplied_in_place(torch.full_like(w, -2.0) * 1.0, w) + n,
    "einsum with (x - 1)": lambda w, t, n: torch.einsum("bct,bct->bct", w, n - 1) + n,
    "einsum of a list, with (x - 1)": lambda w, t, n: torch.einsum("bct,bct->bct", [n - 1, w]) + n,
    "einsum with an implicit output, with (x - 1)": lambda w, t, n: (
        torch.einsum("tc,cs", w.reshape(-1, 1), (n - 1).reshape(1, -1)).diagonal().reshape(n.shape) + n
    ),
    "matmul by (x - 1)": lambda w, t, n: (w.unsqueeze(-1) @ (n - 1).unsqueeze(-2)).diagonal(0, -2, -1) + n,
    "bmm by (x - 1)": lambda w, t, n: torch.bmm(w.reshape(-1, 1, 1), (n - 1).reshape(-1, 1, 1)).reshape(n.shape) + n,
}


@pytest.mark.parametrize("name", list(ZERO_ON_THE_COPY))
def test_values_that_are_zero_on_the_copy_hide_no_branch_in_theoretical_mode(name):
    """The copy's values are exactly 1, so ``n - 1`` and ``log|n|`` are exactly 0 there: as the factor of a product
    they cut the other factor's path (elementwise, or in a ``matmul``/``einsum``), and a square or an absolute value
    of them has a zero gradient. Position 6 read 6..6, not 4..8 as in weights mode."""
    _assert_reads_the_wide_branch(WideAndNarrow(ZERO_ON_THE_COPY[name]))


def test_a_mask_subtracted_from_attention_scores_keeps_its_meaning_in_theoretical_mode():
    """``scores - 1e9 * future`` masks the future keys by subtracting a constant: its values matter, so the copy keeps
    the real subtraction (an earlier twin of "a constant subtracted" added its magnitude, and position 5 read 5..15,
    its future, instead of 0..5)."""

    class MaskedBySubtraction(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.qkv = nn.Conv1d(1, 4, 1), nn.Linear(4, 12)

        def forward(self, x):
            tokens = self.embed(x).transpose(1, 2)
            q, k, v = self.qkv(tokens).chunk(3, dim=-1)
            future = torch.ones(tokens.shape[1], tokens.shape[1]).triu(1)
            scores = q @ k.transpose(-1, -2) - 1e9 * future
            return (scores.softmax(dim=-1) @ v).transpose(1, 2)

    for mode in ("theoretical", "weights"):
        assert probe_rf(MaskedBySubtraction(), (1, 1, 16), 5, mode=mode).bounds == ((0, 5),), mode


def test_a_masked_fill_with_a_value_from_the_input_reads_that_value():
    """``w.masked_fill(w < 0, n.mean())`` kept only ``w`` in theoretical mode: the mean reads the whole input."""
    model = WideAndNarrow(lambda w, t, n: w.masked_fill_(w < 0, n.mean()))
    assert probe_rf(model, (1, 1, 12), 6).bounds == ((0, 11),)


def test_out_arguments_are_refused_in_both_modes():
    """``torch.maximum(a, b, out=c)`` returned its twin in theoretical mode but never wrote ``c``: read through ``c``,
    a branch was lost (6..6 for 4..8). Autograd refuses ``out=`` on tensors that need a gradient, and so does the
    probe now, in both modes, as the forward's own error."""

    def into(w, t, n):
        c = torch.zeros_like(w)
        torch.maximum(w, n, out=c)
        return c + n

    def into_without_gradient(w, t, n):
        c = torch.zeros_like(w)
        with torch.no_grad():
            torch.maximum(w, n, out=c)
        return c + n

    for mode in ("theoretical", "weights"):
        with pytest.raises(ProbeError, match="out="):
            probe_rf(WideAndNarrow(into), (1, 1, 12), 6, mode=mode)
        # without gradient, the tensor written into keeps no trace of the input: a cut
        with pytest.raises(ProbeError, match=r"cuts the gradient .*maximum\(\) inside torch.no_grad\(\)"):
            probe_rf(WideAndNarrow(into_without_gradient), (1, 1, 12), 6, mode=mode)


class _ClipWithStraightThrough(torch.autograd.Function):
    """A clip to [-3, 3] whose hand-written backward passes the gradient inside the range only (quantizers' STE)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(-3, 3)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 3)


class _SwishByHand(torch.autograd.Function):
    """x * sigmoid(x) with its derivative written by hand (timm's memory-efficient activations)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


class ResidualsThrough(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(2, 2, 3, padding=1) for _ in range(3))
        self.function = function

    def forward(self, x):
        for conv in self.convs:
            x = self.function.apply(x + conv(x))
        return x


def test_a_custom_function_whose_backward_cuts_on_the_copy_is_refused_in_theoretical_mode():
    """Theoretical mode cannot linearise a backward written by hand: on the copy's growing values a straight-through
    clip gave no gradient, and the map read (0, -1) at every position without a word. It is refused, naming the
    Function; one whose backward passes everywhere (a swish written by hand) is probed as the native one."""
    with pytest.raises(ProbeError, match="custom autograd Function _ClipWithStraightThrough"):
        probe_rf(ResidualsThrough(_ClipWithStraightThrough), (1, 2, 16), "all")
    field_map = probe_rf(ResidualsThrough(_SwishByHand), (1, 2, 16), "all")
    assert [field_map[(i,)].bounds for i in range(16)] == [((max(i - 3, 0), min(i + 3, 15)),) for i in range(16)]
    assert probe_rf(ResidualsThrough(_ClipWithStraightThrough), (1, 2, 16), 8, mode="weights").bounds == ((5, 11),)


class _StopGradientByHand(torch.autograd.Function):
    """A ``detach()`` written by hand: the identity, whose backward gives zeros (``none``: returns ``None``)."""

    none = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None if _StopGradientByHand.none else torch.zeros_like(grad)


class _PlusStopped(nn.Module):
    """A 1 x 1 path plus a 5 x 5 one through the hand-written stop-gradient: the field is 5 x 5."""

    def __init__(self):
        super().__init__()
        self.point, self.wide = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 5, padding=2)

    def forward(self, x):
        return self.point(x) + _StopGradientByHand.apply(self.wide(x))


@pytest.mark.parametrize("none", [False, True])
def test_a_stop_gradient_written_by_hand_is_refused_in_both_modes(none, monkeypatch):
    """The wide path still changes the output, but its backward gives nothing: weights mode read 1 x 1 for 5 x 5 (and
    theoretical mode too where the backward returned None); both refuse it now, as after a detach()."""
    monkeypatch.setattr(_StopGradientByHand, "none", none)
    x = torch.zeros(1, 1, 9, 9)
    moved = x.clone()
    moved[0, 0, 2, 2] = 5.0
    model = _PlusStopped()
    assert model(moved)[0, 0, 4, 4] != model(x)[0, 0, 4, 4]  # the corner of the 5 x 5 moves the output
    for mode in ("theoretical", "weights"):
        with pytest.raises(ProbeError, match="_StopGradientByHand on the path .* no gradient at all"):
            probe_rf(model, (1, 1, 9, 9), (4, 4), mode=mode)


class _SteppedStopped(nn.Module):
    """The hand-written stop-gradient behind a recurrence stepped in Python, more nodes from the output than a walk
    without cause reads."""

    def __init__(self):
        super().__init__()
        self.point, self.wide = nn.Conv1d(1, 1, 1), nn.Conv1d(1, 1, 5, padding=2)

    def forward(self, x):
        state = self.point(x) + _StopGradientByHand.apply(self.wide(x))
        for _ in range(6000):
            state = state + 1.0
        return state


def test_a_stop_gradient_behind_thousands_of_nodes_is_still_found():
    """Walks of the graph stop at 5000 nodes where no custom Function may be (a deep graph walked whole crashed the
    process when freed); a custom Function's forward reads the input with gradients off, which calls for the whole."""
    with pytest.raises(ProbeError, match="_StopGradientByHand on the path .* no gradient at all"):
        probe_rf(_SteppedStopped(), (1, 1, 9), 4)


def test_the_geometry_of_a_recurrence_stepped_in_python_does_not_crash_the_process(tmp_path):
    """A one-pole filter stepped over time in Python: the geometry's thin inputs (up to 20480 samples) built graphs
    of some 60000 nodes, which the custom Functions' walk wrapped in Python objects; freeing them recursed in C
    until the process died of a segmentation fault (a training run with it). It runs in a process of its own."""
    code = (
        "import torch\n"
        "from torch import nn\n"
        "from rf_callback import probe_rf\n"
        "class Filtered(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv1d(1, 2, 3, padding=1)\n"
        "    def forward(self, x):\n"
        "        x = self.conv(x)\n"
        "        ys = [x[:, :, 0]]\n"
        "        for t in range(1, x.shape[-1]):\n"
        "            ys.append(x[:, :, t] - 0.9 * ys[-1])\n"
        "        return torch.stack(ys, -1)\n"
        "field = probe_rf(Filtered(), (1, 1, 10), 5)\n"
        "print(field, list(field.geometry))\n"
    )
    output = run_isolated(["-c", code], tmp_path / "filtered.log", 300)
    assert "RF of the output at (5,): 7 (input 0..6)" in output and "[None]" in output


class _DoubledPair(torch.autograd.Function):
    """A fused op on two streams that returns both, doubled."""

    @staticmethod
    def forward(ctx, a, b):
        return a * 2, b * 2

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        return grad_a * 2, grad_b * 2


class _MainAndSide(nn.Module):
    """The pair's second stream feeds an auxiliary head only: its input rightly gets no gradient from the output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 3, padding=1)
        self.side = None

    def forward(self, x):
        main, side = _DoubledPair.apply(self.a(x), self.b(x))
        self.side = side.sum()
        return self.head(main)


class _StoppedWithIndices(torch.autograd.Function):
    """A stop-gradient that also returns the arg-max indices (an output without gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone(), x.argmax(dim=1, keepdim=True)

    @staticmethod
    def backward(ctx, grad, _grad_indices):
        return torch.zeros_like(grad)


def test_a_stop_gradient_with_a_second_output_is_refused():
    """Its index output has no gradient: a check that asked every output for one let the cut pass (1 x 1 for 5 x 5
    in weights mode)."""

    class Stopped(_PlusStopped):
        def forward(self, x):
            stopped, _ = _StoppedWithIndices.apply(self.wide(x))
            return self.point(x) + stopped

    for mode in ("theoretical", "weights"):
        with pytest.raises(ProbeError, match="_StoppedWithIndices on the path .* no gradient at all"):
            probe_rf(Stopped(), (1, 1, 9, 9), (4, 4), mode=mode)


def test_a_custom_function_with_an_output_the_probed_one_does_not_read_is_no_stop_gradient():
    """Its unread output gives its input no gradient, rightly: weights mode refused the model as a stop-gradient."""
    for mode in ("theoretical", "weights"):
        assert probe_rf(_MainAndSide(), (1, 3, 16, 16), mode=mode).bounds == ((6, 10), (6, 10))


@pytest.mark.parametrize("pool", [nn.MaxPool2d(8), nn.AdaptiveMaxPool2d(2)])
def test_a_max_pooling_connects_its_whole_window_in_weights_mode(pool):
    """No weight decides which element of a window wins, and some input makes each win: weights mode read the
    winners of its 8 draws (7 of 64 pixels, bounds 0..6 for 0..7, on one channel)."""
    field = probe_rf(nn.Sequential(nn.Conv2d(1, 1, 1), pool), (1, 1, 16, 16), (0, 0), mode="weights")
    assert field.bounds == ((0, 7), (0, 7)) and int((field.heatmap > 0).sum()) == 64


def test_a_heaviside_step_is_a_cut():
    """torch.heaviside has no derivative: the probe raised torch's RuntimeError, not the cut it is."""

    class Stepped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + torch.heaviside(x, torch.zeros(()))

    for mode in ("theoretical", "weights"):
        with pytest.raises(ProbeError, match=r"heaviside\(\), whose gradient is zero"):
            probe_rf(Stepped(), (1, 1, 7, 7), (3, 3), mode=mode)


def _replaced_where_negative(wide, twin, _narrow):
    wide = wide.clone()
    negative = wide < 0  # all False on the copy's positive values: twin[negative] is empty there
    wide[negative] = twin[negative]
    return wide


def _gated_by_a_cast_mask(wide, _twin, narrow):
    return wide * (narrow > 0).type_as(wide) + narrow


def test_a_pick_by_a_mask_that_is_empty_on_the_copy_reads_every_element():
    """``x[m] = y[m]`` with a mask all False on the copy's values: ``y[m]`` was empty and the probe failed (the
    forward raised: "Attempting to broadcast a dimension of length 0"), in theoretical mode and in weights-mode
    maps. Any element may be picked: the pick reads them all."""
    model = WideAndNarrow(_replaced_where_negative)
    assert probe_rf(model, (1, 1, 12), 6).bounds == ((4, 8),)
    torch.manual_seed(0)
    assert probe_rf(model, (1, 1, 12), "all", mode="weights")[(6,)].bounds == ((4, 8),)


def test_a_mask_cast_like_another_tensor_is_no_cut():
    """``(b > 0).type_as(a)`` was refused as a gradient cut ("type_as()"): ``a`` lends its dtype, not its values;
    ``torch.arange(n).expand_as(a)`` likewise."""
    model = WideAndNarrow(_gated_by_a_cast_mask)
    for mode in ("theoretical", "weights"):
        torch.manual_seed(0)
        assert probe_rf(model, (1, 1, 12), 6, mode=mode).bounds == ((4, 8),), mode

    def scattered(wide, _twin, _narrow):
        index = torch.arange(wide.shape[-1]).expand_as(wide)
        return torch.zeros_like(wide).scatter_(2, index, wide)

    assert probe_rf(WideAndNarrow(scattered), (1, 1, 12), 6).bounds == ((4, 8),)


def test_a_weights_map_of_a_model_theoretical_mode_refuses_is_read_position_by_position():
    """A weights-mode map plans its shared passes on the theoretical copy; where that copy refuses (TorchScript, a
    custom Function whose backward cuts on its values), the map raised the theoretical refusal, which told the user
    to use mode='weights'. Each position now gets a pass of its own, and the geometry is None with that reason."""
    scripted = torch.jit.script(nn.Sequential(nn.Conv1d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv1d(1, 1, 3, padding=1)))
    through_a_clip = ResidualsThrough(_ClipWithStraightThrough)
    for model, shape in ((scripted, (1, 1, 12)), (through_a_clip, (1, 2, 16))):
        torch.manual_seed(0)
        field_map = probe_rf(model, shape, "all", mode="weights")
        for i in range(shape[-1]):
            torch.manual_seed(0)
            assert field_map[(i,)].bounds == probe_rf(model, shape, i, mode="weights").bounds, (model, i)
        assert field_map.geometry == (None,)
        assert field_map.geometry.reasons[0].startswith("the geometry is measured on a theoretical copy, and ")
    field = probe_rf(scripted, (1, 1, 12), 6, mode="weights")
    assert str(field) == "RF of the output at (6,): 5 (input 4..8) [weights]"  # it raised, asking for the geometry


class GlobalFilter(nn.Module):
    """Global Filter Networks' layer: a learned filter multiplies the 2D spectrum (stored as real pairs)."""

    def __init__(self, side: int):
        super().__init__()
        self.mix = nn.Conv2d(1, 2, 1)
        self.filter = nn.Parameter(torch.randn(side, side // 2 + 1, 2) * 0.02)

    def forward(self, x):
        x = self.mix(x)
        spectrum = torch.fft.rfft2(x, norm="ortho") * torch.view_as_complex(self.filter)
        return torch.fft.irfft2(spectrum, s=x.shape[-2:], norm="ortho")


class FourierLayer1d(nn.Module):
    """A Fourier neural operator's layer: the lowest `modes` frequencies mixed by learned weights, plus a 1 x 1 path."""

    def __init__(self, channels: int = 2, modes: int = 4):
        super().__init__()
        self.modes = modes
        self.weights = nn.Parameter(torch.randn(channels, channels, modes, dtype=torch.cfloat) * 0.1)
        self.local = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        spectrum = torch.fft.rfft(x)
        mixed = torch.zeros_like(spectrum)
        mixed[:, :, : self.modes] = torch.einsum("bim,iom->bom", spectrum[:, :, : self.modes], self.weights)
        return torch.fft.irfft(mixed, n=x.shape[-1]) + self.local(x)


def test_a_filter_in_the_frequency_domain_reads_the_whole_axis_in_theoretical_mode():
    """A learned spectral filter may be any kernel along the transformed axes; the copy's equal weights made it a
    constant, whose kernel is a single tap: a global filter's field read row 8 alone, ((8, 8), (1, 15)), where the
    weights field is the whole input (and before, the copy's one-element filter could not be viewed as complex)."""
    for model, shape, pos in ((GlobalFilter(16), (1, 1, 16, 16), (8, 8)), (FourierLayer1d(), (1, 2, 32), 5)):
        field = probe_rf(model, shape, pos)
        assert field.bounds == tuple((0, n - 1) for n in shape[2:])
        assert field.geometry == (None,) * (len(shape) - 2)
        if isinstance(model, FourierLayer1d):  # (the global filter runs on its own size only, which says so)
            assert "fft_rfft() along the whole axis" in field.geometry.reasons[0]
        torch.manual_seed(0)
        assert probe_rf(model, shape, pos, mode="weights").bounds == field.bounds


def test_every_output_of_a_spectral_filter_reads_the_whole_axis():
    """Only output column 0 read the whole axis: the term that makes every frequency read every input comes back
    from the inverse transform as an impulse at index 0, and the round trip's paths to the other columns were
    rounding noise on the copy's constants (column 1 read 1..7, column 9 5..11, of 0..11)."""

    class FilterAlongTheRows(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.response = nn.Conv2d(2, 2, 3), nn.Parameter(torch.randn(6))

        def forward(self, x):
            y = self.conv(x)
            return torch.fft.irfft(torch.fft.rfft(y, dim=-1) * self.response, n=y.shape[-1], dim=-1)

    fields = probe_rf(FilterAlongTheRows(), (1, 2, 10, 12), [(1, column) for column in range(10)])
    assert [field.bounds for field in fields] == [((1, 3), (0, 11))] * 10


def test_zero_initialised_complex_spectral_weights_read_the_whole_axis_in_theoretical_mode():
    """A complex parameter kept its trained values on the theoretical copy: a Fourier layer's spectral weights
    initialised to zero cut the spectral path, and output 5 read 5..5 alone of 0..31. Weights mode still reads what
    the zero weights connect: the 1 x 1 path alone."""
    model = FourierLayer1d()
    with torch.no_grad():
        model.weights.zero_()
    assert str(probe_rf(model, (1, 2, 32), 5)) == "RF of the output at (5,): 32 (input 0..31) [theoretical]"
    assert probe_rf(model, (1, 2, 32), 5, mode="weights").bounds == ((5, 5),)
    assert model.weights.dtype == torch.cfloat and not model.weights.any()  # the live weights are left as they were


class SpectrogramGain(nn.Module):
    """A learned gain per frequency of a short-time Fourier transform (8-sample Hann frames every 2 samples)."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(5, 1))

    def forward(self, x):
        window = torch.hann_window(8, dtype=x.dtype)
        spectrogram = torch.stft(x[:, 0], 8, hop_length=2, window=window, return_complex=True)
        return torch.istft(spectrogram * self.gain, 8, hop_length=2, window=window, length=x.shape[-1]).unsqueeze(1)


class SpectrogramMask(nn.Module):
    """A mask computed from a spectrogram's magnitudes (a convolution along its frequencies) applied to it."""

    def __init__(self):
        super().__init__()
        self.mask = nn.Conv2d(1, 1, (3, 1), padding=(1, 0))

    def forward(self, x):
        window = torch.hann_window(16, dtype=x.dtype)
        spectrogram = torch.stft(x[:, 0], 16, hop_length=4, window=window, return_complex=True)
        mask = torch.sigmoid(self.mask(spectrogram.abs().unsqueeze(1)))[:, 0]
        return torch.istft(spectrogram * mask, 16, hop_length=4, window=window, length=x.shape[-1]).unsqueeze(1)


def test_a_filter_of_a_spectrogram_reads_the_frames_that_cover_the_output():
    """A gain per frequency may be any kernel inside each frame; the copy's equal gains made the stft and istft
    round trip an identity, and output 20 read 20 alone (with rounding noise around it). Each output reads the
    frames whose windows cover it, as any gains do: a frame's first sample is under the Hann window's zero, and
    the reflection at the ends reads back into the input. A mask computed from the input reads those frames too."""
    fields = probe_rf(SpectrogramGain(), (1, 1, 40), [0, 3, 20, 21, 39])
    assert [field.bounds for field in fields] == [((0, 5),), ((0, 9),), ((15, 25),), ((15, 27),), ((33, 39),)]
    assert probe_rf(SpectrogramGain(), (1, 1, 40), 20, mode="weights").bounds == ((20, 20),)  # gains of 1: identity
    assert probe_rf(SpectrogramMask(), (1, 1, 64), 32).bounds == ((21, 43),)


class SpectrogramBin(nn.Module):
    """The magnitude of one frequency of an stft (8-sample rectangular frames every 2 samples, not centred), by
    keyword arguments or by position, through a 1 x 1 convolution."""

    def __init__(self, frequency: int, by_keyword: bool):
        super().__init__()
        self.frequency, self.by_keyword, self.conv = frequency, by_keyword, nn.Conv1d(1, 1, 1)

    def forward(self, x):
        options = {"n_fft": 8, "hop_length": 2, "center": False, "return_complex": True}
        spectrogram = torch.stft(input=x[:, 0], **options) if self.by_keyword else torch.stft(x[:, 0], **options)
        return self.conv(spectrogram.abs()[:, self.frequency].unsqueeze(1))


class ImaginaryRotation(nn.Module):
    """The real part of a learned complex kernel times an imaginary input: it reads the kernel's imaginary part."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(1, 1, 5, dtype=torch.cfloat))

    def forward(self, x):
        return F.conv1d(torch.complex(torch.zeros_like(x), x), self.kernel, padding=2).real


@pytest.mark.parametrize("by_keyword", [False, True])
@pytest.mark.parametrize("frequency", [2, 4])
def test_one_frequency_of_a_spectrogram_reads_its_whole_frame(frequency, by_keyword):
    """The stft's twin added its frame sum to each frequency's own term, which it cancelled where that frequency's
    cosine is -1: frame 5 (inputs 10..17) of frequency 2 read without 12 and 16, of frequency 4 (the Nyquist) 10..16
    without 11, 13, 15; a call by keyword (``torch.stft(input=x, ...)``) met no twin at all."""
    field = probe_rf(SpectrogramBin(frequency, by_keyword), (1, 1, 40), 5)
    assert field.bounds == ((10, 17),) and bool((field.heatmap[10:18] > 0).all())


def test_a_complex_kernel_on_an_imaginary_input_keeps_its_path():
    """A complex parameter became a real constant, whose product with an imaginary input has no real part: the
    probe refused (no input position influences the output), where the kernel's imaginary part reads 18..22."""
    assert probe_rf(ImaginaryRotation(), (1, 1, 40), 20).bounds == ((18, 22),)


class TensordotByTensorDims(nn.Module):
    """A fixed mixing of the columns (a buffer) by ``tensordot`` over the last dim, its dims given as an int64 tensor
    (-1: the last), between two 3 x 3 convolutions: 9 channels and 9 columns, so contracting the channels instead
    still runs."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv2d(2, 9, 3, padding=1), nn.Conv2d(9, 2, 3, padding=1)
        mixing = torch.zeros(9, 9)
        mixing[0, 8] = mixing[8, 0] = mixing[4, 4] = 1.0
        self.register_buffer("mixing", mixing)
        self.register_buffer("dims", torch.tensor([[-1], [0]]))

    def forward(self, x):
        return self.second(torch.tensordot(self.first(x), self.mixing, dims=self.dims))


def test_tensordot_dims_given_as_a_tensor_are_no_signed_constant():
    """Signed integer tensors count as signed constants (a sign flip by an int64 tensor), but tensordot's dims are
    names of dims: their magnitude contracted the channels instead of the columns (45 pixels, not 15)."""
    field = probe_rf(TensordotByTensorDims(), (1, 2, 9, 9), (4, 4))
    assert field.bounds == ((2, 6), (3, 5)) and int((field.heatmap > 0).sum()) == 15  # column 4 reads column 4


def _deformable_op():
    """An op named as torchvision's ``deform_conv2d`` (input, weight, offset, mask), with its own backward: each output
    reads the input where its offset points (torchvision does not import beside the CPU build the tests run on)."""
    if hasattr(torch.ops.rf_tests, "deform_conv2d"):
        return torch.ops.rf_tests.deform_conv2d

    def sampled(x, offset):
        _, _, h, w = x.shape
        ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        grid = torch.stack([(xs + offset[:, 0]) / (w - 1) * 2 - 1, (ys + offset[:, 1]) / (h - 1) * 2 - 1], -1)
        return F.grid_sample(x, grid, align_corners=True)

    def reference(x, weight, offset, mask):
        return F.conv2d(sampled(x, offset), weight) * mask

    @torch.library.custom_op("rf_tests::deform_conv2d", mutates_args=())
    def deform_conv2d(
        input: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return reference(input, weight, offset, mask)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        return torch.func.vjp(reference, *ctx.saved_tensors)[1](grad)

    deform_conv2d.register_autograd(backward, setup_context=setup_context)
    return torch.ops.rf_tests.deform_conv2d


class Deformable(nn.Module):
    def __init__(self):
        super().__init__()
        self.offsets = nn.Conv2d(1, 2, 3, padding=1)
        nn.init.normal_(self.offsets.weight, std=3.0)
        self.weight = nn.Parameter(torch.ones(1, 1, 1, 1))

    def forward(self, x):
        return _deformable_op()(x, self.weight, self.offsets(x), torch.ones(1, 1, 1, 1))


@pytest.mark.skipif(not hasattr(torch.library, "custom_op"), reason="torch.library.custom_op needs torch 2.4")
def test_a_deformable_convolution_may_read_anywhere_in_theoretical_mode():
    """Its offsets, computed from the input, move each tap anywhere; on the copy they are constants, and the field
    read one shifted pixel, ((9, 9), (9, 9)), where the weights field spans (0..10, 7..15). Like a grid_sample by
    a grid computed from the input, it reads the whole input and its offsets' fields."""
    torch.manual_seed(0)
    model = Deformable()
    assert probe_rf(model, (1, 1, 16, 16), (8, 8)).bounds == ((0, 15), (0, 15))
    weights = probe_rf(model, (1, 1, 16, 16), (8, 8), mode="weights").bounds
    assert weights != ((8, 8), (8, 8)) and all(0 <= a <= b <= 15 for a, b in weights)


def _haar_filters(channels: int) -> torch.Tensor:
    """The 2 x 2 Haar analysis filters (LL, LH, HL, HH), +1 and -1, once per channel: shape (4 * channels, 1, 2, 2)."""
    low, high = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])
    bands = [torch.outer(a, b) for a in (low, high) for b in (low, high)]
    return torch.stack(bands).unsqueeze(1).repeat(channels, 1, 1, 1)


class HaarDownsampling(nn.Module):
    """Wavelet downsampling (HWD, WaveCNet): a fixed Haar transform held in a buffer, then a learned 1 x 1 mix."""

    def __init__(self, channels: int = 2):
        super().__init__()
        self.register_buffer("haar", _haar_filters(channels))
        self.mix = nn.Conv2d(4 * channels, 3, 1)

    def forward(self, x):
        return self.mix(F.conv2d(x, self.haar, stride=2, groups=x.shape[1]))


class HaarUpsampling(nn.Module):
    """A learned 3 x 3 convolution into four subbands, then the inverse Haar transform by a transposed convolution."""

    def __init__(self):
        super().__init__()
        self.bands = nn.Conv2d(1, 4, 3, padding=1)
        self.register_buffer("haar", _haar_filters(1).reshape(4, 1, 2, 2))

    def forward(self, x):
        return F.conv_transpose2d(self.bands(x), self.haar, stride=2)


class DctFilter(nn.Module):
    """A learned filter along the last axis in the orthonormal DCT-II basis, a fixed matrix held in a buffer."""

    def __init__(self, length: int = 8):
        super().__init__()
        k, n = torch.arange(length).unsqueeze(1), torch.arange(length).unsqueeze(0)
        basis = torch.cos(torch.pi * (n + 0.5) * k / length) * (2 / length) ** 0.5
        basis[0] /= 2**0.5
        self.register_buffer("dct", basis)
        self.gain = nn.Parameter(torch.randn(length))

    def forward(self, x):
        spectrum = torch.einsum("nchw,kw->nchk", x, self.dct) * self.gain
        return torch.einsum("nchk,kw->nchw", spectrum, self.dct)


def test_a_fixed_signed_filter_in_a_buffer_hides_no_pixel_in_theoretical_mode():
    """A fixed Haar transform's +1 and -1 cancelled on the copy's equal values once a later layer summed its bands:
    a 2 x 2 field came out ((2, 2), (2, 2)) with r = 1; the inverse transform's odd outputs came out empty, or were
    refused as "covers only padding"; a learned filter in a DCT basis read a few columns of its row, by float32 noise.
    A constant operand of a linear call now enters the copy by its magnitude."""
    downsampled = probe_rf(HaarDownsampling(), (1, 2, 8, 8), "all")
    for i, j in itertools.product(range(4), range(4)):
        assert downsampled[(i, j)].bounds == ((2 * i, 2 * i + 1), (2 * j, 2 * j + 1)), (i, j)
    field = probe_rf(HaarDownsampling(), (1, 2, 8, 8), (1, 1))
    assert bool((field.heatmap[2:4, 2:4] > 0).all())
    assert [(g.size, g.stride, g.offset) for g in field.geometry] == [(2, 2, 0)] * 2
    upsampled = probe_rf(HaarUpsampling(), (1, 1, 6, 7), "all")
    for i, j in itertools.product(range(12), range(14)):
        rows, cols = (max(i // 2 - 1, 0), min(i // 2 + 1, 5)), (max(j // 2 - 1, 0), min(j // 2 + 1, 6))
        assert upsampled[(i, j)].bounds == (rows, cols), (i, j)
    assert probe_rf(HaarUpsampling(), (1, 1, 6, 7), (5, 5)).bounds == ((1, 3), (1, 3))
    filtered = probe_rf(DctFilter(), (1, 1, 4, 8), "all")
    for i, j in itertools.product(range(4), range(8)):
        assert filtered[(i, j)].bounds == ((i, i), (0, 7)), (i, j)
    assert bool((probe_rf(DctFilter(), (1, 1, 4, 8), (1, 3)).heatmap[1] > 1e-3).all())


class DifferenceMatrix(nn.Module):
    """``y_i = x_i - x_(i+1)`` by a fixed +1/-1 matrix in a buffer, through ``call``, then a learned conv of 2."""

    def __init__(self, call: str, length: int = 21):
        super().__init__()
        self.register_buffer("difference", torch.eye(length) - torch.eye(length).roll(1, 0).tril())
        self.call = call
        self.conv = nn.Conv1d(1, 1, 2, bias=False)

    def forward(self, x):
        matrix, eye = self.difference.to(x.dtype), torch.eye(x.shape[-1], dtype=x.dtype)
        if self.call == "addmm":
            y = torch.addmm(torch.zeros(1, x.shape[-1], dtype=x.dtype), x[:, 0], matrix).unsqueeze(1)
        elif self.call == "baddbmm":
            y = torch.baddbmm(torch.zeros_like(x), x, matrix[None])
        elif self.call == "linalg.multi_dot":
            y = torch.linalg.multi_dot([x[0], matrix, eye])[None]
        else:
            y = torch.chain_matmul(x[0], matrix, eye)[None]
        return self.conv(y)


@pytest.mark.filterwarnings("ignore:torch.chain_matmul is deprecated:UserWarning")
@pytest.mark.parametrize("call", ["addmm", "baddbmm", "linalg.multi_dot", "chain_matmul"])
def test_a_fixed_signed_matrix_in_a_fused_or_chained_product_hides_no_pixel(call):
    """Its +1 and -1 cancelled on the copy's equal values in the conv after it: position 10 read 10 and 12, a hole at
    11 inside the right bounds 10..12."""
    field = probe_rf(DifferenceMatrix(call), (1, 1, 21), 10)
    assert torch.nonzero(field.heatmap > 0).flatten().tolist() == [10, 11, 12]


@pytest.mark.parametrize("statistics", [torch.var_mean, torch.std_mean])
def test_var_mean_and_std_mean_gates_read_the_whole_input_in_theoretical_mode(statistics):
    """``x * sqrt(var_mean(y, dim=(2, 3))[0])`` kept only ``x``'s 3 x 3 window: on the copy's equal values the variance
    is 0 with a zero gradient. ``var``/``std`` had their twin (the mean); the fused calls now have it too."""

    class VarianceGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.local, self.statistics = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            spread, _mean = statistics(self.statistics(x), dim=(2, 3), keepdim=True)
            return self.local(x) * torch.sqrt(spread + 1e-5)

    assert probe_rf(VarianceGate(), (1, 2, 8, 9), (4, 4)).bounds == ((0, 7), (0, 8))
    torch.manual_seed(0)
    assert probe_rf(VarianceGate(), (1, 2, 8, 9), (4, 4), mode="weights").bounds == ((0, 7), (0, 8))


class ConvThenRecurrence(nn.Module):
    """A 3-wide convolution, then a recurrent layer over the time axis (batch first), channels back to dim 1."""

    def __init__(self, kind: str, bidirectional: bool = False, layers: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.recurrence = getattr(nn, kind)(4, 3, num_layers=layers, batch_first=True, bidirectional=bidirectional)

    def forward(self, x):
        output, _state = self.recurrence(self.conv(x).transpose(1, 2))
        return output.transpose(1, 2)


class ConvThenCellLoop(nn.Module):
    """A 3-wide convolution, then a recurrent cell stepped over time in Python, the hidden states stacked."""

    def __init__(self, kind: str = "LSTMCell"):
        super().__init__()
        self.conv, self.cell = nn.Conv1d(2, 4, 3, padding=1), getattr(nn, kind)(4, 3)

    def forward(self, x):
        features, state, outputs = self.conv(x), None, []
        for t in range(features.shape[-1]):
            state = self.cell(features[..., t], state)
            outputs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outputs, dim=-1)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_a_recurrence_reads_its_whole_past_in_theoretical_mode(kind):
    """On the copy's constants a recurrence's gates saturate and its gradient fades step after step: an LSTM's last
    output over 400 steps read its last 185 (((215, 399),), in float64 too; nn.RNN 113), and its geometry claimed
    r = 186, S = 1, where output t reads 0..t + 1; a GRU's geometry, measured on ever longer inputs, killed the
    interpreter (SIGSEGV). Recurrences now run as a running mean (both ways where bidirectional)."""
    assert probe_rf(ConvThenRecurrence(kind), (1, 2, 400), 399).bounds == ((0, 399),)
    one_way = probe_rf(ConvThenRecurrence(kind), (1, 2, 12), "all")
    assert [one_way[(t,)].bounds for t in range(12)] == [((0, min(t + 1, 11)),) for t in range(12)]
    field = probe_rf(ConvThenRecurrence(kind), (1, 2, 12), 5)
    assert field.geometry == (None,) and field.bounds == ((0, 6),) and "RF of the output at (5,): 7" in str(field)
    both_ways = probe_rf(ConvThenRecurrence(kind, bidirectional=True, layers=2), (1, 2, 12), "all")
    assert {both_ways[(t,)].bounds for t in range(12)} == {((0, 11),)}
    torch.manual_seed(0)
    weights = probe_rf(ConvThenRecurrence(kind), (1, 2, 12), "all", mode="weights")
    for t in range(12):
        (low, high), (first, last) = one_way[(t,)].bounds[0], weights[(t,)].bounds[0]
        assert low <= first and last <= high, t


def test_a_time_first_recurrence_over_a_batch_reads_its_whole_past_or_all():
    """Time first (``batch_first=False``, the default) the running mean's step counts broadcast over the batch axis:
    the output came out (40, 16, 40) and was refused as folding something into the batch."""

    class TimeFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3, padding=1)
            self.recurrence = nn.LSTM(4, 3, num_layers=2, bidirectional=True)

        def forward(self, x):
            output, _state = self.recurrence(self.conv(x).permute(2, 0, 1))
            return output.permute(1, 2, 0)

    assert probe_rf(TimeFirst(), (2, 2, 40), 5).bounds == ((0, 39),)


def test_the_magnitude_of_a_complex_spectrum_stays_real():
    """``torch.fft.fft2(x).abs()`` fed to a convolution: the identity's gradient of ``abs`` made its output complex,
    and the convolution raised in theoretical mode."""

    class Spectrum(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.fft.fft2(x).abs())

    assert probe_rf(Spectrum(), (1, 1, 16, 16), (8, 8)).bounds == ((0, 15), (0, 15))


def test_half_precision_probes_a_shallow_network():
    """The underflow guard refused ``dtype=torch.float16`` on any model (its float32 rule, the smallest normal over
    the epsilon, is 0.06 in float16); a gradient in the subnormal range is refused, not a shallow network's."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3))
    for dtype in (torch.float16, torch.bfloat16):
        assert probe_rf(model, (1, 1, 14, 14), (5, 5), dtype=dtype).bounds == ((5, 9), (5, 9)), dtype


def test_a_recurrent_cell_stepped_in_python_reads_its_whole_past_in_theoretical_mode():
    """The same fade through ``nn.LSTMCell`` stepped over time (300 steps: 115..299 of 0..299): each step now reads its
    input and its states, the states with a gradient of 1 in all (a mean of input and states halved the first step's
    at every step: a GRUCell's refused as an underflow of float64 after 1,100)."""
    assert probe_rf(ConvThenCellLoop(), (1, 2, 300), 299).bounds == ((0, 299),)
    assert probe_rf(ConvThenCellLoop("GRUCell"), (1, 2, 1100), 1099).bounds == ((0, 1099),)
    field_map = probe_rf(ConvThenCellLoop(), (1, 2, 12), "all")
    assert [field_map[(t,)].bounds for t in range(12)] == [((0, min(t + 1, 11)),) for t in range(12)]


def _fading_chain(layers: int, edge: float) -> nn.Sequential:
    """``layers`` bias-free 3-wide convolutions whose outer taps are ``edge`` and centre taps 1."""
    chain = nn.Sequential(*[nn.Conv1d(2, 2, 3, bias=False) for _ in range(layers)])
    with torch.no_grad():
        for conv in chain:
            conv.weight.fill_(edge)
            conv.weight[..., 1] = 1.0
    return chain


class DecayingLongConvolution(nn.Module):
    """A causal convolution as long as the input, its kernel exp(-exp(w) * j) (an S4- or RWKV-like decay)."""

    def __init__(self):
        super().__init__()
        self.log_rate = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        steps = torch.arange(x.shape[-1], dtype=x.dtype).flip(0)
        kernel = torch.exp(-torch.exp(self.log_rate) * steps).view(1, 1, -1)
        return F.conv1d(F.pad(x, (x.shape[-1] - 1, 0)), kernel)


def test_a_gradient_at_the_edge_of_the_dtype_s_range_is_refused():
    """With ``dtype`` given, no float64 retry guarded the edge of its range: a 30-layer chain's weights field in
    float32 read 14..54 (bfloat16: 16..52) of the 4..64 that every input in it influences, and a theoretical
    120-layer chain 13..235 of 4..244, as if measured. A gradient that fades to the edge of the dtype's range is now
    refused with the fix, and in float64 (a long recurrence in weights mode) it says so too."""
    chain = _fading_chain(30, 1e-3)
    assert probe_rf(chain, (1, 2, 69), "center", mode="weights").bounds == ((4, 64),)
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ProbeError, match="fades to the edge of .*pass dtype=None"):
            probe_rf(chain, (1, 2, 69), "center", mode="weights", dtype=dtype)
    deep = nn.Sequential(*[nn.Conv1d(4, 4, 3, bias=False) for _ in range(120)])
    assert probe_rf(deep, (1, 4, 249), "center").bounds == ((4, 244),)
    with pytest.raises(ProbeError, match="float32's range"):
        probe_rf(deep, (1, 4, 249), "center", dtype=torch.float32)
    with pytest.raises(ProbeError, match="zero or subnormal in float16"):  # read 7..9 of 4..12: flushed weights
        probe_rf(_fading_chain(4, 1e-5), (1, 2, 17), "center", mode="weights", dtype=torch.float16)
    with pytest.raises(ProbeError, match="float64's range .*use mode='weights'"):
        probe_rf(DecayingLongConvolution(), (1, 1, 400), 399)  # theoretical: the copy's own decay
    with pytest.raises(ProbeError, match="float64's range .*use mode='theoretical'"):
        probe_rf(_fading_chain(120, 1e-3), (1, 2, 249), "center", mode="weights")


class _WritesItsInput(nn.Module):
    """Scales its input in place and blanks its first row, as preprocessing inside a forward may."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)

    def forward(self, x):
        x /= 255.0
        x[:, :, 0, :] = 0
        return self.conv(x)


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_forward_that_writes_its_input_in_place_is_probed(mode):
    """The probe fed its input leaf itself, and autograd refuses an in-place write into a leaf that needs a gradient:
    the probe said the model's forward raised. Output row 0 reads input rows 0..2, of which row 0 is blanked."""
    model = _WritesItsInput()
    assert probe_rf(model, (1, 2, 10, 10), (3, 3), mode=mode).bounds == ((3, 5), (3, 5))
    assert probe_rf(model, (1, 2, 10, 10), (0, 3), mode=mode).bounds == ((1, 2), (3, 5))
    assert rf_table(model, (1, 2, 10, 10))[-1].bounds == ((4, 6), (4, 6))  # the centre of the 8 x 8 map
    support = effective_rf(model, torch.rand(2, 2, 10, 10), (0, 3)).heatmap > 0
    rows, columns = support.any(1).nonzero(), support.any(0).nonzero()
    assert [(int(i.min()), int(i.max())) for i in (rows, columns)] == [(1, 2), (3, 5)]


class _LearnedWarp(nn.Module):
    """A learned affine warp (identity at first), or a sampling grid held in a frozen parameter, then a 3 x 3 conv."""

    def __init__(self, held: str):
        super().__init__()
        self.held = held
        identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        self.theta = nn.Parameter(identity)
        self.grid = nn.Parameter(F.affine_grid(identity, [1, 1, 9, 11], align_corners=False), requires_grad=False)
        self.register_buffer("fixed", F.affine_grid(identity, [1, 1, 9, 11], align_corners=False))
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        grid = {"theta": lambda: F.affine_grid(self.theta.expand(len(x), 2, 3), list(x.shape), align_corners=False),
                "parameter": lambda: self.grid.expand(len(x), -1, -1, -1),
                "buffer": lambda: self.fixed.expand(len(x), -1, -1, -1)}[self.held]()  # fmt: skip
        return self.conv(F.grid_sample(x, grid, align_corners=False))


@pytest.mark.parametrize("held", ["theta", "parameter", "buffer"])
def test_a_sampling_grid_the_weights_compute_may_sample_anywhere_in_theoretical_mode(held):
    """The theoretical copy set the learned affine (or a grid parameter) to a constant, so every output sampled one
    fixed spot: (0, 0) read 3..4, 4..5, where the current weights read 0..1, 0..1 and others read anything. A grid
    in a buffer is the architecture's own: it keeps its samples."""
    model = _LearnedWarp(held)
    for pos in [(0, 0), (4, 5), (8, 10)]:
        weights = probe_rf(model, (1, 1, 9, 11), pos, mode="weights").bounds
        assert weights == tuple((max(i - 1, 0), min(i + 1, n - 1)) for i, n in zip(pos, (9, 11)))
        theoretical = probe_rf(model, (1, 1, 9, 11), pos).bounds
        assert theoretical == (((0, 8), (0, 10)) if held != "buffer" else weights)


def test_a_choice_by_a_learned_score_keeps_both_branches_in_theoretical_mode():
    """``where(self.score > 0, conv3(x), conv7(x))`` with a score learned per position: the copy's constant score
    picked the 3 x 3 branch everywhere, and (6, 9) read 5..7, 8..10 where its current weights read 7 x 7."""

    class Chooser(nn.Module):
        def __init__(self):
            super().__init__()
            self.narrow, self.wide = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 7, padding=3)
            self.score = nn.Parameter(torch.ones(1, 1, 12, 12))
            with torch.no_grad():
                self.score[..., 6:] = -1.0

        def forward(self, x):
            return torch.where(self.score > 0, self.narrow(x), self.wide(x))

    assert probe_rf(Chooser(), (1, 1, 12, 12), (6, 9), mode="weights").bounds == ((3, 9), (6, 11))
    assert probe_rf(Chooser(), (1, 1, 12, 12), (6, 9)).bounds == ((3, 9), (6, 11))
    assert probe_rf(Chooser(), (1, 1, 12, 12), (6, 2)).bounds == ((3, 9), (0, 5))


def test_a_where_by_keywords_keeps_both_branches_in_theoretical_mode():
    """``torch.where(condition=..., input=..., other=...)``: only positional calls were read, and the copy's mask
    (all True) kept the 3 x 3 branch alone."""

    class ByKeywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.narrow, self.wide = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 5, padding=2)

        def forward(self, x):
            narrow = self.narrow(x)
            return torch.where(condition=narrow > 0, input=narrow, other=self.wide(x))

    assert probe_rf(ByKeywords(), (1, 1, 12, 12), (6, 6)).bounds == ((4, 8), (4, 8))


@pytest.mark.parametrize("held", ["bool", "int", "ones_like"])
def test_a_mask_held_in_a_parameter_of_booleans_or_integers_is_the_architectures(held):
    """The copy keeps such a parameter as it is: a causal mask, not a choice any weights could make (it was taken
    for one, and output 4 read its future: 0..15 where it reads 0..4)."""

    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.qkv = nn.Conv1d(1, 4, 1), nn.Linear(4, 12)
            lower = torch.ones(16, 16).tril()
            self.mask = nn.Parameter(lower.bool() if held != "int" else lower.long(), requires_grad=False)
            self.scale = nn.Parameter(torch.ones(16, 16))

        def forward(self, x):
            tokens = self.embed(x).transpose(1, 2)
            q, k, v = self.qkv(tokens).chunk(3, dim=-1)
            future = ~self.mask if held != "int" else self.mask == 0
            if held == "ones_like":  # made from a weight's shape alone
                future = ~torch.ones_like(self.scale, dtype=torch.bool).tril()
            scores = (q @ k.transpose(-1, -2)).masked_fill(future, float("-inf"))
            return (scores.softmax(dim=-1) @ v).transpose(1, 2)

    assert probe_rf(Causal(), (1, 1, 16), 4).bounds == ((0, 4),)


@pytest.mark.parametrize("mask", ["multiplied", "compared", "additive"])
def test_a_mask_held_in_a_frozen_floating_parameter_is_the_architectures(mask):
    """A frozen two-valued parameter with a zero (a 0/1 or 0/-inf mask) stays as it is on the theoretical copy, as a
    buffer does: a masked kernel read 6..10 where it reads 6..8, a causal attention its future (0..15 for 0..4)."""

    class MaskedKernel(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 5, padding=2)
            self.mask = nn.Parameter(torch.tensor([[[1.0, 1.0, 1.0, 0.0, 0.0]]]), requires_grad=False)

        def forward(self, x):
            return F.conv1d(x, self.conv.weight * self.mask, padding=2)

    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.qkv = nn.Conv1d(1, 4, 1), nn.Linear(4, 12)
            lower = torch.ones(16, 16).tril()
            held = lower if mask == "compared" else torch.zeros(16, 16).masked_fill(lower == 0, float("-inf"))
            self.mask = nn.Parameter(held, requires_grad=False)

        def forward(self, x):
            q, k, v = self.qkv(self.embed(x).transpose(1, 2)).chunk(3, dim=-1)
            scores = q @ k.transpose(-1, -2)
            scores = scores.masked_fill(self.mask == 0, float("-inf")) if mask == "compared" else scores + self.mask
            return (scores.softmax(dim=-1) @ v).transpose(1, 2)

    model, position, bounds = (MaskedKernel(), 8, ((6, 8),)) if mask == "multiplied" else (Causal(), 4, ((0, 4),))
    for mode in ("theoretical", "weights"):
        assert probe_rf(model, (1, 1, 16), position, mode=mode).bounds == bounds


def test_a_frozen_backbone_still_stands_for_any_weights():
    """Freezing (as a fine-tuning schedule does) keeps weights weights: a frozen kernel whose current taps are 0 and
    a sign apart still reads its whole window in theoretical mode."""
    conv = nn.Conv1d(1, 1, 5, padding=2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[0.0, 0.5, 0.0, -0.25, 0.0]]]))
    conv.requires_grad_(False)
    assert probe_rf(conv, (1, 1, 16), 8).bounds == ((6, 10),)
    assert probe_rf(conv, (1, 1, 16), 8, mode="weights").bounds == ((7, 9),)


def test_a_frozen_weight_of_two_values_is_still_a_weight():
    """A frozen Dirac or identity initialisation holds 0 and 1 as a mask does, but it is a layer's weight, which a
    fine-tuning schedule unfreezes later: it was kept as a mask, and a 5 x 5 field came out 3 x 3 (a token mixer
    read 1 token of 16)."""
    stack = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1))
    nn.init.dirac_(stack[0].weight)
    stack[0].weight.requires_grad_(False)
    assert probe_rf(stack, (1, 3, 16, 16)).size == (5, 5)
    mixer = nn.Linear(16, 16)
    nn.init.eye_(mixer.weight)
    mixer.weight.requires_grad_(False)
    assert probe_rf(mixer, (1, 3, 16), 8).bounds == ((0, 15),)


class FrozenKernelByKeyword(nn.Module):
    """``F.conv1d(x, weight=k)`` or ``F.linear(x, weight=eye)`` with a frozen Dirac or identity weight."""

    def __init__(self, linear: bool):
        super().__init__()
        kernel = torch.eye(21) if linear else torch.tensor([[[0.0, 0.0, 1.0, 0.0, 0.0]]])
        self.kernel = nn.Parameter(kernel, requires_grad=False)
        self.linear = linear

    def forward(self, x):
        return F.linear(x, weight=self.kernel) if self.linear else F.conv1d(x, weight=self.kernel, padding=2)


@pytest.mark.parametrize("linear, bounds", [(False, ((8, 12),)), (True, ((0, 20),))])
def test_a_frozen_weight_of_two_values_given_by_keyword_is_still_a_weight(linear, bounds):
    """Given as ``weight=`` it was kept as a mask: both read input 10..10 at position 10."""
    assert probe_rf(FrozenKernelByKeyword(linear), (1, 1, 21), 10).bounds == bounds


def test_a_frozen_float8_parameter_is_a_weight_not_a_refusal():
    """The mask test ran ``aminmax``, which float8 lacks on the CPU: the whole probe failed as a copy error."""

    class Float8Kernel(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.rand(1, 1, 5).to(torch.float8_e4m3fn), requires_grad=False)

        def forward(self, x):
            return F.conv1d(x, self.kernel.float(), padding=2)

    assert probe_rf(Float8Kernel(), (1, 1, 16), 8).bounds == ((6, 10),)


class _Thresholded(nn.Module):
    """A convolution, a hard threshold used as values, another convolution: the output changes with the input."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.second((self.first(x) > 0).float())


def test_a_mask_used_as_values_is_said_in_probes_and_tables():
    """``(x > 0).float()`` carries no gradient: the probe said the output "does not depend on the input" (it
    does), and rf_table dropped the rows after it without a word."""
    x = torch.zeros(1, 1, 12, 12)
    model = _Thresholded()
    assert any(bool((model(x + torch.randn_like(x))[0, :, 6, 6] != model(x)[0, :, 6, 6]).any()) for _ in range(5))
    for mode in ("theoretical", "weights"):
        with pytest.raises(ProbeError, match=r"carries no gradient from the input.*comparison \(gt\(\)\)"):
            probe_rf(model, (1, 1, 12, 12), mode=mode)
        with pytest.warns(UserWarning, match=r"1 row is left out: the output of layer 'second' carries no gradient"):
            rows = rf_table(model, (1, 1, 12, 12), mode=mode)
        assert [r.name for r in rows] == ["first"]


@pytest.mark.parametrize("before", ["gate", "normalised", "nan_check"])
def test_an_output_that_does_not_depend_on_the_input_is_said_so_after_unrelated_comparisons(before):
    """A comparison that gates values (y * (y > 0)), picks a scale or checks for NaN (y != y) before a head that
    reads a buffer alone: the output truly does not depend on the input, and the message said it was read through
    a comparison."""

    class ConstantHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.register_buffer("constant", torch.ones(1, 2, 8, 8))
            self.aside = None

        def forward(self, x):
            y = self.conv(x)
            if before == "gate":
                y = y * (y > 0)
            elif before == "normalised":
                y = torch.where(y.abs().amax() > 1, y / y.abs().amax(), y)
            else:
                y = torch.where(y != y, torch.zeros_like(y), y)
            self.aside = y.sum()  # read by nothing the output is made of
            return self.constant.expand(len(x), -1, -1, -1).clone()

    for mode in ("theoretical", "weights"):
        with pytest.raises(ProbeError, match="does not depend on the input"):
            probe_rf(ConstantHead(), (1, 1, 8, 8), mode=mode)


def test_a_row_that_folds_windows_into_the_batch_is_left_out_with_why():
    """A module run on windows folded into the batch axis was left out of the table without the warning the
    docs promise."""

    class Windowed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.window, self.post = (nn.Conv2d(2, 2, 3, padding=1) for _ in range(3))

        def forward(self, x):
            y = self.stem(x)
            windows = y.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(4, 2, 8, 8)
            y = self.window(windows).reshape(1, 2, 2, 2, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(1, 2, 16, 16)
            return self.post(y)

    with pytest.warns(UserWarning, match=r"1 row is left out, whose first axis holds more than the one sample"):
        rows = rf_table(Windowed(), (1, 2, 16, 16))
    assert [r.name for r in rows] == ["stem", "post"]


def test_a_table_row_without_a_field_is_left_out_not_the_whole_table():
    """One row whose centre reads nothing (its weights zeroed, in weights mode) stopped the whole table; it and the
    rows it feeds are left out with the probe's reason, and a row asked for by name still raises it."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    with torch.no_grad():
        model[1].weight.zero_()
    with pytest.warns(UserWarning, match=r"2 rows are left out, whose centre has no field \(1, 2\).*no input position"):
        rows = rf_table(model, (1, 1, 10, 10), mode="weights")
    assert [(r.name, r.bounds) for r in rows] == [("0", ((4, 6), (4, 6)))]
    with pytest.raises(ProbeError, match="no input position influences"):
        rf_table(model, (1, 1, 10, 10), mode="weights", layers=["1"])


class _MaxOverFrequency(nn.Module):
    """An audio network's max over the frequencies (H), spelled in several ways, then a 1 x 3 convolution in time."""

    def __init__(self, spelling: str):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, (1, 3), padding=(0, 1))
        self.spelling = spelling

    def forward(self, x):
        y = self.a(x)
        picked = {
            "max_pool2d": lambda: F.max_pool2d(y, (y.shape[2], 1)),
            "amax": lambda: y.amax(2, keepdim=True),
            "max": lambda: y.max(2, keepdim=True).values,
            "unfold": lambda: y.unfold(2, y.shape[2], 1).amax(-1),
            "topk": lambda: y.topk(1, dim=2).values,
            "sort": lambda: y.sort(dim=2, descending=True).values[:, :, :1],
            "with_indices": lambda: F.max_pool2d(y, (y.shape[2], 1), return_indices=True)[0],
        }[self.spelling]
        return self.b(picked())


@pytest.mark.parametrize("spelling", ["amax", "max", "unfold", "topk", "sort", "with_indices"])
def test_weights_mode_connects_every_candidate_of_a_pick_by_value_as_of_a_max_pool(spelling):
    """A max-pool connects its whole window in weights mode (the input, not a weight, decides which element wins);
    the same max as amax, max along a dim, topk, sort or a pooling with indices ran as the real arg-max, and the field
    held only the pixels that won on the 8 draws: rows 0..30 and 141 pixels of 0..31 and 160 (a float64 brute force
    over 200 inputs agrees with the pooling's)."""
    torch.manual_seed(0)
    pooled = _MaxOverFrequency("max_pool2d")
    model = _MaxOverFrequency(spelling)
    model.load_state_dict(pooled.state_dict())
    expected = probe_rf(pooled, (1, 1, 32, 16), (0, 8), mode="weights")
    field = probe_rf(model, (1, 1, 32, 16), (0, 8), mode="weights")
    assert expected.bounds == ((0, 31), (6, 10)) and int((expected.heatmap > 0).sum()) == 160
    assert field.bounds == expected.bounds and torch.equal(field.heatmap > 0, expected.heatmap > 0)


def test_weights_mode_zeroes_a_bias_held_in_a_buffer():
    """torchvision's FrozenBatchNorm2d holds its shift in a buffer, which the bias-free copy kept: a trained -5 kept
    the ReLU after it off on every draw, (5, 9) where BatchNorm2d's bias-free network reads (3, 9)."""

    class FrozenBatchNorm2d(nn.Module):
        def __init__(self, n: int):
            super().__init__()
            for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                self.register_buffer(name, torch.full((n,), value))

        def forward(self, x):
            scale = (self.weight * (self.running_var + 1e-5).rsqrt()).reshape(1, -1, 1, 1)
            return x * scale + (self.bias - self.running_mean * scale.flatten()).reshape(1, -1, 1, 1)

    conv, head = nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Conv2d(2, 1, 5, padding=2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0], conv.weight[1, 0, 2, 2] = 1, 1
    frozen, norm = FrozenBatchNorm2d(2), nn.BatchNorm2d(2).eval()
    frozen.bias.copy_(torch.tensor([-5.0, 0.0]))
    norm.bias.data.copy_(frozen.bias)
    fields = [probe_rf(nn.Sequential(conv, n, nn.ReLU(), head), (1, 1, 12, 12), (6, 6), mode="weights")
              for n in (norm, frozen)]  # fmt: skip
    assert fields[0].bounds == fields[1].bounds == ((3, 9), (3, 9))


@pytest.mark.parametrize(
    "call", ["mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "pairwise_distance", "atan2", "atan2_"]
)
def test_a_call_that_takes_a_difference_inside_keeps_both_operands_fields(call):
    """A loss, a distance or an angle of two branches reads their difference inside, which is 0 on the theoretical
    copy's equal values: a(x) + mse_loss(a(x), b(x) shifted by 2 columns) read columns 5..7 where 3..7 is right (the
    shifted branch's gradient vanished), atan2 of two channels of one convolution read nothing ("its window covers
    only padding"), in place too, and a distance along the width dropped the width."""

    class Compared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)
            self.both = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            a, b = self.a(x), self.b(x).roll(2, -1)
            if call == "pairwise_distance":  # of two branches along the width, (N, 1, H, 1), added to every column
                return a + F.pairwise_distance(a, self.b(x), keepdim=True)
            if call == "atan2":  # of two channels of one convolution
                y = self.both(x)
                return torch.atan2(y[:, :1], y[:, 1:])
            if call == "atan2_":
                y = self.both(x)
                return y[:, :1].clone().atan2_(y[:, 1:])
            return a + getattr(F, call)(a, b, reduction="none")

    expected = {"pairwise_distance": ((5, 7), (0, 11)), "atan2": ((5, 7), (5, 7))}.get(
        call.rstrip("_"), ((5, 7), (3, 7))
    )
    assert probe_rf(Compared(), (1, 1, 12, 12), (6, 6)).bounds == expected


def test_a_weights_field_that_underflows_everywhere_is_redone_in_float64():
    """20 layers of weights near 0.0005 leave every gradient below float32's range: the map was all zeros, refused
    as "its units are dead ... or the weights on every path are zero", where float64 measures the field."""
    model = nn.Sequential(*(nn.Conv2d(1, 1, 3, padding=1, bias=False) for _ in range(20)))
    for conv in model:
        nn.init.constant_(conv.weight, 0.0005)
    field = probe_rf(model, (1, 1, 48, 48), (24, 24), mode="weights")
    assert field.bounds == ((4, 44), (4, 44)) and field.heatmap.dtype == torch.float64


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min])
def test_a_max_over_masked_frames_keeps_finite_values_in_weights_mode(fill):
    """Frames masked with -inf (or finfo.min) before a max over the frequencies: the whole-window gradient's mean
    over them was -inf, and every picked value NaN ("the output is not finite")."""

    class MaskedMax(nn.Module):
        def __init__(self, pool: bool):
            super().__init__()
            self.a, self.b, self.pool = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, (1, 3), padding=(0, 1)), pool

        def forward(self, x):
            y = self.a(x)
            y = torch.cat([y[:, :, :13], torch.full_like(y[:, :, 13:], fill)], dim=2)
            if self.pool:
                return self.b(F.gelu(F.max_pool2d(y, (y.shape[2], 1), return_indices=True)[0]))
            return self.b(F.gelu(y.amax(2, keepdim=True)))

    for pool in (False, True):
        assert probe_rf(MaskedMax(pool), (1, 1, 16, 16), (0, 8), mode="weights").bounds == ((0, 13), (6, 10))


def test_pooling_with_indices_on_an_unbatched_map_and_an_unpooling_after_an_in_place_change():
    """A max-pool with indices run per sample on (C, H, W) gathered its winners at flat indices past the width
    (index 17 out of bounds); an in-place gate on the pooled values was ignored by the unpooling, which read the
    winners kept before it."""

    class PerSample(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            return torch.stack([F.max_pool2d(s, 2, return_indices=True)[0] for s in self.a(x)])

    assert probe_rf(PerSample(), (1, 1, 12, 12), (3, 3), mode="weights").bounds == ((5, 8), (5, 8))

    class GatedUnpool(nn.Module):
        def forward(self, x):
            pooled, indices = F.max_pool2d(x, 2, return_indices=True)
            pooled.zero_()
            return F.max_unpool2d(pooled, indices, 2) + 0 * x.sum()

    with pytest.raises(ProbeError, match="no input position influences the model at"):
        probe_rf(GatedUnpool(), (1, 1, 8, 8), (4, 4), mode="weights")


def test_a_mask_held_in_a_bias_buffer_is_kept_and_a_dead_float32_only_model_is_said_dead():
    """A 1-D 0/-inf key mask in a buffer named bias was zeroed with the shifts (the masked key read); a dead model
    whose forward runs in float32 only was redone in float64 and refused as "the model's forward raised"."""

    class Masked(nn.Module):
        def __init__(self, as_buffer: bool):
            super().__init__()
            self.a = nn.Conv1d(1, 4, 3, padding=1, bias=False)
            self.b = nn.Conv1d(4, 1, 3, padding=1, bias=False)
            mask = torch.zeros(16)
            mask[12:] = float("-inf")  # frames 12.. are padding
            if as_buffer:
                self.register_buffer("bias", mask)
            else:
                self.bias = nn.Parameter(mask, requires_grad=False)

        def forward(self, x):
            return self.b(F.relu(self.a(x) + self.bias))

    torch.manual_seed(0)
    fields = [probe_rf(Masked(as_buffer), (1, 1, 16), (11,), mode="weights").bounds for as_buffer in (False, True)]
    assert fields == [((9, 12),), ((9, 12),)]

    class Float32Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1, 1, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.weight.float(), padding=1)

    with pytest.raises(ProbeError, match="its units are dead"):
        probe_rf(Float32Only(), (1, 1, 8, 8), (4, 4), mode="weights")


class _TwoBranches(nn.Module):
    """A 3 x 3 and a shifted 5 x 5 convolution in 1D, combined by ``combine``, after a fixed positional term."""

    def __init__(self, combine):
        super().__init__()
        self.a, self.b, self.combine = nn.Conv1d(1, 1, 3, padding=1), nn.Conv1d(1, 1, 5, padding=2), combine
        self.register_buffer("pe", torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        return self.combine(self.a(x), self.b(x) + self.pe)


@pytest.mark.parametrize(
    "combine",
    [
        lambda a, b: a + b.max(),
        lambda a, b: a + torch.min(b),
        lambda a, b: a + torch.aminmax(b).max,
        lambda a, b: a + b.norm(p=float("inf"), dim=-1, keepdim=True),
    ],
    ids=["max", "min", "aminmax", "inf_norm"],
)
def test_a_pick_of_every_element_reads_every_element_on_the_theoretical_copy(combine):
    """max() without a dim, aminmax and norms of order inf had no twin: on the copy's values only the largest element
    (the fixed term's) had a gradient, and the field read 4 of 16 samples."""
    assert probe_rf(_TwoBranches(combine), (1, 1, 16), (8,)).bounds == ((0, 15),)


def test_a_product_of_two_complex_branches_reads_both_parts():
    """Re(z1 z2) = a1 a2 - b1 b2: the lifted product read the real parts alone, (z * z.conj()).real (a power
    spectrum) 9 of 28 pixels."""

    class Power(nn.Module):
        def __init__(self):
            super().__init__()
            self.re, self.im = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 5, padding=2)

        def forward(self, x):
            z = torch.complex(self.re(x), self.im(x).roll(2, -1))
            return (z * z.conj()).real

    assert probe_rf(Power(), (1, 1, 12, 12), (6, 6)).bounds == ((4, 8), (2, 7))  # the 5 x 5 shifted by 2


@pytest.mark.parametrize(
    "combine",
    [
        lambda a, b: a + torch.div(b, 2, rounding_mode="floor"),
        lambda a, b: a + torch.copysign(a, b),
        lambda a, b: a + torch.sgn(b),
        lambda a, b: a + torch.fix(b),
    ],
    ids=["floor_division", "copysign", "sgn", "fix"],
)
def test_calls_whose_gradient_is_zero_are_refused_as_cuts(combine):
    """They silently kept a's field and dropped b's, where round, floor, trunc and sign are refused as cuts."""
    with pytest.raises(ProbeError, match="cuts the gradient on a path from the input .* whose gradient is zero"):
        probe_rf(_TwoBranches(combine), (1, 1, 16), (8,))


def test_a_sign_as_a_mask_and_the_sign_of_a_complex_value_are_no_cuts():
    """signbit gives a mask (as x < 0 does) and sgn of a complex value z / |z| has a gradient: both were refused as
    cuts by the first version of the zero-gradient rule."""
    conv = nn.Conv2d(1, 1, 3, padding=1)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            y = self.conv(x)
            return torch.where(torch.signbit(y), torch.zeros_like(y), y) + torch.sgn(torch.complex(y, y)).real

    for mode in ("theoretical", "weights"):
        assert probe_rf(Masked(), (1, 1, 10, 10), (5, 5), mode=mode).bounds == ((4, 6), (4, 6))


def test_one_pooling_unpooled_twice_reads_its_winners_both_times():
    """The first unpooling consumed the pooled values' winners: the second spread its values over whole windows."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            pooled, indices = F.max_pool2d(self.conv(x), 2, return_indices=True)
            return F.max_unpool2d(pooled, indices, 2) + F.max_unpool2d(pooled, indices, 2)

    torch.manual_seed(0)
    field = probe_rf(Twice(), (1, 1, 12, 12), (5, 5), mode="weights")
    assert field.bounds == ((4, 6), (4, 6))
