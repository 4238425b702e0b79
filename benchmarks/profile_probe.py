"""Where one probe's time goes, per network (cProfile's heaviest entries), and what cuDNN would change on a GPU.

For torchvision's ResNet-18, VGG-16 and MobileNetV2 at 224 x 224: one forward + backward pass of one sample, the
theoretical probe as it runs (cuDNN off on CUDA: Winograd and FFT kernels turn exact zeros into rounding noise),
and, on CUDA only, the same probe with cuDNN on in float32 and in float64, each with whether its support equals
the default probe's, position by position (``--positions``), as evidence for when cuDNN may stay on.

Run: python benchmarks/profile_probe.py [--device cuda] [--positions 6]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import time

import torch

import rf_callback.core.graph as graph
from rf_callback import probe_rf

MODELS = {"resnet18": "layer4", "vgg16": "features", "mobilenet_v2": "features"}
SHAPE = (1, 3, 224, 224)


def best_ms(call, device, repeats: int = 5) -> float:
    call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


@contextlib.contextmanager
def cudnn_kept(enabled: bool):
    """The probe's exact_kernels, with cuDNN left on when ``enabled`` (an experiment, not the library's choice)."""
    original = graph.exact_kernels

    @contextlib.contextmanager
    def kernels(device):
        with torch.autocast("cpu", enabled=False), graph.global_hooks_suspended(), contextlib.ExitStack() as stack:
            if device.type == "cuda":
                stack.enter_context(torch.autocast("cuda", enabled=False))
                if not enabled:
                    stack.enter_context(torch.backends.cudnn.flags(enabled=False))
            yield

    graph.exact_kernels = kernels
    import rf_callback.core.probe as probe

    probe.exact_kernels = kernels
    try:
        yield
    finally:
        graph.exact_kernels = probe.exact_kernels = original


def profile_one(name: str, layer: str, device: torch.device, count: int) -> None:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None).eval().to(device)
    x = torch.randn(SHAPE, device=device)

    def forward_backward():
        model(x.clone().requires_grad_(True)).sum().backward()

    base = best_ms(forward_backward, device)
    probe = best_ms(lambda: probe_rf(model, SHAPE, layer=layer), device)
    weights = best_ms(lambda: probe_rf(model, SHAPE, layer=layer, mode="weights"), device)
    print(f"\n{name}: fwd+bwd {base:.1f} ms, probe {probe:.1f} ms ({probe / base:.1f}x), weights {weights:.1f} ms")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(3):
        probe_rf(model, SHAPE, layer=layer, mode="weights")
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
    print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))
    if device.type != "cuda":
        return
    grid = probe_rf(model, SHAPE, layer=layer).output_shape
    positions = [tuple((k * 5 + a) % n for a, n in enumerate(grid)) for k in range(count)]
    reference = [probe_rf(model, SHAPE, p, layer=layer, dtype=torch.float64).heatmap > 0 for p in positions]
    for dtype in (torch.float32, torch.float64):
        with cudnn_kept(True):
            timed = best_ms(lambda dtype=dtype: probe_rf(model, SHAPE, layer=layer, dtype=dtype), device)
            same = all(
                torch.equal(probe_rf(model, SHAPE, p, layer=layer, dtype=dtype).heatmap > 0, ref)
                for p, ref in zip(positions, reference)
            )
        print(f"  cuDNN on, {dtype}: {timed:.1f} ms ({timed / base:.1f}x), support equal to cuDNN off: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--positions", type=int, default=6)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__} on {device}")
    for name, layer in MODELS.items():
        profile_one(name, layer, device, args.positions)


if __name__ == "__main__":
    main()
