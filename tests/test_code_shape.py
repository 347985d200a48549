"""The shape issue 11 asks of `shared/`: no function longer than 60 lines, so each rule stays readable
on one screen and a new rule lands as one more small function rather than one more nesting level.

Pure `ast` over the source files: no import of the code, no Azurite, no sandbox.
"""

from __future__ import annotations

import ast
from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent / "shared"
MAX_LINES = 60


def long_functions(source: str, max_lines: int = MAX_LINES) -> list[tuple[str, int, int]]:
    """(name, first line, length) of each function, method or nested function, from its `def` line
    (decorators not counted) to its last line, that is longer than `max_lines`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > max_lines:
                found.append((node.name, node.lineno, length))
    return found


def test_no_function_in_shared_is_longer_than_60_lines():
    offenders = [
        f"shared/{path.name}:{line} {name} is {length} lines"
        for path in sorted(SHARED.glob("*.py"))
        for name, line, length in long_functions(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"functions over {MAX_LINES} lines (split them):\n" + "\n".join(offenders)


def test_the_measure_counts_from_def_to_last_line_including_nested_functions():
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    at_limit = f"def f():\n{body}\n"  # 60 lines
    over = f"def g():\n{body}\n    return 1\n"  # 61 lines
    nested = f"class C:\n    def m(self):\n        def inner():\n{body.replace('    ', '            ')}\n"
    assert long_functions(at_limit) == []
    assert long_functions(over) == [("g", 1, 61)]
    assert long_functions(nested) == [("m", 2, 61)]  # inner is 60 lines: at the limit
