"""Tests of rf_callback.plotting: figure layout, box geometry, image overlays, argument errors and the GIF."""

from __future__ import annotations

import dataclasses

import matplotlib.image
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from rf_callback.core.result import AxisGeometry, ReceptiveField
from rf_callback.plotting import animate_rf, plot_rf
from rf_callback.plotting.animation import _raster_positions

SPATIAL_2D = (16, 20)


def make_field(
    spatial: tuple[int, ...],
    bounds: tuple[tuple[int, int], ...],
    position: tuple[int, ...],
    output_shape: tuple[int, ...],
    *,
    heatmap: bool = True,
) -> ReceptiveField:
    """A field whose heatmap is a positive bump exactly inside ``bounds``, peaking at 5 in its first cell."""
    heat = None
    if heatmap:
        heat = torch.zeros(spatial, dtype=torch.float64)
        box = tuple(slice(first, last + 1) for first, last in bounds)
        heat[box] = 1.0
        heat[tuple(first for first, _ in bounds)] = 5.0
    return ReceptiveField(
        position=position,
        bounds=bounds,
        input_shape=(1, 3, *spatial),
        output_shape=output_shape,
        geometry=tuple(AxisGeometry(size=5, stride=2, offset=0) for _ in spatial),
        mode="theoretical",
        heatmap=heat,
    )


def field_2d(bounds=((3, 7), (5, 10)), position=(2, 3), *, heatmap: bool = True) -> ReceptiveField:
    return make_field(SPATIAL_2D, bounds, position, (6, 8), heatmap=heatmap)


def patches_with_gid(ax, gid: str) -> list[Rectangle]:
    return [p for p in ax.patches if p.get_gid() == gid]


def rect_geometry(rect: Rectangle) -> tuple[float, float, float, float]:
    x, y = rect.get_xy()
    return x, y, rect.get_width(), rect.get_height()


# plot_rf, 2D


def test_plot_2d_has_input_colorbar_and_output_panels():
    fig = plot_rf(field_2d())
    assert isinstance(fig, Figure)
    ax_in, ax_out, colorbar = fig.axes
    assert (ax_in.get_xlabel(), ax_in.get_ylabel()) == ("input w", "input h")
    assert (ax_out.get_xlabel(), ax_out.get_ylabel()) == ("output w", "output h")
    assert colorbar.get_ylabel() == "|gradient| / max"


@pytest.mark.parametrize("bounds", [((3, 7), (5, 10)), ((0, 0), (0, 0)), ((0, 15), (0, 19)), ((15, 15), (19, 19))])
def test_plot_2d_draws_box_at_bounds(bounds):
    (top, bottom), (left, right) = bounds
    ax_in = plot_rf(field_2d(bounds)).axes[0]
    (box,) = patches_with_gid(ax_in, "rf-box")
    assert rect_geometry(box) == (left - 0.5, top - 0.5, right - left + 1, bottom - top + 1)


def test_plot_2d_highlights_chosen_output_cell():
    ax_out = plot_rf(field_2d(position=(4, 1))).axes[1]
    (cell,) = patches_with_gid(ax_out, "rf-cell")
    assert rect_geometry(cell) == (0.5, 3.5, 1, 1)
    (grid,) = ax_out.images
    assert grid.get_array().shape == (6, 8)
    assert np.argwhere(np.asarray(grid.get_array()) == 1).tolist() == [[4, 1]]
    assert ax_out.get_xlim() == (-0.5, 7.5) and ax_out.get_ylim() == (5.5, -0.5)
    (borders,) = ax_out.collections  # white lines between cells: 5 across a 6-row grid, 7 down an 8-column one
    lines = sorted(tuple(map(tuple, segment.tolist())) for segment in borders.get_segments())
    across = [((-0.5, y - 0.5), (7.5, y - 0.5)) for y in range(1, 6)]
    down = [((x - 0.5, -0.5), (x - 0.5, 5.5)) for x in range(1, 8)]
    assert lines == sorted(across + down)
    assert borders.get_zorder() < cell.get_zorder()  # the chosen cell's outline stays on top


def test_plot_2d_shows_heatmap_normalised_to_its_maximum():
    (heat,) = plot_rf(field_2d()).axes[0].images
    shown = np.asarray(heat.get_array())
    assert shown.shape == SPATIAL_2D
    assert shown.max() == 1.0 and shown[3, 5] == 1.0 and shown[4, 6] == pytest.approx(0.2)
    assert shown[0, 0] == 0.0


