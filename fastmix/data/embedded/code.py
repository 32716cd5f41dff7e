"""`code`: Python standard library .py files (see the package docstring)."""
from __future__ import annotations

import platform
import re
import sysconfig
from pathlib import Path

from fastmix.data.embedded.common import (CODE_WHOLE_CHARS, Item, chunk_paragraphs, clean_text, py_files, read_text)

# stdlib folders/files left out of `code`: tests, GUIs' demo code, third-party
# packages, generated tables (encodings), a docs dump (pydoc_data), and
# _sysconfigdata*, which holds this machine's build paths (not portable).
_STDLIB_SKIP = {"test", "tests", "idlelib", "turtledemo", "site-packages", "dist-packages",
                "pydoc_data", "encodings", "__pycache__", "lib-dynload", "ensurepip", "__phello__"}

_TOP_LEVEL_DEF = re.compile(r"^(?:def |async def |class |@)", re.MULTILINE)


def split_code(src: str, target: int = CODE_WHOLE_CHARS // 2) -> list[str]:
    """A long module cut before top-level def/class/decorator lines that follow
    a blank line (so a decorator stays with its def), in pieces of >= target
    characters; pieces still over 4*target are cut at blank lines."""
    if len(src) <= CODE_WHOLE_CHARS:
        return [src]
    cuts = [m.start() for m in _TOP_LEVEL_DEF.finditer(src) if m.start() >= 2 and src[m.start() - 2] == "\n"]
    pieces, start = [], 0
    for c in cuts:
        if c - start >= target:
            pieces.append(src[start:c])
            start = c
    pieces.append(src[start:])
    out = []
    for p in pieces:
        out.extend(chunk_paragraphs(p, target, 4 * target) if len(p) > 4 * target else [p])
    return out


def code_items(ctx: dict) -> list[Item]:
    root = Path(sysconfig.get_paths()["stdlib"])
    items = []
    for rel, path in py_files(root, _STDLIB_SKIP):
        if Path(rel).name.startswith("_sysconfigdata"):
            continue
        items.append(Item(rel, lambda p=path, r=rel: [
            f"# {r}\n{piece}" if i == 0 else f"# {r} (continued)\n{piece}"
            for i, piece in enumerate(split_code(clean_text(read_text(p))))]))
    return items


def code_origin() -> str:
    return f"Python {platform.python_version()} standard library (sysconfig stdlib)"
