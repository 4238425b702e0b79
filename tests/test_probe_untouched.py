"""The probe never changes the live model or the global random states, in any mode or grad context."""

from __future__ import annotations

import random
import threading
import types
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from rf_callback import ProbeError, effective_rf, probe_rf, rf_table, verify_rf
from rf_callback.core.geometry import AxisGeometry
from tests.models import TinyResNet


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()},
        "dtypes": {n: p.dtype for n, p in model.named_parameters()},
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    for key, grad in before["grads"].items():
        other = after["grads"][key]
        assert (grad is None and other is None) or torch.equal(grad, other), key
    for name in ("requires_grad", "training", "hooks", "dtypes"):
        assert before[name] == after[name], name


def random_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
@pytest.mark.parametrize("context", ["plain", "no_grad", "inference_mode"])
@pytest.mark.parametrize("pos", ["center", "all", [(0, 0), (3, 4)]])
def test_model_and_random_states_are_untouched(mode, context, pos):
    model = TinyResNet()
    model.train()
    model.layer1.eval()  # a mixed state must survive too
    model.head.weight.requires_grad_(False)
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # leaves .grad and updates BatchNorm statistics
    calls = []
    model.layer2.register_forward_hook(lambda *args: calls.append("hook"))
    before = snapshot(model)
    states = random_states()
    grad_enabled = torch.is_grad_enabled()
    with {"plain": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]():
        result = probe_rf(model, (1, 3, 32, 32), pos, layer="layer2", mode=mode)
        if mode == "theoretical" and pos == "center":
            assert verify_rf(model, result)
    assert_same(before, snapshot(model))
    after = random_states()
    assert torch.equal(states[0], after[0]) and np.array_equal(states[1], after[1]) and states[2] == after[2]
    assert calls == []  # the user's hook did not see the probe
    assert torch.is_grad_enabled() == grad_enabled


def test_model_created_under_inference_mode_can_be_probed():
    with torch.inference_mode():
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
        field = probe_rf(model, (1, 1, 9, 9), mode="weights")
    assert field.size == (3, 3)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_effective_rf_runs_inside_no_grad_and_inference_mode(context):
    """Inside ``torch.inference_mode()`` the effective field's sums were made as inference tensors, then written in
    place outside it: a raw RuntimeError. Inputs made inside the context work too."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    torch.manual_seed(0)
    inputs = torch.randn(4, 3, 16, 16)
    expected = effective_rf(model, inputs, "center").heatmap
    with {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]():
        assert torch.equal(effective_rf(model, inputs, "center").heatmap, expected)
        assert torch.equal(effective_rf(model, inputs.clone(), "center").heatmap, expected)


def test_a_position_asked_for_twice_gets_fields_that_share_nothing():
    """``probe_rf(m, shape, [(2, 2), (2, 2)])`` returned two fields holding one heatmap tensor: a write into one
    showed in the other (and in ``effective_rf``'s theoretical fields)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    for first, second in (
        probe_rf(model, (1, 3, 16, 16), [(2, 2), (2, 2)]),
        [e.theoretical for e in effective_rf(model, torch.randn(2, 3, 16, 16), [(2, 2), (2, 2)])],
    ):
        assert torch.equal(first.heatmap, second.heatmap)
        first.heatmap.zero_()
        assert second.heatmap.sum() > 0 and second.bounds == ((2, 6), (2, 6))


def test_global_generator_is_not_advanced_by_weights_mode():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.5))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    probe_rf(model, (1, 1, 9, 9), "all", mode="weights")
    assert torch.equal(torch.rand(3), expected)


class Recording(nn.Module):
    """A convolution whose forward calls ``record`` (which notes a global setting where the test reads it)."""

    def __init__(self, record):
        super().__init__()
        self.conv, self.record = nn.Conv1d(1, 1, 3), record

    def forward(self, x):
        self.record()
        return self.conv(x)


def test_a_runs_reduced_matmul_precision_is_off_inside_the_probe_and_restored_after():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # what Lightning suggests on GPUs with tensor cores
    seen: list = []
    model = Recording(lambda: seen.append(torch.get_float32_matmul_precision()))
    try:
        probe_rf(model, (1, 1, 30), "all")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen and set(seen) == {"highest"}


