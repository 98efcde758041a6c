"""The normalised run record the report is built from, and its two loaders (local run records, W&B API).

Every run found is returned, whatever its state: a crashed, running or unreadable run is listed as such
by the report, never dropped and never fatal.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, NotRequired

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict

from blueberry.fileio import is_number, read_json_file
from blueberry.models import registry
from blueberry.overrides import value_at
from blueberry.tracking import read_metrics
from blueberry.tracking.record import RecordError, run_is_live
from blueberry.tracking.schema import (
    HEADER_KEYS,
    METRICS_FILE,
    RECORD_FILES,
    SPEC_FILE,
    SPEC_KEYS,
    STATUS_FILE,
    SUMMARY_FILE,
    WANDB_STEP,
    header_from_wandb_config,
    keep_metric,
    run_tags,
    sweep_tag,
)

NOT_AN_OBJECT_LINE = re.compile(rb"^[ \t]*[^{\s]", re.MULTILINE)


class ReportError(Exception):
    """A problem the user must fix; `code` is the CLI exit code (2 bad input, 1 W&B unreachable or refused)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass
class History:
    """All logged rows as one float matrix (rows × columns, NaN where a row did not log a column).

    Train rows and eval rows are separate rows sharing a step, exactly as in metrics.jsonl.
    """

    columns: list[str] = field(default_factory=lambda: ["step", "time"])
    values: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))

    @classmethod
    def from_rows(cls, rows: list[dict], step_key: str = "step", time_key: str = "time") -> History:
        keys = set().union(*rows) if rows else set()
        metrics = sorted(k for k in keys if keep_metric(k) and k not in (step_key, time_key))
        columns = ["step", "time", *metrics]
        values = np.empty((len(rows), len(columns)))
        for j, key in enumerate([step_key, time_key, *metrics]):
            try:  # a column at a time: ~5x faster than cell by cell, for ~1.5M rows of 1,000 runs
                values[:, j] = np.fromiter((row.get(key, math.nan) for row in rows), float, len(rows))
            except (TypeError, ValueError):  # a None or a "nan"/"inf" string somewhere in the column
                values[:, j] = [_to_float(row.get(key)) for row in rows]
        return cls(columns, values)

    @classmethod
    def from_jsonl(cls, path: Path) -> History:
        """A metrics.jsonl file → History, through Arrow's C++ JSON reader (several times faster than json.loads
        row by row, and it releases the GIL). A file Arrow refuses — a torn last line after a crash, a "nan"
        string in a number column — is read row by row instead, with the same result."""
        try:
            data = path.read_bytes()
            if NOT_AN_OBJECT_LINE.search(data):  # Arrow 26 crashes (SIGSEGV) on a first line `null`, and reads a
                raise ValueError("a line that is not an object")  # later `null` as an empty row: never hand it one
            table = pa_json.read_json(pa.BufferReader(data))
            if not {"step", "time"} <= set(table.column_names):
                raise ValueError("no step/time columns")
            step = table.column("step")
            if not pa.types.is_integer(step.type) or step.null_count:  # read_metrics names the bad row
                raise ValueError("a row without an integer step")
            metrics = sorted(k for k in table.column_names if keep_metric(k) and k not in ("step", "time"))
            names = ["step", "time", *metrics]
            values = np.empty((table.num_rows, len(names)))
            for j, name in enumerate(names):
                # nulls (a row that did not log the column) become NaN
                values[:, j] = pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowException, ValueError, TypeError):
            return cls.from_rows(read_metrics(path))
        return cls(names, values)

    def series(self, key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the rows that logged `key`, x being "step" or "time" (seconds since start)."""
        if key not in self.columns:
            return np.empty(0), np.empty(0)
        y = self.values[:, self.columns.index(key)]
        xs = self.values[:, self.columns.index(x)]
        mask = ~np.isnan(y)
        return xs[mask], y[mask]

    @property
    def last_step(self) -> int | None:
        steps = self.values[:, 0]
        steps = steps[~np.isnan(steps)]
        return int(steps.max()) if steps.size else None


def _to_float(value: Any) -> float:
    """Numbers as floats; JSON-safe "nan"/"inf" strings (see write_json_atomic) too; anything else NaN."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


@dataclass
class Run:
    """One run, whatever its source. `state`: finished | running | failed | interrupted | crashed | unreadable."""

    id: str
    name: str
    experiment: str
    state: str
    reason: str | None = None
    sweep: dict | None = None  # {"id": ..., "name": ...} for sweep runs
    group: str | None = None  # the W&B group (tracking.group, WANDB_RUN_GROUP); None: the experiment
    tags: list[str] = field(default_factory=list)  # the W&B tags
    spec: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    header: dict = field(default_factory=dict)
    history: History = field(default_factory=History)
    source: str = ""  # run directory or W&B path

    def get(self, dotted: str, default: Any = None) -> Any:
        """A spec value by dotted path, e.g. "train.lr"."""
        return value_at(self.spec, dotted, default)

    @property
    def variant(self) -> str | None:
        return self.get("model.variant")

    @property
    def lr(self) -> float | None:
        return self.get("train.lr")

    @property
    def seed(self) -> int | None:
        return self.get("seed", self.header.get("seed"))

    @property
    def ok(self) -> bool:
        """Finished, with a spec and a final validation loss: the runs the tables aggregate."""
        return self.state == "finished" and bool(self.spec) and _finite(self.summary.get("val/loss"))

    def metric(self, key: str) -> float | None:
        value = self.summary.get(key)
        return float(value) if _finite(value) else None

    def param_count(self, kind: str) -> float | None:
        value = (self.header.get("params") or {}).get(kind)
        return float(value) if _finite(value) else None

    def to_meta(self) -> dict:
        """Everything but the history matrix, as plain JSON (for the cache)."""
        return {
            "id": self.id,
            "name": self.name,
            "experiment": self.experiment,
            "state": self.state,
            "reason": self.reason,
            "sweep": self.sweep,
            "group": self.group,
            "tags": self.tags,
            "spec": self.spec,
            "summary": self.summary,
            "header": self.header,
            "source": self.source,
            "columns": self.history.columns,
        }

    @classmethod
    def from_meta(cls, meta: dict, values: np.ndarray) -> Run:
        meta = dict(meta)
        history = History(meta.pop("columns"), values)
        return cls(history=history, **meta)


def _finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


# ---------------------------------------------------------------- local run records


def find_run_dirs(runs_root: Path) -> tuple[list[Path], list[Run]]:
    """runs/<experiment>/<run_id>/ directories holding at least one run-record file, and an unreadable Run for
    each experiment folder this user may not list (a colleague's, on a shared runs root). A run folder it may
    not look into is found too: read, it is listed as unreadable, with why."""
    found, unlisted = [], []
    for exp_dir in _named_folders(runs_root):
        try:
            run_dirs = _named_folders(exp_dir)
        except OSError as exc:
            reason = f"its experiment folder cannot be listed ({exc.strerror or exc}): its runs are not read"
            unlisted.append(Run(f"{exp_dir.name}/*", "*", exp_dir.name, "unreadable", reason, source=str(exp_dir)))
            continue
        found += [run_dir for run_dir in run_dirs if _holds_a_record(run_dir)]
    return found, unlisted


def _holds_a_record(run_dir: Path) -> bool:
    """A run-record file is in `run_dir`, or this user may not look (then it is read, and listed unreadable). By
    os.stat, not Path.exists, which reads "permission denied" as "missing" on some Pythons."""
    for name in RECORD_FILES:
        try:
            os.stat(run_dir / name)
            return True
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return True
    return False


def _named_folders(folder: Path) -> list[Path]:
    # "_sweeps/" (sweep state) and hidden directories are not experiments: experiment names start alphanumeric.
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def fingerprint(run_dir: Path) -> list:
    """What the cache is keyed on: (file, mtime, size) of each record file."""
    out = []
    for name in RECORD_FILES:
        try:
            st = os.stat(run_dir / name)
        except OSError:
            continue
        out.append([name, st.st_mtime_ns, st.st_size])
    return out


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    data, problem = read_json_file(path)
    if problem:
        return None, problem
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, None


# The parts of a run record the report reads, with the types the runner writes (other keys pass unchecked).
# A record that breaks them is listed as unreadable with pydantic's reason, never fed to the tables.
_STRICT = ConfigDict(strict=True)


@with_config(_STRICT)
class _SpecShape(TypedDict, total=False):
    name: str | None
    experiment: str
    tags: list[str]
    seed: int
    model: dict[str, Any]
    data: dict[str, Any]
    train: dict[str, Any]
    tracking: dict[str, Any]


@with_config(_STRICT)
class _SweepShape(TypedDict):
    id: str
    name: NotRequired[str | None]


@with_config(_STRICT)
class _HeaderShape(TypedDict, total=False):
    run_id: str
    name: str
    experiment: str
    seed: int
    sweep: _SweepShape | None
    spec: _SpecShape
    params: dict[str, int | float | None]
    data: dict[str, Any]
    causality: dict[str, Any]
    hardware: dict[str, Any]
    created_at: str


@with_config(_STRICT)
class _StatusShape(TypedDict):
    state: Literal["running", "finished", "failed", "interrupted", "crashed"]
    reason: NotRequired[str | None]
    host: NotRequired[str]


# Dotted spec/header values the tables, plots and integrity section compute with: (path, accepted types).
_USED_VALUES = (
    ("spec.model.variant", (str, type(None))),  # None: an attention × ffn pair no preset names
    ("spec.train.lr", (int, float)),
    ("spec.train.steps", (int,)),
    ("spec.train.checkpoint_every", (int, type(None))),
    ("spec.tracking.project", (str, type(None))),  # None: W&B's settings chose it
    ("hardware.gpu_name", (str, type(None))),
    ("hardware.precision", (str, type(None))),  # precision 'auto' as it resolved: part of a configuration
    ("data.leakage", (dict,)),
    ("data.leakage.val_windows_with_train_ngram", (int, float, type(None))),
    ("data.leakage.val_docs_in_train", (int, type(None))),
)
_HEADER = TypeAdapter(_HeaderShape)
_STATUS = TypeAdapter(_StatusShape)


def shape_problem(name: str, data: dict, adapter: TypeAdapter) -> str | None:
    """Why `data` (the file `name`) is not a record the report can use, or None."""
    try:
        adapter.validate_python(data)
    except ValidationError as exc:
        err, more = exc.errors(include_url=False)[0], exc.error_count() - 1
        return f"{name}: {'.'.join(map(str, err['loc']))}: {err['msg']}" + (f" (and {more} more)" if more else "")
    if adapter is _HEADER:
        for dotted, types in _USED_VALUES:
            node = value_at(data, dotted, ...)
            if node is not ... and (isinstance(node, bool) or not isinstance(node, types)):
                return f"{name}: {dotted}: {type(node).__name__} where {' or '.join(t.__name__ for t in types)} belongs"
    return None


def read_local_run(run_dir: Path) -> Run:
    """One run directory → Run. Missing, corrupt or malformed files make it "unreadable", with the reason."""
    header, spec_problem = _read_json(run_dir / SPEC_FILE)
    status, status_problem = _read_json(run_dir / STATUS_FILE)
    if header is not None and (spec_problem := shape_problem(SPEC_FILE, header, _HEADER)):
        header = None  # nothing of a malformed header reaches the report
    if status is not None and (status_problem := shape_problem(STATUS_FILE, status, _STATUS)):
        status = None
    header = header or {}
    spec = header.get("spec") if isinstance(header.get("spec"), dict) else {}
    problems = [p for p in (spec_problem, status_problem) if p]
    status = status or {}
    if status and not status.get("state"):
        problems.append("status.json has no state")
    state, reason = str(status.get("state") or "unreadable"), status.get("reason")

    summary, problem = _read_json(run_dir / SUMMARY_FILE)
    if state == "finished" and problem:  # a failed or running run may have no (or a partial) summary
        problems.append(problem)
    summary = summary or {}

    history = History()
    try:
        has_metrics = (run_dir / METRICS_FILE).exists()
    except OSError:  # a folder this user may not look into: its spec.json was unreadable too, and says why
        has_metrics = False
    if has_metrics:
        try:
            history = History.from_jsonl(run_dir / METRICS_FILE)
        except (OSError, UnicodeDecodeError, RecordError) as exc:
            problems.append(f"metrics.jsonl unreadable ({exc})")
    if problems:
        state, reason = "unreadable", "; ".join(problems)

    return Run(
        id=str(header.get("run_id") or run_dir.name),
        name=str(header.get("name") or spec.get("name") or run_dir.name),
        experiment=str(header.get("experiment") or spec.get("experiment") or run_dir.parent.name),
        state=state,
        reason=reason,
        sweep=header.get("sweep") or None,
        group=_sent_to_wandb(header, "group", str),
        tags=_sent_to_wandb(header, "tags", list) or run_tags(spec),
        spec=spec,
        summary=summary,
        header={k: header[k] for k in HEADER_KEYS if k in header},
        history=history,
        source=str(run_dir),
    )


def _sent_to_wandb(header: dict, field_name: str, kind: type) -> Any:
    """The W&B value the runner chose for `field_name` (the header's `wandb` section: the spec, else W&B's
    settings such as WANDB_TAGS, else our defaults), or None where not recorded as a `kind`."""
    section = header.get("wandb")
    chosen = section.get(field_name) if isinstance(section, dict) else None
    value = chosen.get("value") if isinstance(chosen, dict) else None
    if kind is list and isinstance(value, list):
        return [str(tag) for tag in value if isinstance(tag, str)]
    return value if isinstance(value, kind) else None


def load_local(runs_root: str | Path, cache=None) -> list[Run]:
    """Every run under `runs_root`, from the cache when its record files are unchanged."""
    root = Path(runs_root)
    if root.exists() and not root.is_dir():
        raise ReportError(f"runs root '{root}' is a file, not a directory (pass --runs-root)")
    if not root.is_dir():
        raise ReportError(f"runs root '{root}' does not exist (train a run first, or pass --runs-root)")
    try:
        dirs, unlisted = find_run_dirs(root)
    except OSError as exc:
        raise ReportError(f"runs root '{root}' cannot be read: {exc.strerror or exc}") from None
    keys = [str(run_dir.resolve()) for run_dir in dirs]
    stamps = [fingerprint(run_dir) for run_dir in dirs]
    runs = [cache.get(key, stamp) if cache else None for key, stamp in zip(keys, stamps)]
    missing = [i for i, run in enumerate(runs) if run is None]
    # Arrow parses outside the GIL: the runs not in the cache are read on every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, run in zip(missing, pool.map(read_local_run, [dirs[i] for i in missing])):
            runs[i] = run
            if cache:
                cache.put(keys[i], stamps[i], run)
    # After the cache: a run's process can die without changing a file of its record.
    return [*(_settled(run, run_dir) for run, run_dir in zip(runs, dirs)), *unlisted]


def _settled(run: Run, run_dir: Path) -> Run:
    """A run read as "running" whose lock is free: it ended since it was read (a run writes its status before
    it lets go of the lock), read again; else it died without finishing, W&B's "crashed"."""
    if run.state != "running" or run_is_live(run_dir):
        return run
    again = read_local_run(run_dir)
    if again.state != "running":
        return again
    reason = "its process on this host died without writing its status (killed, out of memory, a reboot)"
    return replace(again, state="crashed", reason=f"{reason}; `blueberry run` of the same spec resumes it")


# ---------------------------------------------------------------- W&B API


def wandb_filters(group: str | None = None, sweep: str | None = None, tags: tuple[str, ...] = ()) -> dict:
    """The runs query filter (MongoDB-style, as wandb.Api().runs takes it)."""
    clauses: list[dict] = []
    if group:
        clauses.append({"group": group})
    if sweep:  # the sweep id, or its name via the runner's "sweep:<name>" tag
        clauses.append({"$or": [{"sweep": sweep}, {"tags": {"$in": [sweep_tag(sweep)]}}]})  # cut as the runner cuts it
    clauses.extend({"tags": {"$in": [tag]}} for tag in tags)
    return {"$and": clauses} if clauses else {}


def run_from_wandb(api_run: Any, rows: list[dict] | None) -> Run:
    """A wandb.apis.public.Run (config: `tracking.schema.wandb_config`) → Run."""
    config = {k: v for k, v in dict(api_run.config).items() if not k.startswith("_")}
    spec = {k: config[k] for k in SPEC_KEYS if k in config}
    model = spec.get("model")
    named = config.get("variant")
    if (
        isinstance(model, dict)
        and model.get("variant") is None
        and isinstance(named, str)
        and named in registry.PRESETS
    ):
        # A sweep that sets `variant: null` (sweeps/factorial.yaml) keeps it so in W&B's config, where sweep
        # parameters win; the pair it chose may be a preset, named by the derived top-level `variant`.
        spec["model"] = {**model, "variant": named}
    summary = {}
    # summary_metrics: plain JSON values; api_run.summary wraps nested ones (define_metric's {"min", "last"}) in
    # SummarySubDict, which is no dict.
    for key, value in api_run.summary_metrics.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict) and "last" in value:  # define_metric(summary="min,last")
            summary[key] = value["last"]
            if key == "val/loss" and "min" in value:
                summary.setdefault("val/best_loss", value["min"])
        else:
            summary[key] = value
    header = header_from_wandb_config(config, getattr(api_run, "created_at", None))
    state = str(api_run.state).lower()  # finished | running | failed | crashed | killed | pending
    sweep = getattr(api_run, "sweep", None)
    if sweep is None and isinstance(config.get("sweep_id"), str):  # a `blueberry sweep` trial, synced
        sweep = SimpleNamespace(id=config["sweep_id"], name=config.get("sweep_name"))
    history = History.from_rows(rows or [], step_key=WANDB_STEP, time_key="_runtime")
    return Run(
        id=api_run.id,
        name=api_run.name or api_run.id,
        experiment=config.get("experiment") or api_run.group or "ungrouped",
        state=state,
        reason=summary.get("status/reason"),
        sweep={"id": sweep.id, "name": getattr(sweep, "name", None)} if sweep else None,
        group=api_run.group or None,
        tags=list(api_run.tags or []),
        spec=spec,
        summary=summary,
        header=header,
        history=history,
        source="/".join(api_run.path),
    )


