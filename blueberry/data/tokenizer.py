"""Tokenizers: a byte-level BPE trained on the train documents only (cached), or any pretrained HF tokenizer.

`tokenizers` and `transformers` are imported inside the functions: together they cost ~1 s, which
`import blueberry` (e.g. the CLI's --help) should not pay.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from blueberry.data.cache import atomic_dir, set_aside
from blueberry.data.corpus import Document, text_sha256
from blueberry.data.errors import DataError
from blueberry.fileio import naming_the_file

# Bump when train_bpe changes, so tokenizers cached under the old recipe are retrained.
BPE_RECIPE = "bytelevel-bpe-v1"
EOS, PAD = "<|endoftext|>", "<|pad|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what `save_pretrained` writes


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Train the byte-level BPE (README, "Data"); returns a `tokenizers.Tokenizer` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Single digits keep numbers from eating vocabulary; ByteLevel makes every byte string encodable.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def bpe_cache_dir(train_docs: Sequence[Document], vocab_size: int, cache_root: Path) -> Path:
    """Where the BPE for exactly these train documents and this vocabulary is cached."""
    h = hashlib.sha256(f"{BPE_RECIPE}\n{vocab_size}\n".encode())
    for doc in train_docs:
        h.update(f"{doc.id}\0{text_sha256(doc.text)}\n".encode())
    return cache_root / "tokenizers" / f"bpe{vocab_size}-{h.hexdigest()[:16]}"


def load_bpe(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def load_or_train_bpe(train_docs: Sequence[Document], vocab_size: int, cache_root: Path) -> tuple[object, Path]:
    """The BPE for these train documents (trained on them only), from the cache or freshly trained."""
    from transformers import PreTrainedTokenizerFast

    path = bpe_cache_dir(train_docs, vocab_size, cache_root)
    if (path / "tokenizer.json").is_file():
        try:
            return load_bpe(path), path
        except Exception:  # damaged (cut short by a crash, edited by hand): trained again under its name
            set_aside(path)
    elif path.exists():  # a folder without its tokenizer.json: damaged too
        set_aside(path)
    backend = train_bpe((doc.text for doc in train_docs), vocab_size)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    with atomic_dir(path) as tmp, naming_the_file(tmp):  # (Python's own writes, its config files, name none)
        try:
            tokenizer.save_pretrained(str(tmp))
        except Exception as exc:  # the tokenizers library's own writes fail as Exception("… (os error 28)")
            if isinstance(exc, OSError) or not (said := re.search(r"\(os error (\d+)\)", str(exc))):
                raise
            raise OSError(int(said[1]), os.strerror(int(said[1])), str(tmp)) from exc
    return load_bpe(path), path


def looks_like_path(name_or_path: str) -> bool:
    """A local path rather than a Hub name: it exists, or it is written as a path (Hub names never start so)."""
    return Path(name_or_path).expanduser().exists() or name_or_path.startswith((".", "/", "~"))


def check_local_tokenizer(name_or_path: str) -> None:
    """A tokenizer given as a path must be a directory `save_pretrained` wrote; cheap (no transformers import),
    so `blueberry run` says so before torch loads. A Hub name or `bpe` passes."""
    if name_or_path == "bpe" or not looks_like_path(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise DataError(f"tokenizer directory {name_or_path!r} does not exist")
    if not path.is_dir():
        raise DataError(
            f"tokenizer {name_or_path!r} is a file; a local tokenizer is the directory `save_pretrained` writes "
            f"(with {' or '.join(TOKENIZER_FILES)})"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"tokenizer directory {name_or_path!r} holds neither {' nor '.join(TOKENIZER_FILES)}")


def load_pretrained(name_or_path: str):
    """AutoTokenizer for a local directory or a Hub name; anything it cannot load → DataError saying why."""
    from transformers import AutoTokenizer

    check_local_tokenizer(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser()))
    except OSError as exc:
        if looks_like_path(name_or_path):
            raise DataError(f"cannot load tokenizer directory {name_or_path!r}: {exc}") from exc
        raise DataError(
            f"cannot load tokenizer {name_or_path!r}: the Hugging Face Hub is unreachable or offline mode is on "
            "(HF_HUB_OFFLINE), and it is not in the local cache. Use tokenizer='bpe' or a local tokenizer "
            f"directory. Cause: {exc}"
        ) from exc
    except Exception as exc:  # transformers' many ways to say the files are not a tokenizer it can build
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot load tokenizer {name_or_path!r}: {type(exc).__name__}: {detail}") from exc
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} has no EOS token; documents need one as separator")
    return tokenizer


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per text, with no special tokens (EOS is added between documents by the caller): a document that
    contains the text `<|endoftext|>` gets it as plain text, not as a document boundary."""
    # verbose=False: whole documents exceed a pretrained tokenizer's model_max_length, which is harmless here.
    return tokenizer(texts, add_special_tokens=False, verbose=False, split_special_tokens=True)["input_ids"]


def vocab_digest(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary, so the data fingerprint changes with the tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
