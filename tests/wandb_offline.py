"""Reading back a W&B offline run (`run-<id>.wandb`) in tests, without wandb's writer.

The file is W&B's record log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of chunks, each with a 7-byte header (CRC-32, length, type: 1 full, 2 first,
3 middle, 4 last) and a piece of a serialized `wandb_internal_pb2.Record`; a block's tail
shorter than a chunk header is padding. wandb 0.31 ships no Python reader of its own (its
Go core writes the file), so this one is the test's.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    out: list[Any] = []
    pending = b""
    offset = HEADER
    while offset + HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < HEADER:
            offset += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if length == 0 and kind == 0:  # zero padding at the end of what was written
            break
        body = data[offset + HEADER : offset + HEADER + length]
        # wandb's checksum covers the type byte, then the body.
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum
        offset += HEADER + length
        if kind == FULL:
            pending = body
        elif kind == FIRST:
            pending = body
            continue
        elif kind == MIDDLE:
            pending += body
            continue
        else:
            pending += body
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        out.append(record)
        pending = b""
    return out


def history(path: Path) -> list[dict[str, Any]]:
    """Every `run.log` call's values (JSON-decoded), with `_step`."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def config(path: Path) -> dict[str, Any]:
    """The run's config as logged (the last value of each key)."""
    values: dict[str, Any] = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        items = record.config.update if kind == "config" else []
        if kind == "run":
            items = record.run.config.update
        for item in items:
            values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values
