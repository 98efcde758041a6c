"""A package's exports loaded on first use (PEP 562), so importing the package, or one light module of it,
does not import its heavy modules (torch, transformers) until an export is asked for."""

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """The module `__getattr__` of `package` whose `exports` map each name to the submodule that defines it."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{exports[name]}", package), name)

    return __getattr__
