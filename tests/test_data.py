"""The data pipeline on a small real-text corpus: discovery, splits, cache, bad input."""
import json

import numpy as np
import pytest
from conftest import compose
from omegaconf import OmegaConf

from fastmix import data
from fastmix.errors import UserError


def data_cfg(root, cache, **over):
    cfg = compose(["experiment=smoke", "data=folder", f"data.root={root}", f"data.cache_dir={cache}"]).data
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def test_corpus_tokens_splits_and_cache(tiny_corpus, tmp_path, monkeypatch):
    cfg = data_cfg(tiny_corpus, tmp_path)
    corpus = data.prepare_corpus(cfg)
    assert corpus.sources == sorted(p.name for p in tiny_corpus.iterdir())
    tok = corpus.tokenizer
    assert tok.bos_token_id is not None and tok.eos_token_id is not None
    for s in corpus.sources:
        for split in data.SPLITS:
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
    monkeypatch.setattr(data, "train_bpe", lambda *a, **k: pytest.fail("cache not reused"))
    again = data.prepare_corpus(cfg)
    assert again.root == corpus.root
    assert np.array_equal(again.tokens[s]["train"], corpus.tokens[s]["train"])


def test_cache_key_changes_with_content(tiny_corpus, tmp_path):
    import shutil
    root = tmp_path / "c"
    shutil.copytree(tiny_corpus, root)
    a = data.prepare_corpus(data_cfg(root, tmp_path / "cache"))
    with open(root / a.sources[0] / "docs.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "one more document, new content"}) + "\n")
    b = data.prepare_corpus(data_cfg(root, tmp_path / "cache"))
    assert a.root != b.root


def test_split_is_by_hash_not_order():
    docs = [f"document number {i}" for i in range(100)]
    a = data.split_documents(docs, 0.1, 0.1, "x")
    b = data.split_documents(list(reversed(docs)), 0.1, 0.1, "x")
    assert a == b
    assert len(a["val"]) == 10 and len(a["test"]) == 10 and len(a["train"]) == 80


def test_reads_txt_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first document")
    (tmp_path / "a" / "two.jsonl").write_text('{"text": "second"}\n\n{"text": "third"}\n')
    pq.write_table(pa.table({"text": ["fourth", ""]}), tmp_path / "a" / "three.parquet")
    spec = data.SourceSpec("a", data._files_under(tmp_path / "a"))
    assert sorted(data.iter_documents(spec)) == ["first document", "fourth", "second", "third"]


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
        data.prepare_corpus(data_cfg(root, tmp_path / "cache", **over))
    if case in ("empty_source", "no_files", "few_docs", "bad_jsonl"):
        assert ("blank" if case == "empty_source" else "") in str(e.value)


def test_hf_source_fails_offline_with_a_clear_message(tmp_path):
    cfg = compose(["data=hf", f"data.cache_dir={tmp_path}"]).data
    OmegaConf.update(cfg, "datasets", {"a": {"path": "no-such/dataset-xyz", "split": "train"},
                                       "b": {"path": "no-such/dataset-abc", "split": "train"}},
                     merge=False)
    with pytest.raises(UserError, match="cannot load Hugging Face dataset"):
        data.prepare_corpus(cfg)
