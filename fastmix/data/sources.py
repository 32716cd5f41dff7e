"""Sources -> documents -> a tokenizer -> token ids.

A *source* is a named set of documents: a folder of .txt/.jsonl/.parquet
files (`data=folder`, one subfolder per source), named files (`data=files`),
or a Hugging Face dataset (`data=hf`). `fastmix.data.corpus` turns them into
the cached token arrays that jobs read.

A .txt/.jsonl file that is not UTF-8 text (see `not_text`) is skipped with a
warning naming it, or stops the job (`data.on_bad_file`); meta.json lists the
skipped files.

Splits are by document: each document's place is decided by a hash of its
text, so the split does not depend on file order and never leaks a document
across splits.
"""
from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import logging
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np

from fastmix.config import abspath
from fastmix.errors import UserError

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


def not_text_error(source: str, path, why: str) -> UserError:
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
                raise not_text_error(spec.name, f, why)
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
