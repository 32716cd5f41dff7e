"""What a mixture is searched for: a loss on held-out rows, in weighted groups.

* `ValidationObjective`: the validation splits of one or more sources, with
  weights (`objective.weights`, source -> weight; unset = every source
  equally). RegMix's and FastMix's pre-training objective is the Pile-CC
  validation loss, i.e. weights={pile_cc: 1}.
* `TextFileObjective`: an external text file (or folder of .txt/.jsonl), cut
  into windows with the corpus tokenizer.
* `QAObjective`: prompt/answer pairs scored on the answer tokens only
  (FastMix's SFT-target variant, public code `calculate_ntp_loss3`): from a
  JSONL file of {"prompt", "answer"} rows, or from the validation split of a
  post-training source.

Every objective reads at most `max_tokens_per_source` tokens per group and split
(windows of the context, or one row per prompt/answer pair), one key for all three
so a scale preset (experiment=smoke) can cap whichever objective is chosen.
Every objective has `loss(model)` (the number a method minimises),
`sample_batch(...)` / `fixed_batch(...)` (FastMix's outer-step batch) and
`describe()`.

Two splits, never mixed: a search reads the `val` rows (the objective as built
from the config); a target is scored on `held_out()`, the same objective on the
`test` rows, which no search, proxy or objective ever read (result.json's
objective_loss). Sources have their own val/test splits; an external file's
documents (or pairs) are split in two by a hash of their text, as the sources
are, so the halves are independent; a single-document file is split by blocks
of windows. describe() (result.json's objective) records how.
"""
from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from fastmix.config import abspath
from fastmix.data.corpus import Corpus, check_not_sealed
from fastmix.data.sources import Pair, SourceSpec, doc_key, files_under, iter_documents, tokenize_documents
from fastmix.errors import UserError
from fastmix.schema import MethodParams, positive_int, rule
from fastmix.search.optimizer import validate_weights
from fastmix.train.loop import token_losses
from fastmix.train.sampling import Batch, eval_windows

SPLITS = ("val", "test")


@dataclass
class ObjectiveParams(MethodParams):
    """What every conf/objective/*.yaml holds besides its own keys (types and
    allowed values; the YAML has the values)."""
    max_tokens_per_source: int = rule(ge=1)  # a preset's cap, whatever the objective
    batch_size: int = rule(ge=1)  # rows per scoring forward


def _windows_with_mask(tokens: np.ndarray, mask: np.ndarray | None, context: int, max_tokens: int):
    ids = eval_windows(tokens, context, max_tokens)
    if mask is None:
        return ids, None
    m = eval_windows(mask, context, max_tokens)[:, 1:].float()  # mask of the targets
    return ids, m


def _alternate(items, split: str):
    """Every other item, starting at 0 for val and 1 for test: a file has no split of
    its own, and alternating (not halves) keeps both sides alike when the file is
    ordered by topic."""
    return items[SPLITS.index(split)::2]


