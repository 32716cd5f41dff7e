"""The token cache and the `Corpus` that jobs read.

Every source (`fastmix.data.sources`) is tokenized once into flat token arrays
(documents joined by EOS) per split, cached under `data.cache_dir` by a hash of
the file contents and of every setting that changes the tokens, so a second run
reads the cache and does no work. The cache's meta.json, written last, records
every file's size and checksum: a damaged cache is found on load and rebuilt,
and a cache another process is building is waited for (`built_folder`).

While a method searches, the test split is sealed (`test_split_sealed`).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fastmix.config import abspath
from fastmix.data.sources import (
    SPLITS,
    Pair,
    SourceSpec,
    cap_documents,
    discover_sources,
    iter_documents,
    load_tokenizer,
    not_text_error,
    split_documents,
    tokenize_documents,
    train_bpe,
)
from fastmix.errors import UserError
from fastmix.records import building_dir, write_text_atomic
from fastmix.schema import data_config

log = logging.getLogger(__name__)


# ------------------------------------------------- the test split, sealed ---
# No search may score, train on or build tasks from a test document (README,
# "no search reads the test split"). The pipeline seals the test split while a
# method searches (`test_split_sealed`); a read of it then raises, so the rule is
# checked on every run of every method, not by review. Exempt (docs/DECISIONS.md):
# the oracle, whose job is to score targets on the test split (it is not sealed),
# and CLIMB's clustering, which runs before the seal to give its clusters splits.
class SealedSplitRead(RuntimeError):
    """A search read the test split: a bug in the method, not bad input."""


_sealed: list[str] = []  # who is searching now (nested seals stack)


@contextmanager
def test_split_sealed(who: str):
    _sealed.append(who)
    try:
        yield
    finally:
        _sealed.pop()


def check_not_sealed(what: str) -> None:
    """Raise if a search is running: `what` (a source's test split, a test-split
    objective or task suite) is for scoring targets only."""
    if _sealed:
        raise SealedSplitRead(f"{_sealed[-1]} read {what} during its search; a search may read the train "
                            f"and val splits only (the test split scores the target).")


class _Splits(dict):
    """One source's {split: array}: reading "test" while sealed raises."""

    def __init__(self, source: str, splits: dict):
        super().__init__(splits)
        self.source = source

    def __getitem__(self, split):
        if split == "test":
            check_not_sealed(f"the test split of '{self.source}'")
        return super().__getitem__(split)

    def get(self, split, default=None):
        return self[split] if split in self else default

    def __reduce__(self):  # pickled to worker processes as what it is
        return _Splits, (self.source, dict(self))


# ------------------------------------------------------------------ corpus ---
@dataclass
class Corpus:
    """Token arrays per source and split (np.memmap), plus the tokenizer. Each
    source's splits are `_Splits`: the test split cannot be read during a search."""
    root: Path
    tokenizer: object
    tokens: dict[str, dict[str, np.ndarray]]  # source -> split -> flat token ids
    doc_starts: dict[str, dict[str, np.ndarray]]  # source -> split -> offsets of documents
    meta: dict
    masks: dict[str, dict[str, np.ndarray | None]] = field(default_factory=dict)  # loss masks of pair sources

    def __post_init__(self):
        for name in ("tokens", "doc_starts", "masks"):
            setattr(self, name, {s: _Splits(s, d) for s, d in getattr(self, name).items()})

    @property
    def sources(self) -> list[str]:
        return list(self.tokens)

    def token_counts(self, split: str = "train") -> dict[str, int]:
        return {s: len(self.tokens[s][split]) for s in self.tokens}

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def mask(self, source: str, split: str) -> np.ndarray | None:
        return self.masks.get(source, {}).get(split)

    def pairs(self, source: str, split: str) -> list[Pair]:
        """A post-training source's prompt/answer pairs, split at the loss mask."""
        mask = self.mask(source, split)
        if mask is None:
            return []
        arr, starts = self.tokens[source][split], self.doc_starts[source][split]
        out = []
        for a, b in zip(starts, list(starts[1:]) + [len(arr)]):
            m = np.asarray(mask[a:b])
            cut = a + int(np.argmax(m > 0))  # first answer token
            out.append(Pair(self.tokenizer.decode(arr[a:cut].tolist()), self.tokenizer.decode(arr[cut:b - 1].tolist())))
        return out

    def documents(self, source: str, split: str) -> list[str]:
        """The split's documents as text (decoded from the cached tokens; the
        byte-level BPE round-trips exactly)."""
        arr, starts = self.tokens[source][split], self.doc_starts[source][split]
        ends = list(starts[1:]) + [len(arr)]
        return [self.tokenizer.decode(arr[a:b - 1].tolist()) for a, b in zip(starts, ends)]  # b-1: drop EOS


