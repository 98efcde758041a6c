"""Loading documents: the embedded corpus, local files, and the Hub failing fast when offline."""

import json
import socket
from importlib.resources import files
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blueberry.data import DataError, prepare_data
from blueberry.data.corpus import load_documents, text_sha256
from blueberry.spec import DataSpec


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Hub offline and every cache in tmp_path, also for libraries that read the env at import time."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("BLUEBERRY_CACHE", str(tmp_path / "blueberry"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def network_attempts(monkeypatch) -> list:
    """Every outgoing connection a test's code tries, refused: "fails fast" means none was tried."""
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise ConnectionRefusedError(f"test: no network ({address})")

    def resolve(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(f"test: no network ({host})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return attempts


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"id": f"d{i}", "body": f"document number {i} " * 5} for i in range(30)]


def test_embedded_austen_has_269_chapters_and_writes_nothing_into_the_package():
    package = Path(str(files("blueberry.data")))
    before = sorted(p.name for p in package.iterdir())
    docs = load_documents(DataSpec())
    assert len(docs) == 269
    assert len({d.id for d in docs}) == 269
    assert docs[0].id == "austen/sensesensibility/001" and docs[0].text.startswith("The family of Dashwood")
    assert 4_000_000 < sum(len(d.text) for d in docs) < 4_050_000
    assert sorted(p.name for p in package.iterdir() if p.name != "__pycache__") == [
        n for n in before if n != "__pycache__"
    ]


def test_local_jsonl_with_caps(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ROWS)
    docs = load_documents(DataSpec(dataset=str(path), text_field="body", max_docs=10, max_chars_per_doc=12))
    assert [d.id for d in docs] == [f"d{i}" for i in range(10)]
    assert all(len(d.text) == 12 for d in docs)


def test_missing_ids_fall_back_to_the_hash_of_the_full_text(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "alpha beta"}, {"text": ""}, {"text": "gamma"}])
    docs = load_documents(DataSpec(dataset=str(path), max_chars_per_doc=3))
    assert [d.id for d in docs] == [text_sha256("alpha beta"), text_sha256("gamma")]  # empty text dropped
    assert [d.text for d in docs] == ["alp", "gam"]


def test_parquet_and_txt_use_their_builders(tmp_path):
    pq.write_table(pa.table({"text": ["one two", "three"], "id": ["a", "b"]}), tmp_path / "d.parquet")
    assert [d.id for d in load_documents(DataSpec(dataset=str(tmp_path / "d.parquet")))] == ["a", "b"]
    (tmp_path / "book.txt").write_text("First paragraph\nstill first.\n\nSecond one.\n")
    docs = load_documents(DataSpec(dataset=str(tmp_path / "book.txt")))
    assert len(docs) == 2  # a single .txt file: blank-line paragraphs are the documents
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"{i}.txt").write_text(f"file {i}\n\nsecond paragraph {i}\n")
    assert len(load_documents(DataSpec(dataset=str(texts)))) == 3  # a directory: one document per file