def need_wandb_credentials(what: str, code: int = 2) -> None:
    """ReportError unless W&B would find credentials: without them wandb.Api() asks for a key on the terminal
    and waits there."""
    from blueberry.tracking.wandb_settings import has_api_key

    try:
        found = has_api_key()
    except ValueError as exc:  # a W&B variable W&B rejects
        raise ReportError(str(exc)) from None
    if not found:
        raise ReportError(f"{what} needs W&B credentials: set WANDB_API_KEY or run `wandb login`", code=code)


def load_wandb(
    entity: str, project: str, *, group=None, sweep=None, tags=(), cache=None, api=None, timeout: int = 60
) -> list[Run]:
    """Runs of entity/project from the W&B API; exact history via scan_history (every row).

    A run is re-scanned only when its state, heartbeat or last step changed since the cached snapshot.
    """
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        raise ReportError(
            f"--source wandb needs the W&B server but WANDB_MODE={os.environ['WANDB_MODE']} "
            "(run `WANDB_MODE=online blueberry report --source wandb ...`)"
        )
    try:
        import wandb

        api = api or wandb.Api(timeout=timeout)
        listing = api.runs(
            f"{entity}/{project}",
            filters=wandb_filters(group, sweep, tuple(tags)),
            order="+created_at",
            per_page=100,
            include_sweeps=True,
            lazy=False,
        )
        runs = []
        for api_run in listing:
            key = f"wandb:{entity}/{project}/{api_run.id}"
            stamp = [api_run.state, getattr(api_run, "heartbeat_at", None), getattr(api_run, "lastHistoryStep", None)]
            # A finished run's summary, config, name, group or tags can still be edited (the web app,
            # `run.update()`) without touching the three above; the listing already holds them.
            edits = [dict(api_run.config), dict(api_run.summary_metrics), api_run.name, api_run.group, api_run.tags]
            stamp.append(hashlib.sha256(json.dumps(edits, sort_keys=True, default=str).encode()).hexdigest()[:16])
            run = cache.get(key, stamp) if cache else None
            if run is None:
                run = run_from_wandb(api_run, list(api_run.scan_history(page_size=1000)))
                if cache:
                    cache.put(key, stamp, run)
            runs.append(run)
        return runs
    except ReportError:
        raise
    except Exception as exc:  # no key, no network, unknown project: all surface here, from several libraries
        message = f"could not read runs from W&B ({entity}/{project}): {type(exc).__name__}: {exc}"
        raise ReportError(message, code=1) from exc


def select(runs: list[Run], *, group=None, sweep=None, tags=()) -> list[Run]:
    """Filter local runs like the W&B query does (on the group and tags W&B was given); an unreadable run is
    kept when it cannot be judged."""

    def keep(run: Run) -> bool:
        if group and (run.group or run.experiment) != group:
            return False
        if run.state == "unreadable" and not run.spec:
            return True
        if sweep and not (run.sweep and sweep in (run.sweep.get("id"), run.sweep.get("name"))):
            return False
        return all(tag in run.tags for tag in tags)

    return [run for run in runs if keep(run)]
