"""No search reads the test split (issue 22, item 5): the pipeline seals it while a
method searches, so a read raises. Every other test that runs a search runs it
under the same seal, so every method's own tests check the rule too; these check
the seal itself, in each way a search could reach test documents."""
import json

import pytest
import torch
from conftest import compose

from fastmix.data.corpus import SealedSplitRead, prepare_corpus
from fastmix.eval.tasks import build_local_suite
from fastmix.run.pipeline import run_search
from fastmix.search.objective import ValidationObjective
from fastmix.search.optimizer import SearchResult
from fastmix.search.proxies import ProxyJob
from fastmix.train.cost import CostMeter


@pytest.fixture(scope="module")
def setup(tiny_corpus, cache_dir):
    cfg = compose(["experiment=smoke", "eval=loss", "data=folder", f"data.root={tiny_corpus}",
                   f"data.cache_dir={cache_dir}", "progress=false"])
    corpus = prepare_corpus(cfg.data)
    return cfg, corpus, ValidationObjective(corpus, max_tokens_per_source=256)


class Reader:
    """A method whose search does `read(ctx)` and returns uniform."""
    name = "reader"

    def __init__(self, read):
        self.read = read

    def search(self, ctx):
        self.read(ctx)
        return SearchResult({s: 1 / len(ctx.sources) for s in ctx.sources})


def _search(setup, read, tmp_path, reads_test_split=False):
    cfg, corpus, objective = setup
    opt = Reader(read)
    opt.reads_test_split = reads_test_split
    return run_search(cfg, opt, corpus, objective, CostMeter(torch.device("cpu")), torch.device("cpu"), tmp_path)


READS = {
    "a test shard": lambda ctx: ctx.corpus.tokens[ctx.sources[0]]["test"],
    "test documents": lambda ctx: ctx.corpus.documents(ctx.sources[0], "test"),
    "a test loss mask": lambda ctx: ctx.corpus.mask(ctx.sources[0], "test"),
    "the held-out objective": lambda ctx: ctx.objective.held_out().rows(16),
    "the test-split task suite": lambda ctx: build_local_suite(ctx.corpus, ctx.out_dir / "suite", 2),
    "proxies scored on test": lambda ctx: ctx.proxies.run([ProxyJob({s: 1.0 for s in ctx.sources}, "t",
                                                                    score="test")]),
}


@pytest.mark.parametrize("what", READS)
def test_a_search_that_reads_the_test_split_fails(setup, tmp_path, what):
    with pytest.raises(SealedSplitRead, match="optimizer=reader read .* during its search"):
        _search(setup, READS[what], tmp_path)
    assert not (tmp_path / "proxies").exists() or not any((tmp_path / "proxies").rglob("record.json"))


def test_train_and_val_are_open_and_the_seal_lifts(setup, tmp_path):
    cfg, corpus, objective = setup
    s = corpus.sources[0]
    _search(setup, lambda ctx: (ctx.corpus.tokens[s]["train"], ctx.corpus.documents(s, "val"),
                                ctx.objective.rows(16)), tmp_path)
    assert len(corpus.tokens[s]["test"]) > 0 and objective.held_out().rows(16)  # the target's turn
    # the exempt (the oracle): not sealed
    _search(setup, READS["a test shard"], tmp_path / "oracle", reads_test_split=True)


def test_search_suite_is_built_from_val(setup, tmp_path):
    """DeMix's score=suite builds the same tasks from the validation documents, in a
    folder of their own: no item of it comes from a test document."""
    _, corpus, _ = setup
    val = build_local_suite(corpus, tmp_path, 4, split="val")
    test = build_local_suite(corpus, tmp_path, 4, split="test")
    # the same generators (which tasks apply depends on the split's text)
    assert set(val) & set(test) and len(list(tmp_path.iterdir())) == 2
    task = next(t for t in val if t.startswith("cont_") and t in test)
    read = lambda m: open(m[task]["yaml"].replace(".yaml", ".jsonl")).read()
    assert read(val) != read(test)
    test_text = "".join(corpus.documents(val[task]["source"], "test"))
    contexts = [json.loads(line)["context"] for line in read(val).splitlines()]
    assert contexts and not any(c.strip()[:80] in test_text for c in contexts)