def _cache_key(specs: dict[str, SourceSpec], data_cfg) -> str:
    tok = data_cfg.tokenizer
    settings = {
        "sources": {n: s.fingerprint() for n, s in specs.items()},
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size,
                      "path": str(tok.path), "bytes_per_source": tok.train_bytes_per_source},
        "splits": dict(data_cfg.splits), "max_bytes_per_source": data_cfg.max_bytes_per_source,
        "format": CACHE_FORMAT,  # on_bad_file is left out: error mode never writes a cache
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ cache ---
CACHE_FORMAT = 3  # 3: meta.json records each file's size and sha256, and the skipped files


class DamagedCache(UserError):
    """A cache folder whose files do not match its meta.json."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()  # sha256, not blake2b: hardware-accelerated on x86 and ARM, about twice as fast
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seal(folder: Path, meta: dict) -> dict:
    """Write `meta` as folder/meta.json, last, with the size and sha256 of every
    other file in the folder under "files" (what `cache_problems` checks)."""
    marker = folder / "meta.json"
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != marker)
    record = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
              for p in files}
    meta = {**meta, "files": record}
    write_text_atomic(marker, json.dumps(meta, indent=1))
    return meta


def cache_problems(root: Path, verify: bool = False) -> tuple[dict | None, list[str]]:
    """(meta, []) for an intact sealed folder, (None, []) when there is none, else
    (None, what is wrong). Sizes are always compared (a stat per file); checksums
    when `verify` or when a size is wrong, so that every damaged file is named."""
    if not root.exists():
        return None, []
    try:
        meta = json.loads((root / "meta.json").read_text())
        files = meta["files"]
    except FileNotFoundError:
        return None, ["meta.json is missing"]
    except (ValueError, KeyError, TypeError):
        return None, ["meta.json is unreadable or records no file sizes"]
    problems = {}
    for rel, rec in files.items():
        try:
            size = (root / rel).stat().st_size
        except FileNotFoundError:
            problems[rel] = f"{rel} is missing"
            continue
        if size != rec["bytes"]:
            problems[rel] = f"{rel} has {size} bytes, meta.json says {rec['bytes']}"
    if problems or verify:
        for rel, rec in files.items():
            if rel not in problems and sha256_file(root / rel) != rec["sha256"]:
                problems[rel] = f"{rel} does not match its checksum"
    return (None if problems else meta), list(problems.values())


@contextmanager
def _build_lock(root: Path):
    """Held while `root` is built, so a second process that wants the same folder
    waits and then finds it built instead of building it again. The lock file
    stays: removing it would let a third process lock a new file while the second
    still holds the old one."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "a") as fh:  # closing it releases the lock
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is building %s", root)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def built_folder(root: Path, build: Callable[[Path], dict], verify: bool = False,
                 what: str = "token cache") -> dict:
    """The meta of the sealed folder `root` (see `seal`), built first if it is absent
    or damaged: `build(tmp)` writes the files into a temporary folder and returns
    the meta, which is sealed and the folder renamed to `root`. A damaged folder is
    rebuilt with one warning naming its bad files; the build holds a lock, so
    concurrent processes build once."""
    meta, _ = cache_problems(root, verify)
    if meta is not None:
        return meta
    with _build_lock(root):
        meta, problems = cache_problems(root, verify)  # the process we waited for may have built it
        if meta is not None:
            return meta
        if problems:
            more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            log.warning("%s %s is damaged (%s%s): rebuilding it", what, root, "; ".join(problems[:3]), more)
            # moved aside first: a reader sees the damaged folder or none, never half of one
            aside = tempfile.mkdtemp(prefix=f".damaged-{root.name}-", dir=root.parent)
            os.replace(root, aside)
            shutil.rmtree(aside, ignore_errors=True)
        with building_dir(root, "meta.json") as tmp:
            meta = seal(tmp, build(tmp))
    return meta


def _open(root: Path, meta: dict, tokenizer) -> Corpus:
    tokens, starts, masks = {}, {}, {}
    for name, info in meta["sources"].items():
        tokens[name], starts[name], masks[name] = {}, {}, {}
        for split in SPLITS:
            n = info[split]["tokens"]
            # np.memmap refuses empty files; an empty split stays an empty array.
            tokens[name][split] = (np.memmap(root / f"{name}.{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,))
                                   if n else np.zeros(0, dtype=meta["dtype"]))
            starts[name][split] = np.load(root / f"{name}.{split}.docs.npy")
            masks[name][split] = (np.memmap(root / f"{name}.{split}.mask.bin", dtype=np.uint8, mode="r", shape=(n,))
                                  if info[split].get("masked") and n else None)
    return Corpus(root, tokenizer, tokens, starts, meta, masks)


def open_corpus(root: Path, tokenizer=None, verify: bool = False) -> Corpus:
    """A finished cache folder (meta.json, token files, tokenizer/) as a Corpus;
    `tokenizer` reuses one already in memory instead of loading tokenizer/. The
    files' sizes (and with `verify` their checksums) are checked against meta.json
    first: a damaged folder raises `DamagedCache`."""
    root = Path(root)
    meta, problems = cache_problems(root, verify)
    if meta is None:
        why = "; ".join(problems) or "it does not exist"
        raise DamagedCache(f"{root} is not a finished corpus folder ({why}): delete it, and the job "
                           f"that made it builds it again.")
    return _load(root, meta, tokenizer)


def _load(root: Path, meta: dict, tokenizer=None) -> Corpus:
    if tokenizer is None:
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(Path(root) / "tokenizer"))
    return _open(Path(root), meta, tokenizer)


