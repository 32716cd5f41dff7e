"""Natural mixture: w_k = source k's share of training tokens (RegMix's "prior",
DoReMi's baseline). Counted with the suite's tokenizer on the train split."""
from __future__ import annotations

from dataclasses import dataclass

from fastmix.search.optimizer import SearchContext, SearchResult


@dataclass
class Natural:  # nothing to set
    name = "natural"

    def planned_proxy_runs(self, n_sources: int) -> int:
        return 0  # no search

    def search(self, ctx: SearchContext) -> SearchResult:
        return SearchResult(ctx.token_share(), info={"train_tokens": ctx.corpus.token_counts("train")})
