"""A mixture given by hand (`optimizer=fixed optimizer.weights='{code: 0.5, ...}'`):
to train and score a mixture found elsewhere or published in a paper."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from fastmix.errors import UserError
from fastmix.schema import rule
from fastmix.search.optimizer import SearchContext, SearchResult, validate_weights


@dataclass
class Fixed:
    name = "fixed"
    weights: Optional[Dict[str, float]] = rule()  # {source: weight}; checked against the sources in search

    def planned_proxy_runs(self, n_sources: int) -> int:
        return 0  # no search

    def search(self, ctx: SearchContext) -> SearchResult:
        if not self.weights:  # null or {}
            raise UserError("optimizer=fixed needs optimizer.weights, e.g. "
                            f"optimizer.weights='{{{ctx.sources[0]}: 0.5, {ctx.sources[1]}: 0.5, ...}}'.")
        return SearchResult(validate_weights(self.weights, ctx.sources, "optimizer.weights"))
