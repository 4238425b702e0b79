"""Feature maps in any layout: channels last, tokens on a grid; and attention in the theoretical copy.

The models are small stand-ins for what torchvision and timm build: a Swin (a stride-4 patch-embedding convolution,
then channels-last blocks of attention inside non-overlapping windows, optionally shifted), a ViT (patch tokens after
a class token, global attention), a segmentation head returning a dict. They double as factories for the rf-probe
command (``tests.test_layouts:tiny_swin``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from rf_callback import AxisGeometry, ProbeError, RFCallback, Tokens, effective_rf, probe_rf, rf_table, verify_rf
from rf_callback.cli import main
from tests.lightning_models import loaders, trainer_kwargs

MODES = ("theoretical", "weights")
SWIN_INPUT = (1, 3, 32, 32)  # 8 x 8 patches of 4 x 4 pixels
VIT_INPUT = (1, 3, 32, 48)  # 8 x 12 patches: not square, so a grid read in the wrong order shows


# --- models -----------------------------------------------------------------------------------------------------


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module (torchvision's Swin and ConvNeXt have one)."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class WindowAttention(nn.Module):
    """Self-attention inside non-overlapping windows of ``window`` x ``window`` tokens of a (N, H, W, C) map.

    With ``shift``, the map is rolled by ``-shift`` on both axes before and back after (Swin's shifted windows,
    without the mask that keeps wrapped-around tokens apart: the probes below stay inside the map).
    """

    def __init__(self, dim: int, window: int, shift: int = 0):
        super().__init__()
        self.window, self.shift = window, shift
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        n, h, w, c = x.shape
        ws, s = self.window, self.shift
        if s:
            x = torch.roll(x, (-s, -s), dims=(1, 2))
        windows = x.view(n, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        q, k, v = self.qkv(windows).chunk(3, dim=-1)
        attention = (q @ k.transpose(-2, -1) / math.sqrt(c)).softmax(dim=-1)
        out = self.proj(attention @ v)
        out = out.view(n, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
        return torch.roll(out, (s, s), dims=(1, 2)) if s else out


class SwinBlock(nn.Module):
    def __init__(self, dim: int, window: int, shift: int = 0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, shift)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinySwin(nn.Module):
    """Conv 4 x 4 stride 4 -> permute to (N, H, W, C) -> a windowed block [-> a shifted-window block].

    Output (N, H/4, W/4, dim), channels last. Without the shifted block, the field of patch (i, j) is its window of
    ``window`` x ``window`` patches: rows ``[4 w (i // w), 4 w (i // w) + 4 w - 1]`` in pixels.
    """

    def __init__(self, dim: int = 8, window: int = 2, shifted: bool = False):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.permute = Permute(0, 2, 3, 1)
        blocks = [SwinBlock(dim, window)] + ([SwinBlock(dim, window, window // 2)] if shifted else [])
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(self.permute(self.patch(x)))


class Attention(nn.Module):
    """Global self-attention over tokens (N, L, C): written out, or with the fused kernel."""

    def __init__(self, dim: int, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.fused:
            return self.proj(F.scaled_dot_product_attention(q, k, v))
        return self.proj((q @ k.transpose(-2, -1) / math.sqrt(x.shape[-1])).softmax(dim=-1) @ v)


class ViTBlock(nn.Module):
    def __init__(self, dim: int, fused: bool = False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, fused)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchTokens(nn.Module):
    """Conv 4 x 4 stride 4, flattened row-major to tokens, after ``prefix`` learned tokens: (N, prefix + h*w, C)."""

    def __init__(self, dim: int = 8, prefix: int = 1):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.prefix = nn.Parameter(torch.randn(1, prefix, dim))

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.prefix.expand(len(x), -1, -1), tokens], dim=1)


class TinyViT(nn.Module):
    """Patch tokens after a class token (and ``registers`` register tokens), then global-attention blocks."""

    def __init__(self, dim: int = 8, depth: int = 1, registers: int = 0, fused: bool = False):
        super().__init__()
        self.embed = PatchTokens(dim, 1 + registers)
        self.blocks = nn.Sequential(*[ViTBlock(dim, fused) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.embed(x))


def conv_stack() -> nn.Sequential:
    """conv5 p2, ReLU, conv3 s2 p1, max-pool 2 (channels first), the same network in both layouts below."""
    return nn.Sequential(nn.Conv2d(2, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                         nn.MaxPool2d(2))  # fmt: skip


class ChannelsLast(nn.Module):
    """A channels-first network whose output is permuted to channels last (1, 2 or 3 spatial axes)."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, x):
        return self.features(x).movedim(1, -1)


class Segmenter(nn.Module):
    """A segmentation head: {"out": per-pixel class scores (N, H, W, K), channels last; "aux": (N, C, H/2, W/2)}."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 8, 3, padding=1)
        self.aux = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.classes = nn.Linear(8, 3)

    def forward(self, x):
        features = self.backbone(x)
        return {"out": self.classes(features.permute(0, 2, 3, 1)), "aux": self.aux(features)}


def tiny_swin(shifted: bool = False) -> nn.Module:
    """rf-probe factory: the TinySwin above."""
    return TinySwin(shifted=shifted)


def tiny_vit() -> nn.Module:
    """rf-probe factory: the TinyViT above."""
    return TinyViT()


def window(index: int, patches: int, patch: int = 4) -> tuple[int, int]:
    """The pixels of the window of ``patches`` patches that holds patch ``index``."""
    first = patch * patches * (index // patches)
    return first, first + patch * patches - 1


# --- channels last ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_conv_stack_permuted_to_channels_last_gives_exactly_the_channels_first_fields(mode):
    torch.manual_seed(0)
    features = conv_stack()
    positions = [(0, 0), (3, 5), (7, 7), (2, 6)]
    first = probe_rf(features, (1, 2, 32, 32), positions, mode=mode)
    last = probe_rf(ChannelsLast(features), (1, 2, 32, 32), positions, mode=mode, layout="channels_last")
    assert [f.bounds for f in last] == [f.bounds for f in first]
    assert all(torch.equal(a.heatmap, b.heatmap) for a, b in zip(first, last))
    assert last[0].output_shape == (8, 8) and last[0].layout == "channels_last"
    assert tuple(last[0].geometry) == tuple(first[0].geometry)  # the geometry reads channels last on thin inputs too
    every = probe_rf(ChannelsLast(features), (1, 2, 32, 32), "all", mode=mode, layout="channels_last")
    assert torch.equal(every.last, probe_rf(features, (1, 2, 32, 32), "all", mode=mode).last)
    assert every.to_dict()["layout"] == "channels_last" and "layout" not in probe_rf(features, (1, 2, 8, 8)).to_dict()


@pytest.mark.parametrize("mode", MODES)
def test_a_1d_channels_last_output_is_read_along_its_sequence(mode):
    # conv5 p2, conv3 s2: r = 7, S = 2, P = 2, so position x sees [2x - 2, 2x + 4] (clipped to 0..19).
    convs = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.Conv1d(4, 4, 3, stride=2))
    fields = probe_rf(ChannelsLast(convs), (1, 2, 20), [(0,), (4,), (8,)], mode=mode, layout="channels_last")
    assert [f.bounds for f in fields] == [((0, 4),), ((6, 12),), ((14, 19),)]
    assert fields[1].stride == (2,) and fields[1].span == ((6, 12),)


def test_a_channels_last_field_passes_verify_rf():
    field = probe_rf(TinySwin(), SWIN_INPUT, (3, 2), layout="channels_last")
    assert verify_rf(TinySwin(), field).passed
    assert field.to_dict(geometry=False)["layout"] == "channels_last"
    assert "layout" not in probe_rf(conv_stack(), (1, 2, 16, 16)).to_dict(geometry=False)


@pytest.mark.parametrize("mode", MODES)
def test_a_dict_output_picks_its_channels_last_element(mode):
    model = Segmenter()
    out = probe_rf(model, (1, 3, 16, 16), (5, 9), mode=mode, element="out", layout="channels_last")
    assert out.bounds == ((4, 6), (8, 10)) and out.output_shape == (16, 16)  # the backbone's 3 x 3
    aux = probe_rf(model, (1, 3, 16, 16), (2, 4), mode=mode, element="aux")  # channels first, the default
    assert aux.bounds == ((2, 6), (6, 10))  # conv3 s2 p1 after conv3 p1: r = 5, S = 2, P = 2


# --- windowed and global attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patches", [2, 4])
def test_windowed_attention_sees_exactly_its_window(mode, patches):
    torch.manual_seed(0)
    model = TinySwin(window=patches)
    positions = [(i, j) for i in range(8) for j in range(8)]
    fields = probe_rf(model, SWIN_INPUT, positions, mode=mode, layout="channels_last")
    assert [f.bounds for f in fields] == [(window(i, patches), window(j, patches)) for i, j in positions]


@pytest.mark.parametrize("mode", MODES)
def test_a_shifted_window_block_after_it_sees_two_windows_across(mode):
    # Windows of 2 patches shifted by 1: patch i (1..6) attends to patches 2k + 1 and 2k + 2 with k = (i - 1) // 2,
    # which the first block saw through their windows, patches 2k .. 2k + 3: pixels [8k, 8k + 15].
    torch.manual_seed(0)
    model = TinySwin(window=2, shifted=True)
    positions = [(i, j) for i in range(1, 7) for j in range(1, 7)]
    fields = probe_rf(model, SWIN_INPUT, positions, mode=mode, layout="channels_last")
    span = {i: (8 * ((i - 1) // 2), 8 * ((i - 1) // 2) + 15) for i in range(1, 7)}
    assert [f.bounds for f in fields] == [(span[i], span[j]) for i, j in positions]
    assert fields[0].size == (16, 16)  # twice the window's 8 pixels


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fused", [False, True])
def test_global_attention_over_tokens_sees_the_whole_input(mode, fused):
    model = TinyViT(depth=2, fused=fused)
    fields = probe_rf(model, VIT_INPUT, [(0, 0), (4, 6), (7, 11)], mode=mode, layout=Tokens(grid=(8, 12), prefix=1))
    assert [f.bounds for f in fields] == [((0, 31), (0, 47))] * 3
    assert fields[0].output_shape == (8, 12) and fields[0].geometry == (None, None)


@pytest.mark.parametrize("mode", MODES)
def test_tokens_lie_on_the_grid_row_major_after_the_prefix(mode):
    # Before attention, token (i, j) is patch (i, j): pixels [4i, 4i + 3] x [4j, 4j + 3] of the 32 x 48 input.
    model = TinyViT(registers=4)
    positions = [(0, 0), (2, 5), (7, 11), (5, 1)]
    fields = probe_rf(model, VIT_INPUT, positions, layer="embed", mode=mode, layout="tokens:8x12+5")
    assert [f.bounds for f in fields] == [((4 * i, 4 * i + 3), (4 * j, 4 * j + 3)) for i, j in positions]
    assert fields[0].layout == "tokens:8x12+5"
    if mode == "theoretical":  # measured on the user's input alone: a token grid fits no other input size
        assert fields[1].stride == (4, 4) and fields[1].span == ((8, 11), (20, 23))


def test_effective_rf_reads_the_layout_and_stays_inside_the_window():
    torch.manual_seed(0)
    model = TinySwin(window=2)
    inputs = torch.randn(4, 3, 32, 32)
    field = effective_rf(model, inputs, (3, 1), layout="channels_last")
    assert field.theoretical.bounds == ((8, 15), (0, 7))
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8:16, 0:8] = True
    assert field.heatmap[~inside].eq(0).all() and field.heatmap[inside].gt(0).all()
    with pytest.raises(ValueError, match="layout='channels_last'"):
        effective_rf(model, inputs, (3, 1), layout="channels_last", theoretical=probe_rf(conv_stack(), (1, 2, 8, 8)))


# --- refusals ---------------------------------------------------------------------------------------------------


def test_a_token_output_without_layout_is_refused_with_the_fix():
    with pytest.raises(ValueError) as info:
        probe_rf(TinyViT(), VIT_INPUT)
    message = str(info.value)
    assert "the output of the model is (1, 97, 8)" in message and "input (1, 3, 32, 48) has 2" in message
    assert "pass layout='tokens:HxW+P'" in message and "layout='channels_last'" in message
    with pytest.raises(ValueError, match=r"\(1, 97, 8\), which layout='channels_last' reads as 1 spatial axis"):
        probe_rf(TinyViT(), VIT_INPUT, layout="channels_last")


class SeriesPatches(nn.Module):
    """PatchTST's patching of a univariate series: patches of 8 every 4 samples, each embedded by a linear layer."""

    def __init__(self, cut):
        super().__init__()
        self.embed, self.cut = nn.Linear(8, 8), cut

    def forward(self, x):
        return self.embed(self.cut(F.pad(x, (0, 4), mode="replicate")))


@pytest.mark.parametrize(
    "cut",
    [
        lambda x: x.unfold(-1, 8, 4).squeeze(1),
        lambda x: x.unfold(-1, 8, 4)[:, 0],
        lambda x: x.unfold(-1, 8, 4).flatten(0, 1),
    ],
    ids=["unfold, squeeze", "unfold, index", "unfold, flatten"],
)
def test_patches_cut_by_a_reshape_are_read_as_tokens_not_as_channels(cut):
    """(1, 1, 64) -> 16 patches of 8 features, (1, 16, 8): read channels first, the patches were taken for channels
    and position 3 read the whole input (0..63) with no warning, while channels_last and tokens were refused as "no
    call moved dim 1". The reshape that makes dim 1 the patches now sends the output to the layout check."""
    model = SeriesPatches(cut)
    with pytest.raises(ValueError, match=r"\(1, 16, 8\).*channels last \(N, L, C\).*pass layout='channels_last'"):
        probe_rf(model, (1, 1, 64), 3)
    for layout in ("channels_last", "tokens:16"):
        for mode in ("theoretical", "weights"):
            assert probe_rf(model, (1, 1, 64), 3, layout=layout, mode=mode).bounds == ((12, 19),)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("tokens:8x12", "97 tokens, not 0 + 8*12 = 96 as layout='tokens:8x12' says; if the first token is a class "
                        "or register token, pass layout='tokens:8x12+1'"),
        (Tokens(grid=(8, 12)), "as layout=Tokens(grid=(8, 12), prefix=0) says; if the first token is a class or "
                               "register token, pass layout=Tokens(grid=(8, 12), prefix=1)"),
        ("tokens:12x12+1", "97 tokens, not 1 + 12*12 = 145 as layout='tokens:12x12+1' says; pass layout= with the "
                           "grid"),
        ("tokens:8x12+5", "97 tokens, not 5 + 8*12 = 101"),
        ("tokens:96+1", "layout='tokens:96+1' lays the tokens on a grid of 1 axis (96,), but the input (1, 3, 32, 48) "
                        "has 2 spatial axes"),
    ],
)  # fmt: skip
def test_tokens_that_do_not_fit_the_grid_are_refused_in_the_users_words(layout, message):
    with pytest.raises(ValueError) as info:
        probe_rf(TinyViT(), VIT_INPUT, layout=layout)
    assert message in str(info.value)


