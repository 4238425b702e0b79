"""The probe on a built-in example network: prints the field at the centre and writes its picture.

Run: python examples/probe_demo.py [--out DIR]
"""

from __future__ import annotations

import argparse
import pathlib

from torch import nn

from rf_callback import probe_rf, verify_rf
from rf_callback.plotting import animate_rf, plot_rf


def example_network() -> nn.Sequential:
    """A small VGG-style network: two stages of two 3x3 convolutions with BatchNorm and ReLU, each max-pooled."""

    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.MaxPool2d(2),
        ]  # fmt: skip

    return nn.Sequential(*stage(3, 16), *stage(16, 32), nn.Conv2d(32, 32, 3, padding=2, dilation=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"), help="folder for the pictures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model, shape = example_network(), (1, 3, 48, 64)
    field = probe_rf(model, shape, "center")
    print(field)
    for axis, name in enumerate("hw"):
        g = field.geometry[axis]
        print(f"  {name}: bounds {field.bounds[axis]}, size {field.size[axis]}, r={g.size} S={g.stride} P={g.offset}")
    print(f"  seed's check (zero the field, only the probed output goes to zero): {verify_rf(model, field).passed}")
    weights = probe_rf(model, shape, "center", mode="weights")
    print(f"  weights mode (what the random initial weights connect): size {weights.size}")
    fmap = probe_rf(model, shape, "all")
    print(f"  every position: {len(fmap)} fields, sizes from {fmap.size.min().item()} to {fmap.size.max().item()}")

    picture = args.out / "rf_center.png"
    plot_rf(field).savefig(picture, dpi=100)
    gif = animate_rf(model, shape, args.out / "rf_sweep.gif")
    print(f"wrote {picture} and {gif}")


if __name__ == "__main__":
    main()
