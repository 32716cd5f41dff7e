"""`techdocs`: docstrings of installed third-party packages, read with `ast`."""
from __future__ import annotations

import ast
import sys
import warnings
from pathlib import Path

from fastmix.data.embedded.common import Item, chunk_paragraphs, clean_text, dist_version, package_dir, py_files

# Third-party packages whose docstrings make `techdocs`: (import name, distribution).
TECHDOC_PACKAGES = (
    ("numpy", "numpy"), ("scipy", "scipy"), ("pandas", "pandas"), ("torch", "torch"),
    ("sklearn", "scikit-learn"), ("transformers", "transformers"), ("datasets", "datasets"),
    ("matplotlib", "matplotlib"), ("sympy", "sympy"), ("networkx", "networkx"), ("nltk", "nltk"),
    ("requests", "requests"), ("jinja2", "Jinja2"), ("click", "click"), ("pydantic", "pydantic"),
)
# Folders skipped everywhere: tests are not documentation, vendored code is someone else's.
_SKIP_DIRS = {"test", "tests", "testing", "_vendor", "vendor", "vendored", "benchmarks", "__pycache__"}
# transformers/models holds hundreds of near-copies of the same model docstrings.
_SKIP_PKG_DIRS = {"transformers": {"models"}}


def _module_docs(path: Path, module: str) -> list[str]:
    """Title line + the module's docstring + each public class/function
    docstring (with its signature), in source order."""
    try:
        with warnings.catch_warnings():  # invalid escapes etc. in third-party code
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return []
    parts = []
    if doc := ast.get_docstring(tree):
        parts.append(doc)

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = child.name
                public = not name.startswith("_") or name in ("__init__", "__call__")
                qual = f"{prefix}{name}"
                if public and (doc := ast.get_docstring(child)):
                    if isinstance(child, ast.ClassDef):
                        head = f"class {qual}"
                    else:
                        try:
                            head = f"{qual}({ast.unparse(child.args)})"
                        except Exception:  # unparse of exotic syntax: the name is enough
                            head = qual
                    parts.append(f"{head}\n\n{doc}")
                if public and isinstance(child, ast.ClassDef):
                    visit(child, f"{qual}.")

    visit(tree, "")
    if not parts:
        return []
    body = clean_text("\n\n\n".join(parts))
    if not body:
        return []
    chunks = chunk_paragraphs(body)
    return [f"Module {module}{'' if i == 0 else ' (continued)'}\n\n{c}" for i, c in enumerate(chunks)]


def techdocs_items(ctx: dict) -> list[Item]:
    items = []
    for name, _dist in TECHDOC_PACKAGES:
        pkg = package_dir(name)
        if pkg is None:
            continue
        for rel, path in py_files(pkg, _SKIP_DIRS | _SKIP_PKG_DIRS.get(name, set())):
            parts = [name, *rel[:-3].split("/")]
            if parts[-1] == "__init__":
                parts.pop()
            module = ".".join(parts)
            items.append(Item(f"{name}/{rel}", lambda p=path, m=module: _module_docs(p, m)))
    return items


def techdocs_origin() -> str:
    found = [f"{d}=={v}" for n, d in TECHDOC_PACKAGES if (v := dist_version(d)) and package_dir(n)]
    # ast.unparse (the signatures) may format differently in another Python.
    return f"docstrings (ast, Python {sys.version_info[0]}.{sys.version_info[1]}) of " + ", ".join(found)
