"""The CLI tests' tiny local models (tests/cli/conftest.py), for the tests here that run ``bsbr distill``."""
from cli.conftest import models, text  # noqa: F401
