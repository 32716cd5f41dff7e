"""The mixture-optimizer protocol: every method (FastMix and the baselines) is a
class with `search(ctx) -> SearchResult`, built by Hydra from
`conf/optimizer/<name>.yaml` through its `_target_`.

The context hands a method everything it may use, and nothing else: the
tokenized sources, the objective, a proxy factory, the one training loop
(`ctx.train_proxy`) and the one cost meter, so that every method pays for its
proxies the same way.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


from fastmix.cost import CostMeter
from fastmix.data import Corpus
from fastmix.errors import UserError


def validate_weights(weights: dict[str, float], sources: list[str], what: str = "mixture weights",
                     atol: float = 1e-6) -> dict[str, float]:
    """Finite, non-negative, summing to 1, keyed by exactly the source names."""
    if set(weights) != set(sources):
        extra, missing = sorted(set(weights) - set(sources)), sorted(set(sources) - set(weights))
        raise UserError(f"{what} must name exactly the sources {sources}: "
                        f"unknown {extra}, missing {missing}.")
    for k, v in weights.items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise UserError(f"{what}: weight of '{k}' is {v!r}, not a number.") from None
        if not math.isfinite(v):
            raise UserError(f"{what}: weight of '{k}' is {v}; weights must be finite numbers >= 0.")
        if v < 0:
            raise UserError(f"{what}: weight of '{k}' is {v} < 0; weights must be >= 0.")
    total = sum(float(v) for v in weights.values())
    if abs(total - 1.0) > atol:
        raise UserError(f"{what} sum to {total:.6g}, not 1; rescale them (divide each by {total:.6g}).")
    return {k: float(weights[k]) for k in sources}


@dataclass
class SearchContext:
    corpus: Corpus
    objective: Any  # fastmix.objective.Objective
    meter: CostMeter
    seed: int
    out_dir: Path  # the method's own folder for checkpoints and proxy runs
    train_proxy: Callable[..., Any]  # fastmix.pipeline.train_proxy bound to this job's config
    cfg: Any = None  # the whole job config, read-only
    # run_proxies(weights_list, tag) -> records: one proxy per mixture, fanned out through
    # the configured executor, resumable (fastmix.pipeline.proxy_runner)
    run_proxies: Callable[[list[dict[str, float]], str], list[dict]] | None = None

    @property
    def sources(self) -> list[str]:
        return self.corpus.sources

    def token_share(self) -> dict[str, float]:
        counts = self.corpus.token_counts("train")
        total = sum(counts.values())
        return {k: v / total for k, v in counts.items()}


@dataclass
class SearchResult:
    weights: dict[str, float]
    trace: list[dict] = field(default_factory=list)  # one row per outer step / proxy run
    info: dict = field(default_factory=dict)

    def validated(self, sources: list[str]) -> SearchResult:
        self.weights = validate_weights(self.weights, sources, "the optimizer's output weights")
        return self


class MixtureOptimizer(Protocol):
    name: str
    # the YAML's keys: a dataclass of fastmix.schema.MethodParams with each key's type
    # and allowed values, checked before the method is built (fastmix.schema.check_params)
    Params: type

    def search(self, ctx: SearchContext) -> SearchResult: ...

    # Optional: proxy runs the method plans for K sources at its configured scale
    # (bench/compare_methods.py extrapolates paper-scale costs from it).
    def planned_proxy_runs(self, n_sources: int) -> int: ...

    # Optional: regroup the sources before the search (CLIMB's clustering stage);
    # the search and the target model then use the returned corpus.
    def prepare_corpus(self, corpus: Corpus, cfg: Any) -> Corpus: ...
