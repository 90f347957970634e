"""Reads W&B offline runs back for tests, straight from the `.wandb` transaction log.

The log uses LevelDB-log framing: 32 KiB blocks; the file starts with a 7-byte header
`<4sHB>` (b":W&B", 0xBEE1, version); then records with a `<IHB>` header (crc, length, type),
type 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST; a block's last < 7 bytes are zero padding. The crc is
zlib's CRC-32 over the type byte and the payload. Each whole record is a serialized
`wandb_internal_pb2.Record`.

An offline run resumed with the same id gets a new `offline-run-*` directory (a segment);
`read_offline_segments` merges them in order.
"""
from __future__ import annotations

import glob
import json
import os
import time
import struct
import zlib
from typing import Any, Dict, Iterator, List

from google.protobuf import json_format
from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = struct.Struct("<4sHB")
RECORD = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_file(run_dir: str) -> str:
    if run_dir.endswith(".wandb"):
        return run_dir
    found = glob.glob(os.path.join(run_dir, "*.wandb"))
    assert len(found) == 1, f"expected one .wandb file in {run_dir}, found {found}"
    return found[0]


def iter_records(path: str) -> Iterator[pb.Record]:
    with open(path, "rb") as f:
        data = f.read()
    ident, magic, _version = HEADER.unpack_from(data, 0)
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path}: not a W&B transaction log"
    pos, chunks = HEADER.size, []
    while pos + RECORD.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD.size:
            assert data[pos:pos + left].strip(b"\0") == b"", f"{path}: junk in block padding at {pos}"
            pos += left
            continue
        crc, n, kind = RECORD.unpack_from(data, pos)
        if kind == 0 and n == 0:  # zeroed (preallocated) tail
            break
        payload = data[pos + RECORD.size:pos + RECORD.size + n]
        assert len(payload) == n, f"{path}: truncated record at {pos}"
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == crc, f"{path}: bad crc at {pos}"
        assert n <= left - RECORD.size, f"{path}: record crosses a block boundary at {pos}"
        pos += RECORD.size + n
        if kind == FULL:
            assert not chunks
            chunks = [payload]
        elif kind == FIRST:
            assert not chunks
            chunks = [payload]
            continue
        elif kind == MIDDLE:
            assert chunks
            chunks.append(payload)
            continue
        else:
            assert kind == LAST and chunks, f"{path}: bad record type {kind} at {pos}"
            chunks.append(payload)
        rec = pb.Record()
        rec.ParseFromString(b"".join(chunks))
        chunks = []
        yield rec


def _key(item) -> List[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _value(item) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    # Newer typed history values (oneof `value`), in case a writer uses them.
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which == "json":
        return json.loads(item.json)
    return None if which in (None, "none") else getattr(item, which)


def _put(d: Dict[str, Any], keys: List[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _drop(d: Dict[str, Any], keys: List[str]) -> None:
    for k in keys[:-1]:
        d = d.get(k, {})
    d.pop(keys[-1], None)


def _apply(d: Dict[str, Any], update, remove=()) -> None:
    for item in update:
        _put(d, _key(item), _value(item))
    for item in remove:
        _drop(d, _key(item))


def read_offline_run(run_dir: str, wait_s: float = 15.0) -> Dict[str, Any]:
    """One segment (an `offline-run-*` dir or its .wandb file) as a plain dict.

    `run.finish()` can return before wandb-core has flushed the log, so a log without its exit
    record yet is read again (up to `wait_s`) rather than half-parsed."""
    path = wandb_file(run_dir)
    deadline = time.time() + wait_s
    while True:
        try:
            records = list(iter_records(path))
        except AssertionError:  # a record still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            break
        time.sleep(0.1)
    out: Dict[str, Any] = {"dir": run_dir, "config": {}, "history": [], "summary": {}, "exit_code": None}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(project=r.project, group=r.run_group, name=r.display_name, id=r.run_id,
                       tags=list(r.tags), job_type=r.job_type, entity=r.entity, notes=r.notes,
                       start_time=json_format.MessageToDict(r).get("startTime"))
            _apply(out["config"], r.config.update, r.config.remove)
        elif kind == "config":
            _apply(out["config"], rec.config.update, rec.config.remove)
        elif kind == "history":
            row: Dict[str, Any] = {}
            _apply(row, rec.history.item)
            row.setdefault("_step", rec.history.step.num)
            out["history"].append(row)
        elif kind == "summary":
            _apply(out["summary"], rec.summary.update, rec.summary.remove)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    out["config"].pop("_wandb", None)  # W&B's own bookkeeping
    return out


def _sort_key(seg: str):
    # offline-run-YYYYmmdd_HHMMSS-<id>[-N]: N marks a second start within the same second.
    stamp, _, rest = os.path.basename(seg)[len("offline-run-"):].partition("-")
    tail = rest.rsplit("-", 1)
    return stamp, int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else 0


def list_offline_runs(directory: str) -> List[str]:
    """Every `offline-run-*` segment directory under `directory` (any depth), oldest first."""
    segs = [d for d in glob.glob(os.path.join(directory, "**", "offline-run-*"), recursive=True)
            if os.path.isdir(d) and glob.glob(os.path.join(d, "*.wandb"))]
    return sorted(segs, key=_sort_key)


def read_offline_segments(directory: str, run_id: str) -> Dict[str, Any]:
    """All segments of `run_id` under `directory`, merged: metadata of the latest segment,
    config and summary updated in order, history concatenated in order."""
    runs = [r for r in map(read_offline_run, list_offline_runs(directory)) if r.get("id") == run_id]
    assert runs, f"no offline run {run_id} under {directory}"
    merged = dict(runs[-1])
    merged["segments"] = [r["dir"] for r in runs]
    merged["history"] = [row for r in runs for row in r["history"]]
    merged["config"], merged["summary"] = {}, {}
    for r in runs:
        merged["config"].update(r["config"])
        merged["summary"].update(r["summary"])
    return merged
