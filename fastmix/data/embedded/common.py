"""What every source builder shares: the corpus constants, text cleaning and
splitting, the document `Item`, file and package helpers."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("code", "techdocs", "drama", "reference", "math", "dialogue")
MANIFEST = "manifest.json"
DOCS_FILE = "docs.jsonl"
DEFAULT_MAX_BYTES = 4_000_000
FORMAT_VERSION = 1

TARGET_CHARS = 4000      # documents split at paragraphs aim for this size...
MAX_DOC_CHARS = 8000     # ...and never exceed this one
CODE_WHOLE_CHARS = 16000  # code files up to this size stay one document
MAX_SKIPS = 64           # the cap stops after this many documents in a row did not fit
MIN_DOC_CHARS = 64       # shorter documents (an empty __init__.py, a one-line docstring) are noise

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Normalised document text: "\\n" newlines, no trailing spaces, no control
    characters (form feeds, NUL, C1), at most two blank lines in a row, no
    leading/trailing blank lines, valid UTF-8 ("" for an empty document)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
    # Lone surrogates (from odd decodes) cannot be written as UTF-8.
    text = _SURROGATE.sub("\ufffd", text)
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    text = text.strip("\n")
    return text if text.strip() else ""


def _split_long_block(block: str, max_chars: int) -> list[str]:
    """A paragraph longer than max_chars, cut at line ends (or mid-line as a last resort)."""
    out, cur = [], ""
    for line in block.split("\n"):
        while len(line) > max_chars:  # one enormous line
            if cur:
                out.append(cur)
                cur = ""
            out.append(line[:max_chars])
            line = line[max_chars:]
        if cur and len(cur) + 1 + len(line) > max_chars:
            out.append(cur)
            cur = line
        else:
            cur = f"{cur}\n{line}" if cur else line
    if cur:
        out.append(cur)
    return out


def chunk_paragraphs(text: str, target: int = TARGET_CHARS, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut text at blank lines into pieces of about `target` characters, none
    over `max_chars`. A text shorter than `max_chars` stays whole."""
    if len(text) <= max_chars:
        return [text]
    blocks: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        blocks.extend(_split_long_block(para, max_chars) if len(para) > max_chars else [para])
    out, cur = [], ""
    for b in blocks:
        if cur and len(cur) + 2 + len(b) > max_chars:
            out.append(cur)
            cur = b
        else:
            cur = f"{cur}\n\n{b}" if cur else b
        if len(cur) >= target:
            out.append(cur)
            cur = ""
    if cur:
        # A short tail (a closing "[Exeunt.]") joins the piece before it when it fits.
        if out and len(cur) < target // 4 and len(out[-1]) + 2 + len(cur) <= max_chars:
            out[-1] = f"{out[-1]}\n\n{cur}"
        else:
            out.append(cur)
    return out


def merge_small(blocks: list[str], small: int = 1000, limit: int = TARGET_CHARS) -> list[str]:
    """Neighbouring blocks joined (blank line between) when either is under
    `small` characters and the result stays within `limit`."""
    out: list[str] = []
    for b in blocks:
        if out and min(len(out[-1]), len(b)) < small and len(out[-1]) + 2 + len(b) <= limit:
            out[-1] = f"{out[-1]}\n\n{b}"
        else:
            out.append(b)
    return out


@dataclass


class Item:
    """One unit of a source (a file, a play, a country): its documents are
    loaded only when the cap reaches it, so a small cap does little work."""
    key: str
    load: Callable[[], list[str]]


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace")


def py_files(root: Path, skip_dirs: set[str]) -> list[tuple[str, Path]]:
    """(relative posix path, path) of the .py files under root, sorted by the
    relative path; skipped folders are pruned, not walked (the stdlib's test/
    and site-packages are most of its files)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        rel_dir = os.path.relpath(dirpath, root)
        for f in filenames:
            if f.endswith(".py"):
                rel = f if rel_dir == "." else f"{rel_dir}/{f}".replace(os.sep, "/")
                out.append((rel, Path(dirpath) / f))
    return sorted(out)


def dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # finds, does not import (torch takes seconds)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
