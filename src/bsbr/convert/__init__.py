"""Conversion of pretrained decoder LMs to BSBR."""
from .converter import (
    DEFAULT_OPTIONS,
    META_INITS,
    TransformerToBSBRConverter,
    convert_to_bsbr,
    count_parameters,
    default_source_path,
    init_meta_projections,
    load_source,
    load_tokenizer,
)
from .families import SUPPORTED_MODEL_TYPES

__all__ = [
    "DEFAULT_OPTIONS",
    "META_INITS",
    "SUPPORTED_MODEL_TYPES",
    "TransformerToBSBRConverter",
    "convert_to_bsbr",
    "count_parameters",
    "default_source_path",
    "init_meta_projections",
    "load_source",
    "load_tokenizer",
]
