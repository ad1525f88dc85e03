"""The ``bsbr==0.1.1`` layer, loaded from its wheel to be timed beside this package's.

``bsbr/bsbr.py`` is imported from the wheel under another module name, so it cannot clash with this
package; its code is neither copied nor kept.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import zipfile

from ..errors import UserError

EARLIER_MODULE_NAME = "bsbr_earlier_0_1_1"


def check_wheel(path: str) -> None:
    """Refuse, before anything runs, a path that is not the bsbr 0.1.1 wheel: missing, a directory, not a
    regular file, not a zip, a zip without ``bsbr/bsbr.py``, or another version's wheel (this one's has a
    ``bsbr/bsbr.py`` too)."""
    if not os.path.exists(path):
        what = "does not exist"
    elif os.path.isdir(path):
        what = "is a directory, not a wheel file"
    elif not os.path.isfile(path):
        what = "is not a regular file (a device or FIFO)"
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
            if "bsbr/bsbr.py" not in names:
                what = "has no bsbr/bsbr.py: it is not the bsbr 0.1.1 wheel"
            elif "bsbr-0.1.1.dist-info/METADATA" in names:
                return
            else:
                other = sorted({n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")})
                what = f"is not the bsbr 0.1.1 wheel (it holds {', '.join(other) or 'no .dist-info'})"
        except zipfile.BadZipFile:
            what = "is not a wheel (zip) file"
        except OSError as e:
            what = f"cannot be read ({e.strerror or e})"
    raise UserError(f"--earlier-wheel {path} {what}: give the file bsbr-0.1.1-py3-none-any.whl "
                    f"(pip download bsbr==0.1.1 --no-deps --only-binary=:all: --python-version 3.12: the wheel "
                    "declares Python 3.12; its one module also runs on 3.11)")


def load_earlier_bsbr(wheel_path: str):
    """Import ``bsbr/bsbr.py`` of the bsbr 0.1.1 wheel (it needs only torch) as module
    ``bsbr_earlier_0_1_1``, from a temporary extraction of that one file deleted right after the import."""
    if EARLIER_MODULE_NAME in sys.modules:
        return sys.modules[EARLIER_MODULE_NAME]
    with tempfile.TemporaryDirectory(prefix="bsbr-earlier-", ignore_cleanup_errors=True) as tmp:
        try:
            with zipfile.ZipFile(wheel_path) as zf:
                src = zf.extract("bsbr/bsbr.py", tmp)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{wheel_path} is not a wheel (zip) file: {e}") from e
        except KeyError:
            raise ValueError(f"{wheel_path} has no bsbr/bsbr.py: not the bsbr 0.1.1 wheel") from None
        spec = importlib.util.spec_from_file_location(EARLIER_MODULE_NAME, src)
        module = importlib.util.module_from_spec(spec)
        sys.modules[EARLIER_MODULE_NAME] = module
        try:
            spec.loader.exec_module(module)
            if not hasattr(module, "BSBRAttention"):
                raise ValueError(f"{wheel_path}: bsbr/bsbr.py defines no BSBRAttention")
        except BaseException:
            del sys.modules[EARLIER_MODULE_NAME]
            raise
    return module


def earlier_bytes_estimate(n: int, heads: int, chunk_size: int) -> int:
    """Memory the bsbr 0.1.1 layer needs at ``n`` tokens: it materialises two n x n float masks and,
    per head, the n x n scores, the masked scores, a bool mask and the softmax."""
    n_pad = -(-n // chunk_size) * chunk_size
    return 2 * 4 * n * n + heads * n_pad * n_pad * (3 * 4 + 1)
