"""Conversion of pretrained decoder LMs to BSBR. The converter (torch, transformers) loads on first use
of its names, so the command line's parsers import this package without it."""
import importlib

_EXPORTS = {"DEFAULT_CHUNK_SIZE": "defaults", "DEFAULT_OPTIONS": "defaults", "default_source_path": "defaults",
            "SUPPORTED_MODEL_TYPES": "families",
            **dict.fromkeys(("TransformerToBSBRConverter", "convert_to_bsbr", "count_parameters", "load_source",
                             "load_tokenizer"), "converter")}
__all__ = sorted(_EXPORTS)


_SUBMODULES = ("cli", "converter", "defaults", "families")


def __getattr__(name):
    if name in _SUBMODULES:  # bsbr.convert.converter after a plain `import bsbr.convert`
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