def test_a_runs_per_backend_matmul_precision_is_full_inside_the_probe_and_restored_after():
    """torch's per-backend API (``torch.backends.cuda.matmul.fp32_precision = "tf32"``) made the legacy getter the
    probe saved the setting with raise: every probe failed."""
    seen: list = []
    model = Recording(
        lambda: seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
    )
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    before = [backend.fp32_precision for backend in backends]
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        assert probe_rf(model, (1, 1, 30), 5).bounds == ((5, 7),)
        assert [backend.fp32_precision for backend in backends] == ["tf32", before[1]]
    finally:
        for backend, precision in zip(backends, before):
            backend.fp32_precision = precision
    assert seen and set(seen) == {("ieee", "ieee")}


class _MaskA(nn.Module):
    """PixelCNN's mask A on a 5 x 5 kernel, as a parametrization."""

    def __init__(self):
        super().__init__()
        mask = torch.ones(5, 5)
        mask[2, 2:], mask[3:] = 0, 0
        self.register_buffer("mask", mask)

    def forward(self, weight):
        return weight * self.mask


def test_probes_inside_a_parametrization_cache_read_their_own_copys_weights():
    """Inside ``parametrize.cached()`` (keyed by module id), a copy built where the previous probe's copy was freed
    read that copy's cached weights: a weights probe after a theoretical one read the architecture's rows 5..9 for
    6..9 (the trained kernel's top row is zero), a theoretical one after a weights one 6..9 for 5..9, and a
    weights-mode table the theoretical rows. The user's cache is kept for after."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.Conv2d(8, 4, 3, padding=1)).eval()
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", _MaskA())
    with torch.no_grad():
        model[0].parametrizations.weight.original[:, :, 0, :] = 0
    shape, theory, trained = (1, 3, 16, 16), ((5, 9), (5, 11)), ((6, 9), (5, 11))
    for order in (("theoretical", "weights"), ("weights", "theoretical")):
        with torch.nn.utils.parametrize.cached():
            cached = model[0].weight
            bounds = {mode: probe_rf(model, shape, (8, 8), mode=mode).bounds for mode in order}
            assert model[0].weight is cached
        assert bounds == {"theoretical": theory, "weights": trained}
    with torch.nn.utils.parametrize.cached():
        assert [row.bounds for row in rf_table(model, shape, mode="weights")][-1] == trained


def test_the_callers_saved_tensor_hooks_do_not_pack_the_probes_tensors():
    """Lossy int8 packing of saved tensors (activation compression) around a weights probe lost a kernel column of
    small weights: columns 6..11 for 5..11."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.Conv2d(8, 4, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight[:, :, :, 0] *= 0.003
    packed: list = []

    def pack(tensor):
        packed.append(1)
        scale = tensor.abs().max() / 127
        return torch.round(tensor / scale).to(torch.int8), scale, tensor.dtype

    def unpack(saved):
        values, scale, dtype = saved
        return values.to(dtype) * scale

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        assert probe_rf(model, (1, 3, 16, 16), (8, 8), mode="weights").bounds == ((5, 11), (5, 11))
        assert not packed
        model(torch.ones(1, 3, 16, 16, requires_grad=True))
    assert packed  # still the caller's after the probe


def test_functional_dropout_in_training_mode_is_not_applied_in_the_copy():
    class RandomForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 3)

        def forward(self, x):
            return nn.functional.dropout(self.conv(x), p=0.9)  # training=True by default

    a = probe_rf(RandomForward(), (1, 1, 30), 5, mode="weights")
    assert a.bounds == ((5, 7),)


