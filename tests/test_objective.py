"""Objectives read the val split for a search and the test split to score a
target (`held_out()`), never the same rows."""
import json

import pytest
import torch
from conftest import compose

from fastmix.data.corpus import prepare_corpus
from fastmix.errors import UserError
from fastmix.search.objective import QAObjective, TextFileObjective, ValidationObjective


@pytest.fixture(scope="module")
def corpus(tiny_corpus, cache_dir):
    return prepare_corpus(compose(["experiment=smoke", "data=folder", f"data.root={tiny_corpus}",
                                   f"data.cache_dir={cache_dir}"]).data)


def test_validation_objective_splits(corpus):
    s = corpus.sources[0]
    obj = ValidationObjective(corpus, weights={s: 1.0}, max_tokens_per_source=256)
    val, test = obj.rows(32)[s][0], obj.held_out().rows(32)[s][0]
    assert torch.equal(val[0], torch.from_numpy(corpus.tokens[s]["val"][:33].astype("int64")))
    assert torch.equal(test[0], torch.from_numpy(corpus.tokens[s]["test"][:33].astype("int64")))
    assert obj.split == "val" and obj.held_out().describe()["split"] == "test"
    with pytest.raises(UserError, match="split 'train'"):
        ValidationObjective(corpus, split="train")


def test_text_file_one_document_splits_by_blocks(corpus, tmp_path):
    text = " ".join(f"word{i} is followed by word{i + 1}." for i in range(400))
    (tmp_path / "t.txt").write_text(text)
    obj = TextFileObjective(corpus, str(tmp_path / "t.txt"), max_tokens_per_source=10_000)
    val, test = obj.rows(16)["text"][0], obj.held_out().rows(16)["text"][0]
    assert abs(len(val) - len(test)) <= 8 and len(test) > 16
    # windows 0-7, 16-23, ... search; 8-15, 24-31, ... score: only blocks' edges touch
    first = lambda i: int(obj.tokens[16 * i])
    assert [int(r[0]) for r in val[:9]] == [first(i) for i in (*range(8), 16)]
    assert [int(r[0]) for r in test[:9]] == [first(i) for i in (*range(8, 16), 24)]
    assert obj.describe()["val_test_split"] == {"by": "blocks of 8 windows", "documents": 1}


def test_text_file_documents_split_by_hash(corpus, tmp_path):
    """Several documents: each lands whole in val or in test, by a hash of its text
    (not by its place in the file), and the halves hold about the same tokens."""
    docs = [f"document {i}: " + " ".join(f"token{i}x{j}" for j in range(30 + 7 * (i % 5))) for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    obj = TextFileObjective(corpus, str(tmp_path / "d.jsonl"), max_tokens_per_source=100_000)
    info = obj.describe()["val_test_split"]
    assert info["by"] == "document" and info["documents"]["val"] + info["documents"]["test"] == 20
    assert abs(info["tokens"]["val"] - info["tokens"]["test"]) < max(info["tokens"].values()) * 0.2
    text = lambda o: corpus.tokenizer.decode(torch.cat([r for r in o.rows(16)["text"][0]]).tolist())
    val, test = text(obj), text(obj.held_out())
    in_val = {i for i in range(20) if f"token{i}x" in val}
    in_test = {i for i in range(20) if f"token{i}x" in test}
    assert in_val and in_test and not in_val & in_test  # no document on both sides
    assert in_val != set(range(0, 20, 2)) and in_val != set(range(1, 20, 2))  # not by position
    # the same split whatever the file's order
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[::-1]) + "\n")
    again = TextFileObjective(corpus, str(tmp_path / "d.jsonl"), max_tokens_per_source=100_000)
    assert again.describe()["val_test_split"] == info


def test_qa_file_pairs_split_by_hash(corpus, tmp_path):
    rows = [{"prompt": f"Q{i}: what follows {i}?", "answer": f" {i + 1}"} for i in range(9)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    obj = QAObjective(corpus, path=str(path))
    val, test = [p.answer for p in obj.pairs], [p.answer for p in obj.held_out().pairs]
    assert len(val) == 5 and len(test) == 4 and sorted(val + test) == sorted(r["answer"] for r in rows)
    assert val != [" 1", " 3", " 5", " 7", " 9"]  # not every other row of the file
    path.write_text("\n".join(json.dumps(r) for r in rows[::-1]) + "\n")
    assert [p.answer for p in QAObjective(corpus, path=str(path)).pairs] == val
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(UserError, match="at least 2"):
        QAObjective(corpus, path=str(path))


@pytest.mark.parametrize("make, message", [
    (lambda c, t: ValidationObjective(c, max_tokens_per_source=0), "objective.max_tokens_per_source=0"),
    (lambda c, t: ValidationObjective(c, batch_size=0), "objective.batch_size=0"),
    (lambda c, t: TextFileObjective(c, str(t), max_tokens_per_source=-5), "objective.max_tokens_per_source=-5"),
    (lambda c, t: QAObjective(c, source=c.sources[0], max_pairs=0), "objective.max_pairs=0"),
])
def test_bad_objective_values(corpus, tmp_path, make, message):
    (tmp_path / "t.txt").write_text("some text " * 50)
    with pytest.raises(UserError, match=message):
        make(corpus, tmp_path / "t.txt")
