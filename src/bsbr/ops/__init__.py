"""Functional attention math (no nn.Module). Every op has a reference beside its fast forms."""
from .bsbr import *  # noqa: F403  (the BSBR op in three forms, its options and its state)
from .bsbr import __all__  # noqa: F401
