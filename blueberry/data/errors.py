"""The one error the data package raises for bad input or an unreachable source."""


class DataError(RuntimeError):
    """The data spec cannot be satisfied: missing file or field, Hub unreachable, too little text."""