def test_plot_2d_draws_all_zero_heatmap_without_dividing_by_zero():
    field = field_2d()
    zero = dataclasses.replace(field, heatmap=torch.zeros(SPATIAL_2D, dtype=torch.float64))
    (heat,) = plot_rf(zero).axes[0].images
    assert np.asarray(heat.get_array()).max() == 0.0


@given(
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    data=st.data(),
)
@settings(max_examples=15, deadline=None)
def test_plot_box_covers_bounds_cell_for_cell_on_any_grid(height, width, data):
    top = data.draw(st.integers(0, height - 1))
    bottom = data.draw(st.integers(top, height - 1))
    left = data.draw(st.integers(0, width - 1))
    right = data.draw(st.integers(left, width - 1))
    field = make_field((height, width), ((top, bottom), (left, right)), (0, 0), (1, 1))
    ax_in = plot_rf(field).axes[0]
    (box,) = patches_with_gid(ax_in, "rf-box")
    assert rect_geometry(box) == (left - 0.5, top - 0.5, right - left + 1, bottom - top + 1)
    assert ax_in.get_xlim() == (-0.5, width - 0.5) and ax_in.get_ylim() == (height - 0.5, -0.5)


def test_plot_annotates_field_size_in_box_unless_asked_not_to():
    ax_in = plot_rf(field_2d()).axes[0]
    assert [t.get_text() for t in ax_in.texts] == ["5 x 6"]
    assert len(plot_rf(field_2d(), annotate=False).axes[0].texts) == 0


def test_plot_title_defaults_to_str_of_field():
    field = field_2d()
    assert plot_rf(field).get_suptitle() == str(field)
    assert plot_rf(field, title="layer4").get_suptitle() == "layer4"
    assert plot_rf(field, title="").get_suptitle() == ""


def test_plot_2d_saves_a_png_that_reads_back(tmp_path):
    path = tmp_path / "rf.png"
    plot_rf(field_2d()).savefig(path, dpi=50)
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert 100 < pixels.shape[0] < pixels.shape[1]


def test_plot_leaves_pyplot_untouched():
    plt = pytest.importorskip("matplotlib.pyplot")
    before = plt.get_fignums()
    plot_rf(field_2d())
    assert plt.get_fignums() == before


# plot_rf, image overlay

IMAGES = {
    "grey array": lambda: np.random.default_rng(0).random(SPATIAL_2D),
    "rgb array": lambda: np.random.default_rng(0).random((*SPATIAL_2D, 3)),
    "grey tensor": lambda: torch.rand(SPATIAL_2D),
    "1-channel tensor": lambda: torch.rand(1, *SPATIAL_2D),
    "3-channel tensor": lambda: torch.rand(3, *SPATIAL_2D),
    "the probed input": lambda: torch.rand(1, 3, *SPATIAL_2D),
    "int array": lambda: np.arange(320, dtype=np.int64).reshape(SPATIAL_2D),
}


@pytest.mark.parametrize("make_image", IMAGES.values(), ids=IMAGES.keys())
def test_plot_overlays_heatmap_on_image(make_image):
    ax_in = plot_rf(field_2d(), image=make_image()).axes[0]
    picture, heat = ax_in.images
    shown = np.asarray(picture.get_array())
    assert shown.shape[:2] == SPATIAL_2D and shown.shape[2:] in ((), (3,))
    assert shown.min() == 0.0 and shown.max() == 1.0
    assert heat.get_alpha() == pytest.approx(0.6)
    overlay = heat.get_array()
    assert overlay.mask[0, 0] and not overlay.mask[3, 5]


def test_plot_reads_rgb_tensor_channels_first():
    image = torch.zeros(3, *SPATIAL_2D)
    image[0] = 1.0
    picture, _ = plot_rf(field_2d(), image=image).axes[0].images
    assert np.asarray(picture.get_array())[0, 0].tolist() == [1.0, 0.0, 0.0]


def test_plot_draws_image_under_box_when_field_has_no_heatmap():
    fig = plot_rf(field_2d(heatmap=False), image=torch.rand(SPATIAL_2D))
    assert len(fig.axes) == 2
    (picture,) = fig.axes[0].images
    assert np.asarray(picture.get_array()).shape == SPATIAL_2D


@pytest.mark.parametrize("shape", [(5, 5), (20, 16), (2, *SPATIAL_2D), (*SPATIAL_2D, 4), (2, 3, *SPATIAL_2D)])
def test_plot_rejects_image_of_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"image has shape .*\(16, 20\)") as error:
        plot_rf(field_2d(), image=torch.rand(shape))
    assert str(shape) in str(error.value)


