"""What the probe costs on a model sharded with FSDP2's ``fully_shard``, beside the same model whole.

Runs on 2 CPU processes (gloo) here, or on 2 GPUs with ``--device cuda`` (nccl). For each model, per rank: the
theoretical probe (no communication under FSDP2), the weights-mode probe (one all-gather per parameter into the
probe's copy), the same under FSDP1 (``FullyShardedDataParallel``, blocks auto-wrapped: gathered in every mode), and
the same probes of the whole model; the gathered copy's size beside the rank's shard.

    OMP_NUM_THREADS=1 PYTHONPATH=.. ../.venv/bin/python bench_sharded.py
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
from torch import nn

from rf_callback import probe_rf

WORLD_SIZE = 2


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


def residual(width: int, blocks: int) -> nn.Sequential:
    """A stem, then ``blocks`` residual blocks per stage over 3 stages of stride 2."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
    for stage in range(3):
        layers += [Block(width) for _ in range(blocks)] + ([nn.Conv2d(width, width, 3, 2, 1)] if stage < 2 else [])
    return nn.Sequential(*layers)


MODELS = {"small (16 x 2 blocks)": (16, 2), "wide (256 x 4 blocks)": (256, 4)}


def best(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def run(rank: int, port: int, device: str, repeats: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=WORLD_SIZE)
    where = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    for name, (width, blocks) in MODELS.items():
        torch.manual_seed(0)
        whole = residual(width, blocks).to(where)
        torch.manual_seed(0)
        sharded = residual(width, blocks).to(where)
        for module in sharded:
            if isinstance(module, Block):
                fully_shard(module)
        fully_shard(sharded)
        torch.manual_seed(0)
        flat = FullyShardedDataParallel(
            residual(width, blocks).to(where), auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=where
        )
        shape = (1, 3, 64, 64)
        flat(torch.ones(shape, device=where))  # FSDP1 initialises lazily, at its first forward
        full_mib = sum(p.numel() for p in whole.parameters()) * 4 / 2**20
        shard_mib = sum(p.to_local().numel() for p in sharded.parameters()) * 4 / 2**20
        row = {}
        for mode in ("theoretical", "weights"):
            for label, model in (("whole", whole), ("sharded", sharded), ("fsdp1", flat)):
                dist.barrier()
                row[(mode, label)] = best(lambda m=model, mo=mode, s=shape: probe_rf(m, s, mode=mo), repeats)
        if rank == 0:
            print(f"{name}: parameters {full_mib:.1f} MiB whole, {shard_mib:.1f} MiB per rank's shard; gathered copy "
                  f"(weights mode) {full_mib:.1f} MiB per rank")  # fmt: skip
            for mode in ("theoretical", "weights"):
                whole_s, sharded_s, flat_s = (row[(mode, label)] for label in ("whole", "sharded", "fsdp1"))
                fsdp2 = f"FSDP2 {sharded_s * 1e3:7.1f} ms ({sharded_s / whole_s:.2f}x)"
                fsdp1 = f"FSDP1 {flat_s * 1e3:7.1f} ms ({flat_s / whole_s:.2f}x)"
                print(f"  {mode:<11} whole {whole_s * 1e3:7.1f} ms   {fsdp2}   {fsdp1}")
    # FSDP1 on the CPU aborts now and then at interpreter exit (torch's teardown of its gloo threads): leave at once.
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(run, args=(port, args.device, args.repeats), nprocs=WORLD_SIZE)


if __name__ == "__main__":
    main()
