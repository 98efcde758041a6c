"""Train/validation split by whole document, decided by a hash of the document id (README, "Data")."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from blueberry.data.corpus import Document


def is_val(doc_id: str, val_fraction: float) -> bool:
    """True if the document belongs to validation: a pure function of its id, so order never matters."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 1000 < 1000 * val_fraction


def split_documents(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val), each in the source order. Documents sharing an id always land in the same split."""
    train, val = [], []
    for doc in docs:
        (val if is_val(doc.id, val_fraction) else train).append(doc)
    return train, val
