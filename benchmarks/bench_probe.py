"""Probe benchmarks, measured side by side in one run and printed as ratios.

1. The whole RF map (pos="all") of a network with 1024 output positions, against a loop of single-position
   probes, and against the bare loop (one forward, then one backward pass per position on the same graph).
2. One single-position theoretical probe, against one forward + backward pass of one sample through the model.

Run: python benchmarks/bench_probe.py [--repeats N]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from rf_callback import probe_rf
from rf_callback.core.graph import ProbeGraph
from rf_callback.core.request import ProbeRequest


def network() -> nn.Sequential:
    """VGG-style: 3 stages of two 3x3 conv + BN + ReLU, two max-pools: 128 x 128 in, 32 x 32 (1024 positions) out."""

    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
        ]  # fmt: skip

    return nn.Sequential(*stage(3, 16), nn.MaxPool2d(2), *stage(16, 32), nn.MaxPool2d(2), *stage(32, 32)).eval()


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, shape = network(), (1, 3, 128, 128)
    fmap = probe_rf(model, shape, "all")
    positions = list(fmap.positions())
    print(
        f"network: {len(model)} modules, input {shape[2:]}, output map {fmap.output_shape} = {len(positions)} positions"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def bare_loop():
        graph = ProbeGraph(model, ProbeRequest.checked(model, shape))
        for p in positions:
            graph.gradient_map([p])

    t_map = best_of(args.repeats, lambda: probe_rf(model, shape, "all"))
    t_bare = best_of(1, bare_loop)
    t_loop = best_of(1, lambda: [probe_rf(model, shape, p) for p in positions])
    passes = _passes_of(model, shape)
    print("\n1. the whole map (pos='all') against a loop over its positions")
    print(f"   pos='all': {passes} backward passes for {len(positions)} positions")
    print(f"   loop of probe_rf(pos=p) calls / pos='all': {t_loop / t_map:7.1f}x")
    print(f"   bare loop, one backward per position / pos='all': {t_bare / t_map:7.1f}x")
    ok = all(probe_rf(model, shape, p).bounds == fmap[p].bounds for p in positions[:: max(1, len(positions) // 64)])
    print(f"   map equals per-position probes (64 sampled): {ok}")

    x = torch.randn(shape)

    def forward_backward():
        inputs = x.clone().requires_grad_(True)
        model(inputs).sum().backward()
        model.zero_grad(set_to_none=True)

    t_fb = best_of(args.repeats * 3, forward_backward)
    t_single = best_of(args.repeats * 3, lambda: probe_rf(model, shape, "center"))
    t_single64 = best_of(args.repeats * 3, lambda: probe_rf(model, shape, "center", dtype=torch.float64))
    t_geometry = best_of(args.repeats * 3, lambda: tuple(probe_rf(model, shape, "center").geometry))
    print("\n2. one position against one forward + backward of one sample (float32, the model itself)")
    print(f"   probe_rf(pos='center'), bounds and heatmap / forward+backward: {t_single / t_fb:7.2f}x (float32)")
    print(f"   the same with dtype=float64 / forward+backward: {t_single64 / t_fb:7.2f}x")
    print(f"   the same, then its geometry / forward+backward: {t_geometry / t_fb:7.2f}x")


def _passes_of(model: nn.Module, shape) -> int:
    counted = []
    original = ProbeGraph.gradient_map

    def counting(self, positions, scale=None):
        counted.append(len(positions))
        return original(self, positions, scale)

    ProbeGraph.gradient_map = counting
    try:
        probe_rf(model, shape, "all")
    finally:
        ProbeGraph.gradient_map = original
    return len(counted)


if __name__ == "__main__":
    main()
