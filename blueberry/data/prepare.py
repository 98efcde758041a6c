"""prepare_data: documents → split → tokenizer → token streams (cached on disk) → audits.

Cache layout under the root ($BLUEBERRY_CACHE, ~/.cache/blueberry, or the cache_dir argument):
    tokenizers/bpe<vocab>-<hash>/     the trained BPE (save_pretrained), keyed by the train documents
    tokens/<hash>/train.npy, val.npy  int32 token streams
    tokens/<hash>/split.json          the document ids of each split
    tokens/<hash>/meta.json           stats, fingerprint and which tokenizer made the tokens
The token key covers the spec fields that change tokens and a fingerprint of the source, never
seq_len or leakage_ngram: windows and audits are recomputed from the cached streams on each call.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blueberry.data import audit
from blueberry.data.cache import atomic_dir, cache_root, set_aside
from blueberry.data.corpus import Source, load_documents, resolve_source, stat_fingerprint, text_sha256
from blueberry.data.errors import DataError
from blueberry.data.split import split_documents
from blueberry.data.tokenizer import encode, load_bpe, load_or_train_bpe, load_pretrained, vocab_digest
from blueberry.data.windows import TrainSampler, build_stream, val_windows
from blueberry.fileio import naming_the_file
from blueberry.spec import DataSpec

log = logging.getLogger(__name__)

# Bump when the token streams for the same spec would change (e.g. how documents are joined), or what an entry
# records does (2: val_docs_in_train).
TOKENS_VERSION = 2


@dataclass
class PreparedData:
    """Tokenized train and val streams plus everything the trainer and the run record need."""

    tokenizer: object
    vocab_size: int
    eos_id: int
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    seq_len: int
    seed: int
    fingerprint: str
    stats: dict
    leakage: dict
    unigram_loss: float

    def val_windows(self) -> torch.Tensor:
        """[N, seq_len+1], fixed order, non-overlapping targets: every scored val token counts once."""
        return val_windows(self.val_tokens, self.seq_len)

    def train_sampler(self, batch_size: int, seed: int | None = None) -> TrainSampler:
        """Stateless sampler: .batch(step, rank=0, world=1) → [batch_size, seq_len+1]. Seed defaults to the run's."""
        return TrainSampler(self.train_tokens, self.seq_len, batch_size, self.seed if seed is None else seed)


def token_cache_key(spec: DataSpec, source: Source) -> str:
    """Hash of everything that decides the token streams (not seq_len, not leakage_ngram)."""
    fields = ["dataset_split", "text_field", "id_field", "max_docs", "max_chars_per_doc", "max_tokens"]
    key = {f: getattr(spec, f) for f in fields}
    key |= {
        "version": TOKENS_VERSION,
        "source": [source.kind, source.name, source.fingerprint],
        "dataset_config": spec.dataset_config,
        "val_fraction": spec.val_fraction,
        "tokenizer": spec.tokenizer,
    }
    if spec.tokenizer == "bpe":
        key["vocab_size"] = spec.vocab_size  # only the trained BPE depends on it
    elif (local := Path(spec.tokenizer).expanduser()).is_dir():
        key["tokenizer_files"] = stat_fingerprint(sorted(p for p in local.rglob("*") if p.is_file()))
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def val_cap(max_tokens: int | None, val_fraction: float) -> int | None:
    """Val tokens kept when train is capped: the val share of the cap, val_fraction / (1 - val_fraction).

    A pure function of the spec (not of the corpus), so the val set a capped spec gets is predictable.
    """
    return None if max_tokens is None else math.ceil(max_tokens * val_fraction / (1 - val_fraction))


def data_fingerprint(train: np.ndarray, val: np.ndarray, tokenizer) -> str:
    """sha256 over both token streams and the tokenizer's vocabulary: same string, same training data."""
    h = hashlib.sha256(b"blueberry-tokens\n")
    for name, stream in (("train", train), ("val", val)):
        h.update(f"{name}:{len(stream)}\n".encode())
        h.update(np.ascontiguousarray(stream, dtype="<i4").tobytes())
    h.update(vocab_digest(tokenizer).encode())
    return h.hexdigest()