class Objective:
    """Rows grouped by name, each group with a weight; loss = sum_g w_g * mean loss of g."""

    name = "objective"
    weights: dict[str, float]

    def __init__(self, corpus: Corpus, batch_size: int = 16, split: str = "val"):
        if split not in SPLITS:
            raise UserError(f"objective split '{split}' is unknown: use one of {SPLITS}.")
        positive_int("objective.batch_size", batch_size)
        self.corpus, self.batch_size, self.split = corpus, batch_size, split
        self._rows: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self._held_out: Objective | None = None

    def held_out(self) -> Objective:
        """The same objective on the test split: what a target is scored on. Built once,
        so its rows are cut once however many grid targets or proxies it scores."""
        if self.split == "test":
            return self
        if self._held_out is None:
            other = copy.copy(self)
            other.split, other._rows, other._held_out = "test", {}, None
            self._held_out = other
        return self._held_out

    def build_rows(self, context: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """group -> (input_ids [N, context+1], loss mask [N, context] or None)."""
        raise NotImplementedError

    def rows(self, context: int):
        if self.split == "test":  # cached rows too: a search may not score on them
            check_not_sealed(f"objective '{self.name}' on the test split")
        if context not in self._rows:
            rows = self.build_rows(context)
            for g, (ids, _) in rows.items():
                if len(ids) == 0:
                    raise UserError(f"objective '{self.name}': '{g}' gives no {self.split}-split rows of "
                                    f"{context + 1} tokens; add held-out text or lower the context.")
            self._rows[context] = rows
        return self._rows[context]

    def loss(self, model, device, meter=None, precision: str = "bf16") -> float:
        return self.losses(model, device, meter, precision)[0]

    @torch.no_grad()
    def losses(self, model, device, meter=None, precision: str = "bf16", rows: slice | None = None
               ) -> tuple[float, dict[str, float]]:
        """(the loss, each group's mean token loss) from one pass over the rows (`rows`:
        only that slice of every group's rows; a group with none there counts NaN)."""
        from fastmix.train.models import flop_params
        was_training = model.training
        model.eval()
        total, groups = 0.0, {}
        for g, (ids, mask) in self.rows(model.config.max_position_embeddings).items():
            if rows is not None:
                ids, mask = ids[rows], None if mask is None else mask[rows]
            num = den = 0.0
            for i in range(0, len(ids), self.batch_size):
                b = Batch(ids[i:i + self.batch_size], torch.zeros(0), torch.ones(0),
                          None if mask is None else mask[i:i + self.batch_size])
                tl = token_losses(model, b, device, precision)
                m = torch.ones_like(tl) if b.loss_mask is None else b.loss_mask.to(tl.device)
                num += float((tl * m).sum())
                den += float(m.sum())
                if meter is not None:
                    meter.add_forward(flop_params(model), tl.numel())
            groups[g] = num / den if den > 0 else float("nan")
            total += self.weights[g] * groups[g] if self.weights[g] else 0.0
        model.train(was_training)
        return total, groups

    def sample_batch(self, rng: np.random.Generator, batch_size: int, context: int) -> Batch:
        """Random rows, each row's group drawn by the weights (FastMix's outer-step batch)."""
        rows = self.rows(context)
        names = [g for g in rows if self.weights[g] > 0]
        p = np.array([self.weights[g] for g in names])
        groups = rng.choice(len(names), size=batch_size, p=p / p.sum())
        picks = [(names[k], int(rng.integers(len(rows[names[k]][0])))) for k in groups]
        ids = torch.stack([rows[g][0][i] for g, i in picks])
        masks = [rows[g][1] for g, _ in picks]
        mask = None
        if any(m is not None for m in masks):
            mask = torch.stack([rows[g][1][i] if rows[g][1] is not None else torch.ones(context)
                                for g, i in picks])
        return Batch(ids, torch.from_numpy(groups), torch.ones(batch_size), mask)

    def fixed_batch(self, rows_per_group: int, context: int) -> Batch:
        """The first `rows_per_group` rows of every weighted group, each row's loss
        weight w_g / rows of g, so `weighted_loss` = sum_g w_g mean_g (for unmasked
        rows): the public code's outer-step batch, `micro_batch_size // 8` rows from
        each validation loader, the loader restarted every time (the same rows every
        outer step), the losses averaged over loaders."""
        rows = self.rows(context)
        ids, groups, weights, masks = [], [], [], []
        for k, g in enumerate(g for g in rows if self.weights[g] > 0):
            gi, gm = rows[g]
            n = min(rows_per_group, len(gi))
            ids.append(gi[:n])
            groups += [k] * n
            weights += [self.weights[g] / n] * n
            masks.append(torch.ones(n, context) if gm is None else gm[:n])
        has_mask = any(rows[g][1] is not None for g in rows)
        return Batch(torch.cat(ids), torch.tensor(groups), torch.tensor(weights, dtype=torch.float32),
                     torch.cat(masks) if has_mask else None)

    def identity(self) -> str:
        """What the objective is, whatever its config calls it: two objectives with the
        same identity are the same objective (every weighting of sources is named `val`
        in its config; the oracle suite and the regret tables key objectives by this)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "id": self.identity(), "weights": self.weights, "split": self.split}


def weights_identity(weights: Mapping[str, float]) -> str:
    """A weighting of sources by its definition: `w:a=0.5,b=0.5` (renormalised, sorted,
    zero weights left out, 4 significant digits)."""
    total = sum(weights.values())
    return "w:" + ",".join(f"{s}={v / total:.4g}" for s, v in sorted(weights.items()) if v > 0)


def file_identity(path: Path, kind: str = "text") -> str:
    """A file objective by its content: `text:<sha256 of its files' bytes, 12 hex>`, the
    files in sorted order (a folder's .txt/.jsonl files); the path does not enter."""
    h = hashlib.sha256()
    for f in files_under(path):
        h.update(Path(f).read_bytes())
    return f"{kind}:{h.hexdigest()[:12]}"


class ValidationObjective(Objective):
    @dataclass
    class Params(ObjectiveParams):
        weights: Optional[Dict[str, float]] = rule()  # source -> weight; null = every source equally
        # the test windows: the eval's per-source ones (fastmix.run.pipeline.per_source_test_loss),
        # so the objective's test loss is the weighted sum of the target's per-source losses
        test_tokens_per_source: Optional[int] = rule(ge=1)

    def __init__(self, corpus: Corpus, name: str = "val", weights: dict[str, float] | None = None,
                 max_tokens_per_source: int = 16384, batch_size: int = 16, split: str = "val",
                 test_tokens_per_source: int | None = None):
        super().__init__(corpus, batch_size, split)
        positive_int("objective.max_tokens_per_source", max_tokens_per_source)
        self.name, self.max_tokens = name, max_tokens_per_source
        self.test_tokens = test_tokens_per_source or max_tokens_per_source
        if weights:
            unknown = sorted(set(weights) - set(corpus.sources))
            if unknown:
                raise UserError(f"objective.weights names unknown source(s) {unknown}; "
                                f"available: {corpus.sources}.")
            full = {s: float(weights.get(s, 0.0)) for s in corpus.sources}
            total = sum(full.values())
            if not total > 0:
                raise UserError(f"objective.weights {dict(weights)} must have a positive sum.")
            self.weights = validate_weights({s: v / total for s, v in full.items()}, corpus.sources,
                                            "objective.weights")
        else:
            self.weights = {s: 1.0 / len(corpus.sources) for s in corpus.sources}

    def build_rows(self, context):
        n = self.test_tokens if self.split == "test" else self.max_tokens
        return {s: _windows_with_mask(self.corpus.tokens[s][self.split], self.corpus.mask(s, self.split), context, n)
                for s, w in self.weights.items() if w > 0}

    def identity(self) -> str:
        return weights_identity(self.weights)


def split_objective_documents(docs: list, lengths) -> dict[str, list[int]] | None:
    """An external objective's documents (their indices) in two independent halves,
    like a source's splits: ordered by a hash of their text (fastmix.data.sources.split_documents'
    order), each goes to the half with fewer tokens so far (`lengths`: each document's
    tokens), so the two hold about the same number of tokens. None for a single
    document (split by blocks of windows instead)."""
    if len(docs) < 2:
        return None
    halves: dict[str, list[int]] = {"val": [], "test": []}
    size = {"val": 0, "test": 0}
    for i in sorted(range(len(docs)), key=lambda i: doc_key(docs[i])):
        side = "val" if size["val"] <= size["test"] else "test"
        halves[side].append(i)
        size[side] += int(lengths[i])
    return halves


def _take(flat, mask, starts, lengths, idx: list[int], docs: list):
    """The tokens (and loss mask) of documents `idx` of a tokenize_documents result, in
    that order, as tokenizing those documents alone gives them (no mask without a pair)."""
    cut = lambda a: np.concatenate([a[starts[i]:starts[i] + lengths[i]] for i in idx])
    has_pair = mask is not None and any(isinstance(docs[i], Pair) for i in idx)
    return cut(flat), (cut(mask) if has_pair else None)


# a single-document text is split by blocks of this many consecutive windows, every
# other block to val: neighbouring windows are alike, so only blocks' edges touch
BLOCK_WINDOWS = 8


def _blocks(items, split: str, block: int):
    """Every other block of `block` items, starting at block 0 for val and 1 for test."""
    first = SPLITS.index(split)
    return items[[i for i in range(len(items)) if (i // block) % 2 == first]]


class TextFileObjective(Objective):
    @dataclass
    class Params(ObjectiveParams):
        path: str = rule()  # a text file or folder: its documents split in two halves, val and test
        test_tokens_per_source: Optional[int] = rule(ge=1)  # the test windows: the eval's, as the sources'

    def __init__(self, corpus: Corpus, path: str, name: str = "text", max_tokens_per_source: int = 65536,
                 batch_size: int = 16, split: str = "val", test_tokens_per_source: int | None = None):
        super().__init__(corpus, batch_size, split)
        positive_int("objective.max_tokens_per_source", max_tokens_per_source)
        self.test_tokens = test_tokens_per_source or max_tokens_per_source
        p = abspath(path)
        if not p.exists():
            raise UserError(f"objective.path {p} does not exist: give a .txt/.jsonl file or a folder of them.")
        docs = list(iter_documents(SourceSpec(name, files_under(p))))
        if not docs:
            raise UserError(f"objective.path {p} holds no text.")
        dtype = "uint32"
        tok = corpus.tokenizer
        self.name, self.max_tokens, self.path = name, max_tokens_per_source, str(p)
        self.weights = {name: 1.0}
        # val and test are independent: by document (a hash, as the sources are split), or
        # for a single document by blocks of windows
        self.tokens, self.mask, lengths = tokenize_documents(tok, docs, dtype)  # once: the halves are slices
        halves = split_objective_documents(docs, lengths)
        if halves is None:
            self.halves = None
            self.split_info = {"by": f"blocks of {BLOCK_WINDOWS} windows", "documents": 1}
        else:
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            self.halves = {sp: _take(self.tokens, self.mask, starts, lengths, idx, docs) for sp, idx in halves.items()}
            self.split_info = {"by": "document", "documents": {sp: len(d) for sp, d in halves.items()},
                               "tokens": {sp: int(len(t)) for sp, (t, _) in self.halves.items()}}

    def build_rows(self, context):
        n = self.test_tokens if self.split == "test" else self.max_tokens
        if self.halves is not None:
            tokens, mask = self.halves[self.split]
            return {self.name: _windows_with_mask(tokens, mask, context, n)}
        # one document: windows for both splits, in blocks, each split's first n tokens of
        # them (the same test windows whatever the val cap); a text too short for two blocks
        # gives every other window
        ids, mask = _windows_with_mask(self.tokens, self.mask, context, 2 * max(self.max_tokens, self.test_tokens))
        block = BLOCK_WINDOWS if len(ids) >= 2 * BLOCK_WINDOWS else 1
        rows = max(1, n // context)
        return {self.name: (_blocks(ids, self.split, block)[:rows],
                            None if mask is None else _blocks(mask, self.split, block)[:rows])}

    def identity(self) -> str:
        return file_identity(Path(self.path))

    def describe(self) -> dict:
        return {**super().describe(), "path": self.path, "val_test_split": self.split_info}


class QAObjective(Objective):
    """Answer-only loss on prompt/answer pairs, one pair per row (left-truncated
    to the context, right-padded; padding and prompt tokens do not count)."""

    @dataclass
    class Params(ObjectiveParams):
        path: Optional[str] = rule()  # a JSONL of prompt/answer pairs; or
        source: Optional[str] = rule()  # a source whose documents are pairs
        max_pairs: int = rule(ge=1)

    def __init__(self, corpus: Corpus, path: str | None = None, source: str | None = None, name: str = "qa",
                 max_pairs: int = 512, max_tokens_per_source: int = 1 << 20, batch_size: int = 16,
                 split: str = "val"):
        super().__init__(corpus, batch_size, split)
        positive_int("objective.max_pairs", max_pairs)
        positive_int("objective.max_tokens_per_source", max_tokens_per_source)
        if (path is None) == (source is None):
            raise UserError("objective=qa needs exactly one of objective.path (a JSONL of "
                            "{prompt, answer} rows) or objective.source (a post-training source).")
        if path is not None:
            p = abspath(path)
            if not p.exists():
                raise UserError(f"objective.path {p} does not exist.")
            pairs = [d for d in iter_documents(SourceSpec(name, files_under(p))) if isinstance(d, Pair)]
            where = str(p)
            if len(pairs) < 2:
                raise UserError(f"objective.path {p} holds {len(pairs)} prompt/answer pair(s) (rows with "
                                f"'prompt' and 'answer'): at least 2 are needed, one to search on and one "
                                f"to score the target on.")
        else:
            if source not in corpus.sources:
                raise UserError(f"objective.source '{source}' is not a source; available: {corpus.sources}.")
            if not corpus.pairs(source, "val") or not corpus.pairs(source, "test"):
                raise UserError(f"objective: source '{source}' has no prompt/answer pairs in its val or test "
                                f"split: rows need 'prompt' and 'answer'.")
            where = f"source '{source}'"
        # a file's pairs in the order of a hash of their text (the sources' split order), then
        # every other one to val and test: neighbours in the file do not land side by side
        self.file_pairs = sorted(pairs, key=doc_key) if path is not None else None
        self.source = source
        self.name, self.where, self.max_pairs, self.max_tokens = name, where, max_pairs, max_tokens_per_source
        self.weights = {name: 1.0}

    @property
    def pairs(self) -> list[Pair]:
        """This split's pairs: the source's own split, or every other pair of the file."""
        if self.file_pairs is not None:
            return _alternate(self.file_pairs, self.split)[:self.max_pairs]  # hash-ordered at load
        return self.corpus.pairs(self.source, self.split)[:self.max_pairs]

    def build_rows(self, context):
        tok = self.corpus.tokenizer
        ids_list, masks = [], []
        # one row of context + 1 tokens per pair, at most max_tokens_per_source // context
        # rows: the same cap, in the same unit, as the other objectives' windows
        for pair in self.pairs[:max(1, self.max_tokens // context)]:
            flat, mask, _ = tokenize_documents(tok, [pair], "int64")
            flat, mask = flat[-(context + 1):], mask[-(context + 1):]  # keep the answer, cut the prompt's start
            pad = context + 1 - len(flat)
            ids_list.append(np.concatenate([flat, np.full(pad, tok.pad_token_id)]))
            masks.append(np.concatenate([mask[1:], np.zeros(pad)]))
        return {self.name: (torch.tensor(np.stack(ids_list), dtype=torch.int64),
                            torch.tensor(np.stack(masks), dtype=torch.float32))}

    def identity(self) -> str:
        return f"qa:source={self.source}" if self.source else file_identity(Path(self.where), "qa")

    def describe(self) -> dict:
        return {**super().describe(), "pairs": len(self.pairs), "from": self.where}


class LandscapeObjective(Objective):
    """What the oracle scores every target of its landscape on: each source's loss on its
    test windows (the eval's, fastmix.run.pipeline.per_source_test_loss) and each registered
    external text's, one group each (and, on the val split with the search objective's
    windows, what a shared proxy is scored on: ProxyRunner.scoring). `losses` gives them all: the landscape's `loss:<group>`
    columns, from which any weighting of the sources, or a registered text, is read without
    training again. The total (groups weighted equally) is not used."""

    @dataclass
    class Params(ObjectiveParams):
        texts: Dict[str, str] = rule()  # name -> a text file or folder
        test_tokens_per_source: int = rule(ge=1)

    def __init__(self, corpus: Corpus, texts: Mapping[str, str] | None = None, test_tokens_per_source: int = 32768,
                 max_tokens_per_source: int = 65536, batch_size: int = 16, split: str = "val",
                 name: str = "landscape"):
        super().__init__(corpus, batch_size, split)
        texts = dict(texts or {})
        clash = sorted(set(texts) & set(corpus.sources))
        if clash:
            raise UserError(f"oracle.texts {clash} are named like sources: a `loss:` column names one group; "
                            f"rename the text(s).")
        self.name = name
        self.parts = [ValidationObjective(corpus, weights=None, max_tokens_per_source=max_tokens_per_source,
                                          test_tokens_per_source=test_tokens_per_source, batch_size=batch_size)]
        self.parts += [TextFileObjective(corpus, path, name=n, max_tokens_per_source=max_tokens_per_source,
                                         batch_size=batch_size, test_tokens_per_source=test_tokens_per_source)
                       for n, path in texts.items()]
        groups = [*corpus.sources, *texts]
        self.weights = {g: 1.0 / len(groups) for g in groups}
        self.text_ids = {p.name: p.identity() for p in self.parts[1:]}

    def build_rows(self, context):
        rows = {}
        for part in self.parts:  # each part cut on this objective's split
            part.split = self.split
            rows.update(part.build_rows(context))
        return rows

    def identity(self) -> str:
        return "landscape:" + ",".join(sorted(self.weights))


def suite_objective(corpus: Corpus, pick: str, suite: Mapping, texts: Mapping[str, str] | None = None,
                    max_tokens_per_source: int = 16384, test_tokens_per_source: int | None = None,
                    batch_size: int = 16, split: str = "val", name: str = "suite") -> Objective:
    """`objective=suite objective.pick=<name>`: an objective of the oracle suite
    (`oracle.suite`, conf/experiment/oracle.yaml) by its name there: a weighting of the
    sources or a registered text (`oracle.texts`). The job then searches for that
    objective; its name is the suite's, its identity its definition."""
    if pick not in suite:
        raise UserError(f"objective.pick '{pick}' is not in oracle.suite; the suite has {sorted(suite)}.")
    d, texts = dict(suite[pick]), dict(texts or {})
    common = dict(max_tokens_per_source=max_tokens_per_source, test_tokens_per_source=test_tokens_per_source,
                  batch_size=batch_size, split=split)
    if "text" in d:
        if d["text"] not in texts:
            raise UserError(f"oracle.suite.{pick}.text '{d['text']}' is not in oracle.texts ({sorted(texts)}).")
        return TextFileObjective(corpus, texts[d["text"]], name=pick, **common)
    return ValidationObjective(corpus, name=pick, weights=dict(d.get("weights") or {}), **common)


@dataclass
class _SuiteParams(ObjectiveParams):
    pick: str = rule()  # a name in oracle.suite
    suite: Dict[str, Dict[str, Any]] = rule()
    texts: Dict[str, str] = rule()
    test_tokens_per_source: Optional[int] = rule(ge=1)


suite_objective.Params = _SuiteParams