class OverlappingPatches(nn.Module):
    """Two 9 x 9 convolutions of stride 4, padded by 4: patches whose fields reach past the left border."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 4, 9, stride=4, padding=4), nn.Conv2d(4, 4, 9, stride=4, padding=4)

    def forward(self, x):
        return self.second(self.first(x)).flatten(2).transpose(1, 2)


class ResizedPatches(nn.Module):
    """Resizes any input to 64 x 96, then 32 x 32 patches: a 2 x 3 grid that need not divide the input."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 4, 32, stride=32)

    def forward(self, x):
        return self.patch(F.interpolate(x, size=(64, 96), mode="nearest")).flatten(2).transpose(1, 2)


@pytest.mark.parametrize(
    ("layout", "fix"), [("tokens:12x8+1", "'tokens:8x12+1'"), (Tokens((12, 8), 1), "Tokens(grid=(8, 12), prefix=1)")]
)
def test_a_grid_written_w_x_h_is_refused_where_its_fields_show_it(layout, fix):
    """A grid written W x H (as image sizes often are) holds as many tokens: every position read another token's
    field, (1, 0) reading token 8, on the first row. Where the grid does not divide the input into patches and its
    lengths in the input's order do, the token a row below the first must read rows further down."""
    with pytest.raises(ValueError, match="its token .* reads the input elsewhere along axis W than token") as refused:
        probe_rf(PatchTokens(), VIT_INPUT, (1, 0), layout=layout)
    assert f"pass layout={fix}" in str(refused.value)
    # A 1 x 3 grid read as 3 x 1: token (1, 0) is (0, 1), whose field starts at column 0 too (clipped there).
    with pytest.raises(ValueError, match="pass layout='tokens:1x3'"):
        probe_rf(OverlappingPatches(), (1, 3, 16, 48), (1, 0), layout="tokens:3x1")
    # A grid that does not divide the input, whose fields follow it (a resize inside the model), is read as given:
    # patch column 2 is resized columns 64..95, input columns 64 * 20 // 96 = 13 .. 95 * 20 // 96 = 19.
    assert probe_rf(ResizedPatches(), (1, 3, 30, 20), (0, 2), layout="tokens:2x3").bounds == ((0, 14), (13, 19))


