import dataclasses

import pytest
import torch
from torch import nn

from rf_callback import Tokens
from rf_callback.core.request import ProbeRequest


def test_checked_request_takes_float32_with_the_underflow_retry_when_no_dtype_is_given():
    request = ProbeRequest.checked(nn.Conv2d(1, 1, 3), (2, 1, 8, 8))
    assert request.input_shape == (2, 1, 8, 8)
    assert (request.dtype, request.guard, request.device) == (torch.float32, True, torch.device("cpu"))
    assert (request.mode, request.draws, request.seed, request.layer, request.element) == (
        "theoretical",
        8,
        0,
        None,
        None,
    )


def test_a_dtype_given_is_kept_without_the_retry():
    request = ProbeRequest.checked(nn.Conv1d(1, 1, 3), (1, 1, 8), dtype=torch.float64, mode="weights", draws=3)
    assert (request.dtype, request.guard, request.mode, request.draws) == (torch.float64, False, "weights", 3)


def test_the_request_is_immutable_and_its_variants_are_new_values():
    request = ProbeRequest.checked(nn.Conv2d(1, 1, 3), (1, 1, 8, 8), mode="weights", draws=4, layout="tokens:2x2+1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.mode = "theoretical"
    assert request.on((1, 1, 16, 4)).input_shape == (1, 1, 16, 4)
    assert (request.theoretical().mode, request.theoretical().draws) == ("theoretical", 1)
    assert request.in_dtype(torch.float32) is request
    assert (request.in_dtype(torch.float64).dtype, request.in_dtype(torch.float64).guard) == (torch.float64, False)
    assert request.parsed_layout == Tokens((2, 2), 1) and request.layout == "tokens:2x2+1"  # as given, for messages
    assert request.replaced(layer="0").layer == "0" and request.layer is None


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"input_shape": (1, 8)}, "input_shape="),
        ({"mode": "exact"}, "mode="),
        ({"draws": 0}, "draws="),
        ({"seed": 1.5}, "seed="),
        ({"dtype": torch.int32}, "dtype="),
        ({"element": 1.5}, "element="),
        ({"layout": "rows"}, "layout="),
        ({"layer": 3}, "layer="),
        ({"device": "abacus"}, "device="),
    ],
)
def test_each_wrong_argument_is_refused_at_the_door_by_name(arguments, named):
    given = {"input_shape": (1, 1, 8, 8), **arguments}
    with pytest.raises(ValueError, match=f"^{named}"):
        ProbeRequest.checked(nn.Conv2d(1, 1, 3), **given)
