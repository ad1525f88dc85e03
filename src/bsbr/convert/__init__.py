"""Conversion of pretrained decoder LMs to BSBR."""
from .converter import (DEFAULT_CHUNK_SIZE, DEFAULT_OPTIONS, TransformerToBSBRConverter, convert_to_bsbr,
                        count_parameters, default_source_path, load_source, load_tokenizer)
from .families import SUPPORTED_MODEL_TYPES

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_OPTIONS", "SUPPORTED_MODEL_TYPES", "TransformerToBSBRConverter",
           "convert_to_bsbr", "count_parameters", "default_source_path", "load_source", "load_tokenizer"]
