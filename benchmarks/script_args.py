"""Argument checks the benchmark scripts share, made right after parsing (before a model is loaded), each
refusal argparse's one-line usage error (exit status 2)."""
from __future__ import annotations

import argparse
import sys

from bsbr.arguments import check_bsbr_dir, check_unique
from bsbr.errors import UserError
from bsbr.evaluate.filler import FILLER_KINDS, filler_path
from bsbr.outputs import check_output_files


def check_args(ap: argparse.ArgumentParser, args, unique=(), outputs=None, inputs=(), models=()) -> None:
    """Refuse a ``--json`` (or the ``(label, path)`` pairs ``outputs``) that may not be written, as the ``bsbr
    bench`` commands check theirs (:func:`bsbr.outputs.check_output_files`: a missing folder, a directory, a
    file that is not JSON, a file inside one of the ``(label, path)`` pairs ``inputs``), a value given twice
    to one of the list options ``unique``, and a ``(label, path)`` of ``models`` that is no saved BSBR model."""
    try:
        for label, path in models:
            check_bsbr_dir(path, label)
        check_output_files([("--json", args.json)] if outputs is None else outputs, inputs=inputs)
        for name in unique:
            check_unique(f"--{name.replace('_', '-')}", getattr(args, name))
    except UserError as e:
        ap.error(str(e))


def output_only(doc: str, default: str) -> str:
    """The one argument of a script that takes only its output file, OUT.json (``default`` when not given),
    checked as :func:`check_args` checks ``--json``; ``doc``: the script's docstring."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n", 1)[-1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=default, metavar="OUT.json", help=f"the results (default {default})")
    args = ap.parse_args()
    check_args(ap, args, outputs=[("OUT.json", args.out)])
    return args.out


def prompts(ap: argparse.ArgumentParser, *args, **kwargs) -> list:
    """The prompts of :func:`bsbr.evaluate.passkey.grid_prompts` (same arguments); a grid they cannot be built for
    (a length too short for a needle and filler) is argparse's one-line error, not a traceback."""
    from bsbr.evaluate.passkey import grid_prompts

    try:
        return list(grid_prompts(*args, **kwargs))
    except ValueError as e:
        ap.error(str(e))


def filler_spec(spec: str) -> str:
    """An argparse type: a pass-key filler, a kind (:data:`bsbr.evaluate.filler.FILLER_KINDS`) or a text file."""
    if spec not in FILLER_KINDS and not filler_path(spec).is_file():
        raise argparse.ArgumentTypeError(f"{spec!r}: give one of {', '.join(FILLER_KINDS)} or a text file's path")
    return spec


if __name__ == "__main__":  # (a module the scripts import, beside them)
    sys.exit("script_args.py holds the argument checks the benchmark scripts share: run one of those scripts")
