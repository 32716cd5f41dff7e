"""Uniform mixture: w_k = 1/K. The no-search baseline of every paper in METHODS.md."""
from __future__ import annotations

from fastmix.optimizer import SearchContext, SearchResult


class Uniform:
    name = "uniform"

    def search(self, ctx: SearchContext) -> SearchResult:
        return SearchResult({s: 1.0 / len(ctx.sources) for s in ctx.sources})