@pytest.mark.parametrize(
    ("shape", "layout", "fix"),
    [
        ((1, 3, 24, 16), "tokens:4x6+1", "tokens:6x4+1"),  # portrait: (1, 0) read rows 4..7, columns 8..11
        ((1, 3, 16, 32), "tokens:8x4+1", "tokens:4x8+1"),  # both orders divide: (1, 0) read rows 0..3, columns 16..19
        ((1, 3, 32, 48), "tokens:4x24+1", "tokens:8x12+1"),  # as many tokens on another grid: (2, 12) read (5, 0)
        ((1, 3, 24, 16), "tokens:2x12+1", "tokens:6x4+1"),
    ],
)
def test_a_grid_not_the_models_is_refused_wherever_its_fields_show_it(shape, layout, fix):
    """Only a W x H grid that did not divide the input while the H x W one did, into square patches, on a landscape
    input, was refused: on a portrait input, where both orders divide it, or on another factoring of as many tokens,
    every position silently read another token's field. The fields of the tokens one step and all the way along each
    axis show the grid: on the model's, they read where the first token does along every other axis."""
    with pytest.raises(ValueError, match=f"the grid is not the model's .* pass layout={re.escape(repr(fix))}"):
        probe_rf(PatchTokens(), shape, (1, 0), layout=layout)
    grid = tuple(int(n) for n in fix.removeprefix("tokens:").removesuffix("+1").split("x"))
    field = probe_rf(PatchTokens(), shape, (grid[0] - 1, grid[1] - 1), layout=fix)
    assert field.bounds == ((4 * grid[0] - 4, 4 * grid[0] - 1), (4 * grid[1] - 4, 4 * grid[1] - 1))


class TokensMixedInTheirOrder(nn.Module):
    """2 x 4 patches on a 16 x 8 input (an 8 x 2 grid), then a Conv1d over the flat token sequence (PEG, Conformer)."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix = nn.Conv2d(3, 4, (2, 4), stride=(2, 4)), nn.Conv1d(4, 4, 3, padding=1)
        self.cls = nn.Parameter(torch.zeros(1, 1, 4))

    def forward(self, x):
        tokens = self.mix(self.embed(x).flatten(2)).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)


def test_tokens_mixed_in_their_flat_order_keep_their_grid():
    """Mixing along the flat order makes token (0, 1) read the next row's patch too, and the first token reads the
    whole width: a 16 x 1 grid, whose one column checks nothing, "kept the rule" and the right 8 x 2 grid was refused
    with layout='tokens:16x1+1', whose field is wrong. Another factoring counts only where its rule tells something."""
    assert probe_rf(TokensMixedInTheirOrder(), (1, 3, 16, 8), (3, 0), layout="tokens:8x2+1").bounds == ((4, 7), (0, 7))


class RegistersAfterPatches(PatchTokens):
    """A class token, the patch tokens, then 4 register tokens appended after them."""

    def __init__(self):
        super().__init__()
        self.registers = nn.Parameter(torch.randn(1, 4, 8))

    def forward(self, x):
        return torch.cat([super().forward(x), self.registers.expand(len(x), -1, -1)], dim=1)


def test_register_tokens_after_the_patches_read_as_a_prefix_are_warned():
    """Their count given as a prefix (tokens:4x6+5) shifts the grid by 4: token (0, 0) read patch (0, 4), input
    0..3, 16..19, without a word. A token's field that misses its own patch says so."""
    with pytest.warns(
        UserWarning, match=r"the field of token \(0, 0\) does not meet its own patch \(input 0..3, 0..3\)"
    ):
        probe_rf(RegistersAfterPatches(), (1, 3, 16, 24), (0, 0), layout="tokens:4x6+5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert probe_rf(PatchTokens(), (1, 3, 16, 24), (2, 5), layout="tokens:4x6+1").bounds == ((8, 11), (20, 23))


def test_a_video_tubelet_grid_in_another_order_is_refused():
    """2 x 4 x 4 tubelets are no cubes: the order check never ran on a 3D grid of them, and (0, 1, 0) of a 2 x 3 x 2
    grid read frames 0..1, rows 0..3, columns 8..11 (the model's token (0, 0, 2))."""

    class Tubelets(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv3d(1, 4, (2, 4, 4), stride=(2, 4, 4))
            self.cls = nn.Parameter(torch.zeros(1, 1, 4))

        def forward(self, x):
            tokens = self.embed(x).flatten(2).transpose(1, 2)
            return torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)

    for layout in ("tokens:2x3x2+1", "tokens:3x2x2+1"):
        with pytest.raises(ValueError, match="pass layout='tokens:2x2x3\\+1'"):
            probe_rf(Tubelets(), (1, 1, 4, 8, 12), (0, 1, 0), layout=layout)
    field = probe_rf(Tubelets(), (1, 1, 4, 8, 12), (0, 1, 0), layout="tokens:2x2x3+1")
    assert field.bounds == ((0, 1), (4, 7), (0, 3))


class FixedSizeChannelsLast(nn.Module):
    """A patch embedding, a position embedding for 16 x 24 inputs alone, then a product by a matrix on (N, H, W, C),
    as a ViTDet or SAM block ends: ``x @ w`` or ``einsum``."""

    def __init__(self, product: str):
        super().__init__()
        self.embed, self.product = nn.Conv2d(3, 8, 2, stride=2), product
        self.pos, self.w = nn.Parameter(torch.randn(1, 8, 12, 8)), nn.Parameter(torch.randn(8, 5))

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1) + self.pos
        return x @ self.w if self.product == "matmul" else torch.einsum("nhwc,cd->nhwd", x, self.w)


def test_a_channels_last_output_of_a_fixed_size_model_is_never_read_channels_first_silently():
    """(N, 8, 12, 5) read channels first gave 16 x 2 (input 0..15, 6..7) at (3, 2) without a word, where the cell
    reads 6..7 x 4..5: the flow of the axes ended at the product by a matrix, and the model runs on no other input
    to tell. A product by a fixed matrix acts on the last dim, as a linear layer does (refused as such); where the
    flow ends otherwise (an einsum), a warning says the axes after dim 1 follow the input."""
    shape = (1, 3, 16, 24)
    with pytest.raises(ValueError, match="the forward moved its spatial axes .* pass layout='channels_last'"):
        probe_rf(FixedSizeChannelsLast("matmul"), shape, (3, 2))
    with pytest.warns(UserWarning, match=r"its axes after dim 1, 8 x 12, follow the input's 16 x 24 by one stride"):
        probe_rf(FixedSizeChannelsLast("einsum"), shape, (3, 2))
    for product in ("matmul", "einsum"):
        field = probe_rf(FixedSizeChannelsLast(product), shape, (3, 2), layout="channels_last")
        assert field.bounds == ((6, 7), (4, 5))


def test_a_channels_first_output_with_strides_per_axis_is_not_taken_for_channels_last():
    """A spectrogram map strided (1, 2), then tokens with a position table for one input size and back to (N, C, H,
    W): its axes follow the input by a stride each, so no warning that it may be channels last."""

    class Spectrogram(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 16, 3, stride=(1, 2), padding=1)
            self.pos, self.mix = nn.Parameter(torch.zeros(1, 32 * 32, 16)), nn.Linear(16, 16)

        def forward(self, x):
            y = self.conv(x)
            tokens = self.mix(y.flatten(2).transpose(1, 2) + self.pos)
            return tokens.transpose(1, 2).reshape(y.shape)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert probe_rf(Spectrogram(), (1, 1, 32, 64), (5, 5)).bounds == ((4, 6), (9, 11))


def test_a_feature_map_read_as_tokens_is_refused_with_the_layouts_that_fit():
    with pytest.raises(ValueError) as info:
        probe_rf(TinySwin(), SWIN_INPUT, layout="tokens:8x8")
    assert str(info.value).startswith("layout='tokens:8x8' reads tokens (N, L, C), but the output of the model is")
    assert "(1, 8, 8, 8)" in str(info.value) and "pass layout='channels_last'" in str(info.value)


@pytest.mark.parametrize(
    ("model", "shape", "layout"),
    [
        (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)), (1, 2, 8, 10), "channels_last"),
        (nn.Sequential(nn.Conv1d(2, 6, 3, padding=1)), (1, 2, 20), "tokens:6"),
    ],
    ids=["channels last", "tokens"],
)
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_channels_first_output_read_with_its_channels_last_is_refused(model, shape, layout, mode):
    """Before, a (1, 4, 8, 10) convolution output read channels last gave a 4 x 8 map whose "rows" were channels
    (bounds 2..6 x 0..9 at (3, 4)), and a (1, 6, 20) one read as 6 tokens the whole signal; the mirror case (channels
    last read channels first) was already refused."""
    with pytest.raises(ValueError) as info:
        probe_rf(model, shape, 3 if len(shape) == 3 else (3, 4), layout=layout, mode=mode)
    assert f"layout={layout!r} reads the output of the model with its channels on the last axis" in str(info.value)
    assert "pass layout='channels_first'" in str(info.value)


@pytest.mark.parametrize("layout", ["tokens:14x14+", "tokens:0x14", "NHWC", "tokens:1x2x3x4", 3, None])
def test_a_value_that_is_no_layout_is_refused_naming_the_forms_allowed(layout):
    with pytest.raises(ValueError) as info:
        probe_rf(conv_stack(), (1, 2, 16, 16), layout=layout)
    assert str(info.value).startswith(f"layout={layout!r} is not a layout")
    assert "'channels_last'" in str(info.value) and "'tokens:14x14+1'" in str(info.value)