def docs_in_stream(stream: np.ndarray, eos_id: int) -> int:
    """Documents with tokens in `stream`: one EOS closes each (texts never encode to EOS: `encode` splits
    special tokens), and a stream cut by a cap ends inside one more."""
    closed = int(np.count_nonzero(stream == eos_id))
    return closed + int(len(stream) > 0 and stream[-1] != eos_id)


def _tokenizer_name(spec: DataSpec) -> str:
    return f"bpe-{spec.vocab_size}" if spec.tokenizer == "bpe" else spec.tokenizer


def _build(spec: DataSpec, source: Source, root: Path, entry: Path):
    """Read, split, tokenize and write one cache entry (split.json: which document ids each split holds);
    returns (tokenizer, train, val, meta)."""
    docs = load_documents(spec, source)
    train_docs, val_docs = split_documents(docs, spec.val_fraction)
    if not train_docs or not val_docs:
        # a text file of one document per line, not per paragraph, is one document
        by_paragraph = source.builder_kwargs.get("sample_by") == "paragraph"
        hint = " (a .txt file's documents are its blank-line-separated paragraphs; one per line is .jsonl)"
        raise DataError(
            f"{len(docs)} documents split into {len(train_docs)} train / {len(val_docs)} val at "
            f"val_fraction={spec.val_fraction}; both splits need at least one document{hint if by_paragraph else ''}"
        )

    if spec.tokenizer == "bpe":
        tokenizer, path = load_or_train_bpe(train_docs, spec.vocab_size, root)
        tokenizer_ref = {"kind": "bpe", "dir": str(path.relative_to(root))}
    else:
        tokenizer = load_pretrained(spec.tokenizer)
        tokenizer_ref = {"kind": "pretrained", "name": spec.tokenizer}
    eos_id = tokenizer.eos_token_id
    tok = functools.partial(encode, tokenizer)

    train = build_stream([d.text for d in train_docs], tok, eos_id, cap=spec.max_tokens)
    val_full = build_stream([d.text for d in val_docs], tok, eos_id)  # val is small: encode it whole
    val = val_full[: val_cap(spec.max_tokens, spec.val_fraction)]
    val_chars = sum(len(d.text) for d in val_docs)

    # The split hashes document ids, so no id is in both splits; a document copied under another id (a web
    # scrape, a corpus joined twice) is, and only its text tells.
    train_texts = {text_sha256(d.text) for d in train_docs}
    meta = {
        "tokenizer": tokenizer_ref,
        "eos_id": eos_id,
        "val_docs_in_train": sum(text_sha256(d.text) in train_texts for d in val_docs),
        "fingerprint": data_fingerprint(train, val, tokenizer),
        "stats": {
            "corpus": spec.dataset,
            "corpus_fingerprint": source.fingerprint,
            # The splits' documents and characters; under data.max_tokens the streams hold only the first
            # train/val_docs_used of them (the last one maybe cut; see prepare_data).
            "n_docs_train": len(train_docs),
            "n_docs_val": len(val_docs),
            "train_chars": sum(len(d.text) for d in train_docs),
            "val_chars": val_chars,
            "train_tokens": len(train),
            "val_tokens": len(val),
            # Over the whole val split (before any cap): turns val loss per token into bits per character.
            "val_chars_per_token": val_chars / len(val_full),
            "tokenizer": _tokenizer_name(spec),
            "vocab_size": len(tokenizer),
        },
    }
    split_ids = {"train": [d.id for d in train_docs], "val": [d.id for d in val_docs]}
    with atomic_dir(entry) as tmp:
        for name, write in (
            ("train.npy", lambda path: np.save(path, train)),
            ("val.npy", lambda path: np.save(path, val)),
            ("split.json", lambda path: path.write_text(json.dumps(split_ids))),
            ("meta.json", lambda path: path.write_text(json.dumps(meta, indent=2))),
        ):
            with naming_the_file(tmp / name):  # a failed write names its file: `prepare_data` then blames the cache
                write(tmp / name)
    return tokenizer, train, val, meta


