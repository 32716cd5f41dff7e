"""CLIMB's clustering stage (baselines/clustering.py): clusters become sources,
splits never move, tokens stay the original tokenizer's, the cache is reused.

Structural checks use a fake embedder (fast); one test embeds a few dozen short
documents with the real offline model and checks that code and drama land in
different clusters."""
import hashlib
import json

import numpy as np
import pytest
from conftest import compose, cut_corpus

from baselines import clustering, embedding
from fastmix.data import corpus as token_cache
from fastmix.data import sources
from fastmix.errors import UserError


def data_cfg(root, cache):
    return compose(["experiment=smoke", "data=folder", f"data.root={root}", f"data.cache_dir={cache}"]).data


def fake_embed(texts, **kw):
    """Deterministic pseudo-embeddings: a random unit vector per text."""
    vecs = []
    for t in texts:
        rng = np.random.default_rng(int(hashlib.sha1(t.encode()).hexdigest()[:8], 16))
        v = rng.standard_normal(16)
        vecs.append(v / np.linalg.norm(v))
    return np.array(vecs, dtype=np.float32), np.array([len(t.split()) for t in texts])


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(embedding, "embed_texts", fake_embed)
    monkeypatch.setattr(embedding, "encoder_params", lambda *a, **k: 1000)


def token_docs(corpus, sources, split):
    """The documents of `split` over `sources`, as sorted token tuples (EOS included)."""
    out = []
    for s in sources:
        arr, starts = corpus.tokens[s][split], corpus.doc_starts[s][split]
        ends = list(starts[1:]) + [len(arr)]
        out += [tuple(np.asarray(arr[a:b]).tolist()) for a, b in zip(starts, ends)]
    return sorted(out)


def test_clusters_partition_each_split_and_keep_the_tokenizer(tiny_corpus, tmp_path, fake):
    cfg = data_cfg(tiny_corpus, tmp_path)
    corpus = token_cache.prepare_corpus(cfg)
    cc = clustering.cluster_corpus(corpus, cfg, n_clusters=3, kmeans_k=20, seed=0, prune_min_docs=2)
    assert cc.sources == ["cluster_00", "cluster_01", "cluster_02"]
    assert cc.tokenizer is corpus.tokenizer and cc.vocab_size == corpus.vocab_size
    # Every document of every split is in exactly one cluster, in the split it had: no leakage.
    for split in sources.SPLITS:
        assert token_docs(cc, cc.sources, split) == token_docs(corpus, corpus.sources, split)
    for s in cc.sources:
        assert cc.meta["sources"][s]["train"]["tokens"] > 0
        assert len(cc.doc_starts[s]["train"]) == cc.meta["sources"][s]["train"]["documents"]
    # The summary is returned and on disk.
    summary = cc.meta["clustering"]
    assert summary == json.loads((cc.root / "clusters.json").read_text())
    info = summary["clusters"]["cluster_00"]
    assert set(info) >= {"documents", "tokens", "source_share", "central"}
    assert abs(sum(info["source_share"].values()) - 1) < 1e-3 and 1 <= len(info["central"]) <= 5
    assert all(len(c["text"]) <= 80 for c in info["central"])
    assert sum(c["documents"]["train"] for c in summary["clusters"].values()) == sum(
        corpus.meta["sources"][s]["train"]["documents"] for s in corpus.sources)
    # cluster_00 is the largest
    toks = [cc.meta["sources"][s]["train"]["tokens"] for s in cc.sources]
    assert toks == sorted(toks, reverse=True)


def test_cache_reused_and_embeddings_shared(tiny_corpus, tmp_path, fake, monkeypatch):
    cfg = data_cfg(tiny_corpus, tmp_path)
    corpus = token_cache.prepare_corpus(cfg)
    a = clustering.cluster_corpus(corpus, cfg, n_clusters=2, kmeans_k=10, seed=0)
    mtime = (a.root / "meta.json").stat().st_mtime_ns
    monkeypatch.setattr(embedding, "embed_texts", lambda *x, **k: pytest.fail("embeddings not reused"))
    b = clustering.cluster_corpus(corpus, cfg, n_clusters=2, kmeans_k=10, seed=0)
    assert b.root == a.root and (b.root / "meta.json").stat().st_mtime_ns == mtime
    assert np.array_equal(b.tokens["cluster_00"]["train"], a.tokens["cluster_00"]["train"])
    # Other clustering parameters: a new clustered corpus, but no document embedded again.
    c = clustering.cluster_corpus(corpus, cfg, n_clusters=3, kmeans_k=10, seed=0)
    assert c.root != a.root and len(c.sources) == 3
    assert c.meta["clustering"]["embedding"]["newly_embedded"] == 0


