"""What the CLI tests check a command against: the source tree for subprocesses, file trees left as
they were, and one-line errors."""
import hashlib
from pathlib import Path

SRC = str(Path(__file__).parents[1] / "src")
# a short Python-like training text for the commands that read text files
TEXT = ("def f ( x ) :\n    return x + y\n\nclass x :\n    def y ( self ) :\n        print ( x , y )\n") * 40


def tree_hash(path) -> dict:
    """{relative path: sha256} of every file under ``path`` (empty for a missing path)."""
    path = Path(path)
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_error_line(err: str, command: str) -> str:
    """The stderr of a refused command: exactly one line, ``bsbr COMMAND: error: ...``."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"bsbr{' ' + command if command else ''}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def refused(capsys, argv, command, *protected):
    """Run ``bsbr ARGV``: exit status 2, one error line, the ``protected`` paths unchanged. Returns the line."""
    before = [tree_hash(p) for p in protected]
    capsys.readouterr()
    from bsbr.cli import main

    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    last = [line for line in err.strip().splitlines() if line.strip()][-1]
    assert "Traceback" not in err and sum(line.startswith(f"bsbr {command}: error:") for line in err.splitlines()) == 1
    assert last.startswith(f"bsbr {command}: error: "), err
    assert [tree_hash(p) for p in protected] == before
    return last
