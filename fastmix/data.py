"""Sources -> tokenizer -> memory-mapped token arrays with train/val/test splits.

A *source* is a named set of documents: a folder of .txt/.jsonl/.parquet
files (`data=folder`, one subfolder per source), named files (`data=files`),
or a Hugging Face dataset (`data=hf`). Every source is tokenized once into
flat token arrays (documents joined by EOS) per split, cached under
`data.cache_dir` by a hash of the file contents and of every setting that
changes the tokens, so a second run reads the cache and does no work. The
cache's meta.json, written last, records every file's size and checksum: a
damaged cache is found on load and rebuilt, and a cache another process is
building is waited for (`built_folder`).

A .txt/.jsonl file that is not UTF-8 text (see `not_text`) is skipped with a
warning naming it, or stops the job (`data.on_bad_file`); meta.json lists the
skipped files.

Splits are by document: each document's place is decided by a hash of its
text, so the split does not depend on file order and never leaks a document
across splits.
"""
from __future__ import annotations

import codecs
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
from tqdm.auto import tqdm

from fastmix.config import abspath
from fastmix.errors import UserError
from fastmix.records import building_dir, write_text_atomic
from fastmix.schema import data_config

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
SPECIALS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}


# ---------------------------------------------------------------- sources ---
@dataclass
class SourceSpec:
    name: str
    files: list[Path] = field(default_factory=list)
    hf: dict | None = None  # load_dataset kwargs, for Hugging Face sources
    text_field: str = "text"

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.name.encode())
        for f in self.files:
            h.update(str(f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        if self.hf is not None:
            h.update(json.dumps(self.hf, sort_keys=True).encode())
        h.update(self.text_field.encode())
        return h.hexdigest()


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def discover_sources(data_cfg) -> dict[str, SourceSpec]:
    """Source specs from a data node with its defaults (`schema.data_config`, as
    prepare_corpus passes it); errors name the path or source to fix."""
    kind, text_field = data_cfg.kind, data_cfg.text_field
    specs: dict[str, SourceSpec] = {}
    if kind == "folder":
        root = abspath(data_cfg.root) if data_cfg.root else None
        if root is None or not root.is_dir():
            hint = ("build it with `make corpus`" if data_cfg.name == "embedded"
                    else "pass data.root=/path/to/dir holding one subfolder per source")
            raise UserError(f"data.root {'is not set' if root is None else f'{root} is not a directory'}: {hint}.")
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            specs[sub.name] = SourceSpec(sub.name, files_under(sub), text_field=text_field)
        if not specs:
            raise UserError(f"data.root {root} has no source subfolders: make one subfolder "
                            f"per source holding {'/'.join(TEXT_SUFFIXES)} files.")
    elif kind == "files":
        root = data_cfg.root  # relative file paths are under data.root when it is set
        for name, paths in (data_cfg.files or {}).items():
            files = []
            for entry in ([paths] if isinstance(paths, str) else paths):
                relative = not Path(entry).is_absolute()
                p = abspath(Path(root) / entry if root and relative else entry)
                if not p.exists():
                    hint = (f"data.root is not set (relative paths in data.files are read under it): pass "
                            f"data.root=/path/to/the/folder holding {entry}, or fix data.files.{name}"
                            if relative and not root else f"fix data.files.{name}")
                    raise UserError(f"source '{name}': file {p} does not exist; {hint}.")
                files += files_under(p)
            specs[name] = SourceSpec(name, files, text_field=text_field)
    elif kind == "hf":
        for name, kwargs in (data_cfg.datasets or {}).items():
            kwargs = dict(kwargs)
            field_name = kwargs.pop("text_field", text_field)
            specs[name] = SourceSpec(name, hf=kwargs, text_field=field_name)
    else:
        raise UserError(f"data.kind '{kind}' is unknown: use folder, files or hf.")

    wanted = data_cfg.sources
    if wanted:
        unknown = [s for s in wanted if s not in specs]
        if unknown:
            raise UserError(f"unknown source(s) {unknown} in data.sources; available: {sorted(specs)}.")
        specs = {s: specs[s] for s in wanted}
    for spec in specs.values():
        if spec.hf is None and not spec.files:
            raise UserError(f"source '{spec.name}' has no {'/'.join(TEXT_SUFFIXES)} files: "
                            f"add documents or drop it from data.sources.")
    if len(specs) < 2:
        raise UserError(f"a mixture needs at least 2 sources, found {sorted(specs)}.")
    return specs


class Pair(NamedTuple):
    """A post-training document: the loss counts the answer's tokens only."""
    prompt: str
    answer: str


Document = Union[str, Pair]


def _doc_from_row(row: dict, text_field: str, where: str) -> Document | None:
    if isinstance(row, dict) and "prompt" in row and "answer" in row:
        return Pair(str(row["prompt"]), str(row["answer"])) if str(row["answer"]).strip() else None
    if not isinstance(row, dict) or text_field not in row:
        raise UserError(f"{where}: expected a JSON object with a '{text_field}' field (or 'prompt' "
                        f"and 'answer' fields for post-training pairs); fix it or set data.text_field.")
    text = row[text_field]
    return text if text and text.strip() else None


# A .txt/.jsonl file is not text when it holds a NUL byte (no text format writes one;
# binaries and UTF-16 text are full of them) or when more than 1% of its bytes are not
# UTF-8: a few stray Latin-1 bytes in a UTF-8 file are kept (each read as U+FFFD), a
# file in another encoding, or random bytes, are not.
MAX_UNDECODABLE = 0.01
_ESCAPED = re.compile("[\udc80-\udcff]")  # what `surrogateescape` turns an undecodable byte into


def not_text(path: Path) -> str | None:
    """Why `path` is not UTF-8 text (see MAX_UNDECODABLE), or None. Reads it in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    size = bad = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            nul = chunk.find(b"\0")
            if nul >= 0:
                return f"it holds NUL bytes (the first at byte {size + nul})"
            size += len(chunk)
            text = decoder.decode(chunk)
            if not text.isascii():  # a constant-time flag in CPython: ASCII chunks cost nothing more
                bad += len(_ESCAPED.findall(text))
    bad += len(_ESCAPED.findall(decoder.decode(b"", final=True)))
    return f"{bad} of its {size} bytes are not UTF-8" if bad > MAX_UNDECODABLE * size else None


def _not_text_error(source: str, path, why: str) -> UserError:
    return UserError(f"source '{source}': {path} is not text ({why}): remove it, or set "
                     f"data.on_bad_file=skip to skip such files with a warning.")


def iter_documents(spec: SourceSpec, on_bad_file: str = "skip",
                   skipped: dict[str, str] | None = None) -> Iterator[Document]:
    """Every non-empty document of a source, in a fixed order: text, or a
    prompt/answer `Pair` for rows that have `prompt` and `answer` fields.
    A .txt/.jsonl file that is not text (`not_text`) stops it with a `UserError`
    (`on_bad_file="error"`) or is skipped with a warning and recorded in `skipped`
    (path -> why)."""
    if spec.hf is not None:
        import datasets  # imported here: slow, and only needed for hub sources
        try:
            ds = datasets.load_dataset(**spec.hf)
        except Exception as e:  # offline: a dataset not in the local cache fails here
            raise UserError(f"source '{spec.name}': cannot load Hugging Face dataset {spec.hf} "
                            f"offline ({type(e).__name__}: {e}). Download it once with network "
                            f"(HF_DATASETS_OFFLINE=0) or point data at local files.") from e
        for i, row in enumerate(ds):
            doc = _doc_from_row(row, spec.text_field, f"source '{spec.name}' row {i}")
            if doc is not None:
                yield doc
        return
    for f in spec.files:
        if f.suffix in (".txt", ".jsonl") and (why := not_text(f)):
            if on_bad_file == "error":
                raise _not_text_error(spec.name, f, why)
            log.warning("source '%s': skipped %s: not text (%s)", spec.name, f, why)
            if skipped is not None:
                skipped[str(f)] = why
            continue
        # errors="replace": a file that passed not_text may still hold a few stray bytes
        if f.suffix == ".txt":
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
        elif f.suffix == ".jsonl":
            with open(f, encoding="utf-8", errors="replace") as fh:
                for i, line in enumerate(fh):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{f}:{i + 1}: not valid JSON ({e}); fix the line.") from e
                    doc = _doc_from_row(row, spec.text_field, f"{f}:{i + 1}")
                    if doc is not None:
                        yield doc
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(f)
            for i, row in enumerate(table.to_pylist()):
                doc = _doc_from_row(row, spec.text_field, f"{f} row {i}")
                if doc is not None:
                    yield doc


def _doc_text(doc: Document) -> str:
    return doc if isinstance(doc, str) else doc.prompt + doc.answer


def doc_key(doc: Document) -> tuple:
    text = doc if isinstance(doc, str) else doc.prompt + "\x00" + doc.answer
    return hashlib.sha1(text.encode("utf-8", "replace")).digest(), text


def split_documents(docs: list[Document], val: float, test: float, name: str) -> dict[str, list[Document]]:
    """Order documents by a hash of their text; the first ceil(n*val) go to val,
    the next ceil(n*test) to test, the rest to train (at least one each)."""
    if len(docs) < 3:
        raise UserError(f"source '{name}' has {len(docs)} document(s); at least 3 are needed "
                        f"(one each for train/val/test). Add documents or split its text into more.")
    keyed = sorted(docs, key=doc_key)
    n_val = max(1, math.ceil(len(docs) * val))
    n_test = max(1, math.ceil(len(docs) * test))
    if n_val + n_test >= len(docs):
        raise UserError(f"source '{name}': data.splits val={val} test={test} leave no training "
                        f"documents out of {len(docs)}; lower them.")
    return {"val": keyed[:n_val], "test": keyed[n_val:n_val + n_test], "train": keyed[n_val + n_test:]}


def cap_documents(docs: Iterator[Document], max_bytes: int | None) -> list[Document]:
    out, total = [], 0
    for d in docs:
        if max_bytes and total >= max_bytes:
            break
        out.append(d)
        total += len(_doc_text(d).encode("utf-8", "replace"))
    return out


# -------------------------------------------------------------- tokenizer ---
def train_bpe(docs_by_source: dict[str, list[str]], vocab_size: int, bytes_per_source: int):
    """A byte-level BPE trained on an equal byte budget from every source, so no
    source's spelling dominates the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())  # its own bar, on a terminal only

    def sample():
        for name in sorted(docs_by_source):
            yield from map(_doc_text, cap_documents(iter(docs_by_source[name]), bytes_per_source))

    tok.train_from_iterator(sample(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer
    path = Path(path)
    if not path.exists():
        raise UserError(f"data.tokenizer.path {path} does not exist: give a local Hugging Face "
                        f"tokenizer directory, or use data.tokenizer.kind=bpe.")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer at {path} has no EOS token; documents are joined by EOS.")
    if tok.bos_token_id is None:
        tok.bos_token = tok.eos_token  # lm-eval prepends BOS; EOS doubles as it (GPT-2 style)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


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


def tokenize_documents(tokenizer, docs: list[Document], dtype: str):
    """Flat token ids (each document + EOS), a loss mask (None when every document
    is plain text; for pairs 0 on prompt tokens, 1 on answer tokens and EOS) and
    the document lengths. A pair's prompt and answer are tokenized separately
    and concatenated, so the boundary is exact."""
    eos = tokenizer.eos_token_id
    texts = [d if isinstance(d, str) else d.prompt for d in docs]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if docs else []
    answers = [d.answer for d in docs if isinstance(d, Pair)]
    ans_ids = iter(tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else [])
    rows, masks = [], []
    for d, x in zip(docs, ids):
        if isinstance(d, Pair):
            a = next(ans_ids)
            rows.append(x + a + [eos])
            masks.append([0] * len(x) + [1] * (len(a) + 1))
        else:
            rows.append(x + [eos])
            masks.append([1] * (len(x) + 1))
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    total = int(lengths.sum())
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=total)
    mask = np.fromiter(itertools.chain.from_iterable(masks), dtype=np.uint8, count=total) if answers else None
    return flat, mask, lengths


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


def write_split(folder: Path, name: str, split: str, flat: np.ndarray, mask: np.ndarray | None,
                lengths: np.ndarray) -> dict:
    """Write one source's split in the layout `_open` reads (tokens, loss mask,
    document offsets); returns its meta.json entry. Other builders of a corpus
    (e.g. CLIMB's clusters) write through this, so there is one on-disk format."""
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
                raise _not_text_error(name, path, why)
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

    meta = {"format": CACHE_FORMAT, "dtype": dtype, "vocab_size": len(tokenizer), "sources": {},
            "skipped_files": {n: bad for n, bad in skipped.items() if bad}}
    # a bar on a terminal only (disable=None): the token cache of a large corpus takes minutes
    for name, parts in tqdm(splits.items(), desc="tokenizing sources", unit="source", disable=None,
                            leave=False):
        meta["sources"][name] = {}
        for split in SPLITS:
            flat, mask, lengths = tokenize_documents(tokenizer, parts[split], dtype)
            if split == "train" and len(flat) == 0:
                raise UserError(f"source '{name}' has no tokens; add text to it.")
            meta["sources"][name][split] = write_split(tmp, name, split, flat, mask, lengths)
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    return meta