def test_damaged_clustered_corpus_is_rebuilt(tmp_path, fake, caplog):
    cfg = data_cfg(cut_corpus(tmp_path / "c", sources=["code", "drama"], docs=12, max_bytes=12_000),
                   tmp_path / "cache")
    corpus = token_cache.prepare_corpus(cfg)
    kw = dict(n_clusters=2, kmeans_k=6, seed=0, prune_min_docs=1)
    a = clustering.cluster_corpus(corpus, cfg, **kw)
    good = np.array(a.tokens["cluster_01"]["train"])
    with open(a.root / "cluster_01.train.bin", "r+b") as fh:
        fh.truncate(10)
    with caplog.at_level("WARNING", logger="fastmix.data"):
        b = clustering.cluster_corpus(corpus, cfg, **kw)
    assert any("clustered corpus" in r.getMessage() and "cluster_01.train.bin" in r.getMessage()
               for r in caplog.records)
    assert np.array_equal(b.tokens["cluster_01"]["train"], good)


def test_max_docs_per_source_caps_train_only(tiny_corpus, tmp_path, fake):
    cfg = data_cfg(tiny_corpus, tmp_path)
    corpus = token_cache.prepare_corpus(cfg)
    cc = clustering.cluster_corpus(corpus, cfg, n_clusters=2, kmeans_k=8, max_docs_per_source=5, seed=0)
    assert sum(cc.meta["sources"][s]["train"]["documents"] for s in cc.sources) == 5 * len(corpus.sources)
    for split in ("val", "test"):  # held-out text is all kept
        assert token_docs(cc, cc.sources, split) == token_docs(corpus, corpus.sources, split)
    left = cc.meta["clustering"]["left_out_train_documents"]
    assert left == {s: corpus.meta["sources"][s]["train"]["documents"] - 5 for s in corpus.sources}


def test_pairs_keep_their_loss_mask(tmp_path, fake):
    root = tmp_path / "c"
    cut_corpus(root, sources=["drama"], docs=12)
    (root / "qa").mkdir()
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}? ", "answer": f"{2 * i}"} for i in range(12)]
    (root / "qa" / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = data_cfg(root, tmp_path / "cache")
    corpus = token_cache.prepare_corpus(cfg)
    cc = clustering.cluster_corpus(corpus, cfg, n_clusters=2, kmeans_k=6, seed=0, prune_min_docs=1)
    ones = sum(int(np.asarray(cc.mask(s, "train")).sum()) for s in cc.sources)
    expected = int(np.asarray(corpus.mask("qa", "train")).sum()) + len(corpus.tokens["drama"]["train"])
    assert ones == expected  # prompt tokens stay masked out, plain text counts in full


@pytest.mark.parametrize("kw,match", [
    ({"n_clusters": 1}, "n_clusters=1"),
    ({"n_clusters": 4, "kmeans_k": 3}, "kmeans_k=3"),
    ({"n_clusters": 12, "kmeans_k": 500, "prune_min_docs": 4}, "after pruning"),
    ({"n_clusters": 2, "model": "no-such-embedder-pkg"}, "pip install no-such-embedder-pkg"),
    ({"n_clusters": 2, "max_docs_per_source": 0}, "max_docs_per_source"),
    ({"n_clusters": 2, "min_heldout_tokens": 10**9}, "tokens in val or test"),
])
def test_bad_input(tiny_corpus, tmp_path, kw, match, monkeypatch):
    cfg = data_cfg(tiny_corpus, tmp_path)
    corpus = token_cache.prepare_corpus(cfg)
    if "model" not in kw:
        monkeypatch.setattr(embedding, "embed_texts", fake_embed)
        monkeypatch.setattr(embedding, "encoder_params", lambda *a, **k: 1000)
    with pytest.raises(UserError, match=match):
        clustering.cluster_corpus(corpus, cfg, **{"kmeans_k": 10, "seed": 0, **kw})


def test_disabled_returns_the_corpus(tiny_corpus, tmp_path):
    cfg = data_cfg(tiny_corpus, tmp_path)
    corpus = token_cache.prepare_corpus(cfg)
    assert clustering.cluster_corpus(corpus, cfg, enabled=False, n_clusters=1) is corpus


def test_real_embedder_separates_code_from_drama(tmp_path):
    """The offline MiniLM on 2 x 12 short documents: clusters follow the sources."""
    root = cut_corpus(tmp_path / "c", sources=["code", "drama"], docs=12, max_bytes=12_000)
    cfg = data_cfg(root, tmp_path / "cache")
    corpus = token_cache.prepare_corpus(cfg)
    cc = clustering.cluster_corpus(corpus, cfg, n_clusters=2, kmeans_k=6, max_seq_length=64, batch_size=16,
                                   seed=0, prune_min_docs=1)
    shares = [cc.meta["clustering"]["clusters"][s]["source_share"] for s in cc.sources]
    top = [max(sh, key=sh.get) for sh in shares]
    assert sorted(top) == ["code", "drama"], shares
    assert all(sh[t] >= 0.8 for sh, t in zip(shares, top)), shares