def test_tokens_is_a_frozen_value_with_a_string_form():
    assert Tokens(grid=[14, 14], prefix=1) == Tokens((14, 14), 1)
    assert str(Tokens((14, 14), 1)) == "tokens:14x14+1" and str(Tokens(7)) == "tokens:7"
    assert repr(Tokens((2, 3))) == "Tokens(grid=(2, 3), prefix=0)"
    with pytest.raises(ValueError, match=r"Tokens\(grid=\(14, 0\)\): grid must be 1 to 3 positive ints"):
        Tokens((14, 0))
    with pytest.raises(ValueError, match=r"Tokens\(prefix=-1\): prefix must be an int >= 0"):
        Tokens((14, 14), -1)
    with pytest.raises(AttributeError):
        Tokens((14, 14)).prefix = 2  # type: ignore[misc]


def test_a_position_off_the_token_grid_names_the_grid():
    with pytest.raises(ValueError, match=r"pos=\(8, 0\) is outside .* whose spatial shape is \(8, 12\)"):
        probe_rf(TinyViT(), VIT_INPUT, (8, 0), layout="tokens:8x12+1")


# --- attention in the theoretical copy --------------------------------------------------------------------------


class SplitAttention(nn.Module):
    """Two branches (3 x 3 and 5 x 5) weighted by a softmax over branches of a globally pooled gate (SKNet)."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.small, self.large = nn.Conv2d(1, channels, 3), nn.Conv2d(1, channels, 5)
        self.gate = nn.Linear(channels, 2 * channels)

    def forward(self, x):
        small, large = self.small(x)[..., 1:-1, 1:-1], self.large(x)
        weights = self.gate((small + large).mean(dim=(2, 3))).view(len(x), 2, -1).softmax(dim=1)
        return weights[:, 0, :, None, None] * small + weights[:, 1, :, None, None] * large


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_softmax_gate_over_branches_with_equal_values_keeps_its_global_path(dtype):
    # The theoretical copy gives both branches the same values, on which softmax's real gradient cancels exactly
    # (float64: the field was the 5 x 5 branch alone; float32 kept the gate only by rounding noise, 1e-11).
    field = probe_rf(SplitAttention(), (1, 1, 16, 16), (6, 6), dtype=dtype)
    assert field.bounds == ((0, 15), (0, 15)) and field.heatmap.min() > 1e-6 * field.heatmap.max()
    assert probe_rf(SplitAttention(), (1, 1, 16, 16), (6, 6), mode="weights").bounds == ((0, 15), (0, 15))


class CrossAttention(nn.Module):
    """1D: tokens of the first half query the second half (keys and values); optionally causal self-attention."""

    def __init__(self, fused: bool = False, causal: bool = False):
        super().__init__()
        self.fused, self.causal = fused, causal
        self.embed = nn.Conv1d(2, 4, 1)
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        tokens = self.embed(x).transpose(1, 2)
        queries, keys = (tokens, tokens) if self.causal else (tokens[:, :8], tokens[:, 8:])
        q, k, v = self.q(queries), self.k(keys), self.v(keys)
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        scores = q @ k.transpose(1, 2) / 2
        if self.causal:
            scores = scores.masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), -math.inf)
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fused", [False, True])
def test_the_query_path_of_attention_counts_in_theoretical_mode(mode, fused):
    # Query i sees its own token (through the query) and every key and value token, 8..15. The theoretical field
    # was 8..15 alone: softmax's gradient cancelled over equal values, and the query path with it.
    fields = probe_rf(CrossAttention(fused), (1, 2, 16), [(0,), (3,), (7,)], mode=mode, layout="channels_last")
    assert [f.bounds for f in fields] == [((0, 15),), ((3, 15),), ((7, 15),)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fused", [False, True])
def test_masked_scores_stay_out_of_the_field(mode, fused):
    model = CrossAttention(fused, causal=True)
    fields = probe_rf(model, (1, 2, 16), [(0,), (3,), (15,)], mode=mode, layout="channels_last")
    assert [f.bounds for f in fields] == [((0, 0),), ((0, 3),), ((0, 15),)]


def test_multihead_attention_module_sees_the_whole_input():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv1d(2, 8, 1)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            tokens = self.embed(x).transpose(1, 2)
            return tokens + self.attention(tokens, tokens, tokens, need_weights=False)[0]

    for mode in MODES:
        assert probe_rf(Encoder(), (1, 2, 12), 4, mode=mode, layout="channels_last").bounds == ((0, 11),)


class CausalAttention(nn.Module):
    """Causal self-attention over 16 tokens, masked with a finite float (``-1e4`` to ``finfo.min``) or causally."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embed = nn.Conv1d(2, 4, 1)
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        tokens = self.embed(x).transpose(1, 2)
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)
        hidden = ~torch.ones(16, 16, dtype=torch.bool).tril()
        if self.how == "sdpa finfo.min":
            mask = torch.zeros(16, 16).masked_fill(hidden, torch.finfo(torch.float32).min)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.how == "sdpa rectangular is_causal":  # the last 4 tokens query all 16: query i sees keys 0..i
            return F.scaled_dot_product_attention(q[:, 12:], k, v, is_causal=True)
        mask = torch.zeros(16, 16).masked_fill(hidden, float(self.how))
        return (q @ k.transpose(1, 2) + mask).softmax(-1) @ v


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["sdpa finfo.min", "-1e9", "-1e4"])
def test_a_finite_mask_keeps_masked_keys_out_of_the_field(mode, how):
    # Token i sees tokens 0..i. The softmax twin counted every finite score (a finfo.min, -1e9 or -1e4 mask
    # included) and gave token 0 the field 0..15.
    fields = probe_rf(CausalAttention(how), (1, 2, 16), [(0,), (3,), (15,)], mode=mode, layout="channels_last")
    assert [f.bounds for f in fields] == [((0, 0),), ((0, 3),), ((0, 15),)]


@pytest.mark.parametrize("mode", MODES)
def test_a_query_that_sees_one_key_gets_that_key_alone(mode):
    # Query i (token 12 + i) sees keys 0..i; with one key, the softmax is the constant 1 and the query's own token
    # drops out: fields {0}, {0, 1, 13}, {0, 1, 2, 14}, {0..3, 15}. The twin passed query 0 its own token 12.
    model = CausalAttention("sdpa rectangular is_causal")
    fields = probe_rf(model, (1, 2, 16), [(0,), (1,), (2,), (3,)], mode=mode, layout="channels_last")
    assert [f.bounds for f in fields] == [((0, 0),), ((0, 13),), ((0, 14),), ((0, 15),)]
    assert fields[1].heatmap.nonzero().flatten().tolist() == [0, 1, 13]


class OneChannelGate(nn.Module):
    """A 1 x 1 convolution gated by a softmax over a single channel of a 5 x 5 convolution: the gate is constant."""

    def __init__(self, gate: str):
        super().__init__()
        self.gate = gate
        self.value, self.score = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 5, padding=2)

    def forward(self, x):
        score = self.score(x)
        if self.gate == "softmax":
            weights = score.softmax(dim=1)
        elif self.gate == "log_softmax":
            weights = F.log_softmax(score, dim=1).exp()
        else:
            weights = F.softmin(score, dim=1)
        return self.value(x) * weights


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gate", ["softmax", "log_softmax", "softmin"])
def test_a_softmax_over_one_element_is_a_constant_that_adds_no_field(mode, gate):
    # The twin gave the 5 x 5 gate a share: 5 x 5 instead of the 1 x 1 value path.
    assert probe_rf(OneChannelGate(gate), (1, 1, 16, 16), (8, 8), mode=mode).bounds == ((8, 8), (8, 8))