def test_a_text_file_of_one_document_per_line_is_told_what_a_document_is(tmp_path, monkeypatch):
    monkeypatch.setenv("BLUEBERRY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "lines.txt").write_text("".join(f"document {i} of the corpus\n" for i in range(50)))
    with pytest.raises(DataError, match=r"1 documents split into .*a \.txt file's documents are its blank-line"):
        prepare_data(DataSpec(dataset=str(tmp_path / "lines.txt"), seq_len=8), seed=0)
    (tmp_path / "folder").mkdir()  # a folder's .txt files are one document each: no such hint
    (tmp_path / "lines.txt").rename(tmp_path / "folder" / "lines.txt")
    with pytest.raises(DataError, match=r"both splits need at least one document$"):
        prepare_data(DataSpec(dataset=str(tmp_path / "folder"), seq_len=8), seed=0)


def test_local_path_wins_over_a_hub_name(tmp_path, monkeypatch):
    (tmp_path / "someone").mkdir()
    write_jsonl(tmp_path / "someone" / "corpus.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    assert len(load_documents(DataSpec(dataset="someone", text_field="body"))) == 30


def test_missing_text_field_names_the_field_and_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ROWS)
    with pytest.raises(DataError, match=r"'text'.*\['id', 'body'\]"):
        load_documents(DataSpec(dataset=str(path)))


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("empty.txt", b"", "is empty (1 file(s) of 0 bytes)"),
        ("empty.jsonl", b"", "is empty (1 file(s) of 0 bytes)"),
        ("latin1.txt", "Élise\n".encode("latin-1"), "as text: UnicodeDecodeError: 'utf-8' codec can't decode"),
        ("latin1.jsonl", '{"id": "a", "text": "Élise"}\n'.encode("latin-1"), "not UTF-8 text"),
        ("broken.jsonl", b'{"text": "a"\n', "as json: ArrowInvalid: JSON parse error"),
        ("broken.parquet", b"PAR1 not really", "as parquet: ArrowInvalid"),
    ],
)
def test_an_unreadable_local_file_is_a_data_error_naming_it_and_the_cause(tmp_path, name, content, says):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=f"dataset '{tmp_path / name}'") as err:
        load_documents(DataSpec(dataset=str(tmp_path / name)))
    assert says in str(err.value)


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("b.jsonl", b'{"id": "b", "body": "a"\n', "as json: file 'b.jsonl': ArrowInvalid: JSON parse error"),
        ("sub/b.jsonl", '{"id": "b", "body": "Élise"}\n'.encode("latin-1"), "file 'sub/b.jsonl': not UTF-8 text"),
        # readable alone, not as one table with the rest: a metadata file left in the folder
        ("info.json", b'{"description": "about"}', "file 'info.json' has columns ['description'], 'a.jsonl' has"),
        ("0-empty.jsonl", b"\n", "file '0-empty.jsonl' has no rows: "),
    ],
)
def test_an_unreadable_file_in_a_dataset_folder_is_named(tmp_path, name, content, says):
    """The builder's error alone does not say which of a folder's files it could not read."""
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    for good in ("a.jsonl", "c.jsonl"):
        write_jsonl(tmp_path / "corpus" / good, ROWS)
    (tmp_path / "corpus" / name).write_bytes(content)
    with pytest.raises(DataError, match=f"dataset '{tmp_path / 'corpus'}'") as err:
        load_documents(DataSpec(dataset=str(tmp_path / "corpus"), text_field="body"))
    assert says in str(err.value)


def test_a_text_field_that_holds_no_text_says_what_it_holds(tmp_path):
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"id": str(i), "body": i} for i in range(3)])
    with pytest.raises(DataError, match=r"field 'body' must be text in every row; found int \(first in row 0\)$"):
        load_documents(DataSpec(dataset=str(numbers), text_field="body"))
    # some rows only: were they dropped, half the corpus would vanish without a word
    mixed = [{"id": str(i), "body": f"text {i}" if i % 2 else ["a", "b"]} for i in range(40)]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", mixed)
    with pytest.raises(DataError, match=r"'body' must be text in every row; found list \(first in row 0\)$"):
        load_documents(DataSpec(dataset=str(mixed), text_field="body"))
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"id": "a", "body": "  "}])
    with pytest.raises(DataError, match=r"no non-empty 'body' documents$"):
        load_documents(DataSpec(dataset=str(blank), text_field="body"))


def test_rows_without_the_text_field_are_left_out_with_a_warning(tmp_path, caplog):
    # 20 of 40 rows name it `body`: half the corpus, gone without a word, trained on the rest
    rows = [{"id": str(i), **({"text": f"text {i}"} if i % 2 else {"body": f"text {i}"})} for i in range(40)]
    rows[1]["text"] = None
    with caplog.at_level("WARNING", logger="blueberry.data.corpus"):
        docs = load_documents(DataSpec(dataset=str(write_jsonl(tmp_path / "half.jsonl", rows))))
    assert len(docs) == 19 and "21 of 40 rows have no 'text' (missing or null): left out" in caplog.text


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(DataSpec(dataset=str(tmp_path / "nope.jsonl")))


