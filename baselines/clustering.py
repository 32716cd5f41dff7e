"""CLIMB's optional data pre-processing (arXiv 2504.13161, Sec. 3.1): embed every
document, k-means it into many centroids (K_init = 1000 in the paper), prune
small clusters, merge the surviving centroids into a few final clusters
(16-21 in the paper). The final clusters become the *sources* that the search
mixes and the target model trains on.

Choices the paper leaves open (see docs/DECISIONS.md, "CLIMB clustering"):

* Embedding: `baselines.embedding` (all-MiniLM-L6-v2, offline, 256-token window).
* k-means (scikit-learn, seeded) is fitted on the *training* documents only;
  held-out documents are assigned to their nearest kept centroid afterwards,
  so nothing about val/test shapes the clusters.
* Pruning keeps k-means clusters with at least `prune_min_docs` training
  documents (the paper also prunes by quality-classifier scores; we have no
  offline classifiers). The documents of a pruned cluster are by default
  reassigned to the nearest kept centroid rather than dropped
  (`drop_pruned=True` drops them, as the paper does): every other method
  trains on the whole corpus, and dropping data would mix "a better mixture"
  with "filtered data" in the comparison.
* Merging: Ward agglomerative clustering of the kept centroids (unweighted)
  into `n_clusters` groups: the paper merges centroids by distance; Ward
  gives compact groups and needs no distance threshold, so `n_clusters` is
  exact. Embeddings are unit vectors, so Euclidean distance ranks like cosine.
* Splits never move: a document stays in the split the original corpus gave it,
  so held-out text stays held out, and its tokens are copied from the original
  arrays (same tokenizer, same ids; no re-tokenisation).
* `max_docs_per_source` caps the *training* documents of each original source
  that are embedded and kept (the first N in the split's hash order, a
  deterministic random sample); the rest are left out of the clustered corpus
  and counted in the summary, so a cap shrinks the corpus the target trains on
  (null, the default, keeps every document). Held-out documents are always
  all kept.

The clustered corpus is cached under `<data.cache_dir>/clusters/` by a hash of
the original corpus's cache key and the clustering parameters, written by
`fastmix.data.corpus.write_corpus` (the token cache's one writer), atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from baselines.embedding import DEFAULT_MODEL, Embedded, embed_documents, load_encoder
from fastmix.data.corpus import Corpus, built_folder, open_corpus, write_corpus
from fastmix.data.sources import SPLITS
from fastmix.errors import UserError
from fastmix.records import write_json

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 16  # text cut before the embedder's tokenizer: a 100 KB document is not tokenized whole
FORMAT = 3  # bump when the layout or algorithm changes (3: meta.json holds sizes and checksums)


@dataclass
class _Doc:
    source: str
    split: str
    start: int  # token offsets in the original split's array; [start, end) includes the EOS
    end: int
    text: str   # the decoded prefix that is embedded


def _collect(corpus: Corpus, max_docs_per_source: int | None, char_cap: int):
    """Every held-out document and the first `max_docs_per_source` training
    documents of every source; and how many training documents were left out."""
    docs, left_out = [], {}
    for s in corpus.sources:
        for split in SPLITS:
            arr, starts = corpus.tokens[s][split], corpus.doc_starts[s][split]
            ends = list(starts[1:]) + [len(arr)]
            pairs = list(zip((int(a) for a in starts), (int(b) for b in ends)))
            if split == "train" and max_docs_per_source is not None:
                left_out[s] = max(0, len(pairs) - max_docs_per_source)
                pairs = pairs[:max_docs_per_source]
            for a, b in pairs:
                # BPE tokens are >= 1 byte each: char_cap tokens hold about char_cap characters or more
                head = np.asarray(arr[a:min(b - 1, a + char_cap)]).tolist()  # b - 1: without the EOS
                text = corpus.tokenizer.decode(head)[:char_cap]
                docs.append(_Doc(s, split, a, b, text))
        left_out.setdefault(s, 0)
    return docs, left_out


def _check(n_clusters, kmeans_k, max_docs_per_source, prune_min_docs, max_seq_length, batch_size):
    for key, v in (("n_clusters", n_clusters), ("kmeans_k", kmeans_k), ("prune_min_docs", prune_min_docs),
                   ("max_seq_length", max_seq_length), ("batch_size", batch_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise UserError(f"clustering.{key}={v!r} must be an integer.")
    if n_clusters < 2:
        raise UserError(f"clustering.n_clusters={n_clusters}: the clusters are the mixture's sources and a "
                        f"mixture needs at least 2; set clustering.n_clusters >= 2 (the paper uses 16-21).")
    if kmeans_k < n_clusters:
        raise UserError(f"clustering.kmeans_k={kmeans_k} is below clustering.n_clusters={n_clusters}: the "
                        f"k-means centroids are merged into the final clusters, so raise kmeans_k "
                        f"(the paper uses 1000) or lower n_clusters.")
    if max_docs_per_source is not None and (not isinstance(max_docs_per_source, (int, np.integer))
                                            or max_docs_per_source < 1):
        raise UserError(f"clustering.max_docs_per_source={max_docs_per_source!r} must be a positive "
                        f"integer or null (every document).")
    if prune_min_docs < 1 or max_seq_length < 1 or batch_size < 1:
        raise UserError("clustering.prune_min_docs, max_seq_length and batch_size must be >= 1.")


def cluster_corpus(corpus: Corpus, cfg_data=None, *, n_clusters: int = 16, kmeans_k: int = 1000,
                   max_docs_per_source: int | None = None, model: str = DEFAULT_MODEL,
                   max_seq_length: int = 256, batch_size: int = 32, seed: int = 0,
                   prune_min_docs: int = 2, drop_pruned: bool = False, min_heldout_tokens: int = 0,
                   device: str | None = None, cache_dir: str | Path | None = None,
                   enabled: bool = True) -> Corpus:
    """The corpus regrouped into `n_clusters` sources `cluster_00`, ... (see the
    module docstring). Cached: a second call with the same corpus and parameters
    opens the cache and embeds nothing. The summary (clusters.json) is returned
    as `corpus.meta["clustering"]`. `cfg_data` supplies `cache_dir` (the data
    config); `enabled=False` returns `corpus` unchanged, so a YAML block
    `clustering: {enabled: ..., n_clusters: ...}` can be passed as **kwargs."""
    if not enabled:
        return corpus
    _check(n_clusters, kmeans_k, max_docs_per_source, prune_min_docs, max_seq_length, batch_size)
    if cache_dir is None:
        if cfg_data is None or not cfg_data.get("cache_dir"):
            raise UserError("cluster_corpus needs data.cache_dir (pass the data config) or cache_dir=.")
        from fastmix.config import abspath
        cache_dir = abspath(cfg_data.cache_dir)
    cache_dir = Path(cache_dir)
    params = {"n_clusters": int(n_clusters), "kmeans_k": int(kmeans_k),
              "max_docs_per_source": None if max_docs_per_source is None else int(max_docs_per_source),
              "model": str(model), "max_seq_length": int(max_seq_length), "seed": int(seed),
              "prune_min_docs": int(prune_min_docs), "drop_pruned": bool(drop_pruned), "format": FORMAT}
    key = hashlib.sha256(json.dumps({"parent": corpus.root.name, "sources": corpus.meta["sources"], **params},
                                    sort_keys=True).encode()).hexdigest()[:16]
    root = cache_dir / "clusters" / f"{corpus.root.name}-{key}"
    # built once under a lock; a damaged folder is rebuilt, with a warning, like the token cache
    built_folder(root, lambda tmp: _build(corpus, tmp, cache_dir, params, batch_size, device),
                 verify=bool(cfg_data is not None and cfg_data.get("verify_cache", False)),
                 what="clustered corpus")
    out = open_corpus(root, tokenizer=corpus.tokenizer)
    out.meta["clustering"] = json.loads((root / "clusters.json").read_text())
    if min_heldout_tokens:
        short = {c: {sp: out.meta["sources"][c][sp]["tokens"] for sp in ("val", "test")}
                 for c in out.sources
                 if min(out.meta["sources"][c][sp]["tokens"] for sp in ("val", "test")) < min_heldout_tokens}
        if short:
            raise UserError(f"clusters {short} have fewer than clustering.min_heldout_tokens="
                            f"{min_heldout_tokens} tokens in val or test (needed to score them): lower "
                            f"clustering.n_clusters, or hold out more text (data.splits).")
    return out


@dataclass
class _Grouping:
    k: int                      # k-means clusters fitted
    kept: np.ndarray            # which of them survived pruning
    sizes: np.ndarray           # training documents per k-means cluster
    group_of_kept: np.ndarray   # kept k-means cluster -> final group
    group: np.ndarray           # document -> final group (-1: dropped)
    dropped: np.ndarray         # document dropped with its pruned cluster
    seconds: float


def _build(corpus: Corpus, tmp: Path, cache_dir: Path, params: dict, batch_size: int,
           device: str | None) -> dict:
    """Cluster and write the clustered corpus into `tmp`; returns its meta.json entries."""
    t0 = time.perf_counter()
    docs, left_out = _collect(corpus, params["max_docs_per_source"], CHARS_PER_TOKEN * params["max_seq_length"])
    emb = embed_documents([d.text for d in docs], cache_dir, params["model"], params["max_seq_length"],
                          batch_size, device)
    train = np.array([d.split == "train" for d in docs])
    grouping = _group(emb.X, train, params)
    ntoks = np.array([d.end - d.start for d in docs])
    order = _order_by_size(ntoks, train, grouping.group, params["n_clusters"])
    width = max(2, len(str(params["n_clusters"] - 1)))
    names = {g: f"cluster_{i:0{width}d}" for i, g in enumerate(order)}
    members = {g: {sp: [i for i, d in enumerate(docs) if d.split == sp and grouping.group[i] == g]
                   for sp in SPLITS} for g in order}
    meta = write_corpus(tmp, corpus.tokenizer, corpus.meta["dtype"],
                        ((names[g], _cluster_parts(corpus, docs, members[g])) for g in order),
                        parent=corpus.root.name)
    summary = _summary(corpus, docs, params, emb, grouping, left_out)
    summary["clusters"] = {names[g]: _describe(corpus, docs, emb.X, ntoks, np.array(members[g]["train"], int),
                                               meta["sources"][names[g]], int((grouping.group_of_kept == g).sum()))
                           for g in order}
    # which cluster each document went to (-1 dropped; absent = left out by max_docs_per_source)
    np.savez(tmp / "assignments.npz", **{
        f"{s}.{sp}": np.array([order.index(grouping.group[i]) if grouping.group[i] >= 0 else -1
                               for i, d in enumerate(docs) if d.source == s and d.split == sp], dtype=np.int32)
        for s in corpus.sources for sp in SPLITS})
    summary["cost"]["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(tmp / "clusters.json", summary)
    load_encoder.cache_clear()  # the encoder's memory back before training starts
    log.info("clustering: %d documents -> %d k-means clusters (%d kept) -> %d clusters in %.1fs",
             len(docs), grouping.k, len(grouping.kept), params["n_clusters"], summary["cost"]["seconds"])
    return meta


def _group(X: np.ndarray, train: np.ndarray, params: dict) -> _Grouping:
    """k-means on the training documents, prune small clusters, merge the kept
    centroids by Ward; every document goes to the group of its nearest kept
    centroid (with drop_pruned, one whose nearest centroid was pruned is dropped)."""
    from sklearn.cluster import AgglomerativeClustering, KMeans

    t = time.perf_counter()
    n_clusters = params["n_clusters"]
    distinct = len(np.unique(X[train], axis=0))  # duplicate documents embed to one point
    k = min(params["kmeans_k"], distinct)
    if k < n_clusters:
        raise UserError(f"clustering.n_clusters={n_clusters} exceeds the {distinct} distinct training "
                        f"documents embedded: lower n_clusters or raise clustering.max_docs_per_source.")
    # one k-means++ start (sklearn's default): k=1000 on the embedded corpus is ~1.5 min on 2 cores
    km = KMeans(n_clusters=k, random_state=params["seed"], n_init=1).fit(X[train])
    sizes = np.bincount(km.labels_, minlength=k)
    kept = np.flatnonzero(sizes >= params["prune_min_docs"])
    if n_clusters > len(kept):
        raise UserError(f"clustering.n_clusters={n_clusters} exceeds the {len(kept)} k-means clusters left "
                        f"after pruning those under clustering.prune_min_docs={params['prune_min_docs']} "
                        f"training documents (of {k} k-means clusters: clustering.kmeans_k clamped to the "
                        f"document count): lower n_clusters or prune_min_docs, or raise kmeans_k.")
    group_of_kept = (np.arange(len(kept)) if len(kept) == n_clusters else
                     AgglomerativeClustering(n_clusters=n_clusters, linkage="ward")
                     .fit_predict(km.cluster_centers_[kept]))
    C = km.cluster_centers_
    d2 = (X ** 2).sum(1)[:, None] - 2 * X @ C.T + (C ** 2).sum(1)[None, :]  # squared distances, [docs, k]
    group = group_of_kept[d2[:, kept].argmin(1)]
    dropped = ~np.isin(d2.argmin(1), kept) if params["drop_pruned"] else np.zeros(len(X), bool)
    return _Grouping(k, kept, sizes, group_of_kept, np.where(dropped, -1, group), dropped,
                     time.perf_counter() - t)


def _order_by_size(ntoks: np.ndarray, train: np.ndarray, group: np.ndarray, n_clusters: int) -> list[int]:
    """The groups by training tokens, most first: cluster_00 is the largest."""
    train_tokens = np.array([ntoks[train & (group == g)].sum() for g in range(n_clusters)])
    if (train_tokens == 0).any():  # cannot happen unless k-means stopped before its labels settled
        raise UserError(f"clustering gave a cluster with no training documents; lower "
                        f"clustering.n_clusters={n_clusters} or change clustering.seed.")
    return sorted(range(n_clusters), key=lambda g: (-train_tokens[g], g))


def _cluster_parts(corpus: Corpus, docs: list[_Doc], members: dict[str, list[int]]) -> dict:
    """One cluster's splits for `write_corpus`: its documents' tokens (and loss
    masks, where the corpus has any) copied from the original arrays."""
    dtype = corpus.meta["dtype"]
    masked = any(corpus.mask(s, sp) is not None for s in corpus.sources for sp in SPLITS)
    parts = {}
    for split, idx in members.items():
        toks = [np.asarray(corpus.tokens[docs[i].source][split][docs[i].start:docs[i].end]) for i in idx]
        flat = np.concatenate(toks).astype(dtype) if toks else np.zeros(0, dtype)
        mask = None
        if masked:
            pieces = []
            for i in idx:
                m = corpus.mask(docs[i].source, split)
                pieces.append(np.ones(docs[i].end - docs[i].start, np.uint8) if m is None
                              else np.asarray(m[docs[i].start:docs[i].end]))
            mask = np.concatenate(pieces).astype(np.uint8) if pieces else np.zeros(0, np.uint8)
        parts[split] = (flat, mask, np.array([docs[i].end - docs[i].start for i in idx], dtype=np.int64))
    return parts


def _describe(corpus: Corpus, docs: list[_Doc], X: np.ndarray, ntoks: np.ndarray, tr: np.ndarray,
              written: dict, kmeans_clusters: int) -> dict:
    """clusters.json's entry for one cluster: its size, the original sources'
    shares of its training tokens, and its five most central documents."""
    total = max(1, int(ntoks[tr].sum()))
    share = {}
    for s in corpus.sources:
        n = int(sum(ntoks[i] for i in tr if docs[i].source == s))
        if n:
            share[s] = round(n / total, 4)
    c = X[tr].mean(0)
    central = tr[np.argsort(-(X[tr] @ (c / max(np.linalg.norm(c), 1e-12))), kind="stable")[:5]]
    return {"documents": {sp: written[sp]["documents"] for sp in SPLITS},
            "tokens": {sp: written[sp]["tokens"] for sp in SPLITS},
            "kmeans_clusters": kmeans_clusters,
            "source_share": share,  # of the cluster's training tokens
            "central": [{"source": docs[i].source, "text": " ".join(docs[i].text.split())[:80]} for i in central]}


def _summary(corpus: Corpus, docs: list[_Doc], params: dict, emb: Embedded, grouping: _Grouping,
             left_out: dict) -> dict:
    g = grouping
    return {"parent": corpus.root.name, "params": params, "clusters": {},
            "kmeans": {"k": g.k, "kept": len(g.kept), "pruned": int(g.k - len(g.kept)),
                       "pruned_train_documents": int(g.sizes[g.sizes < params["prune_min_docs"]].sum()),
                       "merge": "ward agglomerative clustering of the kept centroids"},
            "left_out_train_documents": left_out,
            "dropped_documents": {sp: int((g.dropped & np.array([d.split == sp for d in docs])).sum())
                                  for sp in SPLITS},
            "embedding": {"model": params["model"], "dim": int(emb.X.shape[1]),
                          "max_seq_length": params["max_seq_length"], "documents": len(docs),
                          "newly_embedded": emb.newly_embedded, "tokens": emb.tokens,
                          "nonembedding_params": emb.nonembedding_params},
            "cost": {"embed_seconds": round(emb.seconds, 3), "cluster_seconds": round(g.seconds, 3),
                     "flops": 2 * emb.nonembedding_params * emb.tokens}}  # forward only: 2*N*D (DESIGN.md)
