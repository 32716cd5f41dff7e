"""Objectives read the val split for a search and the test split to score a
target (`held_out()`), never the same rows."""
import json

import pytest
import torch
from conftest import compose

from fastmix.data import prepare_corpus
from fastmix.errors import UserError
from fastmix.objective import QAObjective, TextFileObjective, ValidationObjective


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


def test_text_file_windows_alternate(corpus, tmp_path):
    text = " ".join(f"word{i} is followed by word{i + 1}." for i in range(400))
    (tmp_path / "t.txt").write_text(text)
    obj = TextFileObjective(corpus, str(tmp_path / "t.txt"), max_tokens_per_source=10_000)
    val, test = obj.rows(16)["text"][0], obj.held_out().rows(16)["text"][0]
    assert abs(len(val) - len(test)) <= 1 and len(test) > 4
    # windows 0, 2, 4, ... search; 1, 3, 5, ... score: their target tokens are disjoint
    assert int(val[1][0]) == int(obj.tokens[32]) and int(test[0][0]) == int(obj.tokens[16])


def test_qa_file_pairs_alternate(corpus, tmp_path):
    rows = [{"prompt": f"Q{i}: what follows {i}?", "answer": f" {i + 1}"} for i in range(5)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    obj = QAObjective(corpus, path=str(path))
    assert [p.answer for p in obj.pairs] == [" 1", " 3", " 5"]
    assert [p.answer for p in obj.held_out().pairs] == [" 2", " 4"]
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