class SharedParts(nn.Module):
    """A submodule used twice, a tied weight, a module kept in a plain attribute, a list attribute and a set."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3)
        self.b = self.a  # the same module under two names
        self.c = nn.Conv2d(2, 2, 1)
        self.c.weight = nn.Parameter(torch.ones(2, 2, 1, 1))
        self.d = nn.Conv2d(2, 2, 1)
        self.d.weight = self.c.weight  # tied
        self.__dict__["helper"] = self.c  # a module reached by a plain attribute, not registered twice
        self.log: list[int] = []
        self.tags = {"x", "y"}

    def forward(self, x):
        self.log.append(1)  # a forward that mutates a list attribute: the copy's list, never the live one
        return self.d(self.c(self.b(x)))


def test_the_fast_module_copy_keeps_sharing_and_never_shares_mutable_state_with_the_live_model():
    from rf_callback.core.model_copy import module_copy

    live = SharedParts()
    clone = module_copy(live, {})
    assert clone.a is clone.b and clone.a is not live.a
    assert clone.d.weight is clone.c.weight and clone.c.weight is not live.c.weight
    assert clone.helper is clone.c
    assert clone.log is not live.log and clone.tags == live.tags and clone.tags is not live.tags
    clone(torch.ones(1, 1, 5, 5))
    assert live.log == [] and clone.log == [1]
    assert [n for n, _ in clone.named_modules()] == [n for n, _ in live.named_modules()]
    probe_rf(live, (1, 1, 9, 9))
    assert live.log == []  # the probe ran its copy


def test_a_pruned_model_is_copied_and_its_masks_hide_taps_in_weights_mode_only():
    """torch.nn.utils.prune (and Lightning's ModelPruning) keep weight_orig, a weight_mask and a computed weight that
    no deep copy takes: the probe refused such a model. The mask keeps the centre tap of the first convolution only."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, padding=1))
    mask = torch.zeros(2, 1, 3, 3)
    mask[:, :, 1, 1] = 1
    prune.custom_from_mask(model[0], "weight", mask)
    model(torch.randn(1, 1, 12, 12))
    assert probe_rf(model, (1, 1, 12, 12), (6, 6)).size == (5, 5)  # the architecture's: a pruned weight is a weight
    assert probe_rf(model, (1, 1, 12, 12), (6, 6), mode="weights").size == (3, 3)  # what the weights connect
    assert torch.equal(model[0].weight_mask, mask) and not model[0].weight.is_leaf  # the live model as it was


class _Collects:
    """A feature extractor's hook object, as timm's ``FeatureHooks``: the forward returns what it collected."""

    def __init__(self):
        self.outputs: list[torch.Tensor] = []

    def collect(self, module, args, output):
        self.outputs.append(output)


def test_a_forward_that_reads_what_a_hook_collected_is_refused_with_the_way_out():
    """The copy runs without the user's hooks (they may act on the user's world: a file, the Trainer): a forward
    returning what a hook collected (timm's FeatureHookNet) failed with "list index out of range" alone."""

    class HookNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1))
            self.hooks = _Collects()
            self.body[1].register_forward_hook(self.hooks.collect)

        def forward(self, x):
            self.hooks.outputs.clear()
            self.body(x)
            return self.hooks.outputs[-1]

    model = HookNet()
    with pytest.raises(
        ProbeError,
        match=r"list index out of range \(note: the probe's copy runs without your forward hooks, "
        r"here on 'body.1'; if the forward reads what a hook collected, .* pass layer= naming the hooked module\)",
    ):
        probe_rf(model, (1, 1, 32, 32), (16, 16))
    assert probe_rf(model, (1, 1, 32, 32), (16, 16), layer="body.1").bounds == ((14, 18), (14, 18))
    assert model.hooks.outputs == []


class _LocksItsCounter:
    def __init__(self):
        self.lock, self.calls = threading.Lock(), 0

    def count(self, module, args, output):
        with self.lock:
            self.calls += 1


def test_a_hook_whose_owner_cannot_be_copied_is_left_out_not_the_probe():
    """The copy deep-copied every hook before dropping the user's: a hook object holding a lock refused the whole
    probe ("the model cannot be deep-copied")."""
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1))
    counter = _LocksItsCounter()
    model[0].register_forward_hook(counter.count)
    assert probe_rf(model, (1, 1, 8, 8), (4, 4)).bounds == ((3, 5), (3, 5))
    assert counter.calls == 0 and len(model[0]._forward_hooks) == 1


