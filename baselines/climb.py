"""CLIMB: iterative bootstrapping of the mixture with proxies and a predictor.

Implements the search of CLIMB (Diao et al., arXiv 2504.13161), Sec. 3.2
("mixture bootstrapping": the bi-level problem approximated by a predictor,
solved by coordinate descent between sampling/pruning and predictor fitting).
NVIDIA published no search code; this follows the paper's text, and reuses
RegMix's public generator (sail-sg/regmix mixture_config/synthesize_mixture.py,
via baselines.regmix) for every Dirichlet draw.

* Round 1: n_1 mixtures (64 in the paper) from the Dirichlet generator around
  the token-share prior; one proxy each through `ctx.run_proxies`.
* Predictor: LightGBM with shallow, regularised trees, refit every round on
  all proxies so far (paper: a LightGBM regressor; small data, so shallow).
* Rounds k >= 2 (32, then 16 in the paper): sample many candidates from the
  whole search space (the same generator), predict, keep the best predicted
  `explore_pool` x n_k (pruning), draw n_k of them uniformly (the paper's
  exploration: random choice among the top-ranked instead of the top n_k),
  train those, refit.
* Output: the mixture with the best predicted objective under the final
  predictor, over fresh candidates and the trained mixtures (the paper's
  argmin of the predictor); `output_top_k > 1` averages the best k instead.

The optional clustering stage (Sec. 3.1: embed, k-means, prune, merge; the
mixture is then over clusters) lives in baselines/clustering.py and runs
through `prepare_corpus` when `clustering.enabled` is true.

Choices the paper leaves open (docs/DECISIONS.md, "RegMix and CLIMB"): the
candidate count, the exploration pool, the tree settings and the generator's
parameters (RegMix's published ones).
"""
from __future__ import annotations

import numpy as np

from baselines.regmix import (
    GENERATOR_DEFAULTS,
    Regressor,
    check_generator,
    dirichlet_mixtures,
    pick_preset,
    renormalise,
    spearman,
    top_k_mean,
)
from fastmix.cost import Cost, device_name
from fastmix.errors import UserError
from fastmix.optimizer import SearchContext, SearchResult