def test_offline_hub_dataset_fails_fast_and_clearly(network_attempts):
    spec = DataSpec(
        dataset="HuggingFaceTB/smollm-corpus", dataset_config="cosmopedia-v2", streaming=True, max_docs=1000
    )
    with pytest.raises(DataError) as err:
        prepare_data(spec, seed=0)
    assert network_attempts == []  # offline mode answered at once: no connection tried, no retries waited out
    message = str(err.value)
    assert "HuggingFaceTB/smollm-corpus" in message and "offline" in message and "local" in message


def test_unbounded_stream_is_refused():
    with pytest.raises(DataError, match="max_docs"):
        load_documents(DataSpec(dataset="HuggingFaceTB/smollm-corpus", streaming=True))


def test_offline_hub_tokenizer_fails_fast_and_clearly(tmp_path, network_attempts):
    path = write_jsonl(tmp_path / "docs.jsonl", ROWS)
    with pytest.raises(DataError, match="HuggingFaceTB/SmolLM-135M.*offline"):
        prepare_data(DataSpec(dataset=str(path), text_field="body", tokenizer="HuggingFaceTB/SmolLM-135M"), seed=0)
    assert network_attempts == []


def test_hidden_folders_in_a_dataset_folder_are_no_data(tmp_path):
    # Jupyter leaves .ipynb_checkpoints/ copies beside a notebook's files: read, every document would train twice.
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    write_jsonl(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.jsonl", ROWS)
    docs = load_documents(DataSpec(dataset=str(tmp_path), text_field="body"))
    assert len(docs) == len(ROWS)


def test_a_data_folder_is_split_by_its_file_names_as_the_datasets_library_reads_one(tmp_path):
    # train.jsonl beside a held-out test.jsonl: only the split asked for is read, as load_dataset(data_dir=) does
    folder = tmp_path / "hf-style"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"id": f"tr{i}", "text": f"train {i}"} for i in range(6)])
    write_jsonl(folder / "test.jsonl", [{"id": f"te{i}", "text": f"test {i}"} for i in range(3)])
    train = load_documents(DataSpec(dataset=str(folder)))
    test = load_documents(DataSpec(dataset=str(folder), dataset_split="test"))
    assert {d.id for d in train} == {f"tr{i}" for i in range(6)} and {d.id for d in test} == {"te0", "te1", "te2"}
    with pytest.raises(
        DataError, match=r"has no split 'validation' \(dataset_split\); .* the splits \['test', 'train'\]"
    ):
        load_documents(DataSpec(dataset=str(folder), dataset_split="validation"))
    plain = tmp_path / "plain"  # no split names: every file is 'train'
    plain.mkdir()
    write_jsonl(plain / "a.jsonl", ROWS)
    write_jsonl(plain / "b.jsonl", ROWS)
    assert len(load_documents(DataSpec(dataset=str(plain), text_field="body"))) == 2 * len(ROWS)
    (plain / "eval.py").write_text("")  # only data files are read for split names: no 'test' split here
    (plain / "__data__").mkdir()  # a folder datasets would skip is data like any other here
    write_jsonl(plain / "__data__" / "c.jsonl", ROWS)
    assert len(load_documents(DataSpec(dataset=str(plain), text_field="body"))) == 3 * len(ROWS)
    write_jsonl(folder / "extra.jsonl", ROWS)  # datasets would drop it beside train/test: refused, not dropped
    with pytest.raises(DataError, match=r"extra.jsonl names no split while other files do \(test.jsonl, train.jsonl\)"):
        load_documents(DataSpec(dataset=str(folder)))


def test_split_and_config_names_a_local_file_cannot_honour_are_refused(tmp_path):
    single = write_jsonl(tmp_path / "one.jsonl", ROWS)
    for dataset in (str(single), "austen"):
        with pytest.raises(DataError, match=r"one file, which the datasets library reads as split 'train' only"):
            load_documents(DataSpec(dataset=dataset, dataset_split="test"))
        with pytest.raises(DataError, match=r"dataset_config 'x' names a configuration of a Hub dataset"):
            load_documents(DataSpec(dataset=dataset, dataset_config="x"))
