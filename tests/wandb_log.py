"""Reads back the history rows of an offline W&B run from its transaction log (``run-<id>.wandb``).

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic ``0xBEE1``, version 0), then 32 KiB blocks of
records, each a CRC32 of type and bytes (4 bytes), a length (2 bytes) and a type (1 byte: full, first, middle or
last chunk) before its bytes; a block's tail shorter than a record header is zero padding. Each record is a
``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

BLOCK = 32 * 1024
HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data.startswith(HEADER), f"{path} is not a W&B transaction log"
    out, pending, offset = [], b"", len(HEADER)
    while offset + 7 <= len(data):
        if BLOCK - offset % BLOCK < 7:  # zero padding to the next block
            offset += BLOCK - offset % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if offset + 7 + length > len(data):  # still being written
            break
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad CRC at byte {offset}"
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            out.append(pending)
    return out


def history_rows(path: Path, timeout: float = 60.0) -> list[dict]:
    """Every ``run.log`` row of the run, as {key: value} (media values as W&B's JSON descriptions).

    ``wandb.finish()`` can return before W&B's service process has written the run's records: this waits until the
    log holds the run's exit record.
    """
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout
    while True:
        parsed = []
        for data in records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            parsed.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in parsed) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rows = []
    for record in parsed:
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows
