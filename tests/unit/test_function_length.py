"""No function in clear_cli/ is over 80 lines unless a comment right above it says why (issue 20)."""

import ast
from pathlib import Path

import clear_cli

LIMIT = 80
WHY = "# over 80 lines:"  # the comment, on the line(s) just above the def (or its decorators), that says why


def long_functions(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length <= LIMIT:
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            above = lines[max(0, first - 3):first - 1]
            if not any(line.strip().startswith(WHY) and len(line.strip()) > len(WHY) + 5 for line in above):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_long_functions():
    found = long_functions(Path(clear_cli.__file__).parent)
    assert not found, "split these into steps, or say why above them (`# over 80 lines: ...`):\n" + "\n".join(found)


def test_the_check_finds_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    (pkg / "a.py").write_text(f"def long():\n{body}\n\n\n{WHY} one table of cases, read as one\ndef excused():\n{body}\n")
    assert long_functions(pkg) == ["pkg/a.py:1 long (81 lines)"]
