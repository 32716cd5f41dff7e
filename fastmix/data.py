"""Sources -> tokenizer -> memory-mapped token arrays with train/val/test splits.

A *source* is a named set of documents: a folder of .txt/.jsonl/.parquet
files (`data=folder`, one subfolder per source), named files (`data=files`),
or a Hugging Face dataset (`data=hf`). Every source is tokenized once into
flat token arrays (documents joined by EOS) per split, cached under
`data.cache_dir` by a hash of the file contents and of every setting that
changes the tokens, so a second run reads the cache and does no work.

Splits are by document: each document's place is decided by a hash of its
text, so the split does not depend on file order and never leaks a document
across splits.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
from tqdm.auto import tqdm

from fastmix.config import abspath
from fastmix.errors import UserError
from fastmix.records import building_dir
from fastmix.schema import data_config

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


def _files_under(path: Path) -> list[Path]:
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
            specs[sub.name] = SourceSpec(sub.name, _files_under(sub), text_field=text_field)
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
                files += _files_under(p)
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


def iter_documents(spec: SourceSpec) -> Iterator[Document]:
    """Every non-empty document of a source, in a fixed order: text, or a
    prompt/answer `Pair` for rows that have `prompt` and `answer` fields."""
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
        if f.suffix == ".txt":
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
        elif f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
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


def _doc_key(doc: Document) -> tuple:
    text = doc if isinstance(doc, str) else doc.prompt + "\x00" + doc.answer
    return hashlib.sha1(text.encode("utf-8", "replace")).digest(), text


def split_documents(docs: list[Document], val: float, test: float, name: str) -> dict[str, list[Document]]:
    """Order documents by a hash of their text; the first ceil(n*val) go to val,
    the next ceil(n*test) to test, the rest to train (at least one each)."""
    if len(docs) < 3:
        raise UserError(f"source '{name}' has {len(docs)} document(s); at least 3 are needed "
                        f"(one each for train/val/test). Add documents or split its text into more.")
    keyed = sorted(docs, key=_doc_key)
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


# ------------------------------------------------------------------ corpus ---
@dataclass
class Corpus:
    """Token arrays per source and split (np.memmap), plus the tokenizer."""
    root: Path
    tokenizer: object
    tokens: dict[str, dict[str, np.ndarray]]  # source -> split -> flat token ids
    doc_starts: dict[str, dict[str, np.ndarray]]  # source -> split -> offsets of documents
    meta: dict
    masks: dict[str, dict[str, np.ndarray | None]] = field(default_factory=dict)  # loss masks of pair sources

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
        "format": 2,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


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


def open_corpus(root: Path, tokenizer=None) -> Corpus:
    """A finished cache folder (meta.json, token files, tokenizer/) as a Corpus;
    `tokenizer` reuses one already in memory instead of loading tokenizer/."""
    meta = json.loads((Path(root) / "meta.json").read_text())
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
    cache_dir = abspath(data_cfg.cache_dir)
    root = cache_dir / _cache_key(specs, data_cfg)
    if (root / "meta.json").exists():
        return open_corpus(root)

    docs = {n: cap_documents(iter_documents(s), data_cfg.max_bytes_per_source) for n, s in specs.items()}
    for n, d in docs.items():
        if not d:
            raise UserError(f"source '{n}' is empty: no non-empty documents in "
                            f"{[str(f) for f in specs[n].files] or specs[n].hf}. Add text or drop it "
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

    with building_dir(root, "meta.json") as tmp:
        meta = {"dtype": dtype, "vocab_size": len(tokenizer), "sources": {}}
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
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return prepare_corpus(data_cfg)