def test_plot_rejects_image_that_is_not_a_tensor_or_array():
    with pytest.raises(TypeError, match="image must be a torch.Tensor or a numpy.ndarray, got list"):
        plot_rf(field_2d(), image=[[0.0] * 20] * 16)


# plot_rf, fields without heatmaps, 1D and 3D


def test_plot_without_heatmap_draws_box_on_empty_grid():
    fig = plot_rf(field_2d(heatmap=False))
    ax_in, ax_out = fig.axes
    assert len(ax_in.images) == 0
    (box,) = patches_with_gid(ax_in, "rf-box")
    assert rect_geometry(box) == (4.5, 2.5, 6, 5)
    assert ax_in.get_xlim() == (-0.5, 19.5) and ax_in.get_ylim() == (15.5, -0.5)
    assert len(patches_with_gid(ax_out, "rf-cell")) == 1


def test_plot_1d_draws_strips_with_box_over_bounds():
    field = make_field((40,), ((14, 20),), (7,), (17,))
    fig = plot_rf(field, image=torch.randn(40))
    ax_in, ax_out, _colorbar = fig.axes
    (box,) = patches_with_gid(ax_in, "rf-box")
    assert rect_geometry(box) == (13.5, -0.5, 7, 1)
    assert ax_in.get_xlabel() == "input index" and ax_out.get_xlabel() == "output index"
    picture, heat = ax_in.images
    assert np.asarray(picture.get_array()).shape == np.asarray(heat.get_array()).shape == (1, 40)
    (cell,) = patches_with_gid(ax_out, "rf-cell")
    assert rect_geometry(cell) == (6.5, -0.5, 1, 1)
    assert [t.get_text() for t in ax_in.texts] == ["7"]


def test_plot_3d_slices_depth_evenly_inside_bounds():
    field = make_field((12, 10, 14), ((2, 9), (1, 4), (3, 8)), (1, 2, 3), (4, 3, 5))
    fig = plot_rf(field)
    *slices, _colorbar = fig.axes
    depths = [int(ax.get_title().removeprefix("input d = ")) for ax in slices]
    assert len(depths) == 6 and depths[0] == 2 and depths[-1] == 9 and depths == sorted(set(depths))
    for ax, depth in zip(slices, depths, strict=True):
        (box,) = patches_with_gid(ax, "rf-box")
        assert rect_geometry(box) == (2.5, 0.5, 6, 4)
        (heat,) = ax.images
        assert np.array_equal(heat.get_array(), field.heatmap[depth].numpy() / 5.0)
    assert "(1, 2, 3)" in fig.get_suptitle()


def test_plot_3d_shows_every_depth_of_a_thin_field():
    field = make_field((12, 10, 14), ((3, 5), (1, 4), (3, 8)), (0, 0, 0), (4, 3, 5), heatmap=False)
    fig = plot_rf(field)
    assert [ax.get_title() for ax in fig.axes] == ["input d = 3", "input d = 4", "input d = 5"]


# plot_rf, inconsistent fields


def broken(**changes) -> ReceptiveField:
    return dataclasses.replace(field_2d(), **changes)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (broken(heatmap=torch.zeros(16, 19)), r"field.heatmap has shape \(16, 19\)"),
        (broken(heatmap=torch.full(SPATIAL_2D, float("nan"))), "field.heatmap holds NaN"),
        (broken(bounds=((3, 7), (5, 20))), r"field.bounds\[1\]=\(5, 20\) must satisfy 0 <= first <= last < 20"),
        (broken(bounds=((3, 7),)), "field.bounds="),
        (broken(position=(6, 0)), r"field.position=\(6, 0\) must be an index into the output map of shape \(6, 8\)"),
        (broken(input_shape=(1, 1, 2, 2, 2, 2)), r"field.input_shape=\(1, 1, 2, 2, 2, 2\)"),
        (broken(output_shape=(6, 8, 2), position=(0, 0, 0)), r"field.output_shape=\(6, 8, 2\)"),
    ],
    ids=["heatmap shape", "nan heatmap", "bounds", "bounds count", "position", "rank", "output rank"],
)
def test_plot_rejects_inconsistent_field(field, message):
    with pytest.raises(ValueError, match=message):
        plot_rf(field)


def test_plot_rejects_what_is_not_a_field():
    with pytest.raises(TypeError, match="field must be a ReceptiveField, got dict"):
        plot_rf({"bounds": ((0, 1), (0, 1))})


