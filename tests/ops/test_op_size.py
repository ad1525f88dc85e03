"""Issue 12's bound on the ops: no function in ``src/bsbr/ops`` longer than 80 lines, ``def`` to its end
(docstring included), so each op stays readable beside its reference form."""
import ast
from pathlib import Path

import bsbr.ops

LIMIT = 80


def test_no_op_function_is_longer_than_80_lines():
    root = Path(bsbr.ops.__file__).parent
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
