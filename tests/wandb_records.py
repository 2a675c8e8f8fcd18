"""Read the records of an offline W&B run file (`run-*.wandb`): a LevelDB-style log of protobuf records.

wandb no longer ships a Python reader for it; this is enough to check what a run logged.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

FILE_HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)
BLOCK = 32 * 1024
RECORD_HEADER = 7  # crc32 (4) + length (2) + type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    offset, pending = FILE_HEADER, b""
    while offset + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < RECORD_HEADER:  # block trailer padding
            offset += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + RECORD_HEADER])
        chunk = data[offset + RECORD_HEADER : offset + RECORD_HEADER + length]
        offset += RECORD_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            offset += left_in_block - RECORD_HEADER  # zero padding: skip to the next block
            offset -= offset % BLOCK


def read_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    for payload in _payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def history_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys


def artifacts(path: Path) -> list[wandb_internal_pb2.ArtifactRecord]:
    return [r.artifact for r in read_records(path) if r.WhichOneof("record_type") == "artifact"]


def run_group(path: Path) -> str:
    """The W&B group the run was started in ('' when none)."""
    return next(r.run.run_group for r in read_records(path) if r.WhichOneof("record_type") == "run")