def test_a_hook_object_the_forward_also_reads_is_copied_whole():
    """A hook object holding a lock, registered as a hook and kept as an attribute the forward reads: its failed
    deep copy (as a hook) left a half-built object in the copy's memo, and the forward read an empty one."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.counter = _LocksItsCounter()
            self.counter.scale = 2.0
            self.conv.register_forward_hook(self.counter.count)

        def forward(self, x):
            return self.conv(x) * self.counter.scale

    with pytest.raises(ProbeError, match="cannot be deep-copied"):  # the attribute itself holds a lock
        probe_rf(Scaled(), (1, 1, 8, 8), (4, 4))


_PATCHED_MODEL: nn.Module | None = None  # read by a forward through a global name, as in a notebook


def _patched(reads: str) -> nn.Sequential:
    """A stack whose forward is a lambda that reads the model through a closure or a global name (train mode)."""
    global _PATCHED_MODEL
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 3, padding=1))
    if reads == "closure":
        model.forward = lambda x: model[2](model[1](model[0](x)))
    elif reads == "global":
        _PATCHED_MODEL = model
        model.forward = lambda x: _PATCHED_MODEL[2](_PATCHED_MODEL[1](_PATCHED_MODEL[0](x)))
    elif reads == "helper":
        _PATCHED_MODEL = model
        model.forward = lambda x: _PATCHED_MODEL[2](_stem(x))
    elif reads == "recursive":
        _PATCHED_MODEL = model
        model.forward = lambda x: _through(x, 0)
    elif reads == "exec":  # a function made by exec() has no module name
        namespace = {"model": model}
        exec("forward = lambda x: model[2](model[1](model[0](x)))", namespace)
        model.forward = namespace["forward"]
    elif reads == "cyclic":
        _CYCLIC.update(self=_CYCLIC, model=model)
        model.forward = lambda x: _CYCLIC["model"][2](_CYCLIC["model"][1](_CYCLIC["model"][0](x)))
    else:  # the layers in a list, held by a default argument of a function the forward calls

        def run(x, layers=list(model)):  # noqa: B006 - the default holds the model's layers, as the case is
            for layer in layers:
                x = layer(x)
            return x

        model.forward = lambda x: run(x)
    with torch.no_grad():  # the live weights that the theoretical field must not follow: a 1 x 1 middle tap only
        model[2].weight.zero_()
        model[2].weight[..., 1, 1] = 1
    return model.train()


_CYCLIC: dict = {}  # a global dict that holds itself beside the model


def _through(x: torch.Tensor, index: int) -> torch.Tensor:
    """A recursive helper: the model's layers from ``index`` on, read through a global name."""
    assert _PATCHED_MODEL is not None
    return x if index == len(_PATCHED_MODEL) else _through(_PATCHED_MODEL[index](x), index + 1)


def _stem(x: torch.Tensor) -> torch.Tensor:
    """A notebook's helper that reads the model through a global name."""
    assert _PATCHED_MODEL is not None
    return _PATCHED_MODEL[1](_PATCHED_MODEL[0](x))


@pytest.mark.parametrize("reads", ["closure", "global", "helper", "list", "recursive", "cyclic", "exec"])
def test_a_forward_held_in_a_function_attribute_runs_on_the_copy(reads):
    """A ``forward`` replaced by a function that reads the model (``model.forward = lambda x: model[1](model[0](x))``)
    ran the live model's modules on the probe: the theoretical field followed the live weights (3 x 3 for 5 x 5), and
    the probe updated the live batch norm's statistics."""
    model = _patched(reads)
    before = snapshot(model)
    field = probe_rf(model, (1, 1, 9, 9))
    assert field.bounds == ((2, 6), (2, 6))
    assert tuple(field.geometry) == (AxisGeometry(5, 1, 2),) * 2
    assert probe_rf(model, (1, 1, 9, 9), mode="weights").bounds == ((3, 5), (3, 5))
    assert_same(before, snapshot(model))
    assert model[1].num_batches_tracked == 0


@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_probe_and_its_lazy_geometry_under_another_default_device_run_on_the_models(mode):
    """Inside ``with torch.device("meta"):`` (a next model built with empty weights) the probe made its inputs on the
    meta device and raised torch's "Cannot copy out of meta tensor", and so did a field's first ``str``."""
    from rf_callback import rf_table

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1))
    shape = (1, 1, 12, 12)
    expected = probe_rf(model, shape, mode=mode)
    expected_text = str(expected)
    read_later = probe_rf(model, shape, mode=mode)
    rows = [row.bounds for row in rf_table(model, shape, mode=mode)]
    with torch.device("meta"):
        field = probe_rf(model, shape, mode=mode)
        assert str(read_later) == expected_text
        assert field.bounds == expected.bounds and str(field) == expected_text
        assert [row.bounds for row in rf_table(model, shape, mode=mode)] == rows
        effective = effective_rf(model, torch.ones(2, 1, 12, 12, device="cpu"), "center")
        assert effective.heatmap.device.type == "cpu" and effective.heatmap.sum() > 0


