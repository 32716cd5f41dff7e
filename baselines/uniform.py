"""Uniform mixture: w_k = 1/K. The no-search baseline of every paper in METHODS.md."""
from __future__ import annotations

from dataclasses import dataclass

from fastmix.search.optimizer import SearchContext, SearchResult


@dataclass
class Uniform:  # nothing to set
    name = "uniform"

    def planned_proxy_runs(self, n_sources: int) -> int:
        return 0  # no search

    def search(self, ctx: SearchContext) -> SearchResult:
        return SearchResult({s: 1.0 / len(ctx.sources) for s in ctx.sources})
