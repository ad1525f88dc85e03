"""Result files: JSON (every command's numbers) and matplotlib figures (Agg backend: no display)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence, Tuple

logger = logging.getLogger(__name__)


def _finite(obj):
    """JSON has no NaN or infinity: write them as null (a reader sees 'undefined', not a parse error)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_together(files: Sequence[Tuple[os.PathLike, Callable[[Path], object]]]) -> None:
    """Write result files as one set: each ``(path, write)`` first has ``write(staged)`` write its file
    in a staging folder beside ``path``; only when all are written are they renamed into place, in one
    short final step. A write that fails (or an interruption) before that step leaves the old files
    untouched, and neither staging folders nor the folders made for them."""
    from .errors import UserError, check_not_interrupted
    from .outputs import fsync, temp_dir

    staging, staged, made = {}, [], []
    path = None
    try:
        for path, write in files:
            path = Path(os.path.abspath(os.path.expanduser(str(path))))
            if path.parent not in staging:
                made += [p for p in (path.parent, *path.parent.parents) if not p.exists()]
                path.parent.mkdir(parents=True, exist_ok=True)
                staging[path.parent] = temp_dir(path.parent, ".bsbr-results.tmp-")
            write(staging[path.parent] / path.name)
            staged.append((staging[path.parent] / path.name, path))
        check_not_interrupted()
    except BaseException as e:
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)
        for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):  # deepest first, where empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(e, OSError) and path is not None:  # a full disk, a folder that takes no files
            raise UserError(f"{path}: could not be written ({e.strerror or e}); no result file was written: free "
                            "some space or choose another path") from e
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
        logger.debug("wrote %s", path)  # (the commands print where their results went)
    for parent, folder in staging.items():
        folder.rmdir()
        with contextlib.suppress(OSError):  # not every file system lets a directory be synced
            fsync(parent)


def write_json(result, path: str | os.PathLike) -> Path:
    """Write ``result`` as indented JSON to ``path`` (making its folder) in one rename: a reader sees
    the old file or the new one. Returns the path."""
    from .outputs import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_finite(result), indent=1) + "\n")
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 120, **savefig_kwargs) -> Path:
    """Lay out ``fig``, write it to ``path`` (making its folder; one rename, so never half a file), close it."""
    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is None:  # a figure made with its own layout (constrained) keeps it
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix names the format
    try:
        fig.savefig(tmp, dpi=dpi, **savefig_kwargs)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
