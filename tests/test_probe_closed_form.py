"""The theoretical probe equals the closed form on random chains of convolutions and pools (1D, 2D, 3D)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rf_callback import ProbeError, probe_rf
from rf_callback.core import geometry_flow
from tests.chains import Layer, build, clip, closed_form, exact_hull, lengths, runnable, span


@st.composite
def chains(draw, n_axes: int):
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "max", "avg"]))
        kernel, stride, padding, dilation = [], [], [], []
        for _axis in range(n_axes):
            k = draw(st.integers(1, 5))
            d = draw(st.integers(1, 3)) if kind != "avg" else 1
            s = draw(st.integers(1, 3))
            limit = (k - 1) * d if kind == "conv" else ((k - 1) * d + 1) // 2
            if kind == "avg":
                limit = k // 2
            kernel.append(k), stride.append(s), dilation.append(d), padding.append(draw(st.integers(0, limit)))
        ceil_mode = kind != "conv" and draw(st.booleans())
        layers.append(Layer(kind, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), ceil_mode))
    return layers


@pytest.fixture(autouse=True, params=["measured", "flowed"])
def geometry_source(request, monkeypatch):
    """Every test runs twice: the geometry measured on thin inputs, and carried along the probe's forward."""
    monkeypatch.setattr(geometry_flow, "ENABLED", request.param == "flowed")
    return request.param


def check_chain(layers: list[Layer], input_spatial: tuple[int, ...], data) -> None:
    model, shape, out = runnable(layers, input_spatial)
    out_spatial = out.shape[2:]
    sizes = [lengths(layers, input_spatial[a], a, model, shape) for a in range(len(input_spatial))]
    every = list(itertools.product(*(range(n) for n in out_spatial)))
    expected_map = {pos: tuple(exact_hull(layers, sizes[a], a, pos[a]) for a in range(len(pos))) for pos in every}
    if all(None in expected for expected in expected_map.values()):  # refused, as a single probe is
        with pytest.raises(ProbeError, match="every window covers only padding"):
            probe_rf(model, shape, "all")
    else:
        field_map = probe_rf(model, shape, "all")
        for pos, expected in expected_map.items():
            # An empty field (one that sees only padding) is (0, -1) on every axis.
            assert field_map[pos].bounds == (((0, -1),) * len(pos) if None in expected else expected)
    positions = [tuple(0 for _ in out_spatial), tuple(n - 1 for n in out_spatial)]
    positions.append(tuple(data.draw(st.integers(0, n - 1)) for n in out_spatial))
    for pos in positions:
        expected = [exact_hull(layers, sizes[a], a, pos[a]) for a in range(len(pos))]
        if None in expected:
            try:
                probe_rf(model, shape, pos)
            except ProbeError as error:
                assert "padding" in str(error)
            else:
                raise AssertionError("a field that sees only padding must raise")
            continue
        field = probe_rf(model, shape, pos)
        assert field.bounds == tuple(expected)
        for a, length in enumerate(input_spatial):
            geometry = closed_form(layers, a)
            # The closed form clipped to the input; a strided layer may leave trailing inputs no window reaches,
            # so the exact field lies inside it, and equals it wherever the span is inside the input.
            lo, hi = clip(span(geometry, pos[a]), length)
            assert lo <= field.bounds[a][0] and field.bounds[a][1] <= hi
            first, last = span(geometry, pos[a])
            if first >= 0:
                assert field.bounds[a][0] == first
            if last <= length - 1:
                assert field.bounds[a][1] == last
            if field.geometry[a] is not None:
                g = field.geometry[a]
                assert (g.size, g.stride, g.offset) == geometry
                assert field.span[a] == (first, last)


@given(layers=chains(1), length=st.integers(8, 64), data=st.data())
def test_1d_chain_equals_closed_form(layers, length, data):
    check_chain(layers, (length,), data)


@given(layers=chains(2), height=st.integers(6, 40), width=st.integers(6, 40), data=st.data())
def test_2d_chain_equals_closed_form(layers, height, width, data):
    check_chain(layers, (height, width), data)


@given(layers=chains(3), size=st.tuples(st.integers(5, 14), st.integers(5, 14), st.integers(5, 14)), data=st.data())
def test_3d_chain_equals_closed_form(layers, size, data):
    check_chain(layers, size, data)


def test_geometry_matches_closed_form_where_every_field_is_clipped():
    layers = [Layer("conv", (3,), (2,), (1,), (1,))] * 5
    model = build(layers, channels=1)
    field = probe_rf(model, (1, 1, 16), "center")
    assert field.bounds == ((0, 15),)
    g = field.geometry[0]
    assert (g.size, g.stride, g.offset) == closed_form(layers, 0) == (63, 32, 31)
