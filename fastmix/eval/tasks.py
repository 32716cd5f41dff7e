"""The offline evaluation suite (`eval=local`): lm-eval tasks generated from the
*test* split of the corpus, so they run with no network and move with the mixture.

Every task is 4-way multiple choice scored by lm-eval's loglikelihood ranking
(`output_type: multiple_choice`): the model sees a context and each choice is
scored by log P(choice | context); lm-eval reports `acc` (gold ranked first),
`acc_norm` (log-prob divided by the choice's length in characters) and
`acc_mutual_info` (log-prob minus the choice's log-prob after EOS alone)
(lm-eval docs/task_guide.md, "multiple_choice"; lm_eval/api/task.py). The
primary metric is acc_mutual_info for continuation and cloze tasks, acc for
the QA tasks (see METRICS below). Chance is 0.25 on every task. The tasks:

* `cont_<source>` (every source): a context cut from a test document and the
  true next chunk among 3 chunks cut the same way from *other* test documents
  of the same source. Line-structured sources (code, verse, dialogue, math)
  cut at line ends and a chunk is the next line(s), until it holds 20
  non-space characters (a line of code); prose cuts between words and a chunk
  is the next 10-20 words.
* `cloze_<source>` (prose sources): LAMBADA-like: the context ends just before
  the last word of a sentence; choices are that word and 3 other
  sentence-final words of the source's test split. Multiple choice, not
  greedy exact match:
  tiny models almost never produce a whole word greedily, so greedy accuracy
  sits at ~0 for every mixture and would not rank them.
* `factbook_qa` (when a `reference` source exists): "The <field> of <place>
  is <value>." sentences, or "Field: value" lines under a title line naming
  the place ("Angola: Geography", the embedded corpus's layout), in the
  test documents become open-book questions: a passage of the document that
  states the fact, then "Question: What is the <field> of <place>?"; the
  distractors are values of the same field for other places. (Closed-book
  questions would be unanswerable: a place's facts live in one document, and
  test documents are never trained on.)
* `math_qa` (when a `math` source exists): the "Question: ... Answer: N"
  problems of the test documents with 3 numeric near-misses as distractors
  (the gold answer's rank among the 4 is uniform, so "pick the middle" is no
  shortcut).

Why an untrained model sits at chance: the gold choice and its distractors
are drawn from the same pool by the same rule (cut points and chunk lengths;
distinct words or fact values, uniformly; evenly spaced numbers), so no
scoring rule that ignores the meaning of the context can prefer the gold one. Every choice of an item shares the gold
choice's leading whitespace (the text between context and choice), so
whitespace is no cue either. (acc_mutual_info of an untrained model reacts
to the context at random, so it spreads more around chance than acc: sd up
to 0.07 over initialisations, on a source whose lines come in two kinds.)

Only one split's documents are read: `corpus.documents(source, "test")` for the
suite that scores targets, `"val"` for the one a search may score with (DeMix's
`score: suite`); the split is part of the folder's key. When the split holds
fewer items than `n_per_task`, windows at other positions of the same
documents are used; a task keeps as many distinct items as exist (at most
`n_per_task`) and is left out, with a log line, when it has none.

Output, under `out_dir/<key>/` where key hashes the corpus cache key
(`corpus.root.name`) and every setting: `<task>.jsonl` (context, choices,
label), `<task>.yaml` (an lm-eval task config; `dataset_path: json` with an
absolute `data_files` path) and `suite.json` (the manifest returned by
`build_local_suite`). The folder is built under a temporary name and renamed,
so a suite is either complete or absent, and a second call reads the manifest
and does no work.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from fastmix.data.corpus import check_not_sealed
from fastmix.errors import UserError
from fastmix.records import building_dir, write_json, write_jsonl, write_text_atomic

log = logging.getLogger(__name__)

SUITE_FORMAT = 11  # bump when the generators change, so cached suites are rebuilt
N_CHOICES = 4
CONTEXT_CHARS = 300  # fits ~100 tokens: inside the context of every proxy/target config
MIN_CONTEXT_CHARS = 40  # non-space characters a context needs to say anything
MAX_PER_ANSWER = 5  # cloze/factbook items sharing one gold word or value, at most (see cloze_items)
MAX_CHUNK_CHARS = 120  # ~30-60 tokens: a choice must fit a 64-token smoke model with some context
QA_SOURCES = {"factbook_qa": "reference", "math_qa": "math"}  # task -> the source it needs
# lm-eval's multiple-choice metrics: acc = argmax log P(choice | context);
# acc_norm divides by the choice's length in characters; acc_mutual_info ranks
# by log P(choice | context) - log P(choice | EOS), the part of the likelihood
# the context explains. Continuations and cloze words of one source differ a
# lot in how likely they are on their own, which drowns the context's signal in
# acc for small models (a 2-layer model trained for ~30 s: cont_dialogue
# 0.35 acc vs 0.68 acc_mutual_info); the QA tasks' choices are all of one kind
# (numbers, values of one field), and there acc is the better measure.
METRICS = ["acc", "acc_norm", "acc_mutual_info"]
PRIMARY_METRIC = {"continuation": "acc_mutual_info", "cloze": "acc_mutual_info",
                  "factbook_qa": "acc", "math_qa": "acc"}


@dataclass
class Item:
    context: str
    choices: list[str]
    label: int
    doc: int  # index of the test document the gold answer comes from
    pos: int  # character offset of the gold answer in that document

    def row(self) -> dict:
        return {"context": self.context, "choices": self.choices, "label": self.label,
                "doc": self.doc, "pos": self.pos}


# ------------------------------------------------------------- text units ---
def is_line_structured(docs: list[str]) -> bool:
    """Code, verse, dialogue and Q/A text are written in short lines; prose in
    paragraphs (or lines wrapped at ~75 characters). The median words per
    non-empty line tells them apart."""
    words = sorted(len(line.split()) for d in docs[:200] for line in d.splitlines() if line.strip())
    return bool(words) and words[len(words) // 2] <= 9


_SPACE, _SPACE_OR_NONE, _WORD = re.compile(r"\s+"), re.compile(r"\s*"), re.compile(r"\S+")
_WORDLIKE = re.compile(r"^[\"'(\[]*[A-Za-z][a-z'’-]*[.,;:!?\"')\]]*$")


def is_prose(docs: list[str]) -> bool:
    """Most whitespace-separated tokens are plain words (code and formulas are
    not): such a source gets a cloze task."""
    toks = [t for d in docs[:200] for t in d[:20000].split()]
    return len(toks) >= 50 and sum(bool(_WORDLIKE.match(t)) for t in toks) / len(toks) >= 0.7


def _start_after_boundary(text: str, start: int, end: int, lines: bool) -> int:
    """Move a window start forward to a line start (line mode, if one is in the
    first half of the window) or a word start, so a context never opens mid-word."""
    if start == 0:
        return 0
    if lines:
        nl = text.find("\n", start, start + (end - start) // 2)
        if nl >= 0:
            return nl + 1
    m = _SPACE.search(text, start, end)
    return m.end() if m else end


def _context(text: str, end: int, chars: int, lines: bool) -> str | None:
    start = _start_after_boundary(text, max(0, end - chars), end, lines)
    ctx = text[start:end].lstrip()
    return ctx if len("".join(ctx.split())) >= MIN_CONTEXT_CHARS else None


def _cut_points(text: str, lines: bool) -> list[int]:
    """Where a context may end: at the end of a non-blank line (line mode) or
    after any word (word mode); the gold chunk starts at the next non-space."""
    pat = r"(?<=\S)[^\S\n]*\n" if lines else r"(?<=\S)\s"
    return [m.start() for m in re.finditer(pat, text) if m.start() >= MIN_CONTEXT_CHARS]


def _chunk(text: str, cut: int, lines: bool, rng: random.Random) -> tuple[str, str] | None:
    """(separator, content) following a cut point: the whitespace up to the next
    non-space, and the next line(s) with >= 20 non-space characters (at most 4
    lines) or the next 10-20 words, at most MAX_CHUNK_CHARS. None if the text
    ends first."""
    body = _SPACE_OR_NONE.match(text, cut).end()
    if body >= len(text):
        return None
    sep = text[cut:body]
    if lines:
        end, nonspace, n_lines = body, 0, 0
        while end < len(text) and n_lines < 4 and nonspace < 20:
            nl = text.find("\n", end)
            nl = len(text) if nl < 0 else nl
            line = text[end:nl]
            if line.strip():
                n_lines += 1
                nonspace += len("".join(line.split()))
            end = nl + 1
        content = text[body:min(end, len(text))].rstrip()
    else:
        end = _next_words(text, body, rng.randint(10, 20))
        if end is None:
            return None
        content = text[body:end]
    if len(content) > MAX_CHUNK_CHARS:  # long lines/words: keep choices inside small models' context
        content = content[:MAX_CHUNK_CHARS].rsplit(None, 1)[0]
    return (sep, content) if content.strip() else None


def _next_words(text: str, start: int, k: int) -> int | None:
    """End offset of the k-th word from `start`, or None if fewer remain."""
    for i, m in enumerate(_WORD.finditer(text, start)):
        if i + 1 == k:
            return m.end()
    return None


def _norm(s: str) -> str:
    return " ".join(s.split()).lower()


def _from_other_doc(rng: random.Random, entries: list[tuple[int, int]], doc: int,
                    multi_doc: bool) -> tuple[int, int]:
    """A random (document, position) entry of another document (any, if the split has one)."""
    for _ in range(100):
        d, p = rng.choice(entries)
        if d != doc or not multi_doc:
            return d, p
    return rng.choice(entries)


def _shuffled_with_gold(rng: random.Random, gold: str, others: list[str]) -> tuple[list[str], int]:
    choices = [gold] + others
    order = list(range(len(choices)))
    rng.shuffle(order)
    return [choices[i] for i in order], order.index(0)


# ----------------------------------------------------------------- tasks ---
def continuation_items(docs: list[str], n: int, rng: random.Random, context_chars: int) -> list[Item]:
    """Pick the true next chunk: gold and distractors are chunks at random cut
    points of the same source, the distractors from other documents."""
    lines = is_line_structured(docs)
    pool = [(d, c) for d, text in enumerate(docs) for c in _cut_points(text, lines)]
    multi_doc = len({d for d, _ in pool}) > 1
    items: list[Item] = []
    for d, cut in rng.sample(pool, len(pool)):  # every position at most once
        if len(items) >= n:
            break
        ctx = _context(docs[d], cut, context_chars, lines)
        gold = _chunk(docs[d], cut, lines, rng)
        if ctx is None or gold is None:
            continue
        sep, content = gold
        seen, others = {_norm(content)}, []
        for _ in range(50):
            if len(others) == N_CHOICES - 1:
                break
            d2, c2 = _from_other_doc(rng, pool, d, multi_doc)
            if not multi_doc and abs(c2 - cut) < 2 * context_chars:
                continue  # one test document: take distractors far from the gold position
            alt = _chunk(docs[d2], c2, lines, rng)
            if alt is not None and _norm(alt[1]) not in seen:
                seen.add(_norm(alt[1]))
                others.append(sep + alt[1])
        if len(others) < N_CHOICES - 1:
            continue
        choices, label = _shuffled_with_gold(rng, sep + content, others)
        items.append(Item(ctx, choices, label, d, cut))
    return items


_FINAL_WORD = re.compile(r"(\s+)([A-Za-z][A-Za-z'’-]{2,})(?=[.!?][\"')\]]*(?:\s|$))")


def _other_types(rng: random.Random, types: list[str], gold: str) -> list[str]:
    """3 distinct types other than the gold one, uniformly."""
    others = []
    while len(others) < N_CHOICES - 1:
        t = rng.choice(types)
        if t != gold and t not in others:
            others.append(t)
    return others


def cloze_items(docs: list[str], n: int, rng: random.Random, context_chars: int) -> list[Item]:
    """LAMBADA-like: predict the last word of a sentence from the text before it.
    The gold word and the distractors are drawn uniformly over the distinct
    sentence-final words (then an occurrence of the gold one): drawn by
    occurrence, one frequent word ("est." in "(2024 est.)") would be the gold
    answer of half the items and never a distractor, and an untrained model's
    fixed taste for it would swing the score far from chance."""
    by_word: dict[str, list[tuple[int, int, str, str]]] = {}  # word -> (doc, pos, separator, spelling)
    for d, text in enumerate(docs):
        for m in _FINAL_WORD.finditer(text):
            if m.start() >= MIN_CONTEXT_CHARS:
                by_word.setdefault(m.group(2).lower(), []).append((d, m.start(), m.group(1), m.group(2)))
    types = sorted(by_word)
    items: list[Item] = []
    used: set[tuple[int, int]] = set()
    # at most MAX_PER_ANSWER items per gold word (more if needed to reach n with
    # every word): a frequent word must not fill the task once rarer ones run out
    per_type, cap = Counter(), max(MAX_PER_ANSWER, -(-n // max(1, len(types))))
    for _ in range(20 * n if len(types) >= N_CHOICES else 0):
        if len(items) >= n:
            break
        gold = rng.choice(types)
        d, pos, sep, word = rng.choice(by_word[gold])
        if (d, pos) in used or per_type[gold] >= cap:
            continue
        used.add((d, pos))
        per_type[gold] += 1
        ctx = _context(docs[d], pos, context_chars, lines=False)
        if ctx is None:
            continue
        others = [sep + rng.choice(by_word[t])[3] for t in _other_types(rng, types, gold)]
        choices, label = _shuffled_with_gold(rng, sep + word, others)
        items.append(Item(ctx, choices, label, d, pos))
    return items


# "The capital of France is Paris." / "The population of the Bahamas is 410,862 (2024 est.)."
# The value ends at a period followed by whitespace or the end (so "est." and "1.5" stay inside).
_FACT_SENTENCE = re.compile(
    r"\bThe ([a-z][a-z\- ]{1,40}?) of ((?:the )?[A-Z][\w'’.,()\- ]{0,60}?) (?:is|are) "
    r"((?:[^.\n]|\.(?!\s|$)){1,80}?)\.(?=\s|$)")
_FIELD_LINE = re.compile(r"^(-[^\S\n]*)?([A-Za-z][\w\-,()' ]{1,50}):[^\S\n]*([^\n]{0,80})$", re.MULTILINE)
_TITLE = re.compile(r"^([^:\n]{1,60})(?::[^:\n]{0,40})?$")  # "Angola" or "Angola: Geography"
_UNIT_END = re.compile(r"[.!?][\"')\]]*[^\S\n]+|\n")  # where a sentence or a line ends


@dataclass
class Fact:
    doc: int
    start: int  # span of the sentence or line stating the fact
    end: int
    field: str
    place: str
    value: str


def extract_facts(docs: list[str]) -> list[Fact]:
    """Facts stated as "The <field> of <place> is <value>." sentences, or as
    "Field: value" lines (and "- part: value" lines under a "Field:" line) in
    a document whose first line names the place ("Angola: Geography")."""
    facts = []
    for d, text in enumerate(docs):
        for m in _FACT_SENTENCE.finditer(text):
            if len(m.group(3).split()) <= 12:
                facts.append(Fact(d, m.start(), m.end(), m.group(1).strip(), m.group(2).strip(),
                                  m.group(3).strip()))
        title = _TITLE.match(text.strip().split("\n", 1)[0].strip())
        if title is None:
            continue
        place, parent = title.group(1).strip(), None
        for m in _FIELD_LINE.finditer(text, len(text.split("\n", 1)[0])):
            sub, name, value = m.group(1), m.group(2).strip(), m.group(3).strip()
            if not sub:
                parent = name if not value else None
            if not value or len(value.split()) > 12 or (sub and parent is None):
                continue
            field_ = f"{parent} ({name})" if sub else name
            facts.append(Fact(d, m.start(), m.end(), field_.lower(), place, value))
    return facts


def _passage(text: str, start: int, end: int, chars: int, rng: random.Random) -> str:
    """Whole sentences/lines around [start, end), at most ~`chars` long, with the
    fact at a random place in the passage (line breaks kept, spaces collapsed)."""
    lo = rng.randint(max(0, end - chars), start)
    cuts = [0] + [m.end() for m in _UNIT_END.finditer(text)]
    a = min((c for c in cuts if lo <= c <= start), default=start)
    b = max((c for c in cuts if end <= c <= a + chars), default=end)
    return re.sub(r"[^\S\n]+", " ", text[a:max(b, end)]).strip()


def factbook_items(docs: list[str], n: int, rng: random.Random, context_chars: int) -> list[Item]:
    """Open-book questions: each place's facts live in one document, and test
    documents are never trained on, so a closed-book question about them would
    be unanswerable by construction. The question therefore comes after a
    passage of the document that states the fact (as SciQ gives its support
    text); the distractors are values of the same field for other places."""
    facts = extract_facts(docs)
    # The gold value and the distractors are drawn uniformly over the field's
    # distinct values (as cloze words are; a value like "Africa" or "0 sq km"
    # would otherwise be gold often and a distractor never).
    by_value: dict[str, dict[str, list[Fact]]] = {}  # field -> normalised value -> facts
    for f in facts:
        by_value.setdefault(f.field, {}).setdefault(_norm(f.value), []).append(f)
    usable = [f for f in facts if len(by_value[f.field]) >= N_CHOICES]
    items, seen, per_value = [], set(), Counter()
    cap = max(MAX_PER_ANSWER, -(-n // max(1, len({(f.field, _norm(f.value)) for f in usable}))))
    # Several windows (and distractor draws) per fact when facts are fewer than n.
    for _ in range(20 * n if usable else 0):
        if len(items) >= n:
            break
        field_ = rng.choice(usable).field  # fields in proportion to their facts
        values = by_value[field_]
        types = sorted(values)
        gold = rng.choice(types)
        if per_value[(field_, gold)] >= cap:
            continue
        f = rng.choice(values[gold])
        question = f"\nQuestion: What is the {f.field} of {f.place}?\nAnswer:"
        # passage + question within context_chars, so the fact survives left-truncation
        budget = max(f.end - f.start, context_chars - len(question))
        ctx = _passage(docs[f.doc], f.start, f.end, budget, rng) + question
        if ctx in seen:
            continue
        seen.add(ctx)
        per_value[(field_, gold)] += 1
        others = [" " + rng.choice(values[t]).value for t in _other_types(rng, types, gold)]
        choices, label = _shuffled_with_gold(rng, " " + f.value, others)
        items.append(Item(ctx, choices, label, f.doc, f.start))
    return items


_PROBLEM = re.compile(r"Question:[^\S\n]*(\S.*?)(\s*)\bAnswer:([^\S\n]*)(\S[^\n]*?)[^\S\n]*(?=\n|$)", re.DOTALL)
_INT = re.compile(r"^-?\d+$")
_DEC = re.compile(r"^-?\d+\.(\d+)$")


def numeric_distractors(answer: str, rng: random.Random) -> list[str] | None:
    """3 near misses around an integer or decimal answer: 4 evenly spaced values
    with the gold one at a uniformly random rank (and no sign change for a
    non-negative answer), in the answer's own format. None for other answers."""
    if _INT.match(answer):
        scale, value = 1, int(answer)
    elif (m := _DEC.match(answer)):
        scale, value = 10 ** len(m.group(1)), round(float(answer) * 10 ** len(m.group(1)))
    else:
        return None
    step = rng.randint(1, max(1, abs(value) // 10 + 1)) if scale == 1 else rng.randint(1, 9)
    ranks = [j for j in range(N_CHOICES) if value < 0 or value - j * step >= 0]
    j = rng.choice(ranks)
    vals = [value + (i - j) * step for i in range(N_CHOICES) if i != j]

    def fmt(v: int) -> str:
        if scale == 1:
            return str(v)
        s = f"{abs(v) / scale:.{len(str(scale)) - 1}f}"
        return ("-" if v < 0 else "") + s
    return [fmt(v) for v in vals]


def math_items(docs: list[str], n: int, rng: random.Random, context_chars: int) -> list[Item]:
    """The generated problems of the test split, gold answer among 3 near misses
    (answers that are not numbers: among 3 other such answers)."""
    problems = [(d, m) for d, text in enumerate(docs) for m in _PROBLEM.finditer(text)]
    non_numeric = sorted({m.group(4) for _, m in problems
                          if not (_INT.match(m.group(4)) or _DEC.match(m.group(4)))})
    items = []
    for d, m in rng.sample(problems, len(problems)):
        if len(items) >= n:
            break
        question, gap, sep, answer = m.group(1).strip(), m.group(2), m.group(3) or " ", m.group(4)
        if len(question) > context_chars:
            continue
        others = numeric_distractors(answer, rng)
        if others is None:
            pool = [a for a in non_numeric if a != answer]
            if len(pool) < N_CHOICES - 1:
                continue
            others = rng.sample(pool, N_CHOICES - 1)
        ctx = f"Question: {question}{gap or ' '}Answer:"
        choices, label = _shuffled_with_gold(rng, sep + answer, [sep + o for o in others])
        items.append(Item(ctx, choices, label, d, m.start(4)))
    return items


Generator = Callable[[list[str], int, random.Random, int], list[Item]]


def plan_tasks(docs: dict[str, list[str]]) -> dict[str, tuple[str, str, Generator]]:
    """Every task that applies to these sources: name -> (source, kind, generator)."""
    plan: dict[str, tuple[str, str, Generator]] = {}
    for source, texts in docs.items():
        slug = re.sub(r"\W", "_", source)
        plan[f"cont_{slug}"] = (source, "continuation", continuation_items)
        if is_prose(texts):
            plan[f"cloze_{slug}"] = (source, "cloze", cloze_items)
    for task, source in QA_SOURCES.items():
        if source in docs:
            plan[task] = (source, task, factbook_items if task == "factbook_qa" else math_items)
    return plan


# ------------------------------------------------------------------ suite ---
def _task_config(name: str, data_file: Path, source: str, kind: str) -> dict:
    """An lm-eval task config (docs/task_guide.md): the JSONL fields are used by
    name (`doc_to_text: context` returns doc["context"] verbatim), and the
    choices carry their own leading whitespace, hence `target_delimiter: ""`."""
    return {
        "task": name,
        "tag": ["fastmix_local"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",
        "num_fewshot": 0,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
        "metadata": {"version": SUITE_FORMAT, "source": source, "kind": kind,
                     "primary_metric": PRIMARY_METRIC[kind], "chance": 1 / N_CHOICES},
    }


def suite_key(corpus, n_per_task: int, seed: int, tasks: list[str] | None, context_chars: int,
              split: str = "test") -> str:
    settings = {"corpus": Path(corpus.root).name, "split": split, "n_per_task": n_per_task, "seed": seed,
                "tasks": sorted(tasks) if tasks else None, "context_chars": context_chars,
                "format": SUITE_FORMAT}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _select(plan: dict, tasks: list[str] | None) -> dict:
    if not tasks:
        return plan
    chosen = {}
    for pattern in tasks:
        hits = fnmatch.filter(plan, pattern)
        if not hits:
            raise UserError(f"eval.tasks: '{pattern}' matches no task of this corpus; "
                            f"available: {sorted(plan)}.")
        chosen.update({h: plan[h] for h in hits})
    return {k: plan[k] for k in plan if k in chosen}


def build_local_suite(corpus, out_dir: Path, n_per_task: int = 200, seed: int = 0,
                      tasks: list[str] | None = None, context_chars: int = CONTEXT_CHARS,
                      split: str = "test") -> dict:
    """Generate (or reuse) the offline suite for `corpus`, from one split's documents:
    `test` for scoring targets, `val` for a search that scores with the suite (DeMix's
    `score: suite`); the two are separate folders and share no document.

    Returns the manifest {task: {"yaml": path, "metric": primary metric, "metrics": [...],
    "examples": n, "chance": 0.25, "num_fewshot": 0, "source": s, "kind": k}};
    `evaluation.evaluate_suite` takes it as is. `tasks`: names or glob
    patterns (`cont_*`); None = every task that applies to the corpus.
    """
    if n_per_task < 1:
        raise UserError(f"eval.n_per_task must be >= 1, got {n_per_task}.")
    if split not in ("val", "test"):
        raise ValueError(f"a task suite is built from the val or test split, not {split!r}")
    if split == "test":  # a cached suite too: a search may not score on it (fastmix.data)
        check_not_sealed("the test-split task suite")
    out_dir = Path(out_dir).resolve()
    key = suite_key(corpus, n_per_task, seed, list(tasks) if tasks else None, context_chars, split)
    root = out_dir / key
    if (root / "suite.json").exists():
        return json.loads((root / "suite.json").read_text())["tasks"]

    docs = {s: corpus.documents(s, split) for s in corpus.sources}  # held-out text only
    plan = _select(plan_tasks(docs), list(tasks) if tasks else None)

    with building_dir(root, "suite.json") as tmp:
        manifest = {}
        for name, (source, kind, generate) in plan.items():
            # One RNG per task, seeded by name: a task's items do not depend on
            # which other tasks were asked for.
            rng = random.Random(f"{seed}:{name}")
            items = generate(docs[source], n_per_task, rng, context_chars)
            if not items:  # never write an empty JSONL: datasets fails on it with a bare StopIteration
                log.warning("eval suite: no %s items in the %s split of '%s'; task %s left out",
                            kind, split, source, name)
                continue
            if len(items) < n_per_task:
                log.warning("eval suite: %s has %d items (asked for %d): the %s split of '%s' "
                            "holds no more", name, len(items), n_per_task, split, source)
            write_jsonl(tmp / f"{name}.jsonl", [it.row() for it in items])
            config = _task_config(name, root / f"{name}.jsonl", source, kind)
            write_text_atomic(tmp / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
            manifest[name] = {"yaml": str(root / f"{name}.yaml"), "metric": PRIMARY_METRIC[kind],
                              "metrics": METRICS, "examples": len(items), "chance": 1 / N_CHOICES,
                              "num_fewshot": 0, "source": source, "kind": kind}
        if not manifest:
            raise UserError(f"eval=local: no task could be generated from the {split} split; the "
                            f"corpus needs more held-out text (raise data.splits.{split}).")
        write_json(tmp / "suite.json", {"corpus": Path(corpus.root).name, "split": split, "seed": seed,
                                        "n_per_task": n_per_task, "context_chars": context_chars,
                                        "format": SUITE_FORMAT, "tasks": manifest})
    return json.loads((root / "suite.json").read_text())["tasks"]
