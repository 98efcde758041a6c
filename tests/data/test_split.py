"""The document split: by id hash, stable under reordering, and disjoint on the real corpus."""

import gzip
import json
import random
from importlib.resources import files

from blueberry.data.corpus import Document
from blueberry.data.split import is_val, split_documents


def austen_docs() -> list[Document]:
    with gzip.open(files("blueberry.data").joinpath("austen.jsonl.gz").open("rb"), "rt") as f:
        return [Document(r["id"], r["text"]) for r in map(json.loads, f)]


def test_austen_split_is_disjoint_and_matches_data_facts():
    train, val = split_documents(austen_docs(), 0.1)
    assert (len(train), len(val)) == (246, 23)  # 269 chapters, a 10 % validation share by hashed id
    assert not {d.id for d in train} & {d.id for d in val}
    assert len({d.id.split("/")[1] for d in val}) == 6  # val draws from all six novels


def test_split_is_stable_under_shuffling():
    docs = austen_docs()
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    for a, b in zip(split_documents(docs, 0.2), split_documents(shuffled, 0.2), strict=True):
        assert sorted(d.id for d in a) == sorted(d.id for d in b)


def test_split_keeps_source_order_and_grows_monotonically():
    docs = [Document(f"doc-{i}", "x") for i in range(2000)]
    train, val = split_documents(docs, 0.1)
    assert [d.id for d in train] == [d.id for d in docs if not is_val(d.id, 0.1)]
    assert 150 < len(val) < 250
    # A larger fraction only adds documents to val, never moves one back to train.
    assert {d.id for d in val} <= {d.id for d in split_documents(docs, 0.3)[1]}
