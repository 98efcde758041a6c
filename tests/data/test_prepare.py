"""prepare_data end to end on the real Austen corpus with the default spec: split, tokenizer, cache, audits.

The default vocabulary (8192) costs ~1 s more than a tiny one, but the leakage bound only means something
there: a 13-token n-gram is ~10 words at 8192 and only ~7 words at 512, where Austen's stock phrases
("I do not know what") already repeat across chapters.
"""

import json
import math
from pathlib import Path

import pytest
import torch

import blueberry.data.prepare as prepare_module
import blueberry.data.tokenizer as tokenizer_module
from blueberry.data import DataError, PreparedData, prepare_data
from blueberry.data.audit import leakage
from blueberry.data.corpus import load_documents
from blueberry.data.split import split_documents
from blueberry.spec import DataSpec

SPEC = DataSpec()
VOCAB = SPEC.vocab_size


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("blueberry-cache")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path, cache):
    """Hub offline; HF and Blueberry caches in tmp dirs (the Blueberry one shared by this module)."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("BLUEBERRY_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")


@pytest.fixture(scope="module")
def trained_on(cache):
    """The texts the BPE trainer saw while preparing the full corpus the first time."""
    seen: list[str] = []
    real = tokenizer_module.train_bpe

    def spy(texts, vocab_size):
        texts = list(texts)
        seen.extend(texts)
        return real(texts, vocab_size)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer_module, "train_bpe", spy)
        mp.setenv("HF_HUB_OFFLINE", "1")
        prepare_data(SPEC, seed=0, cache_dir=cache)
    return seen


@pytest.fixture
def data(trained_on) -> PreparedData:
    return prepare_data(SPEC, seed=0)  # a cache hit after trained_on, via $BLUEBERRY_CACHE


def test_tokenizer_is_trained_on_train_documents_only(trained_on):
    train_docs, val_docs = split_documents(load_documents(SPEC), SPEC.val_fraction)
    assert trained_on == [d.text for d in train_docs]
    assert not set(trained_on) & {d.text for d in val_docs}


def test_austen_split_and_audits(data):
    assert data.stats["n_docs_train"] + data.stats["n_docs_val"] == 269
    assert (data.stats["n_docs_train"], data.stats["n_docs_val"]) == (246, 23)
    assert data.leakage["val_docs_in_train"] == 0
    assert data.leakage["ngram"] == 13
    assert data.leakage["val_windows_with_train_ngram"] < 0.01
    assert data.leakage["val_ngrams_in_train"] < 0.01
    # Knowing only token frequencies: close to but below log(vocab).
    assert 4.0 < data.unigram_loss < math.log(VOCAB)


def test_leaky_split_is_caught(data):
    train = data.train_tokens.numpy()
    report = leakage(train, train[10_000:30_000].copy(), n=13, seq_len=SPEC.seq_len, eos_id=data.eos_id)
    assert report["val_windows_with_train_ngram"] > 0.99 and report["val_ngrams_in_train"] > 0.99


def test_tokenizer_and_streams(data):
    tok = data.tokenizer
    assert data.vocab_size == len(tok) == VOCAB
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert data.eos_id == tok.eos_token_id
    text = "It is a truth universally acknowledged, 1813. Café ☕"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    for stream, docs in ((data.train_tokens, "n_docs_train"), (data.val_tokens, "n_docs_val")):
        assert stream.dtype == torch.long and stream.dim() == 1
        assert (stream == data.eos_id).sum() == data.stats[docs]  # one EOS after each document ...
        assert stream[-1] == data.eos_id  # ... including the last
    assert data.stats["train_tokens"] == len(data.train_tokens) and data.stats["val_tokens"] == len(data.val_tokens)
    assert len(data.fingerprint) == 64


def test_windows_and_sampler_shapes(data):
    windows = data.val_windows()
    assert windows.shape == (data.stats["val_windows"], SPEC.seq_len + 1)
    batch = data.train_sampler(batch_size=4, seed=1).batch(0, rank=1, world=2)
    assert batch.shape == (4, SPEC.seq_len + 1) and batch.dtype == torch.long
    assert torch.equal(data.train_sampler(4).batch(3), data.train_sampler(4, seed=0).batch(3))  # run seed default


def test_second_prepare_is_a_cache_hit(data, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("cache miss: documents reloaded or tokenizer retrained")

    monkeypatch.setattr(tokenizer_module, "train_bpe", fail)
    monkeypatch.setattr(prepare_module, "load_documents", fail)
    again = prepare_data(SPEC, seed=123)
    assert again.fingerprint == data.fingerprint
    assert torch.equal(again.train_tokens, data.train_tokens)
    # Window length and audit n do not change the tokens, so they reuse the same cache entry.
    other = prepare_data(SPEC.model_copy(update={"seq_len": 32, "leakage_ngram": 8}), seed=0)
    assert other.fingerprint == data.fingerprint and other.val_windows().shape[1] == 33


def test_max_tokens_caps_train_and_val(trained_on, monkeypatch):
    # Same train documents, so the cached BPE must be reused; only the token streams are rebuilt.
    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda *a: pytest.fail("BPE retrained"))
    capped = prepare_data(SPEC.model_copy(update={"max_tokens": 20_000}), seed=0)
    assert capped.stats["train_tokens"] == 20_000
    assert capped.stats["val_tokens"] == math.ceil(20_000 * 0.1 / 0.9)
    full = prepare_data(SPEC, seed=0)
    assert torch.equal(capped.train_tokens, full.train_tokens[:20_000])
    assert capped.fingerprint != full.fingerprint
    # The split's document counts are the whole split's; *_docs_used counts those the capped stream holds:
    # every document that starts (one token after the previous one's EOS) before the cap.
    ends = (full.train_tokens == full.eos_id).nonzero().flatten()
    starts = torch.cat([torch.zeros(1, dtype=ends.dtype), ends[:-1] + 1])
    assert capped.stats["train_docs_used"] == int((starts < 20_000).sum()) < full.stats["train_docs_used"]
    assert full.stats["train_docs_used"] == full.stats["n_docs_train"] == capped.stats["n_docs_train"]
    assert capped.stats["val_docs_used"] < full.stats["val_docs_used"] == full.stats["n_docs_val"]


def test_local_jsonl_end_to_end(tmp_path):
    docs = load_documents(SPEC)[:60]
    path = tmp_path / "local.jsonl"
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    data = prepare_data(DataSpec(dataset=str(path), vocab_size=300, seq_len=32, max_tokens=5_000), seed=0)
    assert data.stats["train_tokens"] == 5_000 and data.vocab_size == 300
    assert data.leakage["val_docs_in_train"] == 0


DAMAGES = ["cut train.npy", "lose split.json", "lose meta.json", "cut the BPE", "overwrite train.npy in place"]


@pytest.mark.parametrize("damage", [*DAMAGES, "garbage meta.json, its aside name taken"])
def test_a_damaged_cache_entry_is_set_aside_and_built_again(tmp_path, damage, monkeypatch):
    """Files cut short by a crash before they reached the disk, or a hand edit: the next run rebuilds the entry
    (it gave a traceback, or was silently rebuilt by every run) and keeps the damaged one aside, hidden. Tokens
    that still load but are not those built (bytes overwritten in place) were trained on under the old
    fingerprint; a name to set the entry aside under that was taken (pids recur) made every run rebuild it."""
    import os

    docs = load_documents(SPEC)[:60]
    path = tmp_path / "local.jsonl"
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    spec, cache = DataSpec(dataset=str(path), vocab_size=300, seq_len=32, max_tokens=5_000), tmp_path / "cache"
    first = prepare_data(spec, seed=0, cache_dir=cache)
    (entry,) = (cache / "tokens").iterdir()
    (bpe,) = (cache / "tokenizers").iterdir()
    if damage == "cut train.npy":
        (entry / "train.npy").write_bytes((entry / "train.npy").read_bytes()[:100])
    elif damage == "lose split.json":
        (entry / "split.json").unlink()
    elif damage == "lose meta.json":
        (entry / "meta.json").unlink()
    elif damage == "cut the BPE":
        (bpe / "tokenizer.json").write_text((bpe / "tokenizer.json").read_text()[:500])
    elif damage == "overwrite train.npy in place":
        tokens = bytearray((entry / "train.npy").read_bytes())
        tokens[200:400] = b"A" * 200  # the same size: it still loads
        (entry / "train.npy").write_bytes(bytes(tokens))
    else:
        (entry.parent / f".{entry.name}.damaged-{os.getpid()}" / "earlier").mkdir(parents=True)
        (entry / "meta.json").write_text("garbage")
    again = prepare_data(spec, seed=0, cache_dir=cache)
    assert again.fingerprint == first.fingerprint and torch.equal(again.train_tokens, first.train_tokens)
    assert (entry / "meta.json").is_file() and (entry / "split.json").is_file()
    aside = [p.name for folder in ("tokens", "tokenizers") for p in (cache / folder).iterdir() if ".damaged-" in p.name]
    # a damaged BPE takes its token entry with it; a name taken keeps the earlier entry there
    assert len(aside) == (2 if damage in ("cut the BPE", "garbage meta.json, its aside name taken") else 1)
    builds = []
    monkeypatch.setattr(prepare_module, "_build", lambda *args: builds.append(args) or pytest.fail("built again"))
    third = prepare_data(spec, seed=0, cache_dir=cache)  # repaired: a cache hit from now on
    assert third.fingerprint == first.fingerprint and builds == []


def test_the_text_endoftext_inside_a_document_is_no_document_boundary(tmp_path):
    docs = load_documents(SPEC)[:60]
    path = tmp_path / "local.jsonl"
    texts = [d.text for d in docs]
    texts[3] = texts[3] + " quoted: <|endoftext|> in the text"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    data = prepare_data(DataSpec(dataset=str(path), vocab_size=300, seq_len=32), seed=0, cache_dir=tmp_path / "c")
    eos = data.tokenizer.eos_token_id
    boundaries = int((data.train_tokens == eos).sum()) + int((data.val_tokens == eos).sum())
    assert boundaries == len(texts)  # one EOS after each document, none inside


def test_documents_copied_under_other_ids_are_counted_as_val_documents_also_in_train(tmp_path, caplog):
    # the split hashes ids, so a chapter joined twice (X, X-copy) lands in both splits: no id is shared, the text is
    docs = load_documents(SPEC)[:60]
    path = tmp_path / "twice.jsonl"
    rows = [{"id": f"{d.id}{copy}", "text": d.text} for d in docs for copy in ("", "-copy")]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train, val = split_documents(load_documents(DataSpec(dataset=str(path))), SPEC.val_fraction)
    crossed = len({d.text for d in val} & {d.text for d in train})
    with caplog.at_level("WARNING", logger="blueberry.data.prepare"):
        data = prepare_data(DataSpec(dataset=str(path), vocab_size=300, seq_len=32), seed=0, cache_dir=tmp_path / "c")
    assert data.leakage["val_docs_in_train"] == crossed > 0
    assert f"{crossed} validation documents are also training documents" in caplog.text


def test_a_cache_that_cannot_be_written_is_a_data_error_naming_it(tmp_path):
    (tmp_path / "a-file").write_text("")
    docs = load_documents(SPEC)[:60]
    path = tmp_path / "local.jsonl"
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    with pytest.raises(DataError, match=r"cannot write the data cache .*a-file/cache \(BLUEBERRY_CACHE, else"):
        prepare_data(
            DataSpec(dataset=str(path), vocab_size=300, seq_len=32), seed=0, cache_dir=tmp_path / "a-file" / "cache"
        )


@pytest.mark.parametrize("full", ["tokens", "tokens, errno", "split", "tokenizer", "tokenizer's config"])
def test_a_full_cache_disk_says_so_naming_the_cache(tmp_path, monkeypatch, full):
    """numpy's short write names no errno nor file, and the tokenizers library raises a bare Exception: a full
    disk read as a bad dataset, or a traceback."""
    import numpy as np

    docs = load_documents(SPEC)[:60]
    path = tmp_path / "local.jsonl"
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    import errno
    import os

    full_disk = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write or close raises: no file named
    if full == "split":
        real_write = Path.write_text

        def write_text(self, text, *args, **kwargs):
            if self.name == "split.json":
                raise full_disk
            return real_write(self, text, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
        says = r"No space left on device: .*split\.json"
    elif full.startswith("tokens"):

        def save(file, array):
            if full == "tokens, errno":
                raise full_disk
            raise OSError(f"{array.nbytes} requested and 0 written")  # what a full disk gives numpy's tofile

        monkeypatch.setattr(np, "save", save)
        says = r"a short write \(\d+ requested and 0 written\): the disk is full or over quota: .*train\.npy"
        says = says if full == "tokens" else r"No space left on device: .*train\.npy"
    else:
        from transformers import PreTrainedTokenizerFast

        def save_pretrained(self, directory, **kwargs):
            if full == "tokenizer's config":
                raise full_disk
            raise Exception("No space left on device (os error 28)")

        monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", save_pretrained)
        says = "No space left on device: "
    with pytest.raises(DataError, match=r"cannot write the data cache .*\(BLUEBERRY_CACHE, else .*\): " + says):
        prepare_data(DataSpec(dataset=str(path), vocab_size=300, seq_len=32), seed=0, cache_dir=tmp_path / "cache")


def test_a_cache_whose_folder_above_cannot_be_made_is_named_as_the_cache(tmp_path, monkeypatch):
    """HOME=/ (a container's arbitrary user) puts the cache under /.cache, which cannot be made: the error named
    the dataset ("cannot prepare dataset 'austen': Permission denied: /.cache"), not the cache and its setting."""
    import pathlib

    home = tmp_path / "home"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(path, *args, **kwargs):
        if path == home or home in path.parents:
            raise PermissionError(13, "Permission denied", str(home))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    with pytest.raises(
        DataError, match=r"cannot write the data cache .*home/\.cache/blueberry \(BLUEBERRY_CACHE, else"
    ):
        prepare_data(
            DataSpec(vocab_size=300, seq_len=32, max_tokens=20_000), seed=0, cache_dir=home / ".cache" / "blueberry"
        )


def test_a_local_corpus_is_read_without_datasets_shared_cache(tmp_path, monkeypatch):
    """The embedded corpus and local files are read into a scratch cache of their own (datasets' shared one keys
    a file on its mtime alone): a shared cache that cannot be written no longer stops them."""
    import datasets

    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "a-file" / "hf")
    data = prepare_data(DataSpec(vocab_size=300, seq_len=32, max_tokens=5_000), seed=0, cache_dir=tmp_path / "ours")
    assert data.stats["train_tokens"] == 5_000


def test_an_edit_that_keeps_the_files_size_and_mtime_is_read(tmp_path):
    """`touch -r`, `cp -p`, rsync and reproducible builds keep or fix a file's mtime: an edit of the same size was a
    cache hit on the old tokens, and datasets' own cache (keyed on the mtime alone) fed the old documents into a
    rebuild."""
    import os

    docs = load_documents(SPEC)[:60]
    path = tmp_path / "local.jsonl"
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    spec, cache = DataSpec(dataset=str(path), vocab_size=300, seq_len=32, max_tokens=5_000), tmp_path / "cache"
    first = prepare_data(spec, seed=0, cache_dir=cache)
    before = path.stat()
    path.write_text(path.read_text().replace(" the ", " The "))  # the same size, other text
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    again = prepare_data(spec, seed=0, cache_dir=cache)
    assert again.fingerprint != first.fingerprint
    assert again.fingerprint == prepare_data(spec, seed=0, cache_dir=tmp_path / "fresh").fingerprint