class SharesItself(nn.Sequential):
    """A block that copies share (its ``__deepcopy__`` returns itself), as one way to make an attribute copyable."""

    def __deepcopy__(self, memo):
        return self


class ReadsItsNormByWeakReference(nn.Module):
    """A convolution whose norm, registered on the parent, is reached through a weak reference."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self._norm = weakref.ref(norm)

    def forward(self, x):
        return self._norm()(self.conv(x))


def _shared(how: str) -> nn.Module:
    torch.manual_seed(0)
    if how == "deepcopy":
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), SharesItself(nn.BatchNorm2d(2), nn.Dropout(0.5)))
        model[1].register_forward_hook(lambda module, args, output: None)
    else:
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2))
        model.append(ReadsItsNormByWeakReference(model[1]))
        model.forward = lambda x: model[2](model[0](x))
    return model.train()


@pytest.mark.parametrize("how", ["deepcopy", "weakref"])
def test_a_module_the_deep_copy_would_share_with_the_live_model_is_copied(how):
    """A ``__deepcopy__`` that returns the module itself, or a weak reference to a module, left the live module in the
    probe's copy: the probe ran it in training mode (updating its statistics), set it to eval mode and dropped the
    user's hooks from it."""
    model = _shared(how)
    before = snapshot(model)
    assert probe_rf(model, (1, 1, 9, 9), mode="weights").bounds == ((2, 6) if how == "weakref" else (3, 5),) * 2
    assert_same(before, snapshot(model))
    norm = model[1][0] if how == "deepcopy" else model[1]
    assert norm.num_batches_tracked == 0


class _Shallow(nn.Module):
    """Runs a 5 x 5 convolution after its 3 x 3 one until ``shallow`` is set (3 x 3 alone then)."""

    def __init__(self):
        super().__init__()
        self.small, self.large = nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 5, padding=2)
        self.shallow = False

    def forward(self, x):
        return self.small(x) if self.shallow else self.large(self.small(x))


class _ShallowOnEval(_Shallow):
    """Shallow once its own ``eval()`` has run."""

    def eval(self):
        self.shallow = True
        return super().eval()


class _ShallowWhenNotTraining(_Shallow):
    """Shallow when its ``__setattr__`` of ``training`` is told False (no ``eval()`` or ``train()`` of its own)."""

    def __setattr__(self, name, value):
        if name == "training":
            object.__setattr__(self, "shallow", not value)
        super().__setattr__(name, value)


def _shallow_by_its_own_train_function() -> nn.Module:
    """A module whose instance holds a ``train`` of its own (latent diffusion's ``model.train = disabled_train``)."""
    model = _Shallow()

    def own_train(self, mode=True):
        self.shallow = not mode
        return nn.Module.train(self, mode)

    model.train = types.MethodType(own_train, model)
    return model


@pytest.mark.parametrize("kind", [_ShallowOnEval, _ShallowWhenNotTraining, _shallow_by_its_own_train_function])
@pytest.mark.parametrize("mode", ["theoretical", "weights"])
def test_a_models_own_eval_train_or_setattr_of_training_runs_on_the_copy(kind, mode):
    # The copy is put in eval mode; where a module reacts to it by its own code, that code runs (a train-mode
    # model's copy read the 5 x 5 branch, 7 x 7 pixels, where the model in eval mode reads 3 x 3).
    model = kind()
    assert probe_rf(model, (1, 1, 11, 11), (2, 2), mode=mode).bounds == ((2, 4), (2, 4))
    assert probe_rf(kind().eval(), (1, 1, 11, 11), (2, 2), mode=mode).bounds == ((2, 4), (2, 4))
    assert model.training and not model.shallow  # the live model's mode, as it was
