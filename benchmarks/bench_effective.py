"""Effective-field benchmark, measured side by side in one run and printed as a ratio.

effective_rf over 32 inputs (one chunk: one forward and one backward pass of the batch, plus the theoretical
field for reference) against one forward + backward pass of a batch of 32 through the same network.

Run: python benchmarks/bench_effective.py [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_probe import network
from rf_callback import effective_rf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = network()
    inputs = torch.randn(32, 3, 128, 128)

    def forward_backward():
        x = inputs.clone().requires_grad_(True)
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)

    def effective():
        effective_rf(model, inputs, "center")

    times: dict[str, list[float]] = {"fb": [], "erf": []}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        for name, fn in (("fb", forward_backward), ("erf", effective)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(times["erf"]) / statistics.median(times["fb"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, inputs {tuple(inputs.shape)}")
    print(f"effective_rf(32 inputs) / forward+backward(batch of 32): {ratio:.2f}x (median of {args.repeats})")


if __name__ == "__main__":
    main()
