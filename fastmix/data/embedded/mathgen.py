"""Seeded arithmetic / algebra problems with checkable answers.

One generator serves three uses: the `math` source of the embedded corpus
(documents of several "Question: ... / Answer: ..." pairs), QA evaluation
tasks, and post-training prompt/answer pairs. Everything is a pure function of
`(n, seed, kinds)`: the same call gives the same problems on every machine,
because only `random.Random` is used (its integer methods are stable across
Python versions, unlike numpy's, which may change between releases).

Public API
----------
KINDS                                   the problem kinds, in a fixed order
generate_problems(n, seed, kinds=None)  -> list of {"question", "answer", "kind"}
format_qa(problem, with_answer=True)    -> "Question: ...\\nAnswer: ..."
problem_documents(n_docs, seed, per_doc=8) -> corpus documents (str)
parse_qa(text)                          -> the {"question", "answer"} pairs of a document
normalize_answer(s), answers_match(prediction, answer)  lenient answer checking

Every answer is a short string: an integer written without separators
("-42", "1350"). Questions never depend on floating point, so answers are exact.
"""
from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable

Problem = dict  # {"question": str, "answer": str, "kind": str}

_NAMES = ("Alice", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas",
          "Kemi", "Liam", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara")
_ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "shells",
          "cards", "coins", "eggs", "oranges")
_VEHICLES = ("train", "car", "bus", "cyclist", "boat", "truck")


