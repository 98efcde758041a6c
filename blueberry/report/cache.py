"""Per-run parsed snapshots, so rebuilding a report does not re-parse every metrics.jsonl.

One .npz per run (no pickle): the run's metadata as a JSON string plus its history matrix. A snapshot
is used only when its stamp (local: (file, mtime, size) of each record file; W&B: state, heartbeat,
last step, and a digest of config, summary, name, group and tags, which can change after a run ends) equals
the run's current stamp, and it was parsed by this code. A corrupt or stale snapshot is simply re-read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

import blueberry
from blueberry.fileio import atomic_writer, source_digest
from blueberry.report.records import Run


@functools.cache
def parser_version() -> str:
    """The package's own source, digested: an upgrade or an edit of the parsing code (records, schema, the
    registry's labels) parses every run again. A hand-bumped version number was missed twice."""
    package = Path(blueberry.__file__).parent
    # (not an editor's lock or backup beside a module, `.#records.py`, which may be a link to nowhere)
    return source_digest(p for p in package.rglob("*.py") if p.is_file() and not p.name.startswith("."))


class RunCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / f"{hashlib.sha1(key.encode()).hexdigest()[:24]}.npz"

    def get(self, key: str, stamp: list) -> Run | None:
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(str(npz["meta"]))
                if meta.pop("_cache") != [parser_version(), key, stamp]:
                    raise KeyError("stale")
                run = Run.from_meta(meta, npz["values"])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            self.misses += 1
            return None
        self.hits += 1
        return run

    def put(self, key: str, stamp: list, run: Run) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {**run.to_meta(), "_cache": [parser_version(), key, stamp]}
        # JSON round trip of the stamp: what get() compares against is what json gives back.
        meta["_cache"] = json.loads(json.dumps(meta["_cache"]))
        with atomic_writer(self._path(key), binary=True) as handle:
            np.savez(handle, meta=np.array(json.dumps(meta, default=str)), values=run.history.values)
