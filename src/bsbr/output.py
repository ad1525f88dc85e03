"""Result files: JSON (every command's numbers) and matplotlib figures (Agg backend: no display)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


def _finite(obj):
    """JSON has no NaN or infinity: write them as null (a reader sees 'undefined', not a parse error)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(result, path: PathLike) -> Path:
    """Write ``result`` as indented JSON to ``path``, making its folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(result), indent=1) + "\n")
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: PathLike, dpi: int = 120) -> Path:
    """Lay out ``fig``, write it to ``path`` (making its folder) and close it. Returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
