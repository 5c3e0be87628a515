"""Reading an offline W&B run back: the records of its ``run-*.wandb`` file (W&B's LevelDB-style log of
protobuf ``Record`` messages), so tests can check what a run logged without a W&B server."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7  # the file's header (":W&B", magic, version), then per record: crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> list[bytes]:
    out, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        left = BLOCK - offset % BLOCK
        if left < HEADER:
            offset += left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            offset += left
            continue
        chunk = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
            pending = b""
    return out


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """``{"history": [row dicts], "summary": {key: value}, "artifacts": [(name, type, aliases)]}`` of the
    offline run in ``run_dir`` (``.../wandb/offline-run-*``); keys joined with "/" as logged."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    history, summary, artifacts = [], {}, []

    def key_of(item: Any) -> str:
        return "/".join(item.nested_key) if item.nested_key else item.key

    for payload in _payloads(data):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({key_of(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({key_of(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            artifacts.append((record.artifact.name, record.artifact.type, list(record.artifact.aliases)))
    return {"history": history, "summary": summary, "artifacts": artifacts}