class SpelledCrossAttention(CrossAttention):
    """The cross-attention above, spelled with keyword arguments or another name of softmax."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x):
        tokens = self.embed(x).transpose(1, 2)
        q, k, v = self.q(tokens[:, :8]), self.k(tokens[:, 8:]), self.v(tokens[:, 8:])
        if self.how == "sdpa keywords":
            return F.scaled_dot_product_attention(query=q, key=k, value=v)
        softmax = {"torch.special.softmax": torch.special.softmax, "torch._softmax": torch._softmax}[self.how]
        scores = q @ k.transpose(1, 2) / 2
        return (softmax(scores, -1) if self.how == "torch.special.softmax" else softmax(scores, -1, False)) @ v


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["sdpa keywords", "torch.special.softmax", "torch._softmax"])
def test_the_query_path_counts_however_attention_is_called(mode, how):
    # Was 8..15 alone in theoretical mode: the call bypassed the twin.
    fields = probe_rf(SpelledCrossAttention(how), (1, 2, 16), [(0,), (3,)], mode=mode, layout="channels_last")
    assert [f.bounds for f in fields] == [((0, 15),), ((3, 15),)]


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` over 16 tokens: cross (tokens 0..7 query 8..15), or self with a mask."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embed = nn.Conv1d(2, 8, 1)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.queries = nn.Parameter(torch.randn(1, 2, 8))

    def forward(self, x):
        t = self.embed(x).transpose(1, 2)
        causal = ~torch.ones(16, 16, dtype=torch.bool).tril()  # True: hidden
        if self.how == "cross":
            return self.attention(t[:, :8], t[:, 8:], t[:, 8:], need_weights=False)[0]
        if self.how == "learned query":  # two learned queries pool the 16 tokens, masked or not
            queries = self.queries.expand(len(x), -1, -1)
            return self.attention(queries, t, t, key_padding_mask=torch.zeros(len(x), 16, dtype=torch.bool))[0]
        if self.how == "causal":
            return self.attention(t, t, t, attn_mask=causal, need_weights=False)[0]
        if self.how == "diagonal hidden":
            mask = torch.eye(16).masked_fill(torch.eye(16, dtype=torch.bool), -math.inf)
            return self.attention(t, t, t, attn_mask=mask, need_weights=False)[0]
        padding = torch.zeros(len(x), 16, dtype=torch.bool)
        return self.attention(t, t, t, key_padding_mask=padding.index_fill(1, torch.tensor([15]), True))[0]


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("cross", "its query is not its key and value (cross-attention): the query path"),
        ("diagonal hidden", "its attn_mask hides some query's own token"),
        ("key padding", "it is given a key_padding_mask"),
    ],
)
def test_multihead_attention_that_would_lose_a_path_is_refused_in_theoretical_mode(how, reason):
    # The copy cannot reach the softmax inside F.multi_head_attention_forward: cross-attention measured 8..15
    # where query 0 sees 0 and 8..15.
    with pytest.raises(ProbeError) as info:
        probe_rf(MultiheadAttention(how), (1, 2, 16), (0,), layout="channels_last")
    assert str(info.value).startswith("nn.MultiheadAttention (F.multi_head_attention_forward) cannot be probed")
    assert reason in str(info.value) and "use mode='weights', or call F.scaled_dot_product_attention" in str(info.value)
    probe_rf(MultiheadAttention(how), (1, 2, 16), (0,), layout="channels_last", mode="weights")


@pytest.mark.parametrize("mode", MODES)
def test_multihead_self_attention_with_a_causal_mask_and_learned_queries_are_measured(mode):
    fields = probe_rf(MultiheadAttention("causal"), (1, 2, 16), [(0,), (3,), (15,)], mode=mode, layout="channels_last")
    assert [f.bounds for f in fields] == [((0, 0),), ((0, 3),), ((0, 15),)]
    pooled = probe_rf(MultiheadAttention("learned query"), (1, 2, 16), (0,), mode=mode, layout="channels_last")
    assert pooled.bounds == ((0, 15),)  # a learned query adds no path from the input: nothing to lose


# --- windows folded into the batch axis -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["tokens:2x2", "channels_first"])
def test_an_output_with_windows_in_its_batch_axis_is_refused_naming_the_layer_that_merges_them(mode, layout):
    # The qkv of a windowed block is (16 windows, 4 tokens, 24): read as tokens, every field was the union over
    # the windows (28 x 28); read channels first, the message sent the user to layout='tokens:...'.
    with pytest.raises(ValueError) as info:
        probe_rf(TinySwin(window=2), SWIN_INPUT, (0, 0), layer="blocks.0.attn.qkv", mode=mode, layout=layout)
    message = str(info.value)
    rows, held = (16, "one sample") if mode == "theoretical" else (128, "8 samples")  # 8 draws in weights mode
    assert message.startswith(f"the output of layer 'blocks.0.attn.qkv' is ({rows}, 4, 24)")
    assert f"its first axis holds {rows} where the input holds {held}" in message
    assert "folds something into the batch axis" in message
    assert message.endswith("probe the layer that merges them back instead, layer='blocks.0.attn'")
    assert "tokens:HxW" not in message


def test_effective_rf_refuses_an_output_with_windows_in_its_batch_axis():
    with pytest.raises(ValueError, match="folds something into the batch axis"):
        effective_rf(TinySwin(window=2), torch.randn(2, 3, 32, 32), (0, 0), layer="blocks.0.attn.qkv",
                     layout="tokens:2x2")  # fmt: skip


def test_a_model_whose_output_holds_windows_is_refused():
    class Windows(nn.Module):  # 16 windows of 8 x 8 folded into the batch axis, a convolution on each
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(x.view(len(x), 1, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(-1, 1, 8, 8))

    for mode in MODES:  # was 26 x 26 at (0, 0): the union of the 16 windows' 3 x 3
        with pytest.raises(ValueError, match=r"is \(\d+, 2, 8, 8\): its first axis holds .* holds one map per sample"):
            probe_rf(Windows(), (1, 1, 32, 32), (0, 0), mode=mode)


# --- rf_table ---------------------------------------------------------------------------------------------------


def test_rf_table_reads_a_swin_channels_last_after_its_channels_first_patch_embedding():
    model = TinySwin(dim=12, window=2, shifted=True)  # 12 channels: (1, 12, 8, 8) tells the conv from the blocks
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rows = rf_table(model, SWIN_INPUT, layout="channels_last")
    said = [str(w.message) for w in record]  # one warning: the rows inside the windows are left out, and why
    assert len(said) == 1 and "4 rows are left out, whose first axis holds more than the one sample" in said[0]
    assert "blocks.0.attn.qkv (16, 4, 36)" in said[0]
    by_name = {r.name: r for r in rows}
    assert by_name["patch"].layout == "channels_first" and by_name["patch"].output_shape == (1, 12, 8, 8)
    assert {r.layout for r in rows if r.name != "patch"} == {"channels_last"}
    assert by_name["permute"].bounds == ((16, 19), (16, 19)) and by_name["permute"].stride == (4, 4)
    assert by_name["blocks.0.attn"].bounds == ((16, 23), (16, 23))  # the window of patch (4, 4)
    assert by_name["blocks.1"].bounds == ((8, 23), (8, 23))  # and the shifted window after it
    assert by_name["blocks.0.mlp.0"].output_shape == (1, 8, 8, 24) and by_name["blocks.0.mlp.0"].position == (4, 4)
    assert "blocks.0.attn.qkv" not in by_name  # windows folded into the batch axis: no map of the input
    for row in rows:
        field = probe_rf(model, SWIN_INPUT, "center", layer=row.name, layout=row.layout)
        assert (field.bounds, field.position) == (row.bounds, row.position), row.name
    assert by_name["blocks"].to_dict()["layout"] == "channels_last"


def test_rf_table_by_default_leaves_out_last_axis_rows_and_the_rows_shaped_like_them():
    with pytest.warns(UserWarning) as record:
        rows = rf_table(TinySwin(dim=12), SWIN_INPUT)
    folded, contradicted, misfits = [str(w.message) for w in record]
    assert "whose first axis holds more than the one sample" in folded and "blocks.0.attn.qkv" in folded
    assert "blocks.0.norm1 (1, 8, 8, 12)" in misfits and "pass layout='channels_last'" in misfits
    # a permute's output, whose dim 1 the flow follows to a spatial axis, is no row either
    assert "the output of layer 'permute' is (1, 8, 8, 12), whose dim 1 channels first would read" in misfits
    # channels-last rows that no module type gives away, but shaped like the LayerNorm's output: not read at all
    assert "read in layout='channels_first' only because it says so" in contradicted
    assert "blocks.0.attn (1, 8, 8, 12) (like blocks.0.norm1, acting on its last axis)" in contradicted
    assert [r.name for r in rows] == ["patch"]
    with pytest.raises(ValueError, match="layers=\\['blocks.0.mlp.1'\\]: layer 'blocks.0.mlp.1' returns the output"):
        rf_table(TinySwin(), SWIN_INPUT, layers=["blocks.0.mlp.1"])
    with pytest.raises(ValueError, match=r"\(16, 4, 24\): its first axis holds 16 where the input holds one sample"):
        rf_table(TinySwin(), SWIN_INPUT, layers=["blocks.0.attn.qkv"], layout="channels_last")


def test_rf_table_leaves_out_rows_whose_shape_cannot_tell_the_layouts_apart():
    with pytest.warns(UserWarning, match=r"permute \(1, 8, 8, 8\) \(like patch, channels first\)"):
        rows = rf_table(TinySwin(dim=8), SWIN_INPUT, layout="channels_last")  # (1, 8, 8, 8) either way
    assert [r.name for r in rows] == ["patch", "blocks.0.mlp.0", "blocks.0.mlp.1"]  # the MLP's (1, 8, 8, 16) fits one
    (row,) = rf_table(TinySwin(dim=8), SWIN_INPUT, layout="channels_last", layers=["blocks"])  # the user's word
    assert row.layout == "channels_last" and row.bounds == ((16, 23), (16, 23))


class ConvNeXtBlock(nn.Module):
    """torchvision's CNBlock: depthwise 7 x 7, then a channels-last MLP between two permutes, and the residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute(0, 2, 3, 1), nn.LayerNorm(dim),
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), Permute(0, 3, 1, 2),
        )  # fmt: skip

    def forward(self, x):
        return x + self.block(x)


