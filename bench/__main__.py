"""`python -m bench NAME [args]`: run bench/NAME.py's main(argv); with no NAME, list the benchmarks."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

from fedwire.child_process import exit_on_sigterm

_HERE = Path(__file__).resolve().parent


def available() -> dict[str, str]:
    """Benchmark name -> first docstring line, for every bench/*.py with a top-level main().

    Found by parsing, not importing, so listing stays instant and no benchmark's heavy imports
    (torch, faiss, executorch) or side effects run just to print a menu.
    """
    found: dict[str, str] = {}
    for path in sorted(_HERE.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            doc = ast.get_docstring(tree) or ""
            found[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


def _listing() -> str:
    benches = available()
    width = max((len(name) for name in benches), default=0)
    lines = ["usage: python -m bench NAME [--quick] [options]   (python -m bench NAME --help for options)", ""]
    lines += [f"  {name.ljust(width)}  {doc}" for name, doc in benches.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "list"):
        print(_listing())
        return 0
    name, rest = args[0], args[1:]
    if not name.isidentifier() or name not in available():
        print(f"unknown benchmark {name!r}\n\n{_listing()}", file=sys.stderr)
        return 2
    exit_on_sigterm()  # a killed benchmark stops the trials, servers and brokers it started
    module = importlib.import_module(f"bench.{name}")
    result = module.main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
