"""Result files: JSON (every command's numbers) and matplotlib figures (Agg backend: no display)."""
from __future__ import annotations

import json
import logging
import math
import os
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
    file). Characters of its labels that no font of theirs draws (a CJK model name without a CJK font; a file name
    this locale could not decode) are written as escapes (``\\u6e90``) and said in one warning: matplotlib drew
    boxes and warned of each glyph at each layout pass, or failed. Math text draws with its own fonts: there only
    lone surrogates are replaced (by ``?``), other characters left to matplotlib."""
    escaped = _escape_undrawable(fig)
    if escaped:
        logger.warning("%s: the fonts lack %d character(s) of its labels, written as escapes (? in math text; install "
                       "a font with them, e.g. Noto)", Path(path).name, escaped)
    if fig.get_layout_engine() is None:  # a figure made with its own layout (constrained) keeps it
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix names the format (outputs.FIGURE_EXTRA)
    try:
        fig.savefig(tmp, dpi=dpi, **savefig_kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _escape_undrawable(fig) -> int:
    """Replace the characters of ``fig``'s texts and tick labels that none of their fonts (matplotlib's
    fallback list) has by their escapes; the number of distinct characters replaced."""
    from matplotlib import cbook, font_manager, ft2font, text

    fonts, missing = {}, set()
    find = getattr(font_manager.fontManager, "_find_fonts_by_props", None)  # (the fallback list text draws by)

    def escaped(label, prop):
        if not isinstance(label, str) or label.isascii():
            return label
        faces = [fonts.setdefault(p, ft2font.FT2Font(p))
                 for p in (find(prop) if find is not None else [font_manager.findfont(prop)])]
        math = cbook.is_math_text(label)  # (math text draws with its own fonts: only what none could, there as ?)
        odd = {c for c in label if not c.isascii() and not c.isspace() and (
            0xD800 <= ord(c) < 0xE000 or not math and not any(f.get_char_index(ord(c)) for f in faces))}
        missing.update(odd)
        return "".join(("?" if math else c.encode("ascii", "backslashreplace").decode("ascii")) if c in odd else c
                       for c in label)
    for t in fig.findobj(text.Text):
        if (label := escaped(t.get_text(), t.get_fontproperties())) != t.get_text():
            t.set_text(label)
    for ax in fig.axes:  # (tick labels: made by their formatter when drawn)
        for axis in (ax.xaxis, ax.yaxis):
            ticks = axis.get_ticklabels()
            labels = [escaped(t.get_text(), t.get_fontproperties()) for t in ticks]
            if labels != [t.get_text() for t in ticks]:
                axis.set_ticklabels(labels)
    return len(missing)