# animate_rf


def test_default_sweep_takes_every_position_of_a_small_map_in_raster_order():
    assert _raster_positions((2, 3)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert _raster_positions((5,)) == [(0,), (1,), (2,), (3,), (4,)]


@pytest.mark.parametrize("shape", [(100, 100), (2, 100), (1000,), (9, 9), (65,)])
def test_default_sweep_is_capped_at_64_frames_and_keeps_the_corners(shape):
    positions = _raster_positions(shape)
    assert 32 <= len(positions) <= 64
    assert positions == sorted(set(positions))
    assert positions[0] == (0,) * len(shape) and positions[-1] == tuple(n - 1 for n in shape)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"input_shape": (1, 1, 4, 16, 16)}, ValueError, r"input_shape=\(1, 1, 4, 16, 16\) must be .* 1D and 2D"),
        ({"fps": 0}, ValueError, "fps=0 must be a positive number"),
        ({"path": "rf.png"}, ValueError, r"path='rf.png' must end in '.gif'"),
        ({"path": "missing/rf.gif"}, FileNotFoundError, "does not exist"),
        ({"positions": []}, ValueError, r"positions=\[\] must be a non-empty list"),
        ({"positions": [(0, 0), (0, "a")]}, ValueError, r"positions\[1\]=\(0, 'a'\) must be an output index"),
        ({"image": torch.rand(8, 8)}, ValueError, r"image has shape \(8, 8\)"),
    ],
    ids=["3d input", "fps", "suffix", "folder", "no positions", "bad position", "image"],
)
def test_animate_rejects_bad_arguments_before_probing(tmp_path, monkeypatch, kwargs, error, message):
    monkeypatch.chdir(tmp_path)
    arguments = {"model": None, "input_shape": (1, 1, 16, 16), "path": tmp_path / "rf.gif", **kwargs}
    with pytest.raises(error, match=message):
        animate_rf(**arguments)


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(2, 2, 3, stride=2))


def test_animate_sweeps_whole_small_output_map_into_gif(tmp_path):
    pytest.importorskip("rf_callback.core.probe")
    image_module = pytest.importorskip("PIL.Image")
    path = animate_rf(small_cnn(), (1, 1, 16, 16), str(tmp_path / "rf.gif"))
    assert path == tmp_path / "rf.gif"
    with image_module.open(path) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == 36  # the 6 x 6 output map, every position once
        assert gif.size[0] > gif.size[1] > 100


def test_animate_draws_each_frame_afresh(tmp_path, monkeypatch):
    """The output grid's cell borders were kept from frame to frame and drawn again: one more set per frame."""
    from matplotlib.animation import PillowWriter

    drawn, grab = [], PillowWriter.grab_frame

    def counted(writer, **kwargs):
        drawn.append(sum(len(ax.collections) for ax in writer.fig.axes))
        return grab(writer, **kwargs)

    monkeypatch.setattr(PillowWriter, "grab_frame", counted)
    animate_rf(small_cnn(), (1, 1, 16, 16), str(tmp_path / "rf.gif"), positions=[(0, 0), (2, 3), (5, 5)])
    assert len(drawn) == 3 and drawn[0] > 0 and len(set(drawn)) == 1


def test_animate_draws_one_frame_per_given_position_over_image(tmp_path):
    pytest.importorskip("rf_callback.core.probe")
    image_module = pytest.importorskip("PIL.Image")
    path = animate_rf(
        small_cnn(), (1, 1, 16, 16), tmp_path / "rf.gif", positions=[(0, 0), (5, 5), (2, 3)], image=torch.rand(16, 16)
    )
    with image_module.open(path) as gif:
        assert gif.n_frames == 3


def test_animate_sweeps_1d_input_with_int_positions(tmp_path):
    pytest.importorskip("rf_callback.core.probe")
    image_module = pytest.importorskip("PIL.Image")
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 5), torch.nn.Conv1d(2, 2, 3, stride=2))
    path = animate_rf(model, (1, 1, 40), tmp_path / "rf1d.gif", positions=[0, 8, 16], fps=2)
    with image_module.open(path) as gif:
        assert gif.n_frames == 3
        assert gif.info["duration"] == 500


# -- pictures for the loggers: coloured heatmaps, the target on the overlay and the growth curve


