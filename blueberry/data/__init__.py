"""Blueberry data: documents → leakage-free split → tokenizer → cached token streams → windows.

    from blueberry.data import prepare_data
    data = prepare_data(spec.data, seed)          # PreparedData
    data.train_sampler(batch_size, seed).batch(step, rank, world)
    data.val_windows()

The default corpus, Jane Austen's six novels (269 chapters), ships in this package: see README.md.

`prepare_data` and `PreparedData` load on first use (PEP 562): `blueberry run` checks the dataset source
(`corpus.resolve_source`) before torch loads, so a dataset path that is not there fails in a second.
"""

from blueberry.data.errors import DataError
from blueberry.lazy_exports import lazy_exports

_LAZY = {"PreparedData": "prepare", "prepare_data": "prepare"}

__all__ = ["DataError", "PreparedData", "prepare_data"]

__getattr__ = lazy_exports(__name__, _LAZY)
