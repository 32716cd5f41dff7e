"""The data pipeline on a small real-text corpus: discovery, splits, cache, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import compose, cut_corpus
from omegaconf import OmegaConf

from fastmix.data import corpus as token_cache
from fastmix.data import sources
from fastmix.errors import UserError


def data_cfg(root, cache, **over):
    cfg = compose(["experiment=smoke", "data=folder", f"data.root={root}", f"data.cache_dir={cache}"]).data
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def test_corpus_tokens_splits_and_cache(tiny_corpus, tmp_path, monkeypatch):
    cfg = data_cfg(tiny_corpus, tmp_path)
    corpus = token_cache.prepare_corpus(cfg)
    assert corpus.sources == sorted(p.name for p in tiny_corpus.iterdir())
    tok = corpus.tokenizer
    assert tok.bos_token_id is not None and tok.eos_token_id is not None
    for s in corpus.sources:
        for split in sources.SPLITS:
            arr = corpus.tokens[s][split]
            assert len(arr) > 0 and arr.max() < corpus.vocab_size
            assert arr[-1] == tok.eos_token_id  # documents end with EOS
            assert len(corpus.doc_starts[s][split]) == corpus.meta["sources"][s][split]["documents"]
    # Splits are disjoint by document: decode each split's documents and compare.
    s = corpus.sources[0]

    def docs(split):
        arr, starts = corpus.tokens[s][split], corpus.doc_starts[s][split]
        ends = list(starts[1:]) + [len(arr)]
        return {tok.decode(arr[a:b - 1]) for a, b in zip(starts, ends)}
    train, val, test = docs("train"), docs("val"), docs("test")
    assert not (train & val) and not (train & test) and not (val & test)

    # A second prepare reads the cache: training a tokenizer again would be a bug.
    monkeypatch.setattr(token_cache, "train_bpe", lambda *a, **k: pytest.fail("cache not reused"))
    again = token_cache.prepare_corpus(cfg)
    assert again.root == corpus.root
    assert np.array_equal(again.tokens[s]["train"], corpus.tokens[s]["train"])


def test_cache_key_changes_with_content(tiny_corpus, tmp_path):
    import shutil
    root = tmp_path / "c"
    shutil.copytree(tiny_corpus, root)
    a = token_cache.prepare_corpus(data_cfg(root, tmp_path / "cache"))
    with open(root / a.sources[0] / "docs.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "one more document, new content"}) + "\n")
    b = token_cache.prepare_corpus(data_cfg(root, tmp_path / "cache"))
    assert a.root != b.root


def test_split_is_by_hash_not_order():
    docs = [f"document number {i}" for i in range(100)]
    a = sources.split_documents(docs, 0.1, 0.1, "x")
    b = sources.split_documents(list(reversed(docs)), 0.1, 0.1, "x")
    assert a == b
    assert len(a["val"]) == 10 and len(a["test"]) == 10 and len(a["train"]) == 80


def test_reads_txt_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first document")
    (tmp_path / "a" / "two.jsonl").write_text('{"text": "second"}\n\n{"text": "third"}\n')
    pq.write_table(pa.table({"text": ["fourth", ""]}), tmp_path / "a" / "three.parquet")
    spec = sources.SourceSpec("a", sources.files_under(tmp_path / "a"))
    assert sorted(sources.iter_documents(spec)) == ["first document", "fourth", "second", "third"]


@pytest.mark.parametrize("case,match", [
    ("missing_root", "is not a directory"),
    ("unknown_source", "unknown source"),
    ("empty_source", "empty"),
    ("no_files", "has no"),
    ("few_docs", "at least 3"),
    ("bad_jsonl", "expected a JSON object"),
    ("one_source", "at least 2 sources"),
])
def test_bad_data_is_named(case, match, tiny_corpus, tmp_path):
    import shutil
    root = tmp_path / "c"
    shutil.copytree(tiny_corpus, root)
    over = {}
    if case == "missing_root":
        root = tmp_path / "nope"
    elif case == "unknown_source":
        over["sources"] = ["code", "klingon"]
    elif case == "empty_source":
        (root / "blank").mkdir()
        (root / "blank" / "a.txt").write_text("   \n")
    elif case == "no_files":
        (root / "nothing").mkdir()
    elif case == "few_docs":
        (root / "small").mkdir()
        (root / "small" / "a.txt").write_text("only one document")
    elif case == "bad_jsonl":
        (root / "broken").mkdir()
        (root / "broken" / "a.jsonl").write_text('{"txt": "wrong field"}\n')
    elif case == "one_source":
        over["sources"] = ["code"]
    with pytest.raises(UserError, match=match) as e:
        token_cache.prepare_corpus(data_cfg(root, tmp_path / "cache", **over))
    if case in ("empty_source", "no_files", "few_docs", "bad_jsonl"):
        assert ("blank" if case == "empty_source" else "") in str(e.value)


def test_hf_source_fails_offline_with_a_clear_message(tmp_path):
    cfg = compose(["data=hf", f"data.cache_dir={tmp_path}"]).data
    OmegaConf.update(cfg, "datasets", {"a": {"path": "no-such/dataset-xyz", "split": "train"},
                                       "b": {"path": "no-such/dataset-abc", "split": "train"}},
                     merge=False)
    with pytest.raises(UserError, match="cannot load Hugging Face dataset"):
        token_cache.prepare_corpus(cfg)


# ------------------------------------------------ damaged or shared caches ---
def two_sources(tmp_path):
    return cut_corpus(tmp_path / "c", sources=["code", "drama"], docs=12, max_bytes=12_000)


def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    cfg = data_cfg(two_sources(tmp_path), tmp_path / "cache")
    first = token_cache.prepare_corpus(cfg)
    good = np.array(first.tokens["code"]["train"])
    rec = first.meta["files"]
    assert {"code.train.bin", "code.train.docs.npy", "tokenizer/tokenizer.json"} <= set(rec)
    assert rec["code.train.bin"]["bytes"] == good.nbytes and len(rec["code.train.bin"]["sha256"]) == 64
    shard, sources = first.root / "code.train.bin", first.meta["sources"]
    del first  # its memmaps

    with open(shard, "r+b") as fh:  # truncated: every later job used to die in np.memmap
        fh.truncate(good.nbytes // 2)
    with caplog.at_level("WARNING", logger="fastmix.data"):
        again = token_cache.prepare_corpus(cfg)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "damaged" in warning and "code.train.bin has" in warning and "rebuilding" in warning
    assert np.array_equal(again.tokens["code"]["train"], good) and again.meta["sources"] == sources
    assert token_cache.cache_problems(again.root) == (again.meta, [])
    assert not list((tmp_path / "cache").glob(".damaged-*"))

    # A same-size change passes the size check; data.verify_cache=true compares checksums.
    val = again.root / "drama.val.bin"
    raw = bytearray(val.read_bytes())
    raw[0] ^= 0xFF
    val.write_bytes(bytes(raw))
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastmix.data"):
        token_cache.prepare_corpus(cfg)
        assert not caplog.records  # sizes only, by default
        fixed = token_cache.prepare_corpus(data_cfg(tmp_path / "c", tmp_path / "cache", verify_cache=True))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "drama.val.bin does not match its checksum" in warning
    assert token_cache.cache_problems(fixed.root, verify=True)[1] == []
    # open_corpus (CLIMB's clusters, tests) checks the same way, and says so in one line
    (fixed.root / "code.val.docs.npy").unlink()
    with pytest.raises(token_cache.DamagedCache, match="code.val.docs.npy is missing"):
        token_cache.open_corpus(fixed.root)


def _build_in_child(cfg, out):
    corpus = token_cache.prepare_corpus(cfg)
    out.write_text(str(corpus.root))


def test_concurrent_builds_of_one_cache_build_it_once(tmp_path, monkeypatch):
    import multiprocessing
    import time
    cfg = data_cfg(two_sources(tmp_path), tmp_path / "cache")
    trainings = tmp_path / "trainings"
    real = sources.train_bpe

    def slow_counted_train(*a, **k):  # long enough that the second process arrives mid-build
        with open(trainings, "a") as fh:
            fh.write("x")
        time.sleep(1.0)
        return real(*a, **k)
    monkeypatch.setattr(token_cache, "train_bpe", slow_counted_train)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # tokenizers warns in forked children
    ctx = multiprocessing.get_context("fork")  # the children inherit the counting stand-in
    procs = [ctx.Process(target=_build_in_child, args=(cfg, tmp_path / f"root{i}")) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert trainings.read_text() == "x"  # one tokenizer trained: the other process waited
    roots = {(tmp_path / f"root{i}").read_text() for i in range(2)}
    assert len(roots) == 1 and (tmp_path / "cache" / f"{Path(roots.pop()).name}.lock").exists()


# ---------------------------------------------------- binary or bad input ---
def test_not_text_threshold(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"caf\xe9 " + b"a" * 200)  # one Latin-1 byte in 205: kept
    assert sources.not_text(f) is None
    f.write_bytes(b"caf\xe9 " * 20)  # 20%: another encoding
    assert "20 of its 100 bytes are not UTF-8" in sources.not_text(f)
    f.write_bytes(b"text\x00more")
    assert "NUL" in sources.not_text(f)
    # a multibyte character across the 1 MiB read boundary is one valid character
    f.write_bytes(b"a" * ((1 << 20) - 1) + "é".encode() + b"b" * 10)
    assert sources.not_text(f) is None


def test_binary_files_are_skipped_named_and_counted(tmp_path, caplog):
    root = two_sources(tmp_path)
    rng = np.random.default_rng(0)
    noise = root / "code" / "noise.txt"
    noise.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    blob = root / "drama" / "blob.jsonl"  # was a UnicodeDecodeError traceback
    blob.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    cfg = data_cfg(root, tmp_path / "cache")
    with caplog.at_level("WARNING", logger="fastmix.data"):
        corpus = token_cache.prepare_corpus(cfg)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and any(str(noise) in w for w in warnings) and any(str(blob) in w for w in warnings)
    assert {s: list(v) for s, v in corpus.meta["skipped_files"].items()} == {"code": [str(noise)],
                                                                             "drama": [str(blob)]}
    assert "\ufffd" not in "".join(corpus.documents("code", "train"))

    # error mode: one message naming the file and the key; also when a skip run built the cache
    for cache in (tmp_path / "fresh", tmp_path / "cache"):
        with pytest.raises(UserError, match="data.on_bad_file=skip") as e:
            token_cache.prepare_corpus(data_cfg(root, cache, on_bad_file="error"))
        assert str(noise) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "fresh").exists() or not [p for p in (tmp_path / "fresh").iterdir()
                                                      if not p.name.endswith(".lock")]

    # a source left with nothing but a binary file is still "empty", in one line
    (root / "blank").mkdir()
    (root / "blank" / "x.txt").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(UserError, match=r"source 'blank' is empty.*1 of them skipped: not text"):
        token_cache.prepare_corpus(data_cfg(root, tmp_path / "cache"))