def _add(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(10, 9999), r.randint(10, 9999)
    return f"What is {a} + {b}?", a + b


def _sub(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(10, 9999), r.randint(10, 9999)
    return f"What is {a} - {b}?", a - b


def _mul(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(2, 99), r.randint(2, 999)
    return f"What is {a} * {b}?", a * b


def _div(r: random.Random) -> tuple[str, int]:
    # Built from the answer so the division is always exact.
    b, q = r.randint(2, 99), r.randint(2, 999)
    return f"What is {b * q} / {b}?", q


def _expr(r: random.Random) -> tuple[str, int]:
    # "(a op b) * c" or "(a op b) * c op d": tests precedence, stays integer.
    a, b, c, d = r.randint(1, 50), r.randint(1, 50), r.randint(2, 12), r.randint(1, 50)
    inner = a + b if (op1 := r.choice("+-")) == "+" else a - b
    op2 = r.choice(("", "+", "-"))
    if not op2:
        return f"What is ({a} {op1} {b}) * {c}?", inner * c
    value = inner * c + d if op2 == "+" else inner * c - d
    return f"What is ({a} {op1} {b}) * {c} {op2} {d}?", value


def _linear(r: random.Random) -> tuple[str, int]:
    # a*x + b = c with an integer x chosen first.
    x, a, b = r.randint(-20, 20), r.randint(2, 12), r.randint(-50, 50)
    c = a * x + b
    lhs = f"{a}x + {b}" if b >= 0 else f"{a}x - {-b}"
    return f"Solve for x: {lhs} = {c}.", x


def _system(r: random.Random) -> tuple[str, int]:
    x, y = r.randint(-15, 15), r.randint(-15, 15)
    s, d = x + y, x - y
    return f"If x + y = {s} and x - y = {d}, what is x?", x


def _remainder(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(20, 999), r.randint(3, 19)
    return f"What is the remainder when {a} is divided by {b}?", a % b


def _gcd(r: random.Random) -> tuple[str, int]:
    # A shared factor makes the answer usually more than 1.
    g = r.randint(2, 15)
    a, b = g * r.randint(2, 20), g * r.randint(2, 20)
    return f"What is the greatest common divisor of {a} and {b}?", math.gcd(a, b)


def _lcm(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(2, 30), r.randint(2, 30)
    return f"What is the least common multiple of {a} and {b}?", a * b // math.gcd(a, b)


def _percent(r: random.Random) -> tuple[str, int]:
    # base is a multiple of 20 and p a multiple of 5, so p% of base is an integer.
    p, base = 5 * r.randint(1, 19), 20 * r.randint(1, 50)
    return f"What is {p}% of {base}?", p * base // 100


def _power(r: random.Random) -> tuple[str, int]:
    a, e = r.randint(2, 12), r.randint(2, 4)
    return f"What is {a} to the power of {e}?", a ** e


def _mean(r: random.Random) -> tuple[str, int]:
    # The last value is chosen so the sum divides evenly and stays positive.
    k = r.randint(3, 6)
    vals = [r.randint(1, 99) for _ in range(k - 1)]
    # near the mean of the others, so the last value looks like them
    target = max(-(-(sum(vals) + 1) // k), sum(vals) // (k - 1) + r.randint(-10, 10))
    vals.append(k * target - sum(vals))
    return f"What is the mean of {', '.join(map(str, vals))}?", target


def _word_count(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(5, 60), r.randint(1, 40)
    c = r.randint(1, a + b)
    n1, n2 = r.sample(_NAMES, 2)
    item = r.choice(_ITEMS)
    q = (f"{n1} has {a} {item}. {n1} gets {b} more and then gives {c} to {n2}. "
         f"How many {item} does {n1} have now?")
    return q, a + b - c


def _word_price(r: random.Random) -> tuple[str, int]:
    p, n = r.randint(2, 40), r.randint(2, 25)
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    return f"{item.capitalize()} cost {p} dollars each. How many dollars does {name} pay for {n} {item}?", p * n


def _word_speed(r: random.Random) -> tuple[str, int]:
    v, t = r.randint(5, 120), r.randint(2, 9)
    return f"A {r.choice(_VEHICLES)} travels at {v} km per hour for {t} hours. How many km does it travel?", v * t


def _word_share(r: random.Random) -> tuple[str, int]:
    k, each = r.randint(2, 12), r.randint(2, 30)
    item = r.choice(_ITEMS)
    return (f"{k * each} {item} are shared equally among {k} children. "
            f"How many {item} does each child get?"), each


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, int]]] = {
    "add": _add, "sub": _sub, "mul": _mul, "div": _div, "expr": _expr, "linear": _linear,
    "system": _system, "remainder": _remainder, "gcd": _gcd, "lcm": _lcm, "percent": _percent,
    "power": _power, "mean": _mean, "word_count": _word_count, "word_price": _word_price,
    "word_speed": _word_speed, "word_share": _word_share,
}
KINDS: tuple[str, ...] = tuple(_GENERATORS)


def generate_problems(n: int, seed: int, kinds: Iterable[str] | None = None) -> list[Problem]:
    """`n` problems, each `{"question": str, "answer": str, "kind": str}`.

    Deterministic in `(n, seed, kinds)`; the first `m` problems of a call with
    `n > m` are the problems of the call with `m` (a prefix), so asking for more
    never changes the ones already used. Kinds are drawn uniformly from `kinds`
    (default: all of KINDS).
    """
    kinds = tuple(kinds) if kinds is not None else KINDS
    unknown = [k for k in kinds if k not in _GENERATORS]
    if unknown or not kinds:
        raise ValueError(f"unknown problem kinds {unknown or '(none given)'}; choose from {list(KINDS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.choice(kinds)
        question, answer = _GENERATORS[kind](rng)
        out.append({"question": question, "answer": str(answer), "kind": kind})
    return out


def format_qa(problem: Problem, with_answer: bool = True) -> str:
    """"Question: ...\\nAnswer: ..." (a prompt ending in "Answer:" without the answer)."""
    text = f"Question: {problem['question']}\nAnswer:"
    return f"{text} {problem['answer']}" if with_answer else text


def problem_documents(n_docs: int, seed: int, per_doc: int = 8) -> list[str]:
    """Corpus documents: `per_doc` formatted problems each, separated by a blank line."""
    probs = generate_problems(n_docs * per_doc, seed)
    return ["\n\n".join(format_qa(p) for p in probs[i:i + per_doc]) for i in range(0, len(probs), per_doc)]


_QA_RE = re.compile(r"^Question: (.+?)\nAnswer: (.+?)$", re.MULTILINE)


def parse_qa(text: str) -> list[dict]:
    """The `{"question", "answer"}` pairs of a document made by `problem_documents`
    (e.g. to build QA tasks from the held-out split of the math source)."""
    return [{"question": q, "answer": a.strip()} for q, a in _QA_RE.findall(text)]


def normalize_answer(s: str) -> str:
    """A model's answer reduced to its first number ("The answer is 1,350." -> "1350");
    the stripped text when it has none."""
    m = re.search(r"-?\d[\d,]*(?:\.\d+)?", s)
    if not m:
        return s.strip()
    num = m.group(0).replace(",", "")
    if "." in num:  # "42.0" -> "42"; other decimals stay as written
        whole, frac = num.split(".")
        num = whole if set(frac) == {"0"} else num
    return num


def answers_match(prediction: str, answer: str) -> bool:
    """True when the prediction's first number equals the gold answer."""
    return normalize_answer(prediction) == normalize_answer(answer)
