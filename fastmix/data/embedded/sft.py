"""Build the embedded post-training corpus: prompt/answer sources for SFT-style
mixture search (FastMix's post-training setting, at CPU scale).

    python -m fastmix.data.embedded.sft --embedded data/embedded --out data/embedded_sft

Every source is `<out>/<source>/pairs.jsonl` of {"prompt": ..., "answer": ...}
rows, derived deterministically from the embedded corpus (which must be built
first) or from the seeded math generator; `manifest.json` is written last.

  math_qa      generated arithmetic/algebra problems (fastmix.data.embedded.mathgen, seed 1234):
               "Question: ...\\nAnswer:" -> " 42". The target skill of the demo.
  factbook_qa  one-line "Field: value" facts of the reference source:
               "Question: What is the <field> of <country>?\\nAnswer:" -> " <value>".
  code         stdlib functions with a docstring: signature + docstring -> body.
  dialogue     consecutive chatterbot turns: "A: ...\\nB:" -> " reply".

Prompt tokens are masked out of the loss when these sources are trained on
(fastmix.data tokenizes a pair's prompt and answer separately).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
from pathlib import Path

from fastmix.data.embedded import mathgen
from fastmix.records import write_json, write_text_atomic

MATH_SEED = 1234
MAX_PAIRS = 4000  # per source: enough for CPU-scale post-training, quick to tokenize
FACT_RE = re.compile(r"^([A-Z][A-Za-z ,()'-]{2,40}): (\S.{0,60})$")


def _docs(embedded: Path, source: str) -> list[str]:
    path = embedded / source / "docs.jsonl"
    if not path.exists():
        raise SystemExit(f"error: {path} is missing: build the embedded corpus first (make corpus).")
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def math_pairs(n: int = MAX_PAIRS) -> list[dict]:
    return [{"prompt": mathgen.format_qa(p, with_answer=False), "answer": " " + p["answer"]}
            for p in mathgen.generate_problems(n, MATH_SEED)]


def factbook_pairs(docs: list[str]) -> list[dict]:
    out = []
    for doc in docs:
        country = doc.split(":", 1)[0].strip()
        for line in doc.splitlines()[1:]:
            m = FACT_RE.match(line.strip())
            if m and m.group(1) != "note":
                field, value = m.group(1).lower(), m.group(2).strip()
                out.append({"prompt": f"Question: What is the {field} of {country}?\nAnswer:",
                            "answer": " " + value})
    return out


def code_pairs(docs: list[str]) -> list[dict]:
    out = []
    for doc in docs:
        try:
            tree = ast.parse(doc)
        except SyntaxError:  # a chunk cut out of a larger file
            continue
        lines = doc.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) and len(node.body) > 1:
                doc_end = node.body[0].end_lineno  # the docstring statement
                prompt = "".join(lines[node.lineno - 1:doc_end])
                answer = "".join(lines[doc_end:node.end_lineno])
                if answer.strip() and len(prompt) + len(answer) < 2000:
                    out.append({"prompt": prompt, "answer": answer})
    return out


def dialogue_pairs(docs: list[str]) -> list[dict]:
    out = []
    for doc in docs:
        turns = re.findall(r"^([AB]): (.*)$", doc, re.MULTILINE)
        for (sa, a), (sb, b) in zip(turns, turns[1:]):
            if sa == "A" and sb == "B":
                out.append({"prompt": f"A: {a}\nB:", "answer": f" {b}"})
    return out


def _thin(pairs: list[dict], n: int) -> list[dict]:
    """At most n pairs, deduplicated, chosen by a hash (an even sample, same every build)."""
    unique = {json.dumps(p, sort_keys=True): p for p in pairs}
    keys = sorted(unique, key=lambda k: hashlib.sha1(k.encode()).hexdigest())[:n]
    return [unique[k] for k in sorted(keys)]


def build_sft_corpus(embedded: Path, out: Path, max_pairs: int = MAX_PAIRS) -> dict:
    sources = {
        "math_qa": math_pairs(max_pairs),
        "factbook_qa": factbook_pairs(_docs(embedded, "reference")),
        "code": code_pairs(_docs(embedded, "code")),
        "dialogue": dialogue_pairs(_docs(embedded, "dialogue")),
    }
    manifest = {"sources": {}, "origin": "derived from data/embedded (see fastmix/data/embedded/sft.py)"}
    for name, pairs in sources.items():
        pairs = _thin(pairs, max_pairs)
        body = "".join(json.dumps(p) + "\n" for p in pairs)
        write_text_atomic(out / name / "pairs.jsonl", body)
        manifest["sources"][name] = {"pairs": len(pairs), "bytes": len(body.encode()),
                                     "sha256": hashlib.sha256(body.encode()).hexdigest()}
    write_json(out / "manifest.json", manifest)
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embedded", type=Path, default=Path("data/embedded"))
    ap.add_argument("--out", type=Path, default=Path("data/embedded_sft"))
    ap.add_argument("--max-pairs", type=int, default=MAX_PAIRS)
    args = ap.parse_args(argv)
    manifest = build_sft_corpus(args.embedded, args.out, args.max_pairs)
    for name, info in manifest["sources"].items():
        print(f"{name:12s} {info['pairs']:6d} pairs {info['bytes'] / 1e6:6.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
