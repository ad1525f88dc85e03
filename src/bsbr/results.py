"""Result files: JSON (every command's numbers) and matplotlib figures (Agg backend: no display)."""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)


def software() -> dict:
    """The software, torch's thread count and the machine a result was computed with (recorded beside it)."""
    import platform

    import torch
    import transformers

    from . import __version__

    return dict(bsbr=__version__, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), threads=torch.get_num_threads(), machine=platform.machine())


def _finite(obj):
    """JSON has no NaN or infinity: write them as null (a reader sees 'undefined', not a parse error)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(result, path: str | os.PathLike) -> Path:
    """Write ``result`` as indented JSON to ``path`` (making its folder) in one rename: a reader sees
    the old file or the new one. Returns the path."""
    from .outputs import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_finite(result), indent=1) + "\n")
    return path


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, layout=None, squeeze: bool = True):
    """``(figure, axes)`` as ``matplotlib.pyplot.subplots`` makes them, without pyplot: the figure is saved by the
    backend its file's format names, so the program's own matplotlib backend and its pyplot figures are left
    as they are (matplotlib imported only when a figure is drawn)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120, **savefig_kwargs) -> Path:
    """Lay out ``fig`` (from :func:`subplots`), write it to ``path`` (making its folder; one rename, so never half a
    file). Characters of its labels the font lacks (a CJK model name without a CJK font) are drawn as boxes and
    said in one warning (matplotlib warned of each glyph at each layout pass, with its source line)."""
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix names the format
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", message=r"Glyph \d+ .*missing from font")
            if fig.get_layout_engine() is None:  # a figure made with its own layout (constrained) keeps it
                fig.tight_layout()
            fig.savefig(tmp, dpi=dpi, **savefig_kwargs)
        missing = {m.group(1) for w in caught if (m := re.match(r"Glyph (\d+) .*missing from font", str(w.message)))}
        for w in caught:
            if not re.match(r"Glyph \d+ .*missing from font", str(w.message)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if missing:
            logger.warning("%s: the font lacks %d character(s) of its labels, drawn as boxes (install a font with "
                           "them, e.g. Noto)", path.name, len(missing))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
