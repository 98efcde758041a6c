"""Blueberry data: documents → leakage-free split → tokenizer → cached token streams → windows.

    from blueberry.data import prepare_data
    data = prepare_data(spec.data, seed)          # PreparedData
    data.train_sampler(batch_size, seed).batch(step, rank, world)
    data.val_windows()

The default corpus, Jane Austen's six novels (269 chapters), ships in this package: see README.md.
"""

from blueberry.data.errors import DataError
from blueberry.data.prepare import PreparedData, prepare_data

__all__ = ["DataError", "PreparedData", "prepare_data"]
