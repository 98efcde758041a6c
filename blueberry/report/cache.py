"""Per-run parsed snapshots, so rebuilding a report does not re-parse every metrics.jsonl.

One .npz per run (no pickle): the run's metadata as a JSON string plus its history matrix. A snapshot
is used only when its stamp (local: (file, mtime, size) of each record file; W&B: state, heartbeat,
last step) equals the run's current stamp. A corrupt or stale snapshot is simply re-read.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from blueberry.fileio import atomic_writer
from blueberry.report.records import Run

VERSION = 2  # bump when Run or History changes shape


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
                if meta.pop("_cache") != [VERSION, key, stamp]:
                    raise KeyError("stale")
                run = Run.from_meta(meta, npz["values"])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            self.misses += 1
            return None
        self.hits += 1
        return run

    def put(self, key: str, stamp: list, run: Run) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {**run.to_meta(), "_cache": [VERSION, key, stamp]}
        # JSON round trip of the stamp: what get() compares against is what json gives back.
        meta["_cache"] = json.loads(json.dumps(meta["_cache"]))
        with atomic_writer(self._path(key), binary=True) as handle:
            np.savez(handle, meta=np.array(json.dumps(meta, default=str)), values=run.history.values)
