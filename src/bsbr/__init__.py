"""bsbr: Block Sparse attention with Block Retrieval, and tools to convert pretrained decoder LMs to it.

``import bsbr`` is light (the ``bsbr`` command starts without torch): the names below load on first
use. It also registers ``model_type="bsbr"`` with transformers' Auto classes — at once if transformers
is already imported, else right after transformers is imported — so that after ``import bsbr``,
``AutoModelForCausalLM.from_pretrained`` loads a BSBR checkpoint (strictly, see
:mod:`bsbr.models.bsbr.loading`).
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import threading

from .lazy import lazy_names

__version__ = "0.3.0.dev0"

_EXPORTS = {"BSBRAttention": "layers", "BSBRBaseModel": "models", "BSBRCache": "models", "BSBRConfig": "models",
            "BSBRForCausalLM": "models", "BSBRForQuestionAnswering": "models",
            "BSBRForSequenceClassification": "models", "BSBRForTokenClassification": "models", "BSBRLayer": "models",
            "BSBRModel": "models", "TransformerToBSBRConverter": "convert", "convert_to_bsbr": "convert",
            "BSBROptions": "ops", "load_bsbr_model": "models"}
__all__ = sorted([*_EXPORTS, "__version__"])
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, ("bench", "convert", "distill", "evaluate", "layers", "models",
                                                       "ops"))


def _register_auto_classes() -> None:
    importlib.import_module("bsbr.models.bsbr")  # registers on import


class _AfterTransformersImport:
    """A ``sys.meta_path`` finder that lets the regular finders find ``transformers`` and registers the
    BSBR Auto classes once that module has executed; it removes itself then (a spec only asked for, as a
    check that transformers is installed does, leaves it in place)."""

    _searching = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers" or getattr(self._searching, "on", False):
            return None
        self._searching.on = True  # (the finders asked below may ask the meta path again)
        try:
            spec = next((s for f in sys.meta_path if f is not self and getattr(f, "find_spec", None)
                         for s in [f.find_spec(fullname, path, target)] if s is not None), None)
        finally:
            self._searching.on = False
        exec_module = getattr(getattr(spec, "loader", None), "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_register(module):
            exec_module(module)
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
            try:
                _register_auto_classes()
            except Exception as e:  # never break the user's `import transformers`
                import warnings

                warnings.warn(f"bsbr could not register its model with transformers' Auto classes: {e}")

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register_auto_classes()
elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformersImport())
