"""The probe on real architectures at 224 x 224, as ratios to one forward + backward pass of the same model.

For ResNet-18, ResNet-50, VGG-16 and MobileNetV2 (torchvision's where it imports, else real_models.py's
re-implementations of their layer shapes), at input (1, 3, 224, 224), measured side by side in one run, repeats
interleaved, best of N:

- ``probe_rf(model, shape, "center", layer=L)``: bounds and heatmap only, theoretical mode, against one forward +
  backward pass of one sample (the model in eval mode, the input requiring grad, loss = output.sum());
- the same probe with ``mode="weights"``, against forward + backward of a batch of 8 (its 8 draws);
- the same theoretical probe, then reading ``field.geometry`` (r, S, P per axis), against one sample;
- ``rf_table(model, shape)``, then reading every row's ``stride``, against one sample.

L is ``layer4`` for the ResNets and ``features`` for VGG-16 and MobileNetV2. A second table gives the fields the
probes found beside the closed form of the longest path (``real_models.closed_form``).

Run: python benchmarks/bench_real.py [--repeats N | --quick] [--models resnet18,vgg16] [--source own]
     [--calls theoretical,weights,geometry,table] [--device cuda]
On a GPU every call is synchronised before its time is read, and the table adds each call's peak memory beside
the model's parameters.
(Ctrl-C or SIGTERM prints the tables of what was measured so far.)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable

import torch
from real_models import MODELS, PROBED_LAYER, available_sources, build, closed_form
from torch import nn

from rf_callback import probe_rf, rf_table

SHAPE = (1, 3, 224, 224)
DEVICE = torch.device("cpu")  # --device
DRAWS = 8  # probe_rf's default number of draws in weights mode: the weights-mode baseline's batch size
CALLS = {  # what each call does, as the table shows it (L: the probed layer, R: rf_table's number of rows)
    "theoretical": '`probe_rf(model, shape, "center", layer="L")`, bounds + heatmap',
    "weights": 'the same, `mode="weights"`',
    "geometry": "the same theoretical probe, then `field.geometry`",
    "table": "`rf_table(model, shape)` (R rows), then every row's `stride`",
}


def forward_backward(model: nn.Module, batch: int) -> Callable[[], None]:
    """Returns the baseline: one forward and backward pass of ``batch`` samples, loss = output.sum()."""
    x = torch.randn((batch, *SHAPE[1:]), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def run() -> None:
        model(x.clone().requires_grad_(True)).sum().backward()
        model.zero_grad(set_to_none=True)

    return run


def calls_of(model: nn.Module, layer: str, wanted: list[str], results: dict) -> dict[str, Callable[[], None]]:
    """Returns the timed calls for one model; each keeps its last result in ``results`` for the fields table."""

    def theoretical() -> None:
        results["theoretical"] = probe_rf(model, SHAPE, "center", layer=layer)

    def weights() -> None:
        results["weights"] = probe_rf(model, SHAPE, "center", layer=layer, mode="weights", draws=DRAWS)

    def geometry() -> None:
        field = probe_rf(model, SHAPE, "center", layer=layer)
        tuple(field.geometry)  # measured on first use: a LazyGeometry until it is read
        results["geometry"] = field

    def table() -> None:
        rows = rf_table(model, SHAPE)
        [row.stride for row in rows]  # noqa: B018
        results["table"] = rows

    calls = {"fb1": forward_backward(model, 1), "fb8": forward_backward(model, DRAWS)}
    everything = {"theoretical": theoretical, "weights": weights, "geometry": geometry, "table": table}
    return calls | {name: everything[name] for name in wanted}


def measure(
    calls: dict[str, Callable[[], None]], repeats: int, times: dict[str, float], label: str, peaks: dict | None = None
) -> None:
    """Times every call once per repeat, the calls interleaved, keeping the best time of each in ``times``.

    On a GPU, ``peaks`` gets each call's peak memory above what was allocated before it (bytes).
    """
    cuda = DEVICE.type == "cuda"
    for name in ("fb1", "fb8"):
        calls[name]()  # warm-up: the baselines are cheap and their first call pays for allocation
    for repeat in range(repeats):
        for name, call in calls.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            call()
            if cuda:
                torch.cuda.synchronize()
                if peaks is not None:
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated() - before)
            elapsed = time.perf_counter() - start
            times[name] = min(times.get(name, elapsed), elapsed)
            print(f"  [{label}] repeat {repeat + 1}/{repeats}: {name} {elapsed:.3f} s", file=sys.stderr, flush=True)


class OtherWork:
    """How many CPUs other processes kept busy since construction: /proc/stat's busy time less this process's CPU
    time, over the wall time (Linux; ``None`` elsewhere). Competing for cores slows torch's threads many times over.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as stat:
                ticks = [int(t) for t in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        except (OSError, ValueError):
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        return busy, time.process_time(), time.perf_counter()

    def cpus(self) -> float | None:
        """Returns the mean number of CPUs other processes kept busy since construction."""
        end = self._sample()
        if self.start is None or end is None:
            return None
        (busy0, own0, wall0), (busy1, own1, wall1) = self.start, end
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(wall1 - wall0, 1e-9)


def ratio_table(measured: dict[str, tuple[str, dict, dict]], peaks: dict | None = None) -> list[str]:
    """Returns the Markdown table of ratios to the baselines, one row per model and call (and peak memory on a GPU)."""
    memory = bool(peaks)
    lines = [
        "| model | call | ratio | time (s) | baseline | baseline (s) |" + (" peak MiB (model MiB) |" if memory else ""),
        "|---|---|---|---|---|---|" + ("---|" if memory else ""),
    ]
    for model_name, (layer, times, results) in measured.items():
        for call, text in CALLS.items():
            base = "fb8" if call == "weights" else "fb1"
            if call not in times or base not in times:
                continue
            base_text = f"fwd+bwd, batch of {DRAWS}" if base == "fb8" else "fwd+bwd, 1 sample"
            text = text.replace('"L"', f'"{layer}"').replace("R rows", f"{len(results.get('table', ''))} rows")
            peak = ""
            if memory:
                model_peaks = peaks.get(model_name, {})
                peak = f" {model_peaks.get(call, 0) / 2**20:.0f} ({model_peaks.get('model', 0) / 2**20:.0f}) |"
            lines.append(
                f"| {model_name} | {text} | **{times[call] / times[base]:.1f}×** | {times[call]:.2f} | "
                f"{base_text} | {times[base]:.3f} |{peak}"
            )
    return lines


def _axes(values) -> str:
    return " x ".join(str(v) for v in values)


def _geometry(geometry) -> str:
    return "; ".join("None" if g is None else f"r={g.size}, S={g.stride}, P={g.offset}" for g in geometry)


def fields_table(measured: dict[str, tuple[str, dict, dict]], source: str) -> list[str]:
    """Returns the Markdown table of the fields the probes found, beside the closed form of the longest path."""
    lines = [
        "| model | call | size | bounds | geometry per axis (h; w) | closed form (r, S, P) | geometry = closed form |",
        "|---|---|---|---|---|---|---|",
    ]
    for model_name, (layer, _, results) in measured.items():
        r, s, p = closed_form(model_name, source)
        closed = f"r={r}, S={s}, P={p}"
        for call in ("theoretical", "weights", "geometry"):
            if call not in results:
                continue
            field = results[call]
            shown, same = "(not read)", ""
            if call == "geometry":  # only this row reads the geometry: reading it elsewhere would compute it
                shown = _geometry(field.geometry)
                matches = [g is not None and (g.size, g.stride, g.offset) == (r, s, p) for g in field.geometry]
                same = "yes" if all(matches) else "**no**"
            lines.append(
                f"| {model_name} | {call} | {_axes(field.size)} | {field.bounds} | {shown} | {closed} | {same} |"
            )
        if "table" in results:
            row = next(row for row in results["table"] if row.name == layer)
            full = getattr(row, "full_size", None)  # the unclipped r, in tables that carry it
            sizes = full if full is not None else (r,) * len(row.stride)  # without it, S and P alone are compared
            same = all(found == (r, s, p) for found in zip(sizes, row.stride, row.offset))
            shown = f"S={_axes(row.stride)}, P={_axes(row.offset)}"
            shown = shown if full is None else f"r={_axes(full)}, {shown}"
            verdict = ("yes" if same else "**no**") + (" (S, P)" if full is None else "")
            lines.append(
                f"| {model_name} | table row `{layer}` | {_axes(row.size)} | {row.bounds} | {shown} | {closed} | "
                f"{verdict} |"
            )
    return lines


def main() -> None:
    """Parses the arguments, measures, prints the tables."""
    sources = available_sources()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best of them counts")
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--source", choices=["torchvision", "own"], default=sources[0])
    parser.add_argument("--calls", default=",".join(CALLS), help=f"comma-separated subset of {','.join(CALLS)}")
    parser.add_argument("--device", default="cpu", help="where the model and its probes run (cpu, cuda)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    models, calls = args.models.split(","), args.calls.split(",")
    for name, given, allowed in (("--models", models, MODELS), ("--calls", calls, list(CALLS))):
        if not set(given) <= set(allowed):
            parser.error(f"{name}: {sorted(set(given) - set(allowed))} not in {list(allowed)}")
    if args.source not in sources:
        parser.error("--source torchvision: torchvision does not import here (make bench-env creates .venv-bench)")
    repeats = 1 if args.quick else args.repeats

    if args.source == "torchvision":
        import torchvision

        origin = f"torchvision {torchvision.__version__} (torchvision.models.<name>(weights=None))"
    else:
        origin = "benchmarks/real_models.py (re-implementations of torchvision's layer shapes)"
    print(
        f"torch {torch.__version__} on {DEVICE}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"input {SHAPE}, best of {repeats} interleaved repeat(s)\nmodels from {origin}, fresh weights, eval mode",
        flush=True,
    )
    probe_rf(nn.Conv2d(1, 1, 3), (1, 1, 8, 8))  # warm-up of the probe's code paths, on a tiny network

    measured: dict[str, tuple[str, dict, dict]] = {}
    peaks: dict[str, dict] = {}
    others: dict[str, float | None] = {}  # per model, CPUs kept busy by other processes while it was measured
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` stops it as Ctrl-C does: tables printed
    try:
        for model_name in models:
            layer, times, results = PROBED_LAYER[model_name], {}, {}
            measured[model_name] = (layer, times, results)
            model, other_work = build(model_name, args.source).to(DEVICE), OtherWork()
            peaks[model_name] = {"model": sum(p.numel() * p.element_size() for p in model.parameters())}
            measure(calls_of(model, layer, calls, results), repeats, times, model_name, peaks[model_name])
            others[model_name] = other_work.cpus()
    except KeyboardInterrupt:
        print("\ninterrupted: the tables hold what was measured so far", file=sys.stderr)
    print()
    print("\n".join(ratio_table(measured, peaks if DEVICE.type == "cuda" else None)))
    print()
    print("\n".join(fields_table(measured, args.source)))
    if others:
        busy = ", ".join(f"{name} {'?' if cpus is None else f'{cpus:.2f}'}" for name, cpus in others.items())
        print(f"\nCPUs kept busy by other processes during each model's measurements: {busy}")
        if any(cpus is not None and cpus > 0.1 * (os.cpu_count() or 1) for cpus in others.values()):
            print(
                "warning: other processes competed for the CPUs; torch's threads wait for each other then, and the "
                "figures (the short baselines most) can be several times off: measure on an idle machine"
            )


if __name__ == "__main__":
    main()