def tiny_convnext() -> nn.Module:
    """A 4 x 4 stride-4 stem (12 channels) and two ConvNeXt blocks: channels first outside, channels last inside."""
    return nn.Sequential(nn.Conv2d(3, 12, 4, stride=4), nn.Sequential(ConvNeXtBlock(12), ConvNeXtBlock(12)))


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_rf_table_on_a_convnext_prints_every_row_right_in_either_layout(layout):
    model, shape = tiny_convnext(), (1, 3, 64, 32)
    with pytest.warns(UserWarning) as record:
        rows = rf_table(model, shape, layout=layout)
    messages = [str(w.message) for w in record]
    if layout == "channels_first":  # the rows kept on layout='s word alone are named beside the misfits
        (misfits,) = [message for message in messages if "do not fit the layout" in message]
        assert misfits.endswith("may be laid out as those left out are: 1.0.block.6, 1.0, 1.1.block.6, 1.1")
        assert "the forward moved a spatial axis of the input there" in misfits  # the permuted MLP, by the flow
    else:
        assert any("only because it says so, while their shapes say otherwise" in message for message in messages)
    for row in rows:  # each row as probed alone, in the layout the table read it in
        field = probe_rf(model, shape, "center", layer=row.name, layout=row.layout)
        assert (field.bounds, field.position) == (row.bounds, row.position), row.name
    blocks = {"1.0", "1.1"}
    if layout == "channels_first":  # the blocks (channels first) are read, their channels-last inside is not
        assert blocks <= {r.name for r in rows} and {r.layout for r in rows} == {"channels_first"}
    else:  # the MLP inside is read channels last; the blocks, shaped like the stem, are left out
        assert not blocks & {r.name for r in rows} and "1.0.block.3" in {r.name for r in rows}


