"""Read a W&B run's transaction log (`run-<id>.wandb`) in-process, without a server.

W&B's Python API has no reader for offline runs (wandb/wandb#1308); W&B ships one as a CLI,
`wandb leet inspect --json PATH` (one JSON object per record, wandb 0.31). We decode the file
ourselves so the runner (resume replay) and the tests can read it without a subprocess, and
tests/tracking/test_wandb_log.py checks this decoder against `wandb leet inspect` record by
record (run, config, every history row, summary, exit), so a wandb upgrade that changes the
format fails the tests. Format (wandb 0.31, pinned): a 7-byte header (`:W&B`, uint16 0xBEE1,
uint8 version), then 32 KiB blocks of chunks with a 7-byte header (uint32 CRC, uint16 length,
uint8 type: 1 full, 2 first, 3 middle, 4 last) holding protobuf Records.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768
HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class WandbLog:
    run_id: str = ""
    name: str = ""
    project: str = ""
    entity: str = ""
    notes: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)  # name, type, aliases, metadata of each logged artifact
    exit_code: int | None = None  # None: no exit record (still running, or killed)


def _payloads(data: bytes):
    if len(data) < 7 or data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError("not a W&B transaction log")
    pos, pending = 7, b""
    while pos + HEADER.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER.size:  # too small for a header: the writer skipped to the next block
            pos += left_in_block
            continue
        crc, length, kind = HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # padding to the end of the block
            pos += left_in_block
            continue
        payload = data[pos + HEADER.size : pos + HEADER.size + length]
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            return  # torn tail: the run was killed or is still writing
        pos += HEADER.size + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""


def _items(items) -> dict:
    return {(item.key or ".".join(item.nested_key)): json.loads(item.value_json) for item in items}


class WandbLogError(ValueError):
    """A W&B transaction log that cannot be decoded (missing, not one, or a corrupt record inside)."""


def read_wandb_log(path: str | Path) -> WandbLog:
    """Decode one `run-<id>.wandb` file (or the offline run directory holding it); WandbLogError if it cannot be."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    try:
        if path.is_dir():
            path = next(path.glob("run-*.wandb"), path / "run-<id>.wandb")
        return _decode(path.read_bytes())
    except (OSError, ValueError, DecodeError, struct.error) as exc:
        raise WandbLogError(f"{path}: {type(exc).__name__}: {exc}") from None


def held_rows(segments) -> tuple[set[tuple[int, bool]], list[str]]:
    """(trainer/step, is an eval row) of every history row in these logs, and why each unreadable one was left
    out: a resumed run re-logs what no readable segment holds."""
    held: set[tuple[int, bool]] = set()
    problems = []
    for segment in segments:
        try:
            rows = read_wandb_log(segment).history
        except WandbLogError as exc:
            problems.append(str(exc))
            continue
        for row in rows:
            step = row.get("trainer/step")
            held.add((step if isinstance(step, int) else None, "val/loss" in row))
    return held, problems


def _decode(data: bytes) -> WandbLog:
    from wandb.proto import wandb_internal_pb2

    log = WandbLog()
    for payload in _payloads(data):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            log.run_id, log.name, log.group, log.job_type = run.run_id, run.display_name, run.run_group, run.job_type
            log.project, log.entity, log.notes = run.project, run.entity, run.notes
            log.tags = list(run.tags)
            log.config.update(_items(run.config.update))
        elif kind == "config":
            log.config.update(_items(record.config.update))
        elif kind == "history":
            log.history.append(_items(record.history.item))
        elif kind == "summary":
            log.summary.update(_items(record.summary.update))
            for item in record.summary.remove:
                log.summary.pop(item.key or ".".join(item.nested_key), None)
        elif kind == "artifact":
            artifact = record.artifact
            log.artifacts.append(
                {
                    "name": artifact.name,
                    "type": artifact.type,
                    "aliases": list(artifact.aliases),
                    "metadata": json.loads(artifact.metadata or "{}"),
                }
            )
        elif kind == "exit":
            log.exit_code = record.exit.exit_code
    log.config.pop("_wandb", None)
    return log
