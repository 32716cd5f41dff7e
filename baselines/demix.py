"""DeMix: mixtures evaluated by merging per-source component models, not by training.

Implements DeMix (Li et al., arXiv 2602.00747, ICML 2026): component models,
merged proxies, iterative sampling with a predictor (its public README's steps;
section numbers not cited, the paper's text was not at hand), every value
checked against the public code (Lucius-lsr/DeMix): iterative_sample/sample.py
(generator), model_merge/generate_merge_yaml.py (mergekit `linear`, no base
model), iterative_sample/train_predictor.py (predictor and narrowing).

* A shared base: one proxy run on the natural mixture (public code: every
  component continues one mid-training checkpoint), kept on disk.
* One component per source: a one-hot run continued from the base
  (`init_from`), kept on disk, in the paper's regime: a short continuation
  (`component_fraction` of the base's budget; the paper: 30B tokens from a strong
  1.7B checkpoint) at a lower peak lr (`component_lr_scale` x the proxy's) after a
  short warmup, so merging averages small updates of one strong model.
* A mixture w is scored without training: theta(w) = sum_k w_k theta_k
  (`merge`), written in place into one model held in memory, then
  `ctx.objective.loss` on it (forward FLOPs charged; the merge's 2·K·P FLOPs
  too). No model is written to disk per candidate.
* Generator (`demix_mixtures` = `generate_weights_dirichlet`): prior = token
  share; cap min(4 x prior, 1) on the un-tempered prior; Dirichlet(s x
  prior^0.7) with s one of 15 strengths log-spaced in [0.5, 5]; weights over
  their cap set to it and the rest of the row scaled up, repeated until every
  cap holds (`cap_mode: waterfill`, ours; sample.py's one-weight-after-the-other
  pass, `sequential`, lets a later rescale lift an earlier weight over its cap);
  weights < 2e-4 -> 0, renormalise, round to multiples of 2e-4, renormalise
  (capped again); deduplicated.
* Scoring (`score`): the objective's loss (default), or minus the eval
  suite's average score (`suite`: the paper scores merged models on its
  benchmarks with OpenCompass); lower is better either way.
* Rounds: N0 mixtures from the generator are merged and scored; a predictor
  (LightGBM, 300 rounds, lr 0.01; ridge, alpha 0.5, when N0 <= 32) is fit on
  everything scored so far and predicts a pool of candidates (200k in the
  code); N0/2, then N0/4 mixtures are drawn at random from the top predicted
  (`top_k`), merged and scored. Output: the predictor refit on all, the mean
  of its top_k predicted mixtures of the pool (`avg=True`, 1280 of 200k).
* Rank check (`rank_check`, the paper's rank consistency, eval_merged/proxy_eval.py):
  proxies of the proxy config trained from scratch on a few scored mixtures spread
  over the merged scores; Spearman(merged, trained) in the trace and in
  info["proxy_check"] = {spearman, n, passed, threshold, merged, trained}. Their
  training is charged to the search.

Choices left open (docs/DECISIONS.md, "DeMix"): one objective (lower is
better) replaces the code's rank-averaged benchmark composite; the base
mixture; ridge is refit on every round (the code's N0 = 32 case fits on its
second round only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from baselines.merging import merge_into
from baselines.proxy_search import (
    Regressor,
    RegressorParams,
    demix_mixtures,
    renormalise,
    spearman,
)
from fastmix.errors import UserError
from fastmix.schema import rule
from fastmix.search.optimizer import SearchContext, SearchResult
from fastmix.search.proxies import ProxyJob
from fastmix.train.cost import Cost

# ---- the method ---------------------------------------------------------------------------------

@dataclass
class Preset:
    n0: int = rule(ge=2)  # the predictor's first fit needs 2 mixtures
    n_candidates: int = rule(ge=1)
    pool_draws: int = rule(ge=1)
    top_k: int = rule(ge=1)
    component_fraction: float = rule(gt=0, le=1)
    rank_check: int = rule(ge=0, check=(lambda n: n != 1, "0 (off) or >= 2 (a rank correlation)"))


@dataclass
class DeMix(RegressorParams):
    name = "demix"
    Preset = Preset
    score: str = rule(choices=("objective", "suite"))
    rounds: int = rule(ge=1)
    base: str = rule(choices=("natural", "uniform"))
    base_tokens: Optional[int] = rule(ge=1)  # null = the proxy config's tokens
    component_tokens: Optional[int] = rule(ge=1)  # null = component_fraction x the base's
    component_lr_scale: float = rule(gt=0)
    component_warmup_steps: Optional[int] = rule(ge=0)
    rank_check_threshold: float = rule(ge=-1, le=1)  # a Spearman rho
    regressor: str = rule(choices=("auto", "ridge", "lightgbm"))
    ridge_max_n0: int = rule(ge=1)
    ridge_alpha: float = rule(ge=0)
    score_output: bool = rule()
    cap_mode: str = rule(choices=("waterfill", "sequential"))

    def __post_init__(self):
        super().__post_init__()
        preset = self.preset
        self.n0, self.n_candidates, self.pool_draws, self.top_k, self.rank_check = (
            int(preset[k]) for k in ("n0", "n_candidates", "pool_draws", "top_k", "rank_check"))
        self.component_fraction = float(preset["component_fraction"])
        if self.n0 // 2 ** (self.rounds - 1) < 1:
            raise UserError(f"optimizer.{self.scale}.n0 is {self.n0} with rounds {self.rounds}; every round "
                            "needs n0 / 2^r >= 1 mixture.")
        if not self.top_k <= self.n_candidates <= self.pool_draws:
            raise UserError(f"optimizer.{self.scale}: need 1 <= top_k ({self.top_k}) <= n_candidates "
                            f"({self.n_candidates}) <= pool_draws ({self.pool_draws}).")
        if self.rounds > 1 and self.top_k < self.n0 // 2:
            raise UserError(f"optimizer.{self.scale}.top_k is {self.top_k}; round 2 draws n0/2 = {self.n0 // 2} "
                            "mixtures from the top_k predicted: raise top_k.")
        self.kind = (self.regressor if self.regressor != "auto" else
                     "ridge" if self.n0 <= self.ridge_max_n0 else "lightgbm")
        self.lgbm_params = dict(self.lightgbm or {})

    def planned_proxy_runs(self, n_sources: int) -> int:
        # the shared base, one (shorter) component per source, the proxies of the rank check
        return n_sources + 1 + self.rank_check

    def component_regime(self, proxy_cfg) -> tuple[int, dict]:
        """(each component's token budget, the proxy-config keys it replaces): a short
        continuation of the base (`component_fraction` of the base's budget, unless
        `component_tokens` is set) at `component_lr_scale` x the proxy's peak lr, after a
        short warmup (the proxy's warmup x component_fraction, >= 1 step, unless set)."""
        base_tokens = int(self.base_tokens or proxy_cfg.tokens)
        tokens = int(self.component_tokens or max(1, round(self.component_fraction * base_tokens)))
        warmup = (self.component_warmup_steps if self.component_warmup_steps is not None else
                  max(1, round(int(proxy_cfg.warmup_steps) * self.component_fraction)))
        return tokens, {"lr": float(proxy_cfg.lr) * self.component_lr_scale, "warmup_steps": int(warmup)}

    def _fit(self, X, y, seed: int):
        ok = np.isfinite(y)  # a merged model whose score is not finite says nothing: left out
        if ok.sum() < 2:
            raise UserError(f"DeMix's predictor needs >= 2 finite merged scores; got {int(ok.sum())}.")
        if self.kind == "ridge":
            from sklearn.linear_model import Ridge
            reg = Ridge(alpha=self.ridge_alpha).fit(X[ok], y[ok])
            return reg, {"regressor": "ridge", "alpha": self.ridge_alpha, "n_train": int(ok.sum())}
        reg = Regressor("lightgbm", self.lgbm_params, early_stopping_rounds=0, seed=seed).fit(X, y)
        return reg, reg.info

    def _scorer(self, ctx: SearchContext, device, precision: str):
        """model -> the number minimised: the objective's loss, or minus the eval suite's
        average (`score: suite`, the paper's benchmark scores). Both charge their forwards."""
        if self.score == "objective":
            return lambda m: float(ctx.objective.loss(m, device, ctx.meter, precision))
        from fastmix.eval.harness import evaluate_suite, load_tasks, suite_from_config
        ev = ctx.eval
        # built from the validation split: the search never sees the test-split tasks the
        # target is scored on (same generators, other documents)
        suite = suite_from_config(ev, ctx.corpus, split="val")
        if not suite:
            raise UserError("optimizer.score=suite scores merged models with the eval suite, but eval="
                            f"{ev.get('name')} has none: use eval=local or eval=paper14, or score=objective.")
        load_tasks(suite)
        return lambda m: -float(evaluate_suite(m, ctx.corpus.tokenizer, suite, device, ev.batch_size,
                                               ev.get("limit"), ctx.meter, precision)["average"])

    def _rounds(self, seed: int, prior: np.ndarray, score, trace: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rounds (public sample.py / train_predictor.py): n0 generated mixtures merged
        and scored, then each round n0 / 2^(r-1) drawn at random among the regressor's top_k
        predicted of the candidate pool. Returns (every scored mixture, its score, the pool)."""
        rng = np.random.default_rng(seed)
        gen = {**{k: v for k, v in self.generator.items() if k != "sample_multiplier"}, "cap_mode": self.cap_mode}
        X = demix_mixtures(prior, self.n0, rng, self.n0 * self.sample_multiplier, **gen)
        pool = demix_mixtures(prior, self.n_candidates, rng, self.pool_draws, **gen)  # the code's 200k json
        if len(X) < 2 or len(pool) < self.top_k:
            raise UserError(f"the DeMix generator left {len(X)} distinct round-1 mixtures and {len(pool)} "
                            f"candidates (need 2 and top_k = {self.top_k}): lower optimizer.minimum or raise "
                            "optimizer.max_usage.")
        y = score(X, 1)
        for round_no in range(2, self.rounds + 1):
            reg, reg_info = self._fit(X, y, seed)
            trace.append({"kind": "regressor", "round": round_no - 1, **reg_info,
                          "train_spearman": spearman(reg.predict(X), y)})
            predicted = reg.predict(pool)
            top = np.argsort(predicted, kind="stable")[:self.top_k]
            n = self.n0 // 2 ** (round_no - 1)
            chosen = rng.choice(top, size=n, replace=False)  # select_best_samples: at random among the best
            trace.append({"kind": "selection", "round": round_no, "n_candidates": len(pool),
                          "top_k": self.top_k, "predicted": [float(predicted[i]) for i in chosen]})
            X = np.concatenate([X, pool[chosen]])
            y = np.concatenate([y, score(pool[chosen], round_no)])

        return X, y, pool

    def _components(self, ctx: SearchContext, base_w: dict, tokens: int, overrides: dict):
        """The shared base (Sec. 3.1) and one component per source continuing it on that
        source alone: (base record, component records, their trace rows)."""
        sources = list(ctx.sources)
        (base,) = ctx.proxies.run([ProxyJob(base_w, "demix_base", keep_model=True, tokens=self.base_tokens)])
        comps = ctx.proxies.run([ProxyJob({s: float(s == k) for s in sources}, "demix_component",
                                          init_from=base.model_dir, keep_model=True, tokens=tokens,
                                          overrides=overrides) for k in sources])
        trace = [{"kind": "proxy", "role": "base", **base.to_dict()}]
        trace += [{"kind": "proxy", "role": "component", "source": s, **r.to_dict()} for s, r in zip(sources, comps)]
        return base, comps, trace

    def search(self, ctx: SearchContext) -> SearchResult:
        from transformers import AutoModelForCausalLM
        sources = list(ctx.sources)
        K = len(sources)
        share = ctx.token_share()
        prior = np.array([share[s] for s in sources])
        as_dict = lambda w: dict(zip(sources, map(float, w)))
        base_w = share if self.base == "natural" else {s: 1.0 / K for s in sources}
        device, proxy_cfg = ctx.device, ctx.proxy
        comp_tokens, comp_overrides = self.component_regime(proxy_cfg)
        scorer = self._scorer(ctx, device, proxy_cfg.precision)  # before any training: a missing suite stops now
        base, comps, trace = self._components(ctx, base_w, comp_tokens, comp_overrides)

        merged = AutoModelForCausalLM.from_pretrained(base.model_dir).to(device)  # the one reused model
        states = [{k: v.to(device) for k, v in AutoModelForCausalLM.from_pretrained(c.model_dir)
                   .state_dict().items()} for c in comps]
        n_float = sum(t.numel() for t in states[0].values() if t.is_floating_point())

        def score(W: np.ndarray, round_no: int, kind: str = "merged") -> np.ndarray:
            out = []
            for w in W:
                merge_into(merged, states, w)
                ctx.meter.add(Cost(flops=2.0 * int((w > 0).sum()) * n_float))  # the merge's multiply-adds
                out.append(scorer(merged))
                trace.append({"kind": kind, "round": round_no, "weights": as_dict(w), "objective": out[-1]})
            return np.array(out)

        X, y, pool = self._rounds(ctx.seed, prior, score, trace)
        reg, reg_info = self._fit(X, y, ctx.seed)
        trace.append({"kind": "regressor", "round": self.rounds, **reg_info,
                      "train_spearman": spearman(reg.predict(X), y)})
        predicted = reg.predict(pool)
        top = np.argsort(predicted, kind="stable")[:self.top_k]
        weights = renormalise(pool[top].mean(axis=0))
        choice = {"kind": "choice", "weights": as_dict(weights),
                  "predicted_objective": float(reg.predict(weights[None])[0]),
                  "top_k_mean_predicted": float(predicted[top].mean())}
        if self.score_output:  # the output's own merged score: how far off the prediction is
            choice["merged_objective"] = float(score(weights[None], self.rounds + 1, "merged_output")[0])
        trace.append(choice)
        best = int(np.nanargmin(y)) if np.isfinite(y).any() else 0
        info = {"n0": self.n0, "rounds": self.rounds, "n_merged": len(y), "n_candidates": len(pool),
                "top_k": self.top_k, "score": self.score, "regressor": reg_info, "base": self.base,
                **{k: v for k, v in choice.items() if k not in ("kind", "weights")},
                "best_merged": {"objective": float(y[best]), "weights": as_dict(X[best])},
                "component_objective": {s: r.objective for s, r in zip(sources, comps)},
                "base_objective": base.objective,
                "components": {"tokens": comp_tokens, "fraction_of_base": comp_tokens / int(
                    self.base_tokens or proxy_cfg.tokens), **comp_overrides}}
        if self.rank_check:
            del merged, states  # free the components' copies before more proxies train
            check = self._proxy_check(ctx, X, y, scorer, as_dict)
            trace += check.pop("trace")
            info["proxy_check"] = check
        return SearchResult(as_dict(weights), trace=trace, info=info)

    def _proxy_check(self, ctx: SearchContext, X: np.ndarray, y: np.ndarray, scorer, as_dict) -> dict:
        """The paper's rank consistency, on this job: proxies of the proxy config trained from
        scratch (what a merged model stands in for) on `rank_check` of the scored mixtures,
        spread over the merged scores (evenly spaced ranks, best and worst included), scored
        as the merged models were; Spearman of merged against trained scores. The runs go
        through ctx.proxies, so their cost is the search's."""
        ok = np.flatnonzero(np.isfinite(y))
        _, first = np.unique(X[ok], axis=0, return_index=True)  # a mixture scored twice counts once
        pool = ok[np.sort(first)]
        pool = pool[np.argsort(y[pool], kind="stable")]
        n = min(self.rank_check, len(pool))
        pick = pool[np.unique(np.round(np.linspace(0, len(pool) - 1, n)).astype(int))]
        runs = ctx.proxies.run([ProxyJob(as_dict(X[i]), "demix_check", keep_model=self.score != "objective")
                                for i in pick])
        if self.score == "objective":  # the unit scored each on the objective already
            trained = [float(r.objective) for r in runs]
        else:
            from transformers import AutoModelForCausalLM
            trained = [scorer(AutoModelForCausalLM.from_pretrained(r.model_dir).to(ctx.device))
                       for r in runs]
        merged = [float(y[i]) for i in pick]
        rho = spearman(merged, trained)  # None if either side is constant
        passed = rho is not None and rho >= self.rank_check_threshold
        trace = [{"kind": "proxy", "role": "check", **r.to_dict()} for r in runs]
        trace.append({"kind": "proxy_check", "spearman": rho, "n": len(pick),
                      "threshold": self.rank_check_threshold, "passed": passed, "merged": merged,
                      "trained": trained, "weights": [as_dict(X[i]) for i in pick]})
        return {"spearman": rho, "n": len(pick), "passed": passed, "threshold": self.rank_check_threshold,
                "merged": merged, "trained": trained, "trace": trace}
