"""The probe across timm's families at their native input sizes, as ratios to one forward + backward pass.

Per model (timm 1.0.29, fresh weights, ``forward_features`` as the model, eval mode), measured side by side in one
run, best of N interleaved repeats: one forward + backward pass of one sample (loss = output.sum()); the theoretical
probe of the centre (bounds and heatmap); the same probe, then its geometry; and on a GPU each call's peak memory
beside the model's parameters. Where a geometry is None, its reason is printed.

Runs in the bench environment (``make bench-env``, which installs timm 1.0.29 beside torchvision, from local disk):
python benchmarks/bench_zoo.py [--device cuda] [--repeats N] [--only convnext,vit]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from check_zoo import TIMM, Features

from rf_callback import probe_rf


def timed(call, device: torch.device) -> tuple[float, int, object]:
    """Runs ``call``; returns its seconds, its peak memory above what was allocated before (GPU; else 0) and result."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    result = call()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed, (torch.cuda.max_memory_allocated() - before) if cuda else 0, result


def bench(name: str, layout: str, side: int, device: torch.device, repeats: int) -> str:
    import timm

    model = Features(timm.create_model(name, pretrained=False)).eval().to(device)
    shape = (1, 3, side, side)
    x = torch.randn(shape, device=device)

    def forward_backward():
        out = model(x.clone().requires_grad_(True))
        (out if isinstance(out, torch.Tensor) else out[0]).float().sum().backward()
        model.zero_grad(set_to_none=True)

    def probe():
        return probe_rf(model, shape, layout=layout)

    def geometry():
        field = probe_rf(model, shape, layout=layout)
        return field, tuple(field.geometry)

    calls = {"fb": forward_backward, "probe": probe, "geometry": geometry}
    best: dict[str, float] = {}
    peak: dict[str, int] = {}
    results: dict[str, object] = {}
    forward_backward()
    for _ in range(repeats):
        for key, call in calls.items():
            elapsed, memory, results[key] = timed(call, device)
            best[key] = min(best.get(key, elapsed), elapsed)
            peak[key] = max(peak.get(key, 0), memory)
    field, geometry = results["geometry"]
    shown = ", ".join("None" if g is None else f"r={g.size} S={g.stride}" for g in geometry)
    why = "; ".join(dict.fromkeys(r for r in field.geometry.reasons if r))
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    memory = (
        f" | {peak['probe'] / 2**20:.0f} / {peak['geometry'] / 2**20:.0f} ({params:.0f})"
        if device.type == "cuda"
        else ""
    )
    return (
        f"| `{name}` @ {side} | {best['fb'] * 1e3:.1f} ms | **{best['probe'] / best['fb']:.1f}×** | "
        f"**{best['geometry'] / best['fb']:.1f}×** | {shown}{memory} |" + (f" {why[:90]}" if why else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated substrings of model names to keep")
    args = parser.parse_args()
    device = torch.device(args.device)
    keep = [s for s in args.only.split(",") if s]
    print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads, best of {args.repeats}")
    memory = " peak MiB probe / geometry (params) |" if device.type == "cuda" else ""
    print(f"| timm model @ input | fwd+bwd | probe (bounds) | probe + geometry | geometry per axis |{memory}")
    print("|---|---|---|---|---|" + ("---|" if memory else ""))
    for name, layout, side in TIMM:
        if keep and not any(k in name for k in keep):
            continue
        try:
            print(bench(name, layout, side, device, args.repeats), flush=True)
        except Exception as error:  # noqa: BLE001 - one model's failure is reported, the others run
            print(f"| `{name}` @ {side} | failed: {type(error).__name__}: {str(error)[:150]} |", flush=True)
            print(f"  {name}: {error}", file=sys.stderr)


if __name__ == "__main__":
    main()
