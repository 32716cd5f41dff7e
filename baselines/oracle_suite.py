"""The oracle suite's pieces: objectives as weightings of a landscape's loss columns,
and the design of mixtures a landscape is trained on (ours; no paper).

An objective of the suite is a weighting of `loss:` columns: a weighting of the
sources (`loss:<source>`) or one registered external text (`loss:<text name>`).
It is identified by its definition (fastmix.search.objective: `w:a=0.5,b=0.5`,
`text:<sha256 of the file, 12 hex>`), not by its name, so two names for the same
weighting are one objective and `val` is not an identity. Each has a `role`:
`tuning` (a small-scale rule of any method may be chosen on these) or `held_out`
(never used to choose anything; the leaderboard reports them apart).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np

from fastmix.errors import UserError
from fastmix.search.objective import TextFileObjective, ValidationObjective, weights_identity

ROLES = ("tuning", "held_out")


def parse_weights(spec: str, sources: list[str]) -> dict[str, float]:
    """'src:w,src:w' (the analysis tool's --objective) -> normalised weights by source."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        src, _, w = part.partition(":")
        if src not in sources:
            raise UserError(f"--objective: '{src}' is not a source of this landscape; sources: {sources}.")
        try:
            out[src] = float(w)
        except ValueError:
            raise UserError(f"--objective: '{part}' needs a weight, as in {src}:0.5.") from None
        if out[src] < 0:
            raise UserError(f"--objective: weight {part} is negative.")
    if not out or sum(out.values()) <= 0:
        raise UserError(f"--objective '{spec}' has no positive weight: write it as src:w,src:w.")
    total = sum(out.values())
    return {s: v / total for s, v in out.items()}


def suite_entries(suite: Mapping, sources: list[str], text_ids: Mapping[str, str]) -> list[dict]:
    """The suite's objectives as rows: name, role, id, definition, columns (loss column ->
    weight). `text_ids`: each registered text's identity (the landscape scored them)."""
    rows, seen = [], {}
    for name, d in suite.items():
        d = dict(d)
        role = d.get("role", "held_out")
        if role not in ROLES:
            raise UserError(f"oracle.suite.{name}.role '{role}' is unknown: use one of {ROLES}.")
        if ("weights" in d) == ("text" in d):
            raise UserError(f"oracle.suite.{name} needs exactly one of `weights` (source -> weight) or "
                            f"`text` (a name in oracle.texts).")
        if "text" in d:
            if d["text"] not in text_ids:
                raise UserError(f"oracle.suite.{name}.text '{d['text']}' is not in oracle.texts "
                                f"({sorted(text_ids)}): register the file there.")
            ident, cols, definition = text_ids[d["text"]], {f"loss:{d['text']}": 1.0}, f"text {d['text']}"
        else:
            w = {s: float(v) for s, v in d["weights"].items()}
            unknown = sorted(set(w) - set(sources))
            if unknown or not sum(w.values()) > 0:
                raise UserError(f"oracle.suite.{name}.weights {w}: " + (f"unknown source(s) {unknown}; sources: "
                                f"{sources}." if unknown else "needs a positive sum."))
            ident = weights_identity(w)
            cols = {f"loss:{s}": v / sum(w.values()) for s, v in w.items() if v > 0}
            definition = ident[2:]
        if ident in seen:
            raise UserError(f"oracle.suite.{name} and .{seen[ident]} are one objective ({ident}): drop one.")
        seen[ident] = name
        rows.append({"name": name, "role": role, "id": ident, "definition": definition, "columns": cols})
    return rows


def objective_columns(objective, text_ids: Mapping[str, str]) -> dict[str, float]:
    """A job's objective as a weighting of the landscape's columns."""
    if isinstance(objective, ValidationObjective):
        return {f"loss:{s}": w for s, w in objective.weights.items() if w > 0}
    if isinstance(objective, TextFileObjective):
        for name, ident in text_ids.items():
            if ident == objective.identity():
                return {f"loss:{name}": 1.0}
        raise UserError(f"objective text {objective.path} is not scored by the oracle's landscape: register it, "
                        f"'+oracle.texts.{objective.name}={objective.path}', so every target is scored on it.")
    raise UserError(f"the oracle scores weightings of sources and registered texts; objective "
                    f"'{objective.name}' ({type(objective).__name__}) is neither.")


def simplex_grid(k: int, resolution: int) -> list[tuple[int, ...]]:
    """Every way to split `resolution` units over k sources (counts summing to R), in
    lexicographic order from the first source's corner: the weights are counts / R."""
    out = []
    for bars in itertools.combinations(range(resolution + k - 1), k - 1):  # stars and bars
        edges = (-1, *bars, resolution + k - 1)
        out.append(tuple(edges[i + 1] - edges[i] - 1 for i in range(k)))
    return sorted(out, reverse=True)


def grid_design(sources: list[str], resolution: int) -> list[tuple[str, dict[str, float]]]:
    """(label, weights) of every mixture of the 1/R grid."""
    return [("-".join(map(str, c)), {s: n / resolution for s, n in zip(sources, c)})
            for c in simplex_grid(len(sources), resolution)]


def space_filling_design(sources: list[str], natural: Mapping[str, float], interior: int,
                         seed: int = 0) -> list[tuple[str, dict[str, float]]]:
    """A design for K >= 5, where a grid fine enough to hold blends is too large (K = 6,
    R = 3 has no mixture of more than 3 sources): every vertex, every edge's midpoint,
    the centre, the natural mixture and `interior` Dirichlet(1) draws (uniform over the
    simplex), the fit doing the interpolation. Weights rounded to 1e-4, summing to 1."""
    k = len(sources)
    eye = np.eye(k)
    points = [("vertex_" + s, eye[i]) for i, s in enumerate(sources)]
    points += [(f"mid_{a}_{b}", (eye[i] + eye[j]) / 2) for (i, a), (j, b) in itertools.combinations(enumerate(sources), 2)]
    points.append(("centre", np.full(k, 1.0 / k)))
    points.append(("natural", np.array([natural[s] for s in sources], float)))
    draws = np.random.default_rng(seed).dirichlet(np.ones(k), size=interior)
    points += [(f"dirichlet_{i:02d}", d) for i, d in enumerate(draws)]
    out = []
    for label, w in points:
        w = np.round(np.asarray(w, float) / w.sum(), 4)
        w[np.argmax(w)] += 1.0 - w.sum()  # exact sum after rounding
        out.append((label, {s: float(v) for s, v in zip(sources, w)}))
    return out


def design_size(k: int, design: str, resolution: int, interior: int) -> int:
    return math.comb(resolution + k - 1, k - 1) if design == "grid" else k + math.comb(k, 2) + 2 + interior
