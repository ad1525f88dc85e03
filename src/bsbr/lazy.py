"""Packages whose names load on first use (PEP 562), so that the command line builds its parsers without
importing torch or transformers."""
from __future__ import annotations

import importlib


def lazy_names(package: str, exports: dict, submodules=()):
    """``(__getattr__, __dir__)`` for ``package``: each name of ``exports`` (name -> its submodule) is read
    from that submodule on first use, and each of ``submodules`` is imported as an attribute."""
    def __getattr__(name):
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(exports) | set(submodules))

    return __getattr__, __dir__
