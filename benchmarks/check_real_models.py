"""Checks that real_models.py's re-implementations match torchvision's models, layer by layer.

For each model, at input (1, 3, 224, 224): the same named submodules in the same order, of the same classes, with
the same output shape each (forward hooks over ``named_modules()``), the same hyperparameters of every convolution
and pool, and the same parameter count; and, with torchvision's weights loaded into ours, the same outputs (so the
forward passes compute the same function, activations and residual sums included). Prints OK or the differences;
exits 1 on any difference, 2 without torchvision.

Run: python benchmarks/check_real_models.py   (in an environment with torchvision, e.g. make bench-env)
"""

from __future__ import annotations

import sys

import torch
from real_models import MODELS, PROBED_LAYER, available_sources, build, closed_form
from torch import nn

SHAPE = (1, 3, 224, 224)
HYPER = ("kernel_size", "stride", "padding", "dilation", "groups", "ceil_mode", "in_channels", "out_channels")


def describe(model: nn.Module) -> dict[str, tuple]:
    """Returns, per named submodule: its class, output shape(s) (one forward pass) and, for a leaf, its layer
    hyperparameters.
    """
    shapes: dict[str, list] = {}

    def hook(name):
        def record(module, inputs, output):
            shapes.setdefault(name, []).append(tuple(output.shape) if torch.is_tensor(output) else type(output))

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()]
    with torch.no_grad():
        model(torch.zeros(SHAPE))
    for handle in handles:
        handle.remove()
    return {
        name: (
            type(module).__name__,
            shapes.get(name),
            {a: getattr(module, a) for a in HYPER if hasattr(module, a)} if not list(module.children()) else None,
            getattr(module, "bias", None) is not None if isinstance(module, nn.Conv2d) else None,
        )
        for name, module in model.named_modules()
    }


def compare(name: str) -> list[str]:
    """Returns the differences between torchvision's model ``name`` and ours (empty when they match)."""
    theirs, ours = build(name, "torchvision"), build(name, "own")
    problems = []
    count_theirs = sum(p.numel() for p in theirs.parameters())
    count_ours = sum(p.numel() for p in ours.parameters())
    if count_theirs != count_ours:
        problems.append(f"parameters: torchvision {count_theirs}, own {count_ours}")
    a, b = describe(theirs), describe(ours)
    if list(a) != list(b):
        problems.append(f"submodules differ: only torchvision's {set(a) - set(b)}, only ours {set(b) - set(a)}")
    for module_name in a.keys() & b.keys():
        for what, x, y in zip(("class", "output shapes", "hyperparameters", "bias"), a[module_name], b[module_name]):
            if x != y:
                problems.append(f"{module_name or '(model)'}: {what}: torchvision {x}, own {y}")
    ours.load_state_dict(theirs.state_dict())  # same names and shapes, or this raises
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        problems.append(f"outputs with torchvision's weights differ by up to {(expected - got).abs().max():.3g}")
    if closed_form(name, "torchvision") != closed_form(name, "own"):
        problems.append(f"closed form: torchvision {closed_form(name, 'torchvision')}, own {closed_form(name, 'own')}")
    return sorted(problems)


def main() -> int:
    """Compares every model and prints the result; returns the exit status."""
    if "torchvision" not in available_sources():
        print("torchvision does not import here: nothing to compare against (make bench-env creates .venv-bench)")
        return 2
    import torchvision

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, input {SHAPE}")
    failed = False
    for name in MODELS:
        problems = compare(name)
        count = sum(p.numel() for p in build(name).parameters())
        modules = len(dict(build(name).named_modules()))
        if problems:
            failed = True
            print(f"{name}: {len(problems)} differences")
            for line in problems[:40]:
                print(f"  {line}")
        else:
            print(
                f"{name}: OK ({modules} submodules, {count} parameters, same outputs with the same weights, "
                f"closed form (r, S, P) at {PROBED_LAYER[name]}: {closed_form(name)})"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
