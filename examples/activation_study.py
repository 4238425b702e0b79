"""How do activation functions shape the gradient heatmap's values?

The same small network, 4 x [Conv2d 3x3 padding 1, activation] with 16 channels (the probed feature map,
``features``) and a 1x1 convolution head, is built with no activation (``nn.Identity``), ``nn.ReLU``, ``nn.GELU``
and ``nn.Tanh``. Each is measured at initialisation (seeded) and after 100 Adam steps on a synthetic dense task
made on the fly: from white-noise images, predict at every pixel the mean of the input over the 7 x 7 window
centred there. The theoretical field of ``features`` is 9 x 9, so the task asks for most of it.

For each network and stage: the weights-mode heatmap (``probe_rf(..., mode="weights")``) and the effective
heatmap on 64 held-out noise images (``effective_rf``) of the centre of ``features``, with the effective metrics
(extent0.95, std per axis, area0.5), and the patchiness (std / mean over the 9 x 9 field) of both heatmaps.
Writes docs/activations.png and prints a table.

Run: OMP_NUM_THREADS=1 python examples/activation_study.py
"""

from __future__ import annotations

import pathlib

import torch
from matplotlib.figure import Figure
from torch import nn

import rf_callback

SHAPE = (1, 1, 32, 32)
CHANNELS, DEPTH, WINDOW, STEPS, BATCH = 16, 4, 7, 100, 16
ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
CROP = slice(16 - 7, 16 + 8)  # the heatmaps are shown on the 15 x 15 window around the centre (the field is 9 x 9)
FIELD = slice(16 - 4, 16 + 5)  # the theoretical 9 x 9 field of the centre


def patchiness(heatmap: torch.Tensor) -> float:
    """Coefficient of variation (std / mean) of the heatmap over the 9 x 9 field: 0 for a flat map, high if speckled."""
    values = heatmap[FIELD, FIELD]
    return float(values.std() / values.mean())


def network(activation: type[nn.Module], seed: int = 0) -> nn.Sequential:
    """``features`` (4 x [conv 3x3, activation], the probed map) then a 1x1 convolution head to one channel."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index in range(DEPTH):
        layers += [nn.Conv2d(1 if index == 0 else CHANNELS, CHANNELS, 3, padding=1), activation()]
    return nn.Sequential(nn.Sequential(*layers), nn.Conv2d(CHANNELS, 1, 1))


def task(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """White-noise images and, per pixel, the mean of the image over the WINDOW x WINDOW window around it."""
    images = torch.randn(count, *SHAPE[1:], generator=generator)
    targets = nn.functional.avg_pool2d(images, WINDOW, stride=1, padding=WINDOW // 2, count_include_pad=True)
    return images, targets


def train(model: nn.Module, seed: int = 1) -> float:
    """STEPS Adam steps on fresh batches of the task; returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss = torch.tensor(0.0)
    for _ in range(STEPS):
        images, targets = task(BATCH, generator)
        loss = nn.functional.mse_loss(model(images), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return float(loss.detach())


def measure(model: nn.Module, inputs: torch.Tensor) -> dict:
    """Weights-mode and effective heatmaps of the centre of ``features``, and the effective metrics."""
    weights = rf_callback.probe_rf(model, SHAPE, "center", layer="0", mode="weights")
    effective = rf_callback.effective_rf(model, inputs, "center", layer="0")
    return {"weights": weights.heatmap, "effective": effective.heatmap, "metrics": effective.metrics()}


def main() -> None:
    inputs, _ = task(64, torch.Generator().manual_seed(2))
    results: dict[str, dict[str, dict]] = {}
    for name, activation in ACTIVATIONS.items():
        model = network(activation)
        results[name] = {"init": measure(model, inputs)}
        loss = train(model)
        results[name]["trained"] = measure(model, inputs)
        results[name]["loss"] = loss

    header = f"{'activation':<10} {'stage':<8} {'ext95 h':>7} {'ext95 w':>7} {'std h':>6} {'std w':>6} {'area0.5':>8}"
    header += f" {'cv weights':>10} {'cv eff':>6} {'loss':>7}"
    print(header)
    print("-" * len(header))
    for name, stages in results.items():
        for stage in ("init", "trained"):
            m = stages[stage]["metrics"]
            cv_weights, cv_effective = patchiness(stages[stage]["weights"]), patchiness(stages[stage]["effective"])
            area = "-" if m["area0.5"] is None else f"{m['area0.5']:.4f}"
            loss = f"{stages['loss']:.4f}" if stage == "trained" else ""
            print(
                f"{name:<10} {stage:<8} {m['extent0.95_h']:>7.0f} {m['extent0.95_w']:>7.0f} {m['std_h']:>6.2f} "
                f"{m['std_w']:>6.2f} {area:>8} {cv_weights:>10.2f} {cv_effective:>6.2f} {loss:>7}"
            )

    columns = [("weights", "init"), ("weights", "trained"), ("effective", "init"), ("effective", "trained")]
    fig = Figure(figsize=(10, 10.5))
    axes = fig.subplots(len(ACTIVATIONS), len(columns))
    for row, name in enumerate(ACTIVATIONS):
        for col, (kind, stage) in enumerate(columns):
            heat = results[name][stage][kind][CROP, CROP]
            heat = heat / heat.max()
            ax = axes[row, col]
            ax.imshow(heat.numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{kind}-mode, {stage}\n(linear, / max)", fontsize=9)
            if col == 0:
                ax.set_ylabel(name, fontsize=11)
    fig.suptitle("Centre of a 4 x conv3x3 feature map: gradient heatmaps (15 x 15 crop of a 32 x 32 input)")
    fig.tight_layout()
    out = pathlib.Path("docs/activations.png")
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
