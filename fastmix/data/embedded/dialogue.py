"""`dialogue`: chatterbot-corpus's English conversations."""
from __future__ import annotations

from pathlib import Path

from fastmix.data.embedded.common import Item, clean_text, dist_version, package_dir

DIALOGUE_DOC_CHARS = 1000


def _dialogue_docs(path: Path) -> list[str]:
    import yaml  # PyYAML is pinned; imported here so the other sources do not need it

    # libyaml's loader when PyYAML has it (10x faster); both give the same data.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data = yaml.load(path.read_bytes().decode("utf-8", "replace"), Loader=loader) or {}
    convs = []
    for conv in data.get("conversations") or []:
        turns = [clean_text(str(t)) for t in conv if t is not None]
        turns = [t for t in turns if t]
        if turns:
            convs.append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns)))
    # Most conversations are one exchange (~100 bytes): group neighbours into ~1 KB documents.
    docs, cur = [], ""
    for c in convs:
        cur = f"{cur}\n\n{c}" if cur else c
        if len(cur) >= DIALOGUE_DOC_CHARS:
            docs.append(cur)
            cur = ""
    if cur:
        docs.append(cur)
    return docs


def dialogue_items(ctx: dict) -> list[Item]:
    pkg = package_dir("chatterbot_corpus")
    if pkg is None:
        raise RuntimeError("package chatterbot-corpus is not installed (needed for the dialogue source)")
    return [Item(p.name, lambda p=p: _dialogue_docs(p)) for p in sorted((pkg / "data" / "english").glob("*.yml"))]


def dialogue_origin() -> str:
    return f"PyPI chatterbot-corpus=={dist_version('chatterbot-corpus')} (english only)"
