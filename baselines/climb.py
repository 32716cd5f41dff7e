"""CLIMB: iterative bootstrapping of the mixture with proxies and a predictor.

Implements the search of CLIMB (Diao et al., arXiv 2504.13161), Sec. 3.2
("mixture bootstrapping": the bi-level problem approximated by a predictor,
solved by coordinate descent between sampling/pruning and predictor fitting).
NVIDIA published no search code; this follows the paper's text, and reuses
RegMix's public generator (sail-sg/regmix mixture_config/synthesize_mixture.py,
via baselines.regmix) for every Dirichlet draw.

* Round 1: n_1 mixtures (64 in the paper) from the Dirichlet generator around
  the token-share prior; one proxy each through `ctx.proxies.run`.
* Predictor: LightGBM refit every round on all proxies so far, regularised as
  the paper lists for its ~100 runs: L1 and L2 terms, early stopping after 20
  rounds without improvement on held-out runs, depth 4, >= 5 runs per leaf.
  We hold out 20% of the runs to pick the number of rounds and refit on all
  (RegMix's protocol); the objective is standardised before the fit so the L1
  term means the same for any objective; the small presets allow 2 / 1 runs
  per leaf (8 and 3 runs in round 1).
* Rounds k >= 2 (32, then 16 in the paper): sample many candidates from the
  whole search space (the same generator), predict, keep the best predicted
  `explore_pool` x n_k (pruning), draw n_k of them uniformly (the paper's
  exploration: random choice among the top-ranked instead of the top n_k),
  train those, refit.
* Output: the best predicted mixture under the final predictor (paper), taken
  as the mean of the `output_top_k` best predicted among fresh candidates and
  the trained mixtures (RegMix's top-k average; the paper does not say how
  many). A tree ensemble is piecewise constant, so its argmin is a region of
  tied candidates: one of them (k = 1) is an arbitrary, often near one-hot,
  point of it; the mean of k is near its centre.

The optional clustering stage (Sec. 3.1: embed, k-means, prune, merge; the
mixture is then over clusters) lives in baselines/clustering.py and runs
through `prepare_corpus` when `clustering.enabled` is true.

Choices the paper leaves open (docs/DECISIONS.md, "CLIMB"): the candidate
count, the exploration pool, the top-k of the output, the L1/L2 values, the
held-out share and the generator's parameters (RegMix's published ones).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from baselines.proxy_search import (
    EarlyStoppedParams,
    LightGBMPreset,
    Regressor,
    dirichlet_mixtures,
    renormalise,
    spearman,
    top_k_mean,
)
from fastmix.errors import UserError
from fastmix.schema import rule
from fastmix.search.optimizer import SearchContext, SearchResult
from fastmix.search.proxies import ProxyJob
from fastmix.train.cost import Cost, device_name


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


class Standardised:
    """A regressor fit on (y - mean) / std of the finite objectives and predicting in
    the objective's units: LightGBM's L1 term (reg_alpha) thresholds sums of residuals,
    so standardising gives it the same meaning for a loss in nats or an accuracy."""

    def __init__(self, reg: Regressor):
        self.reg, self.mean, self.std, self.info = reg, 0.0, 1.0, {}

    def fit(self, X, y) -> Standardised:
        y = np.asarray(y, dtype=np.float64)
        ok = y[np.isfinite(y)]  # non-finite runs stay non-finite and the regressor drops them
        self.mean = float(ok.mean()) if len(ok) else 0.0
        self.std = float(ok.std()) if len(ok) > 1 and ok.std() > 0 else 1.0
        self.reg.fit(X, (y - self.mean) / self.std)
        self.info = {**self.reg.info, "target_mean": self.mean, "target_std": self.std}
        return self

    def predict(self, X) -> np.ndarray:
        return self.reg.predict(X) * self.std + self.mean


def _rounds_ok(rounds) -> bool:
    return bool(rounds) and rounds[0] >= 2 and min(rounds) >= 1


@dataclass
class Preset(LightGBMPreset):
    rounds: list[int] = rule(check=(_rounds_ok, "proxies per round, the first >= 2 (a predictor needs 2 runs), "
                                                "e.g. [64, 32, 16]"))
    n_candidates: int = rule(ge=1)
    output_top_k: int = rule(ge=1)


@dataclass
class Climb(EarlyStoppedParams):
    name = "climb"
    Preset = Preset
    explore_pool: float = rule(ge=1)  # 1 = keep the top n
    clustering: Any = rule()  # baselines.clustering.cluster_corpus's arguments and `enabled`

    def __post_init__(self):
        super().__post_init__()
        preset = self.preset
        self.rounds = [int(n) for n in preset["rounds"]]
        self.n_candidates = int(preset["n_candidates"])
        self.output_top_k = int(preset["output_top_k"])
        need = max([int(round(self.explore_pool * n)) for n in self.rounds[1:]] or [1])
        if self.n_candidates < need:
            raise UserError(f"optimizer.{self.scale}.n_candidates is {self.n_candidates}; rounds {self.rounds} "
                            f"with explore_pool {self.explore_pool} need at least {need}.")
        if self.output_top_k > self.n_candidates:
            raise UserError(f"optimizer.{self.scale}.output_top_k is {self.output_top_k}; set it in "
                            f"1..{self.n_candidates} (optimizer.<scale>.n_candidates).")
        self.clustering = dict(self.clustering or {})
        self.clustering_params = {k: v for k, v in self.clustering.items() if k != "enabled"}

    def prepare_corpus(self, corpus, data=None, meter=None):
        """The corpus to search over: unchanged, or its clusters (Sec. 3.1) when
        `clustering.enabled` is true (the embedding stack is imported only then).
        `data`: the job's data settings (where clusters are cached).
        Given a meter, the clustering's recorded cost (embedding FLOPs, build
        time) is charged to the search, also when the clusters come from the cache."""
        if not self.clustering.get("enabled", False):
            return corpus
        from baselines.clustering import cluster_corpus
        clustered = cluster_corpus(corpus, data, **self.clustering_params)
        if meter is not None:
            cost = clustered.meta["clustering"]["cost"]
            charge = Cost(device=device_name(meter.device), devices=meter.devices, flops=cost["flops"])
            charge.add_time(cost["seconds"], meter.devices)
            meter.add(charge)
        return clustered

    def _fit(self, X, y, seed: int) -> Standardised:
        return Standardised(self.new_regressor(seed)).fit(X, y)

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
            records = ctx.proxies.run([ProxyJob(w, f"climb_round{round_no}") for w in as_dicts(W)])
            X = np.concatenate([X, [[r.weights[s] for s in sources] for r in records]])
            y = np.concatenate([y, [float(r.objective) for r in records]])
            trace.extend({"kind": "proxy", "round": round_no, **r.to_dict()} for r in records)

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
                "explore_pool": self.explore_pool, "output_top_k": self.output_top_k,
                "early_stopping_rounds": self.early_stopping_rounds, "regressor": reg.info,
                "predicted_objective": chosen_pred,
                "best_proxy": {"objective": float(y[best]),
                               "weights": dict(zip(sources, map(float, X[best])))}}
        return SearchResult(dict(zip(sources, map(float, weights))), trace=trace, info=info)