def select_candidates(predicted: np.ndarray, n: int, pool_factor: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Indices of n candidates drawn uniformly without replacement from the
    round(pool_factor x n) best predicted (lowest), best first. pool_factor 1 = the top n."""
    if n > len(predicted):
        raise UserError(f"CLIMB asks for {n} mixtures out of {len(predicted)} candidates; "
                        "raise optimizer.<scale>.n_candidates.")
    pool = np.argsort(predicted, kind="stable")[:min(len(predicted), max(n, int(round(pool_factor * n))))]
    chosen = rng.choice(pool, size=n, replace=False)
    return chosen[np.argsort(predicted[chosen], kind="stable")]


def _key(w: np.ndarray) -> tuple:
    return tuple(np.round(w, 9))


class Climb:
    name = "climb"

    def __init__(self, scale: str = "demo", paper: dict | None = None, demo: dict | None = None,
                 smoke: dict | None = None, regressor: str = "lightgbm", lightgbm: dict | None = None,
                 explore_pool: float = 4.0, output_top_k: int = 1, clustering: dict | None = None,
                 **generator):
        preset = pick_preset("climb", scale, {"paper": paper, "demo": demo, "smoke": smoke},
                             ("rounds", "n_candidates"))
        self.rounds = [int(n) for n in preset.pop("rounds")]
        self.n_candidates = int(preset.pop("n_candidates"))
        if not self.rounds or self.rounds[0] < 2 or min(self.rounds) < 1:
            raise UserError(f"optimizer.{scale}.rounds is {self.rounds}; give proxies per round, the first "
                            ">= 2 (a predictor needs 2 runs), e.g. [64, 32, 16].")
        if not explore_pool >= 1:
            raise UserError(f"optimizer.explore_pool is {explore_pool}; set it >= 1 (1 = keep the top n).")
        if not 1 <= int(output_top_k) <= self.n_candidates:
            raise UserError(f"optimizer.output_top_k is {output_top_k}; set it in 1..{self.n_candidates}.")
        need = max([int(round(explore_pool * n)) for n in self.rounds[1:]] or [1])
        if self.n_candidates < need:
            raise UserError(f"optimizer.{scale}.n_candidates is {self.n_candidates}; rounds {self.rounds} "
                            f"with explore_pool {explore_pool} need at least {need}.")
        self.generator = check_generator(**{**GENERATOR_DEFAULTS, **generator})
        self.regressor, self.lgbm_params = regressor, {**(lightgbm or {}), **preset}
        self.explore_pool, self.output_top_k = float(explore_pool), int(output_top_k)
        self.clustering = dict(clustering or {})
        self.clustering_params = {k: v for k, v in self.clustering.items() if k != "enabled"}
        Regressor(regressor)  # an unknown regressor fails at build time, before any proxy trains

    def prepare_corpus(self, corpus, cfg=None, meter=None):
        """The corpus to search over: unchanged, or its clusters (Sec. 3.1) when
        `clustering.enabled` is true (the embedding stack is imported only then).
        `cfg` is the job config; its `data` block says where clusters are cached.
        Given a meter, the clustering's recorded cost (embedding FLOPs, build
        time) is charged to the search, also when the clusters come from the cache."""
        if not self.clustering.get("enabled", False):
            return corpus
        from baselines.clustering import cluster_corpus
        clustered = cluster_corpus(corpus, None if cfg is None else cfg.get("data"), **self.clustering_params)
        if meter is not None:
            cost = clustered.meta["clustering"]["cost"]
            charge = Cost(device=device_name(meter.device), devices=meter.devices, flops=cost["flops"])
            charge.add_time(cost["seconds"], meter.devices)
            meter.add(charge)
        return clustered

    def _fit(self, X, y, seed: int) -> Regressor:
        # no early stopping: 64 runs leave too few to hold out; the shallow trees regularise
        return Regressor(self.regressor, self.lgbm_params, early_stopping_rounds=0, seed=seed).fit(X, y)

    def _candidates(self, prior, rng, exclude: set) -> np.ndarray:
        gen = {**self.generator, "sample_multiplier": 1}  # x100 would be 100x the draws for nothing
        c = renormalise(dirichlet_mixtures(prior, self.n_candidates, rng, **gen))
        return c[[_key(w) not in exclude for w in c]]  # A \ S_k: no mixture is trained twice

    def planned_proxy_runs(self, n_sources: int) -> int:
        return sum(self.rounds)  # every round's proxies, whatever K

    def search(self, ctx: SearchContext) -> SearchResult:
        sources = list(ctx.sources)
        share = ctx.token_share()
        prior = np.array([share[s] for s in sources])
        rng = np.random.default_rng(ctx.seed)
        as_dicts = lambda W: [dict(zip(sources, map(float, w))) for w in W]

        X, y, trace = np.zeros((0, len(sources))), np.zeros(0), []

        def train(W: np.ndarray, round_no: int) -> None:
            nonlocal X, y
            records = ctx.run_proxies(as_dicts(W), f"climb_round{round_no}")
            X = np.concatenate([X, [[r["weights"][s] for s in sources] for r in records]])
            y = np.concatenate([y, [float(r["objective"]) for r in records]])
            trace.extend({"kind": "proxy", "round": round_no, **r} for r in records)

        train(renormalise(dirichlet_mixtures(prior, self.rounds[0], rng, **self.generator)), 1)
        for round_no, n in enumerate(self.rounds[1:], start=2):
            reg = self._fit(X, y, ctx.seed)
            trace.append({"kind": "regressor", "round": round_no - 1, **reg.info,
                          "train_spearman": spearman(reg.predict(X), y)})
            candidates = self._candidates(prior, rng, {_key(w) for w in X})
            predicted = reg.predict(candidates)
            chosen = select_candidates(predicted, n, self.explore_pool, rng)
            trace.append({"kind": "selection", "round": round_no, "n_candidates": len(candidates),
                          "pool": min(len(candidates), max(n, int(round(self.explore_pool * n)))),
                          "best_predicted": float(predicted.min()),
                          "predicted": [float(predicted[i]) for i in chosen],
                          "weights": as_dicts(candidates[chosen])})
            train(candidates[chosen], round_no)

        reg = self._fit(X, y, ctx.seed)
        trace.append({"kind": "regressor", "round": len(self.rounds), **reg.info,
                      "train_spearman": spearman(reg.predict(X), y)})
        candidates = np.concatenate([self._candidates(prior, rng, set()), X])
        predicted = reg.predict(candidates)
        weights, top = top_k_mean(candidates, predicted, self.output_top_k)
        chosen_pred = float(reg.predict(weights[None])[0])
        trace.append({"kind": "choice", "weights": dict(zip(sources, map(float, weights))),
                      "predicted_objective": chosen_pred,
                      "top_predicted": [float(predicted[i]) for i in top]})
        best = int(np.nanargmin(y))
        info = {"rounds": self.rounds, "n_proxies": len(y), "n_candidates": self.n_candidates,
                "explore_pool": self.explore_pool, "output_top_k": self.output_top_k, "regressor": reg.info,
                "predicted_objective": chosen_pred,
                "best_proxy": {"objective": float(y[best]),
                               "weights": dict(zip(sources, map(float, X[best])))}}
        return SearchResult(dict(zip(sources, map(float, weights))), trace=trace, info=info)