def test_heatmap_image_is_magma_enlarged_block_for_block():
    import matplotlib

    from rf_callback.plotting import heatmap_image

    heatmap = torch.zeros(16, 16)
    heatmap[6:11, 6:11] = 1.0  # a 5 x 5 field
    heatmap[8, 8] = 2.0
    image = heatmap_image(heatmap)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8  # 16 times, nearest neighbour
    blocks = image.reshape(16, 16, 16, 16, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()  # every input pixel is a uniform 16 x 16 block
    magma = matplotlib.colormaps["magma"]
    for value, (row, col) in ((1.0, (8, 8)), (0.5, (6, 6)), (0.0, (0, 0))):
        expected = np.round(np.asarray(magma(value)[:3]) * 255)
        assert (blocks[row, 0, col, 0] == expected).all()


def test_an_exact_fields_faint_border_is_drawn_apart_from_the_background():
    """A 20-layer stack's field (41 x 41 at the centre of 48 x 48) showed as 23 x 23: 1236 of its 1681 pixels, below
    1/256 of the peak (the corner 1e-18 of it), were drawn as the background's colour."""
    from rf_callback import probe_rf
    from rf_callback.plotting import heatmap_image

    stack = torch.nn.Sequential(*[torch.nn.Conv2d(1 if i == 0 else 4, 4, 3, padding=1) for i in range(20)])
    field = probe_rf(stack, (1, 1, 48, 48), (24, 24))
    assert field.bounds == ((4, 44), (4, 44))
    for support, drawn in ((True, 41), (False, None)):
        image = heatmap_image(field.heatmap, support=support, min_side=48)
        background = (image == image[0, 0]).all(-1)
        rows = np.flatnonzero(~background.all(1))
        if drawn is None:
            assert rows[-1] - rows[0] + 1 < 41  # drawn by mass: the faint border fades into the background
        else:
            assert (rows[0], rows[-1] - rows[0] + 1) == (4, drawn)
            assert (~background).sum() == 41 * 41


def test_heatmap_image_of_1d_and_3d_fields():
    from rf_callback.plotting import heatmap_image

    for length in (7, 9, 10, 11, 13, 300):
        assert heatmap_image(torch.rand(length) + 0.1).shape[0] == 24
    strip = heatmap_image(torch.arange(100.0))
    assert strip.shape == (24, 200, 3)  # 2 times along the axis, a strip 24 rows high
    volume = torch.zeros(5, 8, 8)
    volume[1, 2, 3] = 1.0
    assert heatmap_image(volume, depth=1).shape == (256, 256, 3)
    assert (heatmap_image(volume) == heatmap_image(volume, depth=1)).all()  # the slice with the mass, not the middle
    assert heatmap_image(volume, depth=2).max() < heatmap_image(volume).max()  # the middle is empty
    assert heatmap_image(torch.rand(4, 512)).shape == (4, 512, 3)  # a thin 2D map is not stretched like a strip


def test_effective_overlay_draws_the_target_centred_on_the_field():
    from rf_callback import effective_rf
    from rf_callback.plotting import plot_effective
    from rf_callback.plotting.style import _TARGET_GID

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Conv2d(2, 1, 3, padding=1))
    field = effective_rf(model, torch.randn(4, 1, 16, 16), (8, 8))
    fig = plot_effective(field, target=(6, 4))
    (box,) = [p for ax in fig.axes for p in ax.patches if p.get_gid() == _TARGET_GID]
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (8 - 2, 8 - 3, 4, 6)
    assert not any(p.get_gid() == _TARGET_GID for ax in plot_effective(field).axes for p in ax.patches)
    with pytest.raises(ValueError, match="target=.*2 axes"):
        plot_effective(field, target=(6,))


def test_effective_overlay_of_a_3d_field_boxes_only_the_depth_slices_its_extent_and_target_hold():
    """The extent box (1 deep, at depth 4) and the target box went on every depth slice the figure shows (2..6)."""
    from rf_callback import effective_rf
    from rf_callback.plotting import plot_effective
    from rf_callback.plotting.style import _EXTENT_GID, _TARGET_GID

    conv = torch.nn.Conv3d(1, 1, (5, 3, 3), bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.001)
        conv.weight[0, 0, 2] = 1.0  # nearly all the mass at the centre depth tap
    field = effective_rf(conv, torch.randn(2, 1, 9, 7, 7), (2, 1, 1))
    assert field.theoretical.bounds[0] == (2, 6) and field.extent(0.95)[0] == (4, 4)
    fig = plot_effective(field, q=0.95, target=(3, 3, 3))  # target depth 3..5 around the centre 4

    def boxed(gid: str) -> list[int]:
        return [int(ax.get_title().split("=")[1]) for ax in fig.axes if any(p.get_gid() == gid for p in ax.patches)]

    assert boxed(_EXTENT_GID) == [4]
    assert boxed(_TARGET_GID) == [3, 4, 5]


