"""RegMix: data mixture as regression over many small proxy runs.

Implements RegMix (Liu et al., arXiv 2407.01492, ICLR 2025), Sec. 2 (the four
steps of Fig. 1) and Algorithm 1 (App. H), checked against the public code
(sail-sg/regmix): mixture_config/synthesize_mixture.py for the mixture
generator and regression_fitting/regression.ipynb for the regressor, the
simulation and the top-k average.

* Generator (`dirichlet_mixtures` = `generate_weights_dirichlet`): prior =
  token share; cap min(15 x prior, 1) per weight (MAXIMUM_USAGE, un-tempered
  prior); prior ** 0.5 renormalised (TEMP); each trial draws Dirichlet(s x p)
  at one of 15 log-spaced strengths s in [0.1, 5] picked uniformly (the public
  code draws one per strength and keeps one at random: same distribution);
  trials over a cap are rejected; weights < 2e-4 -> 0, renormalise, round to
  multiples of 2e-4 (MINIMUM); n x 100 trials deduplicated, n picked.
* One proxy per mixture through `ctx.proxies.run` (512 in the paper).
* Regressor mixture -> objective: LightGBM with the notebook's parameters
  (gbdt, 1000 rounds, lr 0.01, metrics l1 + l2, early stopping after 3 rounds
  without improvement), or linear regression (the paper's second option).
* Simulation: candidates from the same generator (1M in the paper), predicted;
  output = the mean of the top-k (lowest predicted objective; k = 100).

Choices left open (docs/DECISIONS.md, "RegMix and CLIMB"): early stopping
needs held-out runs (the notebook stops on its 256 test runs): a search holds
out 20% of its proxies to pick the rounds, then refits on all. Rounded weights
are renormalised (the public YAMLs keep sums off 1 by up to K x 1e-4).

The generator, the regressor and the top-k average live in
baselines/proxy_search.py (CLIMB and DeMix use them too);
`python -m baselines.regmix_replay --mixtures M.csv --targets T.csv ...` replays
the notebook on recorded runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from baselines.proxy_search import (
    EarlyStoppedParams,
    LightGBMPreset,
    as_prior,
    dirichlet_mixtures,
    renormalise,
    spearman,
    top_k_mean,
)
from fastmix.errors import UserError
from fastmix.schema import rule
from fastmix.search.optimizer import SearchContext, SearchResult
from fastmix.search.proxies import ProxyJob


@dataclass
class Preset(LightGBMPreset):
    n_proxies: int = rule(ge=2)  # a regression needs 2 runs
    n_candidates: int = rule(ge=1)
    top_k: int = rule(ge=1)


@dataclass
class RegMix(EarlyStoppedParams):
    name = "regmix"
    Preset = Preset
    simulation: str = rule(choices=("generator", "notebook"))

    def __post_init__(self):
        super().__post_init__()
        preset = self.preset
        self.n_proxies, self.n_candidates, self.top_k = (int(preset[k]) for k in
                                                         ("n_proxies", "n_candidates", "top_k"))
        if self.top_k > self.n_candidates:
            raise UserError(f"optimizer.{self.scale}.top_k is {self.top_k}; set it in 1..{self.n_candidates}.")

    def planned_proxy_runs(self, n_sources: int) -> int:
        return self.n_proxies  # one proxy per generated mixture, whatever K

    def search(self, ctx: SearchContext) -> SearchResult:
        sources, share = list(ctx.sources), ctx.token_share()
        prior = np.array([share[s] for s in sources])
        rng = np.random.default_rng(ctx.seed)
        mixtures = renormalise(dirichlet_mixtures(prior, self.n_proxies, rng, **self.generator))
        records = ctx.proxies.run([ProxyJob(dict(zip(sources, map(float, w))), "regmix") for w in mixtures])
        X = np.array([[r.weights[s] for s in sources] for r in records])
        y = np.array([r.objective for r in records], dtype=np.float64)
        reg = self.new_regressor(ctx.seed).fit(X, y)
        if self.simulation == "notebook":  # regression.ipynb: Dirichlet(prior x 1), no cap or rounding
            candidates = rng.dirichlet(as_prior(prior), size=self.n_candidates)
        else:
            gen = {**self.generator, "sample_multiplier": 1}  # 1M x 100 trials would be 100M draws
            candidates = renormalise(dirichlet_mixtures(prior, self.n_candidates, rng, **gen))
        predicted = reg.predict(candidates)
        weights, top = top_k_mean(candidates, predicted, self.top_k)
        chosen_pred = float(reg.predict(weights[None])[0])
        trace = [{"kind": "proxy", **r.to_dict()} for r in records]
        trace.append({"kind": "regressor", **reg.info, "train_spearman": spearman(reg.predict(X), y)})
        trace.append({"kind": "top_k", "n_candidates": len(candidates),
                      "predicted": [float(predicted[i]) for i in top],
                      "weights": [dict(zip(sources, map(float, candidates[i]))) for i in top[:10]]})
        trace.append({"kind": "choice", "weights": dict(zip(sources, map(float, weights))),
                      "predicted_objective": chosen_pred,
                      "top_k_mean_predicted": float(predicted[top].mean())})
        best = int(np.nanargmin(y))
        info = {"n_proxies": len(records), "n_candidates": len(candidates), "top_k": self.top_k,
                "regressor": reg.info, "simulation": self.simulation, "predicted_objective": chosen_pred,
                "best_proxy": {"objective": float(y[best]), "weights": records[best].weights}}
        return SearchResult(dict(zip(sources, map(float, weights))), trace=trace, info=info)

