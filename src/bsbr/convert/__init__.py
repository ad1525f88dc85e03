"""Conversion of pretrained decoder LMs to BSBR. The converter (torch, transformers) loads on first use
of its names, so the command line's parsers import this package without it."""
from ..lazy import lazy_names

_EXPORTS = {"DEFAULT_CHUNK_SIZE": "defaults", "DEFAULT_OPTIONS": "defaults", "default_source_path": "defaults",
            "SUPPORTED_MODEL_TYPES": "families",
            **dict.fromkeys(("TransformerToBSBRConverter", "convert_to_bsbr", "count_parameters", "load_source",
                             "load_tokenizer"), "converter")}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, ("cli", "converter", "defaults", "families"))
