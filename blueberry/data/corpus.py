"""Documents from the embedded Austen corpus, a local file or directory, or the Hugging Face Hub.

Everything goes through `datasets.load_dataset`; the source is resolved first (cheaply: without
`datasets`, which is imported only when documents are actually read, save for a folder's split names) so
the token cache can be looked up before any document is read: a cache hit of the embedded corpus or a
file never imports `datasets`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import itertools
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from blueberry.data.errors import DataError
from blueberry.spec import DataSpec

EMBEDDED = {"austen": "austen.jsonl.gz"}
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class Source:
    """A resolved dataset: how to load it and a fingerprint of its content (for cache keys)."""

    kind: str  # "embedded" | "local" | "hub"
    name: str
    fingerprint: str
    builder: str | None = None
    files: tuple[str, ...] = ()
    builder_kwargs: dict = field(default_factory=dict)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":  # datasets decompresses .gz transparently
        suffixes.pop()
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def stat_fingerprint(files: Iterable[Path]) -> str:
    """Hash of absolute path, size, mtime and ctime per file.

    Hashing the content of a large local corpus on every run would cost more than the cache saves. The ctime
    changes on every write and no tool sets it back, unlike the mtime (`touch -r`, `cp -p`, rsync and
    reproducible builds keep or fix it), so an edit that keeps the size and the mtime is still seen.
    """
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()


def resolve_source(spec: DataSpec) -> Source:
    """Decide where the documents come from: embedded name, then an existing local path, then the Hub."""
    path = Path(spec.dataset).expanduser()
    local = spec.dataset in EMBEDDED or path.is_file() or path.is_dir()
    if local and spec.dataset_config is not None:
        raise DataError(
            f"dataset_config {spec.dataset_config!r} names a configuration of a Hub dataset; {spec.dataset!r} is "
            "embedded or a local file or folder, which has none"
        )
    if spec.dataset_split != "train" and not path.is_dir() and local:
        raise DataError(
            f"dataset {spec.dataset!r} is one file, which the datasets library reads as split 'train' only "
            f"(dataset_split {spec.dataset_split!r}); the validation split is carved from it (data.val_fraction)"
        )
    if spec.dataset in EMBEDDED:
        resource = importlib.resources.files("blueberry.data").joinpath(EMBEDDED[spec.dataset])
        digest = hashlib.sha256(resource.read_bytes()).hexdigest()
        return Source("embedded", spec.dataset, digest, "json", (EMBEDDED[spec.dataset],))

    if path.is_file():
        builder = _builder_for(path)
        if builder is None:
            raise DataError(f"unsupported file type {path.name!r}; use one of {sorted(BUILDERS)} (optionally .gz)")
        files = [path.resolve()]
    elif path.is_dir():
        root = path.resolve()
        files = sorted(  # hidden files and folders (.ipynb_checkpoints, .git) are no data: a copy would train twice
            f
            for f in root.rglob("*")
            if f.is_file() and _builder_for(f) and not any(p.startswith(".") for p in f.relative_to(root).parts)
        )
        if files:
            files = _files_of_split(spec, root, files)
        builders = {_builder_for(f) for f in files}
        if len(builders) != 1:
            found = "no data files" if not builders else f"mixed formats {sorted(builders)}"
            raise DataError(f"directory {str(path)!r} holds {found}; expected files of one of {sorted(BUILDERS)}")
        builder = builders.pop()
    elif _builder_for(path) or spec.dataset.startswith((".", "/", "~")):
        relative = not Path(spec.dataset).expanduser().is_absolute()
        raise DataError(
            f"dataset file {spec.dataset!r} does not exist" + (f" (read from {Path.cwd()})" if relative else "")
        )
    else:
        return Source("hub", spec.dataset, f"hub:{spec.dataset}:{spec.dataset_config}:{spec.dataset_split}")

    if not any(f.stat().st_size for f in files):
        raise DataError(f"dataset {spec.dataset!r} is empty ({len(files)} file(s) of 0 bytes)")
    kwargs = {}
    if builder == "text":
        # One .txt file: its blank-line paragraphs are the documents (a split needs many documents).
        # A directory of .txt files: each file is one document.
        kwargs["sample_by"] = "paragraph" if path.is_file() else "document"
    return Source("local", str(path), stat_fingerprint(files), builder, tuple(map(str, files)), kwargs)


def _files_of_split(spec: DataSpec, root: Path, files: list[Path]) -> list[Path]:
    """The folder's data files of split `spec.dataset_split`, as the datasets library reads a data folder: files
    or folders named after a split (train, validation/valid/dev/val, test/eval, ...) hold that split, and a
    folder naming none is all 'train'. So a held-out test.jsonl beside train.jsonl never lands in training.

    Only the data files count (an eval.py beside them names no split); datasets' own patterns are matched
    against their names in an in-memory mirror of the folder."""
    import uuid

    import fsspec
    from datasets.data_files import DEFAULT_PATTERNS_ALL, DataFilesDict, EmptyDatasetError, get_data_patterns

    names = {f.relative_to(root).as_posix(): f for f in files}
    memory, mirror = fsspec.filesystem("memory"), f"blueberry-splits-{uuid.uuid4().hex}"
    try:
        for name in names:
            memory.pipe(f"memory://{mirror}/{name}", b"")
        try:
            patterns = get_data_patterns(f"memory://{mirror}")
        except EmptyDatasetError:  # every file inside folders datasets skips (__data__/)
            patterns = DEFAULT_PATTERNS_ALL
        if patterns == DEFAULT_PATTERNS_ALL:  # no split names: every data file is 'train'
            splits = {"train": set(names)}
        else:
            found = DataFilesDict.from_patterns(patterns, base_path=f"memory://{mirror}")
            splits = {str(split): {url.split(f"{mirror}/", 1)[1] for url in urls} for split, urls in found.items()}
    finally:
        memory.rm(f"memory://{mirror}", recursive=True)
    unnamed = sorted(set(names) - set().union(*splits.values()))
    if unnamed:  # datasets would leave them out without a word
        raise DataError(
            f"directory {spec.dataset!r}: {', '.join(unnamed[:5])} {'names' if len(unnamed) == 1 else 'name'} "
            "no split while other files do "
            f"({', '.join(sorted(set().union(*splits.values()))[:5])}); rename them or give them a folder of their own"
        )
    if spec.dataset_split not in splits:
        raise DataError(
            f"directory {spec.dataset!r} has no split {spec.dataset_split!r} (dataset_split); its file names make "
            f"the splits {sorted(splits)}, as the datasets library reads a data folder"
        )
    return [file for name, file in names.items() if name in splits[spec.dataset_split]]


def _load_dataset(spec: DataSpec, source: Source, scratch: str):
    """Return a `datasets` Dataset or IterableDataset for the source. A local file (ours or the user's) is read
    into `scratch`, a cache of this read alone: datasets' shared one keys a file on its mtime only (an edit that
    kept it was read as the old documents), and rereading into it deletes files another process may be opening.
    This runs only when our own token cache misses."""
    import datasets

    datasets.disable_progress_bars()
    if source.kind == "embedded":
        resource = importlib.resources.files("blueberry.data").joinpath(source.files[0])
        # as_file gives a real path even from a zipped install; nothing is written into the package
        with importlib.resources.as_file(resource) as path:
            return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=scratch)
    if source.kind == "local":
        try:
            with _datasets_log_silenced():  # it logs the error it then raises; ours names the file and the cause
                return datasets.load_dataset(
                    source.builder,
                    data_files=list(source.files),
                    split="train",
                    cache_dir=scratch,
                    **source.builder_kwargs,
                )
        except Exception as exc:  # a builder's parse error, bad UTF-8, a truncated file, wrapped or not by datasets
            raise DataError(
                f"cannot read dataset {spec.dataset!r} as {source.builder}: {_which_file(spec, source)}"
                f"{_builder_error(exc)}"
            ) from exc
    try:
        return datasets.load_dataset(
            spec.dataset, spec.dataset_config, split=spec.dataset_split, streaming=spec.streaming
        )
    except OSError as exc:  # ConnectionError (offline / unreachable) and FileNotFoundError are both OSError
        raise DataError(
            f"cannot load dataset {spec.dataset!r} (config {spec.dataset_config!r}, split {spec.dataset_split!r}): "
            "the Hugging Face Hub is unreachable or offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), "
            "and it is not in the local cache. Use dataset='austen' (embedded) or a local "
            f".jsonl/.json/.parquet/.txt file or directory. Cause: {exc}"
        ) from exc
    except ValueError as exc:  # unknown config or split name
        raise DataError(f"cannot load dataset {spec.dataset!r}: {exc}") from exc


@contextlib.contextmanager
def _datasets_log_silenced():
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _which_file(spec: DataSpec, source: Source) -> str:
    """'file <name>: ' for the first of a folder's files the builder cannot read alone, else ''. Read streaming
    (nothing cached), in the order the failed load read them, so finding it costs about what that load did."""
    import datasets

    if len(source.files) < 2:
        return ""
    root, first_columns = Path(spec.dataset).expanduser().resolve(), None
    for file in source.files:
        name = str(Path(file).relative_to(root))
        try:
            with _datasets_log_silenced():
                rows = datasets.load_dataset(
                    source.builder, data_files=[file], split="train", streaming=True, **source.builder_kwargs
                )
                columns = None
                for row in rows:  # rows as Python objects: bad UTF-8 in a JSON string shows only here
                    columns = columns or sorted(row)
        except Exception:
            return f"file {name!r}: "
        if columns is None:
            return f"file {name!r} has no rows: "
        first_columns = first_columns or (name, columns)
        if columns != first_columns[1]:  # readable alone, but not one table with the others
            return f"file {name!r} has columns {columns}, {first_columns[0]!r} has {first_columns[1]}: "
    return ""


def _builder_error(exc: BaseException) -> str:
    """The builder's own error under datasets' wrappers (DatasetGenerationError says only that one occurred)."""
    from datasets.exceptions import DatasetsError

    while isinstance(exc, DatasetsError) and (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _columns(ds) -> list[str]:
    if ds.column_names is not None:
        return list(ds.column_names)
    # A streamed dataset may not know its columns until the first row is read.
    first = next(iter(ds), None)
    return list(first) if first else []


def _rows(ds, max_docs: int | None) -> Iterator[dict]:
    if hasattr(ds, "__len__"):  # an in-memory Dataset: slice it rather than iterate it whole
        if max_docs is not None:
            ds = ds.select(range(min(max_docs, len(ds))))
        return iter(ds)
    return itertools.islice(ds, max_docs)


def to_documents(
    rows: Iterable[dict], text_field: str, id_field: str | None, max_chars: int | None, dataset: str = "dataset"
) -> list[Document]:
    """Rows → Documents: ids from `id_field` or a hash of the full text; empty or null texts are dropped (missing or
    null ones with a warning), and a text that is not a string (a list, a number) is an error: dropping it would
    silently shrink the corpus."""
    docs, wrong, missing, index = [], {}, 0, -1
    for index, row in enumerate(rows):
        text = row.get(text_field)
        if text is not None and not isinstance(text, str):
            wrong.setdefault(type(text).__name__, index)
            continue
        missing += text is None
        if text is None or not text.strip():
            continue
        doc_id = row.get(id_field) if id_field else None
        # Hash the full text, not the cut one, so max_chars_per_doc never moves a document across splits.
        doc_id = str(doc_id) if doc_id not in (None, "") else text_sha256(text)
        docs.append(Document(doc_id, text[:max_chars] if max_chars else text))
    if wrong:
        found = ", ".join(f"{kind} (first in row {index})" for kind, index in wrong.items())
        raise DataError(f"dataset {dataset!r}: field {text_field!r} must be text in every row; found {found}")
    if missing:  # left out, as an empty text is, but a field named otherwise in some rows is a mistake to see
        logging.getLogger(__name__).warning(
            "dataset %r: %d of %d rows have no %r (missing or null): left out", dataset, missing, index + 1, text_field
        )
    return docs


def load_documents(spec: DataSpec, source: Source | None = None) -> list[Document]:
    """The spec's documents, in source order, after max_docs and max_chars_per_doc."""
    source = source or resolve_source(spec)
    if source.kind == "hub" and spec.streaming and spec.max_docs is None:
        # Every document is read before the split, so an unbounded stream would never finish.
        raise DataError(f"streaming dataset {spec.dataset!r} needs max_docs")
    with tempfile.TemporaryDirectory(prefix="blueberry-read-") as scratch:  # its Arrow files, read to the end here
        ds = _load_dataset(spec, source, scratch)
        columns = _columns(ds)
        if spec.text_field not in columns:
            raise DataError(f"dataset {spec.dataset!r} has no text field {spec.text_field!r}; columns: {columns}")
        ds = ds.select_columns([c for c in (spec.text_field, spec.id_field) if c in columns])
        try:
            rows = _rows(ds, spec.max_docs)
            docs = to_documents(rows, spec.text_field, spec.id_field, spec.max_chars_per_doc, spec.dataset)
        except UnicodeDecodeError as exc:  # Arrow's JSON reader leaves UTF-8 to be checked as rows are read
            raise DataError(
                f"cannot read dataset {spec.dataset!r}: {_which_file(spec, source)}not UTF-8 text ({exc})"
            ) from exc
    if not docs:
        raise DataError(f"dataset {spec.dataset!r} yielded no non-empty {spec.text_field!r} documents")
    return docs
