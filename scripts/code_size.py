"""The largest functions and classes of the production code: lines and, for classes, methods.

    python scripts/code_size.py [--top N] [PATH ...]      (default: services threadline)

Generated stubs (threadline/v1) are left out. Used to keep functions under about
80 lines; the figures go into closing notes as before/after.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def _measure(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, int, str]]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    functions: list[tuple[int, str]] = []
    classes: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            where = f"{path}:{node.lineno} {node.name}"
            if isinstance(node, ast.ClassDef):
                methods = sum(
                    isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) for n in node.body
                )
                classes.append((lines, methods, where))
            else:
                functions.append((lines, where))
    return functions, classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["services", "threadline"])
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    functions: list[tuple[int, str]] = []
    classes: list[tuple[int, int, str]] = []
    for root in map(Path, args.paths):
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            if "v1" in path.parts:
                continue
            found_functions, found_classes = _measure(path)
            functions += found_functions
            classes += found_classes
    print(f"largest functions (lines), of {len(functions)}:")
    for lines, where in sorted(functions, reverse=True)[: args.top]:
        print(f"  {lines:5d}  {where}")
    print(f"largest classes (lines, methods), of {len(classes)}:")
    for lines, methods, where in sorted(classes, reverse=True)[: args.top]:
        print(f"  {lines:5d} {methods:3d}  {where}")
    over = [f for f in functions if f[0] > 80]
    print(f"functions over 80 lines: {len(over)}")


if __name__ == "__main__":
    main()
