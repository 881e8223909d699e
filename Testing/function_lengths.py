"""Report the functions in Backend/src longer than a limit (issue 11: about 80 lines).

``python Testing/function_lengths.py [--limit 80] [PATH ...]`` prints one line per long function,
longest first, and exits 1 when there is any. A report, not a test: a long function may have a
reason (say it in a comment)."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def long_functions(paths: list[Path], limit: int) -> list[tuple[int, str]]:
    found = []
    for root in paths:
        for path in sorted(root.rglob("*.py") if root.is_dir() else [root]):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > limit:
                        found.append((length, f"{path.relative_to(REPO)}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=80, help="longest allowed function, in lines (default 80)")
    parser.add_argument("paths", nargs="*", type=Path, default=[REPO / "Backend" / "src"])
    args = parser.parse_args(argv)
    found = long_functions([p.resolve() for p in args.paths], args.limit)
    for length, where in found:
        print(f"{length:4d} lines  {where}")
    print(f"{len(found)} function(s) longer than {args.limit} lines")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