def _load(root: Path, entry: Path, spec: DataSpec):
    """A complete cache entry whose tokens are those it recorded (their fingerprint), or None if it (or the BPE
    it refers to) is missing or they are not."""
    if not (entry / "meta.json").is_file() or not (entry / "split.json").is_file():
        return None
    meta = json.loads((entry / "meta.json").read_text())
    if meta["tokenizer"]["kind"] == "bpe":
        path = root / meta["tokenizer"]["dir"]
        if not (path / "tokenizer.json").is_file():
            return None
        tokenizer = load_bpe(path)
    else:
        tokenizer = load_pretrained(spec.tokenizer)
    train, val = np.load(entry / "train.npy"), np.load(entry / "val.npy")
    if train.ndim != 1 or val.ndim != 1 or data_fingerprint(train, val, tokenizer) != meta["fingerprint"]:
        return None  # tokens that load but are not the ones built (an edit in place, a disk fault): built again
    return tokenizer, train, val, meta


def prepare_data(spec: DataSpec, seed: int, cache_dir: str | Path | None = None) -> PreparedData:
    """Documents → leakage-free split → tokenizer → token streams → audits, reusing the on-disk cache.

    The split and the tokens do not depend on `seed` (hash split, deterministic BPE), so runs that differ
    only in seed train on identical data; the seed is the default for `train_sampler`.
    """
    started = time.perf_counter()
    root = cache_root(cache_dir)
    source = resolve_source(spec)
    entry = root / "tokens" / token_cache_key(spec, source)[:24]
    try:
        cached = _load(root, entry, spec)
    except DataError:  # the spec's tokenizer cannot be loaded: say so
        raise
    except Exception:  # a damaged entry (files cut short by a crash before they reached the disk, a hand edit)
        cached = None
    if cached is None and entry.exists():
        set_aside(entry)  # else the new entry's rename onto it fails, and every run would build it again
    try:
        tokenizer, train, val, meta = cached or _build(spec, source, root, entry)
    except OSError as exc:  # a cache that cannot be written (not a folder, read-only, full): ours or datasets'
        where = f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
        failed = Path(exc.filename).resolve() if exc.filename else None
        # inside the cache, or a folder above it that its creation needed (HOME=/ or /nonexistent: /.cache)
        if failed and (failed.is_relative_to(root.resolve()) or root.resolve().is_relative_to(failed)):
            raise DataError(
                f"cannot write the data cache {root} (BLUEBERRY_CACHE, else ~/.cache/blueberry): {where}"
            ) from exc
        raise DataError(f"cannot prepare dataset {spec.dataset!r}: {where}") from exc

    if len(train) < spec.seq_len + 1:
        raise DataError(f"training split has {len(train)} tokens, fewer than seq_len+1 = {spec.seq_len + 1}")
    targets = val_windows(torch.from_numpy(val), spec.seq_len)[:, 1:]
    leakage = audit.leakage(train, val, spec.leakage_ngram, spec.seq_len, meta["eos_id"])
    leakage["val_docs_in_train"] = meta["val_docs_in_train"]  # validation documents whose text is a train one's
    if leakage["val_docs_in_train"]:
        log.warning(
            "data %s: %d validation documents are also training documents (same text, other ids): val loss "
            "measures them as seen; drop the copies", spec.dataset, leakage["val_docs_in_train"],
        )  # fmt: skip
    stats = {
        **meta["stats"],
        "train_docs_used": docs_in_stream(train, meta["eos_id"]),
        "val_docs_used": docs_in_stream(val, meta["eos_id"]),
        "val_windows": len(targets),
        "val_targets": targets.numel(),
    }
    elapsed, state = time.perf_counter() - started, "cache hit" if cached else "built"
    log.info("data %s: %d train / %d val tokens (%s, %.2fs)", spec.dataset, len(train), len(val), state, elapsed)
    return PreparedData(
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        eos_id=meta["eos_id"],
        train_tokens=torch.from_numpy(train.astype(np.int64)),
        val_tokens=torch.from_numpy(val.astype(np.int64)),
        seq_len=spec.seq_len,
        seed=seed,
        fingerprint=meta["fingerprint"],
        stats=stats,
        leakage=leakage,
        unigram_loss=audit.unigram_loss(train, targets.numpy(), len(tokenizer)),
    )
