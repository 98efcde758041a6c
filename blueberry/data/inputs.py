"""What a run's data spec is checked for before torch loads (~7 s on a small CPU): a dataset path that is not
there or of no known format, a split or config a local file cannot honour, a tokenizer path that is no
tokenizer. `blueberry run` checks its spec so; `blueberry validate`, and a sweep or study every trial's before the
first starts (else each trial would fail on it in turn)."""

from __future__ import annotations

from blueberry.data.corpus import resolve_source
from blueberry.data.errors import DataError
from blueberry.data.tokenizer import check_local_tokenizer
from blueberry.spec import DataSpec


def input_problems(spec: DataSpec) -> list[tuple[str, str]]:
    """(field, what is wrong) for each data input of `spec` a run would refuse; [] when all are usable."""
    problems = []
    for field, check in (
        ("data.dataset", lambda: resolve_source(spec)),
        ("data.tokenizer", lambda: check_local_tokenizer(spec.tokenizer)),
    ):
        try:
            check()
        except DataError as exc:
            problems.append((field, str(exc)))
    return problems
