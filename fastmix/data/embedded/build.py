"""Build the corpus: the builders in order, the size cap, the manifest, the CLI."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from fastmix.data.embedded import mathgen
from fastmix.data.embedded.code import code_items, code_origin
from fastmix.data.embedded.common import (DEFAULT_MAX_BYTES, DOCS_FILE, FORMAT_VERSION, Item, MANIFEST, MAX_SKIPS, MIN_DOC_CHARS, SOURCES, clean_text)
from fastmix.data.embedded.dialogue import dialogue_items, dialogue_origin
from fastmix.data.embedded.drama import drama_items, drama_origin
from fastmix.data.embedded.math_source import math_items, math_origin
from fastmix.data.embedded.reference import reference_items, reference_origin
from fastmix.data.embedded.techdocs import techdocs_items, techdocs_origin
from fastmix.data.corpus import sha256_file
from fastmix.records import atomic_file

BUILDERS: dict[str, tuple[Callable[[dict], list[Item]], Callable[[], str]]] = {
    "code": (code_items, code_origin),
    "techdocs": (techdocs_items, techdocs_origin),
    "drama": (drama_items, drama_origin),
    "reference": (reference_items, reference_origin),
    "math": (math_items, math_origin),
    "dialogue": (dialogue_items, dialogue_origin),
}
assert tuple(BUILDERS) == SOURCES


def _order_key(source: str, key: str) -> str:
    return hashlib.sha256(f"{source}\0{key}".encode()).hexdigest()


def select_documents(source: str, items: Iterable[Item], max_bytes: int) -> list[str]:
    """Whole documents, at most max_bytes of UTF-8 in all: items are visited in
    the order of a hash of their key (an even sample when the cap bites), a
    document that would overflow is skipped, and the visit stops after
    MAX_SKIPS skips in a row (the source is full). Documents under MIN_DOC_CHARS
    after cleaning are dropped. Returned sorted by (key, part)."""
    kept, total, skips = [], 0, 0
    for item in sorted(items, key=lambda it: _order_key(source, it.key)):
        for part, raw in enumerate(item.load()):
            text = clean_text(raw)
            size = len(text.encode("utf-8"))
            if len(text) < MIN_DOC_CHARS:
                continue
            if total + size > max_bytes:
                skips += 1
                if skips >= MAX_SKIPS:
                    break
                continue
            kept.append(((item.key, part), text))
            total, skips = total + size, 0
        if skips >= MAX_SKIPS:
            break
    return [text for _, text in sorted(kept)]


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as fh:
        fh.write(data)


def _builder_hash() -> str:
    """Hash of the code that decides the bytes: a changed builder means a rebuild."""
    h = hashlib.sha256()
    # texts.py builds the external objective texts, not the corpus
    for mod in sorted(p for p in Path(__file__).parent.glob("*.py") if p.name != "texts.py") + [Path(mathgen.__file__)]:
        h.update(mod.read_bytes())
    return h.hexdigest()


def _origins() -> dict[str, str]:
    return {name: origin() for name, (_, origin) in BUILDERS.items()}


def read_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(out_dir: Path, max_bytes_per_source: int = DEFAULT_MAX_BYTES) -> bool:
    """True when manifest.json exists, was made by this builder with the same cap
    from the same origins (package versions, Python version), and every
    docs.jsonl still has the recorded sha256."""
    out_dir = Path(out_dir)
    man = read_manifest(out_dir)
    if not man or man.get("format") != FORMAT_VERSION or man.get("builder") != _builder_hash():
        return False
    if man.get("max_bytes_per_source") != max_bytes_per_source:
        return False
    srcs = man.get("sources", {})
    if sorted(srcs) != sorted(SOURCES):
        return False
    origins = _origins()
    for name, entry in srcs.items():
        path = out_dir / name / DOCS_FILE
        if entry.get("origin") != origins[name] or not path.is_file() or sha256_file(path) != entry.get("sha256"):
            return False
    return True


def build_source(name: str, out_dir: Path, max_bytes: int, cache_dir: Path) -> dict:
    """Build one source into out_dir/<name>/docs.jsonl; its manifest entry."""
    items_fn, origin_fn = BUILDERS[name]
    docs = select_documents(name, items_fn({"cache_dir": cache_dir}), max_bytes)
    if not docs:
        # An empty JSONL makes `datasets` fail with an opaque StopIteration later.
        raise RuntimeError(f"source {name!r} has no documents (max_bytes_per_source={max_bytes})")
    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    _atomic_write(out_dir / name / DOCS_FILE, data)
    return {"docs": len(docs), "bytes": sum(len(d.encode("utf-8")) for d in docs),
            "sha256": hashlib.sha256(data).hexdigest(), "file": f"{name}/{DOCS_FILE}", "origin": origin_fn()}


def build_corpus(out_dir: Path, max_bytes_per_source: int = DEFAULT_MAX_BYTES,
                 cache_dir: Path | None = None, force: bool = False, verbose: bool = True) -> dict:
    """Build every source of SOURCES under out_dir and write manifest.json last;
    returns the manifest. Does nothing (returns the existing manifest) when
    `is_up_to_date` and not `force`. cache_dir holds the downloaded sdist
    (default: out_dir/../cache/downloads, outside out_dir so it is not mistaken
    for a source)."""
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else out_dir.parent / "cache" / "downloads"
    say = print if verbose else (lambda *a, **k: None)
    if not force and is_up_to_date(out_dir, max_bytes_per_source):
        man = read_manifest(out_dir)
        # Refresh the mtime so make, which compares it with fastmix/data/embedded/*.py, stops asking.
        os.utime(out_dir / MANIFEST)
        say(f"{out_dir}: up to date ({man['total']['docs']} documents, {man['total']['bytes'] / 1e6:.2f} MB)")
        return man
    old = read_manifest(out_dir) or {}
    # The marker goes first, so an interrupted build never looks complete.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    t0 = time.perf_counter()
    entries = {}
    for name in SOURCES:
        t = time.perf_counter()
        entries[name] = e = build_source(name, out_dir, max_bytes_per_source, cache_dir)
        say(f"  {name:<10} {e['docs']:>6} docs  {e['bytes'] / 1e6:6.2f} MB  ({time.perf_counter() - t:.1f} s)")
    # A source dropped from SOURCES would otherwise still be read by data loaders.
    for name in sorted(set(old.get("sources", {})) - set(SOURCES)):
        (out_dir / name / DOCS_FILE).unlink(missing_ok=True)
        try:
            (out_dir / name).rmdir()
        except OSError:
            pass
    manifest = {
        "format": FORMAT_VERSION,
        "builder": _builder_hash(),
        "max_bytes_per_source": max_bytes_per_source,
        "sources": entries,
        "total": {"docs": sum(e["docs"] for e in entries.values()),
                  "bytes": sum(e["bytes"] for e in entries.values())},
    }
    _atomic_write(out_dir / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    say(f"  {'total':<10} {manifest['total']['docs']:>6} docs  {manifest['total']['bytes'] / 1e6:6.2f} MB  "
        f"({time.perf_counter() - t0:.1f} s) -> {out_dir}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmix.data.embedded", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/embedded"), help="output folder (default data/embedded)")
    ap.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                    help=f"cap per source in bytes of cleaned text (default {DEFAULT_MAX_BYTES})")
    ap.add_argument("--cache", type=Path, default=None, help="download cache (default OUT/../cache/downloads)")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = ap.parse_args(argv)
    try:
        build_corpus(args.out, args.max_bytes, args.cache, args.force)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