class TwoBranches(nn.Module):
    """A custom module, channels first: a concatenation of a 3 x 3 and a 5 x 5 convolution."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 5, padding=2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_rf_table_leaves_out_a_row_whose_channels_follow_the_input_in_the_layout_it_would_be_read_in():
    """Read channels last on layout='s word alone, the (1, 12, 10, 10) output was a 12 x 10 map of 10 channels: a
    20 x 40 row with no stride. Its true field is 20 x 20 (stem k4 s4, then k5 p2: r = 4 + 4 * 4, S = 4, P = 8)."""
    model = nn.Sequential(
        nn.Conv2d(3, 6, 4, stride=4), TwoBranches(), nn.Conv2d(12, 8, 2, stride=2), Permute(0, 2, 3, 1)
    )
    with pytest.warns(
        UserWarning, match=r"1 row is left out.*1 \(1, 12, 10, 10\) \(the axis read as its channels follows"
    ):
        rows = rf_table(model, (1, 3, 40, 40), layout="channels_last")
    assert "1" not in {r.name for r in rows}
    assert probe_rf(model, (1, 3, 40, 40), "center", layer="1").span == ((12, 31), (12, 31))
    (row,) = rf_table(model, (1, 3, 40, 40), layers="1")  # channels first, as it is: the same field
    assert (row.size, row.stride, row.offset) == ((20, 20), (4, 4), (8, 8))


def test_rf_table_reads_token_rows_on_the_grid():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = rf_table(TinyViT(), VIT_INPUT, layout=Tokens((8, 12), 1))
    by_name = {r.name: r for r in rows}
    assert by_name["embed.patch"].layout == "channels_first" and by_name["embed"].layout == "tokens:8x12+1"
    assert by_name["embed"].bounds == ((16, 19), (24, 27)) and by_name["embed"].stride == (4, 4)
    assert by_name["blocks"].bounds == ((0, 31), (0, 47)) and by_name["blocks"].covers_input


# --- rf-probe ---------------------------------------------------------------------------------------------------


def fields_of(text: str) -> dict[str, str]:
    return {line[:10].strip(): line[10:] for line in text.splitlines() if line[:1].isalpha()}


def test_rf_probe_layout_channels_last_and_tokens(capsys):
    assert main(["tests.test_layouts:tiny_swin", "--input-shape", "3,32,32", "--layout", "channels_last",
                 "--pos", "3,5", "--quiet"]) == 0  # fmt: skip
    printed = fields_of(capsys.readouterr().out)
    assert printed["bounds"] == "8..15, 16..23" and printed["output"] == "8 x 8 (theoretical, read as channels_last)"
    assert main(["tests.test_layouts:tiny_vit", "--input-shape", "3,32,48", "--layout", "tokens:8x12+1",
                 "--layer", "embed", "--pos", "2,5", "--quiet"]) == 0  # fmt: skip
    assert fields_of(capsys.readouterr().out)["bounds"] == "8..11, 20..23"
    assert main(["tests.test_layouts:tiny_swin", "--input-shape", "3,32,32", "--layout", "channels_last", "--table",
                 "--quiet"]) == 0  # fmt: skip
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:4] == ["layer", "type", "output", "layout"]
    assert table[2].split()[:3] == ["patch", "Conv2d", "1"] and "channels_first" in table[2]
    assert "channels_last" in table[3]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layout", "tokens:8x"], "--layout 'tokens:8x' is not a layout"),
        (["--layout", "NHWC"], "use channels_first (default: N,C,H,W), channels_last (N,H,W,C) or tokens:HxW+P"),
        (["--layout", "tokens:8x8", "--gif", "a.gif"], "--gif sweeps channels-first output maps only"),
        ([], "the output of the model is (1, 97, 8), which --layout channels_first reads as 1 spatial axis"),
        (["--layout", "tokens:8x12"], "97 tokens, not 0 + 8*12 = 96 as --layout tokens:8x12 says; if the first token "
                                      "is a class or register token, pass --layout tokens:8x12+1"),
    ],
)  # fmt: skip
def test_rf_probe_refuses_a_layout_that_does_not_fit_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(["tests.test_layouts:tiny_vit", "--input-shape", "3,32,48", "--quiet", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    if not argv:
        assert "pass --layout tokens:HxW+P" in err


class ConvNeXtStyleBlock(nn.Module):
    """A stem, then a block that permutes to channels last for its LayerNorm and MLP and back: (N, C, H, W), C = H."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.stem, self.depthwise = nn.Conv2d(3, dim, 2, stride=2), nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm, self.mlp = (
            nn.LayerNorm(dim),
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
        )

    def forward(self, x):
        x = self.stem(x)
        return x + self.mlp(self.norm(self.depthwise(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class SeriesAttention(nn.Module):
    """Patches of 4 samples, an attention block on (N, L, C), transposed back to channels first (N, C, L), C = L."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.patch, self.block = nn.Conv1d(1, dim, 4, stride=4), ViTBlock(dim)

    def forward(self, x):
        return self.block(self.patch(x).transpose(1, 2)).transpose(1, 2)


class FlattenedBlock(ConvNeXtStyleBlock):
    """The block's (N, C, H, W) output flattened to (N, C, H*W): channels first, C = H*W = 16 on an 8 x 8 input."""

    def __init__(self):
        super().__init__(dim=16)

    def forward(self, x):
        return super().forward(x).flatten(2)


class CountsItsCalls(nn.Module):
    """A convolution permuted channels last, scaled by a buffer its forward increments (a step counter)."""

    def __init__(self):
        super().__init__()
        self.conv, self.linear = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8)
        self.register_buffer("steps", torch.ones(1))

    def forward(self, x):
        self.steps.add_(1)
        return self.linear(self.conv(x).permute(0, 2, 3, 1)) * self.steps


def test_the_layout_check_reads_2d_token_outputs_and_writes_no_buffer_the_graph_saved():
    """The check read the other input's output channels first, which a token output of a 2D input does not fit: it
    never ran there (a flattened (N, C, H*W) map read as tokens:4x4 gave the bounds of channel rows). And its forward
    wrote into the copy's step counter, which the probe's graph had saved: weights mode failed in its backward."""
    with pytest.raises(ValueError, match=r"its last axis follows the input, 16 -> 4, and dim 1 keeps its length"):
        probe_rf(FlattenedBlock(), (1, 3, 8, 8), (0, 3), layout="tokens:4x4", mode="weights")
    field = probe_rf(CountsItsCalls(), (1, 3, 16, 16), (3, 3), layout="channels_last", mode="weights")
    assert field.bounds == ((2, 4), (2, 4))


def test_a_channels_first_output_read_channels_last_or_as_tokens_is_refused_where_the_forward_cannot_tell():
    """Weights mode (which carries no flow), and a theoretical forward whose flow ends at attention, let a
    channels-first output be read channels last or as tokens after a permute anywhere: weights mode gave the bounds
    of another cell ((8, 13), (0, 15) where cell (1, 5) reads (0, 5), (8, 13)), and the effective field of a series
    the map of channel 3 for position 3. An input half as long shows the channels on dim 1."""
    model = ConvNeXtStyleBlock()
    assert probe_rf(model, (1, 3, 16, 16), (1, 5)).bounds == ((0, 5), (8, 13))
    with pytest.raises(ValueError, match=r"its last axis follows the input, 8 -> 4, and dim 1 keeps its length"):
        probe_rf(model, (1, 3, 16, 16), (1, 5), layout="channels_last", mode="weights")
    with pytest.raises(ValueError, match=r"answer for the wrong cell"):  # the theoretical flow follows the permutes
        probe_rf(model, (1, 3, 16, 16), (1, 5), layout="channels_last")
    series = SeriesAttention()
    for call in (lambda: probe_rf(series, (1, 1, 64), 3, layout="tokens:16", mode="weights"),
                 lambda: effective_rf(series, torch.randn(4, 1, 64), 3, layout="tokens:16")):  # fmt: skip
        with pytest.raises(ValueError, match=r"reads the output of the model with its channels on the last axis"):
            call()
    assert probe_rf(ChannelsLast(conv_stack()), (1, 2, 16, 16), (1, 1), layout="channels_last", mode="weights")


# --- RFCallback -------------------------------------------------------------------------------------------------


class ChannelsLastClassifier(pl.LightningModule):
    """conv3 s2 p1 -> (N, H, W, C) -> LayerNorm -> Linear, GELU (per pixel) = ``features``, channels last; mean, head.

    At ``features`` (8 x 8 on a 16 x 16 input), position (4, 4) sees [7, 9] on both axes: r = 3, S = 2, P = 1.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), Permute(0, 2, 3, 1), nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU()
        )
        self.head = nn.Linear(8, 3)
        self.example_input_array = torch.zeros(2, 1, 16, 16)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(1, 2)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_callback_probes_a_channels_last_layer_in_a_real_fit(tmp_path):
    train, val = loaders(n=16)
    callback = RFCallback((4, 4), layer="features", layout="channels_last", erf_samples=8, log_images=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, logger=False), callbacks=[callback])
    trainer.fit(ChannelsLastClassifier(), train, val)
    assert [h["fields"][0]["bounds"] for h in callback.history] == [[[7, 9], [7, 9]]] * 2
    assert callback.history[-1]["effective"]["4_4"]["extent0.95_h"] <= 3


class TokenClassifier(pl.LightningModule):
    """A TinyViT (4 x 4 patches after a class token) and a head on the class token, for RGB images."""

    def __init__(self):
        super().__init__()
        self.vit, self.head = TinyViT(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.vit(x)[:, 0])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_callback_reads_no_token_grid_on_validation_inputs_shaped_otherwise(tmp_path):
    """Probed on 16 x 24 inputs (a 4 x 6 grid) and validated on 24 x 16 ones (6 x 4, as many tokens): the effective
    field read the 4 x 6 grid there, and logged token 1 + 5 (cell (1, 1) of the real grid) as cell (0, 5)."""
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 24, 16, generator=generator), int(i % 3)) for i in range(8)]
    train = torch.utils.data.DataLoader(data, batch_size=4)
    callback = RFCallback(
        (0, 5), layer="vit.embed", layout="tokens:4x6+1", input_shape=(1, 3, 16, 24), log_images=False
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, logger=False), callbacks=[callback])
    with pytest.warns(UserWarning, match=r"names the token grid of the probed input only"):
        trainer.fit(TokenClassifier(), train, torch.utils.data.DataLoader(data, batch_size=4))
    assert callback.history[-1]["fields"][0]["bounds"] == [[0, 3], [20, 23]]
    assert not callback.history[-1].get("effective")


def test_callback_checks_layout_at_construction_and_keys_its_state_by_it():
    with pytest.raises(MisconfigurationException, match=r"^RFCallback\(layout='NHWC' is not a layout"):
        RFCallback(layout="NHWC")
    assert "layout" not in RFCallback(layer="features").state_key
    assert RFCallback(layout="tokens:8x8+1").state_key == RFCallback(layout=Tokens((8, 8), 1)).state_key
    assert "tokens:8x8+1" in RFCallback(layout=Tokens((8, 8), 1)).state_key


def test_a_layout_that_does_not_fit_ends_the_run_before_the_first_step(tmp_path):
    callback = RFCallback((4, 4), layer="features", layout="tokens:8x8", effective=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, logger=False), callbacks=[callback])
    with pytest.raises(MisconfigurationException, match=r"layout='tokens:8x8' reads tokens \(N, L, C\)"):
        trainer.fit(ChannelsLastClassifier(), *loaders(n=16))


def test_lightning_cli_takes_the_layout_as_a_string(tmp_path):
    cli = pytest.importorskip("lightning.pytorch.cli")
    pytest.importorskip("jsonargparse")
    args = ["--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=rf_callback.RFCallback", "--trainer.callbacks.layer=features",
            "--trainer.callbacks.layout=tokens:14x14+1"]  # fmt: skip
    run = cli.LightningCLI(ChannelsLastClassifier, args=args, run=False)
    (callback,) = [c for c in run.trainer.callbacks if isinstance(c, RFCallback)]
    assert callback.layout == "tokens:14x14+1" and "tokens:14x14+1" in callback.state_key


def test_rf_probe_says_the_tables_warnings_in_its_own_words(capsys):
    assert main(["tests.test_layouts:tiny_swin", "--input-shape", "3,32,32", "--table", "--quiet"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rf-probe: warning: rf_table:")]
    assert len(lines) == 3 and "layout=" not in err  # the rows folded into windows, contradicted, misfits
    assert "pass --layout channels_last" in err and "read in --layout channels_first only because it says so" in err
    assert "list them in --layer NAME (once per layer) to read them in --layout channels_first" in err


# --- Swin's shifted windows with torchvision's and timm's -100 mask (issue 16) -----------------------------------


class MaskedShiftedAttention(WindowAttention):
    """Shifted-window attention as torchvision and timm write it: roll, windows, and a mask of -100 between tokens
    that the roll brought together from opposite borders (Swin's regions), added to the scores before the softmax."""

    def forward(self, x):
        n, h, w, c = x.shape
        ws, s = self.window, self.shift
        x = torch.roll(x, (-s, -s), dims=(1, 2))
        windows = x.view(n, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        region = torch.zeros(h, w)
        for k, rows in enumerate((slice(0, -ws), slice(-ws, -s), slice(-s, None))):
            for m, cols in enumerate((slice(0, -ws), slice(-ws, -s), slice(-s, None))):
                region[rows, cols] = 3 * k + m
        region = region.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        mask = (region[:, None, :] - region[:, :, None]).ne(0).float() * -100.0  # (windows, tokens, tokens)
        q, k, v = self.qkv(windows).chunk(3, dim=-1)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(c)).view(n, -1, ws * ws, ws * ws) + mask
        out = self.proj(F.softmax(scores.view(-1, ws * ws, ws * ws), dim=-1) @ v)
        out = out.view(n, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
        return torch.roll(out, (s, s), dims=(1, 2))


@pytest.mark.parametrize("mode", MODES)
def test_a_minus_100_mask_keeps_the_wrapped_strip_out_of_a_shifted_windows_field(mode):
    # Windows of 2 patches shifted by 1 on 8 x 8 patches: patch 7 shares its shifted window with patch 0, which the
    # roll brought from the other border, and the mask keeps them apart: patch 7 sees its first-block window alone,
    # pixels 24..31. Counting the masked keys (the twin's mask list stopped at -1e4) gave 0..31.
    torch.manual_seed(0)
    model = TinySwin(window=2, shifted=True)
    model.blocks[1].attn = MaskedShiftedAttention(8, 2, 1)
    positions = [(7, 7), (0, 0), (7, 3), (3, 4)]
    fields = probe_rf(model, SWIN_INPUT, positions, mode=mode, layout="channels_last")
    assert [f.bounds for f in fields] == [
        ((24, 31), (24, 31)),
        ((0, 7), (0, 7)),
        ((24, 31), (8, 23)),
        ((8, 23), (8, 23)),
    ]


@pytest.mark.parametrize("mode", MODES)
def test_a_minus_100_causal_mask_keeps_masked_keys_out_of_the_field(mode):
    fields = probe_rf(CausalAttention("-100"), (1, 2, 16), [(0,), (3,)], mode=mode, layout="channels_last")
    assert [f.bounds for f in fields] == [((0, 0),), ((0, 3),)]


# --- a channels-last output read channels first is refused, not measured for minutes (issue 16) ------------------


class FixedInput(nn.Module):
    """Runs ``inner`` on inputs of one shape only, as a model with fixed position embeddings does."""

    def __init__(self, inner: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.inner, self.shape = inner, shape

    def forward(self, x):
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"expected {self.shape}, got {tuple(x.shape[1:])}")
        return self.inner(x)


def nhwc_stage(channels: int) -> nn.Module:
    """A patch embedding, then channels last, a LayerNorm and a Linear: (N, H/2, W/2, channels)."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 2, stride=2), Permute(0, 2, 3, 1), nn.LayerNorm(channels), nn.Linear(channels, channels)
    )


@pytest.mark.parametrize(
    ("model", "shape", "evidence"),
    [
        (nhwc_stage(64), (1, 3, 32, 32), "16 -> 32"),  # its channels (64) are longer than the input (32)
        (nhwc_stage(8), (1, 3, 48, 48), "24 -> 48"),  # shorter, but as long as its Linear's features
        (TinySwin(window=2), SWIN_INPUT, "8 -> 16"),  # (1, 8, 8, 8): the shape alone reads either way
        (ChannelsLast(nn.Conv1d(2, 40, 3, padding=1)), (1, 2, 20), "20 -> 40"),  # 1D (N, L, C)
    ],
)
def test_a_channels_last_output_read_channels_first_is_refused_with_the_fix(model, shape, evidence):
    # the theoretical forward follows the spatial axes through the permute; weights mode grows the input to tell
    with pytest.raises(ValueError, match=r"the forward moved its spatial axes.*pass layout='channels_last'|"
                       rf"it is channels last .*\({evidence}\).*pass layout='channels_last'"):  # fmt: skip
        probe_rf(model, shape)
    with pytest.raises(ValueError, match=rf"it is channels last .*\({evidence}\).*pass layout='channels_last'"):
        probe_rf(model, shape, mode="weights")


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_convolutions_output_permuted_to_few_channels_last_is_refused_without_any_hint_in_its_shape(mode):
    """(1, 9, 9, 4): no axis longer than the input, no linear layer; read channels first it was a 9 x 4 map of 9
    channels, and the probe answered for the wrong cells without a word."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3, stride=2), Permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"\(1, 9, 9, 4\).*pass layout='channels_last'"):
        probe_rf(model, (1, 3, 40, 40), mode=mode)
    field = probe_rf(model, (1, 3, 40, 40), (4, 4), layout="channels_last", mode=mode)
    assert field.output_shape == (9, 9) and field.bounds == ((16, 22), (16, 22))


class Moved(nn.Module):
    """A convolution, then its channels moved by ``move`` (a function of the output)."""

    def __init__(self, move):
        super().__init__()
        self.conv, self.move = nn.Conv2d(3, 4, 3, stride=4), move

    def forward(self, x):
        return self.move(self.conv(x))


@pytest.mark.parametrize(
    "move",
    [lambda y: y.movedim(1, -1), lambda y: torch.transpose(y, 1, 3).transpose(1, 2), lambda y: y.permute(0, 2, 3, 1)],
    ids=["movedim", "two transposes", "permute"],
)
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_channels_moved_last_by_any_permute_like_call_are_refused(move, mode):
    with pytest.raises(ValueError, match=r"\(1, 10, 10, 4\).*pass layout='channels_last'"):
        probe_rf(Moved(move), (1, 3, 40, 40), mode=mode)


def test_spatial_axes_swapped_among_themselves_stay_channels_first():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Permute(0, 1, 3, 2))
    field = probe_rf(model, (1, 3, 12, 20), (3, 5))
    assert field.output_shape == (18, 10) and field.bounds == ((5, 7), (3, 5))


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 4, 2, stride=2)), (1, 3, 16, 16)),
        (nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.Upsample(scale_factor=4)), (1, 1, 10)),  # a 1D signal
        (nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Upsample(scale_factor=2)), (1, 1, 4, 6, 6)),  # a volume
        (ConvNeXtBlock(8), (1, 8, 8, 8)),  # Linear layers inside, channels first outside, C = W
    ],
)
def test_a_channels_first_output_longer_than_its_input_is_measured_without_a_word(model, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        field = probe_rf(model, shape)
    assert field.heatmap.shape == shape[2:] and min(field.size) >= 1


def test_a_channels_last_hint_the_model_cannot_decide_is_a_warning_at_once():
    model = FixedInput(nhwc_stage(64), (3, 32, 32))  # it refuses the doubled input that would decide
    with pytest.warns(UserWarning, match=r"\(64\) is longer than the input's \(32\).*pass layout='channels_last'"):
        probe_rf(model, (1, 3, 32, 32), (3, 3), mode="weights")
    with pytest.raises(ValueError, match="the forward moved its spatial axes"):  # the theoretical forward saw it
        probe_rf(model, (1, 3, 32, 32), (3, 3))
    assert probe_rf(model, (1, 3, 32, 32), (3, 3), layout="channels_last").bounds == ((6, 7), (6, 7))


class PositionEmbedded(TinyViT):
    """A TinyViT whose tokens get learned position embeddings: added whatever the input, as timm's ViTs do."""

    def __init__(self):
        super().__init__(depth=2)
        self.position = nn.Parameter(torch.randn(1, 1 + 8 * 12, 8))

    def forward(self, x):
        return self.blocks(self.embed(x) + self.position)


def test_verify_rf_passes_a_vit_whose_position_embeddings_reach_the_output_without_the_input():
    # The output on an input of zeros is not zero (the embeddings and the class token): verify_rf compared the
    # outside's output with zero, saw influence where there is none, and failed the whole-input field (timm's ViTs).
    model = PositionEmbedded()
    field = probe_rf(model, VIT_INPUT, (3, 5), layout="tokens:8x12+1")
    assert field.bounds == ((0, 31), (0, 47))
    assert verify_rf(model, field).passed
    local = probe_rf(model, VIT_INPUT, (3, 5), layer="embed", layout="tokens:8x12+1")  # one patch, before attention
    assert local.bounds == ((12, 15), (20, 23)) and verify_rf(model, local).passed
    assert not verify_rf(model, dataclasses.replace(local, bounds=((12, 14), (20, 23)))).passed


@pytest.mark.parametrize("shifted", [False, True])
def test_windowed_attention_has_no_geometry_and_says_why_at_once(shifted, monkeypatch):
    from rf_callback.core.graph import ProbeGraph

    passes = []
    gradient_map = ProbeGraph.gradient_map
    monkeypatch.setattr(
        ProbeGraph, "gradient_map", lambda self, p, *rest: passes.append(len(p)) or gradient_map(self, p, *rest)
    )
    torch.manual_seed(0)
    field = probe_rf(TinySwin(window=2, shifted=shifted), (1, 3, 64, 64), (3, 4), layout="channels_last")
    assert list(field.geometry) == [None, None]
    assert all("attention in windows" in reason for reason in field.geometry.reasons)
    # Two neighbours with the same whole field on two lengths decide it (28 and 57 passes before: it grew 32 times,
    # then read full tables on larger inputs).
    assert len(passes) <= 24


class FixedGridTokens(nn.Module):
    """A ViT's patch embedding (4 x 4 patches) after a class token, on a fixed 4 x 6 grid (a position embedding)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls, self.pos = nn.Parameter(torch.zeros(1, 1, 8)), nn.Parameter(torch.zeros(1, 24, 8))

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)


def test_a_short_token_axis_says_it_has_too_few_fields_not_that_they_fit_no_geometry():
    """4 tokens along h: fields 4i..4i+3 fit r = 4, S = 4, P = 0, but too few lie certainly inside the input to tell,
    and the grid is fixed (before, the reason said they fit no single (r, S, P))."""
    field = probe_rf(FixedGridTokens(), (1, 3, 16, 24), (1, 2), layout="tokens:4x6+1")
    assert field.bounds == ((4, 7), (8, 11))
    assert tuple(field.geometry) == (None, AxisGeometry(size=4, stride=4, offset=0))
    assert "too few to tell r, S and P" in field.geometry.reasons[0]


class AlibiAttention(nn.Module):
    """Causal self-attention over a 1D sequence with ALiBi: a bias of -slope per step back added to the scores."""

    def __init__(self, width: int = 8, slope: float = 0.5):
        super().__init__()
        self.embed, self.qkv, self.slope = nn.Conv1d(1, width, 1), nn.Linear(width, 3 * width), slope

    def forward(self, x):
        tokens = self.embed(x).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        steps = torch.arange(tokens.shape[1], dtype=tokens.dtype)
        scores = q @ k.transpose(-1, -2) / tokens.shape[-1] ** 0.5 - self.slope * (steps[:, None] - steps[None, :])
        future = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).triu(1)
        return (scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v).transpose(1, 2)


def test_a_graded_attention_bias_is_no_mask():
    """ALiBi puts a key 200 steps back 100 below the nearest: the rule "50 or more below the largest is masked" (for
    -inf, -1e9 or Swin's -100) dropped every key more than 100 steps back, in both modes: position 200 read 101..200
    (weights mode 100..200), where its float64 gradient reaches input 0 (2e-44). A mask leaves a gap of 50 or more
    below every live score; a graded bias leaves none, and its keys stay live."""
    for mode in ("theoretical", "weights"):
        assert probe_rf(AlibiAttention(), (1, 1, 256), 200, mode=mode).bounds == ((0, 200),), mode
