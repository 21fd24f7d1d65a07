"""Reads what an offline W&B run logged, from its run-<id>.wandb file.

wandb 0.31 writes runs from its Go core and no longer ships a Python reader for this file, so
the tests read it themselves: a 7-byte header (":W&B", magic, version), then LevelDB-log
records (4-byte checksum, 2-byte length, 1-byte type: full / first / middle / last) in 32 KiB
blocks, each record a serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
from pathlib import Path

BLOCK, HEADER = 32768, 7


def records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        if kind in (1, 2):  # full, first
            pending = chunk
        else:  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def summary(run_dir: str | Path) -> dict:
    """{'run': (id, group, name), 'config': {key: value}, 'history': [{key: value}, ...]}."""
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    result: dict = {"config": {}, "history": []}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            result["run"] = (record.run.run_id, record.run.run_group, record.run.display_name)
        elif kind == "config":
            for item in record.config.update:
                result["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            result["history"].append(row)
    return result