def test_growth_curve_draws_the_target_line():
    from rf_callback.plotting import plot_growth

    rows = [(0, {"extent0.95_h": 5.0, "extent0.95_w": 5.0, "std_h": 1.0}), (1, {"extent0.95_h": 9.0, "std_h": 2.0})]
    ax_extent = plot_growth(rows, target=(16, 16)).axes[0]
    lines = {line.get_label(): line for line in ax_extent.get_lines()}
    assert list(lines["target 16"].get_ydata()) == [16, 16]
    assert list(lines["extent0.95_h"].get_ydata()) == [5.0, 9.0]
    assert not any("target" in line.get_label() for line in plot_growth(rows).axes[0].get_lines())
    labels = [line.get_label() for line in plot_growth(rows, target=(4, 6)).axes[0].get_lines()]
    assert {"target h 4", "target w 6"} <= set(labels)


def test_growth_curve_of_one_epoch_ticks_whole_epochs():
    from rf_callback.plotting import plot_growth

    figure = plot_growth([(3, {"extent0.95_h": 5.0, "std_h": 1.0})])
    figure.canvas.draw()
    for ax in figure.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert 3 in ticks and all(float(t).is_integer() for t in ticks)


@pytest.mark.parametrize("scale", [1e-45, 1e40])
def test_heatmap_image_draws_a_field_beyond_float32s_range(scale):
    """A deep field redone in float64 holds values below float32's range (or above): a cast before the
    normalisation drew those pixels as background (413 of 1681 of a 20-layer stack), or the whole field black."""
    from rf_callback.plotting import heatmap_image

    heatmap = torch.zeros(8, 8, dtype=torch.float64)
    heatmap[2:6, 2:6] = scale * torch.logspace(0, -10, 16, dtype=torch.float64).reshape(4, 4)
    background = heatmap_image(torch.zeros(8, 8), min_side=8)[0, 0]
    image = heatmap_image(heatmap, support=True, min_side=8)
    drawn = (image != background).any(axis=-1)
    assert torch.equal(torch.from_numpy(drawn), heatmap > 0)


def test_a_3d_field_shows_its_heaviest_depth_among_its_slices():
    """Six slices spread over a 7-deep field skipped its middle, the heaviest: an effective field's extent box lay on
    no slice drawn (its title said "0.2 of the mass in 1 x 1 x 1 (green)")."""
    from rf_callback.plotting.drawing import _depth_slices

    heat = torch.zeros(11, 6, 6, dtype=torch.float64)
    heat[2:9] = torch.tensor([1.0, 3, 6, 7, 6, 3, 1], dtype=torch.float64).reshape(7, 1, 1)
    field = make_field((11, 6, 6), ((2, 8), (0, 5), (0, 5)), (1, 1, 1), (3, 3, 3))
    field = dataclasses.replace(field, heatmap=heat)
    depths = _depth_slices(field)
    assert 5 in depths and len(depths) == 6 and depths[0] == 2 and depths[-1] == 8
    assert len(plot_rf(field).axes) >= 6


def test_an_empty_field_is_refused_saying_so_and_the_default_sweep_skips_such_positions(tmp_path):
    """FCN-style padding leaves the corners of the output seeing only padding: the default sweep of animate_rf failed
    on them ("no input position influences the model at (0, 0)"), and rf-probe --gif blamed the path; plot_rf of such
    a position said its bounds (0, -1) must satisfy 0 <= first <= last."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=5), torch.nn.Conv2d(4, 4, 3, stride=2))
    from rf_callback import probe_rf

    field_map = probe_rf(net, (1, 3, 20, 27), "all")
    with pytest.raises(ValueError, match=r"the field at \(0, 0\) is empty: no input position moves the output"):
        plot_rf(field_map[0, 0])
    assert animate_rf(net, (1, 3, 20, 27), tmp_path / "sweep.gif").exists()


def test_plot_growth_takes_one_target_for_all_axes():
    from rf_callback.plotting import plot_growth

    rows = [(0, {"extent0.95_h": 5.0, "extent0.95_w": 6.0}), (1, {"extent0.95_h": 7.0, "extent0.95_w": 8.0})]
    labels = [line.get_label() for line in plot_growth(rows, target=16).axes[0].lines]
    assert "target 16" in labels
