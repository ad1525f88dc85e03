"""What the CLI tests check a command against: the source tree for subprocesses, file trees left as
they were, and one-line errors."""
import hashlib
from pathlib import Path

SRC = str(Path(__file__).parents[1] / "src")


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