Parts = dict  # split -> (flat token ids, loss mask or None, document lengths)


def write_corpus(folder: Path, tokenizer, dtype: str, sources: Iterable[tuple[str, Parts]], **extra) -> dict:
    """The one corpus writer: each source's splits in the layout `_open` reads
    (tokens, loss mask, document offsets) and the tokenizer; returns meta.json's
    entries (plus `extra`). `sources` is consumed one source at a time, so a
    builder holds one source's tokens in memory. `prepare_corpus` and CLIMB's
    clusters write through this, so there is one on-disk format."""
    meta = {"dtype": dtype, "vocab_size": len(tokenizer), "sources": {}, **extra}
    for name, parts in sources:
        meta["sources"][name] = {split: _write_split(folder, name, split, *parts[split]) for split in SPLITS}
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    return meta


def _write_split(folder: Path, name: str, split: str, flat: np.ndarray, mask: np.ndarray | None,
                 lengths: np.ndarray) -> dict:
    flat.tofile(folder / f"{name}.{split}.bin")
    if mask is not None:
        mask.tofile(folder / f"{name}.{split}.mask.bin")
    # a split may hold no document (a CLIMB cluster's val split, say): then no offsets either
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0)
    np.save(folder / f"{name}.{split}.docs.npy", starts.astype(np.int64))
    return {"documents": len(lengths), "tokens": len(flat), "masked": mask is not None}


def prepare_corpus(data_cfg) -> Corpus:
    """Tokenize every source once (or reuse the cache) and open the token arrays."""
    data_cfg = data_config(data_cfg)
    specs = discover_sources(data_cfg)
    if data_cfg.tokenizer.kind == "pretrained" and not data_cfg.tokenizer.path:
        raise UserError("data.tokenizer.path is not set: pass data.tokenizer.path=/path/to/a/local/tokenizer "
                        "folder (Hugging Face format), or use data.tokenizer.kind=bpe.")
    root = abspath(data_cfg.cache_dir) / _cache_key(specs, data_cfg)
    meta = built_folder(root, lambda tmp: _build_corpus(tmp, specs, data_cfg), verify=data_cfg.verify_cache)
    if data_cfg.on_bad_file == "error":  # the cache may be one a skip run built, leaving files out
        for name, bad in meta["skipped_files"].items():
            for path, why in bad.items():
                raise not_text_error(name, path, why)
    return _load(root, meta)


def _build_corpus(tmp: Path, specs: dict[str, SourceSpec], data_cfg) -> dict:
    """Read, split and tokenize every source into `tmp`; returns the meta.json entries."""
    skipped = {n: {} for n in specs}  # source -> {path: why}: files that are not text
    cap = data_cfg.max_bytes_per_source
    docs = {n: cap_documents(iter_documents(s, data_cfg.on_bad_file, skipped[n]), cap)
            for n, s in specs.items()}
    for n, d in docs.items():
        if not d:
            also = f" ({len(skipped[n])} of them skipped: not text)" if skipped[n] else ""
            raise UserError(f"source '{n}' is empty: no non-empty documents in "
                            f"{[str(f) for f in specs[n].files] or specs[n].hf}{also}. Add text or drop it "
                            f"from data.sources.")
    splits = {n: split_documents(d, data_cfg.splits.val, data_cfg.splits.test, n) for n, d in docs.items()}
    tk = data_cfg.tokenizer
    if tk.kind == "bpe":
        tokenizer = train_bpe({n: s["train"] for n, s in splits.items()}, tk.vocab_size, tk.train_bytes_per_source)
    elif tk.kind == "pretrained":
        tokenizer = load_tokenizer(abspath(tk.path))
    else:
        raise UserError(f"data.tokenizer.kind '{tk.kind}' is unknown: use bpe or pretrained.")
    dtype = "uint16" if len(tokenizer) <= 2**16 else "uint32"

    def tokenized():  # a bar on a terminal only (disable=None): a large corpus takes minutes
        for name, parts in tqdm(splits.items(), desc="tokenizing sources", unit="source", disable=None,
                                leave=False):
            out = {split: tokenize_documents(tokenizer, parts[split], dtype) for split in SPLITS}
            if len(out["train"][0]) == 0:
                raise UserError(f"source '{name}' has no tokens; add text to it.")
            yield name, out
    return write_corpus(tmp, tokenizer, dtype, tokenized(), format=CACHE_FORMAT,
                        skipped_files={n: bad for n, bad in skipped.items() if bad})
