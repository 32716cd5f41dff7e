"""Build the oracle suite's external objective texts: text that ships with the
installed packages and is none of the embedded sources.

    python -m fastmix.data.embedded.texts --out data/embedded_texts

  readmes   every installed distribution's long description (its METADATA body:
            the README a package index shows), one document per package.
  licenses  every installed distribution's LICENSE/COPYING files, one document each.

Both are read through importlib.metadata, so the same pinned environment gives the
same bytes; documents go in the order of a hash of the package name, at most
MAX_BYTES each file; `manifest.json` (sizes and sha256) is written last.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import sys
from pathlib import Path

from fastmix.records import write_json, write_text_atomic

MAX_BYTES = 400_000  # per text: enough windows for a test split, quick to tokenize
MIN_CHARS = 200


# this project's own distribution is left out: its README (and so the text's hash and every
# landscape scored on it) would change with every commit
OWN = "fastmix-bench"


def _dists():
    return [d for d in md.distributions() if d.metadata["Name"].lower() != OWN]


def _readmes() -> dict[str, str]:
    return {d.metadata["Name"].lower(): d.metadata.get_payload() or "" for d in _dists()}


def _licenses() -> dict[str, str]:
    out = {}
    for d in _dists():
        for f in d.files or []:
            if any(k in f.name.upper() for k in ("LICENSE", "LICENCE", "COPYING")):
                try:
                    out[f"{d.metadata['Name'].lower()}/{f}"] = f.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
    return out


TEXTS = {"readmes": _readmes, "licenses": _licenses}


def select(docs: dict[str, str], max_bytes: int) -> list[str]:
    """Distinct documents of at least MIN_CHARS, by a hash of their key, up to max_bytes."""
    kept, seen, total = [], set(), 0
    for key in sorted(docs, key=lambda k: hashlib.sha256(k.encode()).hexdigest()):
        text = docs[key].strip()
        digest = hashlib.sha256(text.encode()).hexdigest()
        if len(text) < MIN_CHARS or digest in seen or total + len(text.encode()) > max_bytes:
            continue
        seen.add(digest)
        kept.append(text)
        total += len(text.encode())
    return kept


def build_texts(out: Path, max_bytes: int = MAX_BYTES) -> dict:
    manifest = {"texts": {}}
    for name, read in TEXTS.items():
        docs = select(read(), max_bytes)
        body = "".join(json.dumps({"text": t}) + "\n" for t in docs)
        write_text_atomic(out / f"{name}.jsonl", body)
        manifest["texts"][name] = {"file": f"{name}.jsonl", "docs": len(docs), "bytes": len(body.encode()),
                                   "sha256": hashlib.sha256(body.encode()).hexdigest()}
    write_json(out / "manifest.json", manifest)
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/embedded_texts"))
    ap.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    args = ap.parse_args(argv)
    for name, info in build_texts(args.out, args.max_bytes)["texts"].items():
        print(f"{name:10s} {info['docs']:5d} docs {info['bytes'] / 1e6:6.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
