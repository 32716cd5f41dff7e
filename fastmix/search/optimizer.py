"""The mixture-optimizer protocol: every method (FastMix and the baselines) is a
class with `search(ctx) -> SearchResult`, built by Hydra from
`conf/optimizer/<name>.yaml` through its `_target_`.

The context hands a method everything it may use, and nothing else: the
tokenized sources, the objective, the device, the proxy's and the target's run
settings, the eval settings, the proxies (`ctx.proxies`: fastmix.search.proxies, the one
training loop) and the one cost meter, so that every method pays for its proxies
the same way. It carries no raw job config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from fastmix.data.corpus import Corpus
from fastmix.errors import UserError
from fastmix.train.cost import CostMeter

if TYPE_CHECKING:
    from fastmix.schema import EvalSchema, RunSchema
    from fastmix.search.objective import Objective
    from fastmix.search.proxies import ProxyRunner


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
    corpus: Corpus  # the sources searched over (CLIMB's clusters, if it regroups them)
    objective: Objective  # what the search minimises, on the original sources' val split
    meter: CostMeter  # the job's one meter; its open stage is the search
    seed: int
    out_dir: Path  # the method's own folder for checkpoints and proxy runs
    proxies: ProxyRunner  # run(jobs) -> records, train(weights, out_dir, hook=...)
    device: torch.device
    proxy: RunSchema  # the proxy's run settings (fastmix.schema; every default filled)
    target: RunSchema  # the target's run settings (the oracle trains targets)
    eval: EvalSchema  # the eval settings (DeMix's score=suite)

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


@runtime_checkable
class MixtureOptimizer(Protocol):
    """What every method is: fastmix.run.pipeline.build refuses an optimizer that is not."""
    # A method is a dataclass whose fields are the YAML's keys, each with its type and
    # allowed values (fastmix.schema.rule), checked before it is built
    # (fastmix.schema.check_params); `name` is a class attribute, not a field.
    name: str

    def search(self, ctx: SearchContext) -> SearchResult: ...

    # proxy runs the method plans for K sources at its configured scale (0 for the
    # no-search rows; bench/compare_methods.py extrapolates paper-scale costs from it)
    def planned_proxy_runs(self, n_sources: int) -> int: ...


@runtime_checkable
class RegroupsSources(Protocol):
    """A method that regroups the sources before its search (CLIMB's clustering stage):
    the search and the target then use the returned corpus. `data`: the job's data
    settings (where caches go); `meter`: charged for the regrouping."""

    def prepare_corpus(self, corpus: Corpus, data: Any, meter: CostMeter | None = None) -> Corpus: ...
