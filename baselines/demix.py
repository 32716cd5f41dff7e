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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from baselines.proxy_search import (
    Regressor,
    ScaledParams,
    as_prior,
    finish_mixtures,
    pick_preset,
    renormalise,
    spearman,
    strengths,
)
from fastmix.errors import UserError
from fastmix.schema import rule
from fastmix.search.optimizer import SearchContext, SearchResult
from fastmix.search.proxies import ProxyJob
from fastmix.train.cost import Cost

# sample.py's constants; the YAML repeats them with their sources
GENERATOR_DEFAULTS = dict(temperature=0.7, min_strength=0.5, max_strength=5.0, n_strengths=15, max_usage=4.0,
                          minimum=2e-4, sample_multiplier=100, cap_mode="waterfill")


# ---- merging ------------------------------------------------------------------------------------

def check_merge_weights(weights, n: int, atol: float = 1e-6) -> np.ndarray:
    """Merge weights as a float64 vector: n of them, finite, >= 0, summing to 1."""
    w = np.asarray([float(v) for v in weights], dtype=np.float64)
    if len(w) != n:
        raise UserError(f"merge: {len(w)} weights for {n} models; give one weight per model.")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise UserError(f"merge weights must be finite and >= 0; got {w.tolist()}.")
    if abs(w.sum() - 1.0) > atol:
        raise UserError(f"merge weights sum to {w.sum():.6g}, not 1: theta(w) = sum_k w_k theta_k is a "
                        f"weighted average; rescale them (divide each by {w.sum():.6g}).")
    return w


def _states(models) -> list[Mapping[str, torch.Tensor]]:
    states = [m.state_dict() if isinstance(m, torch.nn.Module) else m for m in models]
    if not states:
        raise UserError("merge: no models given.")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise UserError(f"merge: model {i} does not have model 0's parameters (names and shapes); "
                            "components must share one architecture.")
    return states


def _accumulate(tensors: Sequence[torch.Tensor], w: np.ndarray, out: torch.Tensor) -> None:
    """out = sum_k w_k t_k over the nonzero weights (a weight of 1 copies exactly)."""
    if not out.is_floating_point():  # integer buffers cannot be averaged: they must agree
        if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise UserError("merge: models differ in a non-float buffer; they cannot be averaged.")
        out.copy_(tensors[0])
        return
    nz = [k for k in range(len(w)) if w[k] > 0]
    out.copy_(tensors[nz[0]])
    if w[nz[0]] != 1.0:
        out.mul_(float(w[nz[0]]))
    for k in nz[1:]:
        out.add_(tensors[k].mul(float(w[k])))


def merge(models_or_state_dicts: Sequence, weights) -> dict[str, torch.Tensor]:
    """Linear merge theta(w) = sum_k w_k theta_k (mergekit `linear`, as the public code) as a
    new state dict. Weights must be >= 0 and sum to 1 (UserError otherwise)."""
    states = _states(models_or_state_dicts)
    w = check_merge_weights(weights, len(states))
    out = {}
    for name, t in states[0].items():
        out[name] = torch.empty_like(t)
        _accumulate([s[name] for s in states], w, out[name])
    return out


@torch.no_grad()
def merge_into(model: torch.nn.Module, states: Sequence[Mapping[str, torch.Tensor]], weights) -> None:
    """`merge`, written in place into `model`'s parameters and buffers (one model reused
    for every candidate: no allocation, nothing on disk)."""
    w = check_merge_weights(weights, len(states))
    for name, t in model.state_dict().items():  # tensors that share the model's storage
        _accumulate([s[name] for s in states], w, t)


# ---- the candidate generator (sample.py) --------------------------------------------------------

def cap_weights(x: np.ndarray, bound: np.ndarray, mode: str = "waterfill") -> np.ndarray:
    """Every weight of each row (summing to 1) brought under its bound, the row still summing to 1.

    `waterfill` (default): the weights over their bound are set to it and the others
    scaled up to carry the rest of the mass; repeated until no weight is over (at most K
    passes: a capped weight stays capped, the others only grow), so every cap holds.
    `sequential`: sample.py's cap, one weight after the other: a weight over its bound
    is set to it and the row scaled by 1 + over / (1 - x_j) first; an earlier weight
    pushed over its bound by a later rescale is left so (as the code; on the embedded
    corpus `dialogue` reached 0.659 against a 0.052 cap). Rows whose mass cannot go
    anywhere (every uncapped weight 0) come back NaN."""
    x = np.array(x, dtype=np.float64, copy=True)
    if mode == "sequential":
        for j in range(x.shape[1]):
            over = x[:, j] - bound[j]
            rows = over > 0
            if rows.any():
                other = 1.0 - x[rows, j]
                with np.errstate(divide="ignore", invalid="ignore"):
                    factor = np.where(other > 0, 1.0 + over[rows] / other, np.nan)
                x[rows] *= factor[:, None]
                x[rows, j] = np.where(np.isnan(factor), np.nan, bound[j])
        return x
    if mode != "waterfill":
        raise UserError(f"optimizer.cap_mode '{mode}' is unknown: use waterfill or sequential.")
    capped = np.zeros(x.shape, dtype=bool)
    for _ in range(x.shape[1] + 1):  # each pass caps >= 1 more weight of a row still over
        over = (x > bound) & ~capped
        rows = over.any(axis=1)
        if not rows.any():
            break
        capped[rows] |= over[rows]
        c, xr = capped[rows], x[rows]
        left = 1.0 - (bound * c).sum(axis=1)  # mass the uncapped weights must carry
        free = np.where(c, 0.0, xr).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(free > 0, left / free, np.where(left > 1e-12, np.nan, 0.0))
        x[rows] = np.where(np.isnan(scale)[:, None], np.nan, np.where(c, bound, xr * scale[:, None]))
    return x


def demix_mixtures(prior, n: int, rng: np.random.Generator, draws: int, *, temperature=0.7, min_strength=0.5,
                   max_strength=5.0, n_strengths=15, max_usage=4.0, minimum=2e-4,
                   cap_mode: str = "waterfill") -> np.ndarray:
    """Up to n distinct mixtures [n, K] (rows sum to 1) out of `draws` generator draws,
    picked at random (sample.py: fewer if deduplication leaves fewer, with a warning).
    cap_mode waterfill: every weight <= min(max_usage x prior, 1) exactly, also after the
    rounding (capped once more after it, which moves a weight off the grid by < minimum)."""
    p = as_prior(prior)
    bound = np.minimum(p * max_usage, 1.0)
    alpha = p ** temperature if temperature < 1.0 else p  # sample.py tempers only below 1
    alpha = alpha / alpha.sum()
    s = strengths(min_strength, max_strength, n_strengths)
    which = rng.integers(len(s), size=draws)
    x = np.empty((draws, len(p)))
    for i, strength in enumerate(s):
        rows = which == i
        x[rows] = rng.dirichlet(alpha * strength, size=int(rows.sum()))
    x = cap_weights(x, bound, cap_mode)
    x = x[np.all(np.isfinite(x), axis=1)]
    x = finish_mixtures(x, minimum)
    if minimum > 0:  # rows on the 2e-4 grid: exact dedup (sort_and_deduplicate's L1 < 1e-5)
        _, keep = np.unique(np.rint(x / minimum).astype(np.int64), axis=0, return_index=True)
        x = x[np.sort(keep)]
    x = renormalise(x)
    if cap_mode == "waterfill":  # rounding and renormalising can lift a capped weight past its cap
        x = cap_weights(x, bound, cap_mode)
    return x if len(x) <= n else x[rng.choice(len(x), size=n, replace=False)]


# ---- the method ---------------------------------------------------------------------------------

def _check_generator(g: dict) -> dict:
    unknown = sorted(set(g) - set(GENERATOR_DEFAULTS))
    if unknown:
        raise UserError(f"unknown optimizer keys {unknown}; the generator takes "
                        f"{sorted(GENERATOR_DEFAULTS)}.")
    g = {**GENERATOR_DEFAULTS, **g}
    if g["cap_mode"] not in ("waterfill", "sequential"):
        raise UserError(f"optimizer.cap_mode '{g['cap_mode']}' is unknown: use waterfill (every cap "
                        "holds) or sequential (sample.py's one-after-the-other cap).")
    if not (g["temperature"] > 0 and 0 < g["min_strength"] <= g["max_strength"] and g["max_usage"] > 0
            and 0 <= g["minimum"] < 0.5 and int(g["n_strengths"]) >= 1 and int(g["sample_multiplier"]) >= 1):
        raise UserError(f"optimizer generator settings out of range: {g} (published {GENERATOR_DEFAULTS}).")
    return g


@dataclass
class Preset:
    n0: int = rule(ge=2)  # the predictor's first fit needs 2 mixtures
    n_candidates: int = rule(ge=1)
    pool_draws: int = rule(ge=1)
    top_k: int = rule(ge=1)
    component_fraction: float = rule(gt=0, le=1)
    rank_check: int = rule(ge=0, check=(lambda n: n != 1, "0 (off) or >= 2 (a rank correlation)"))


class DeMix:
    name = "demix"

    @dataclass
    class Params(ScaledParams):
        """conf/optimizer/demix.yaml: types and allowed values (the YAML has the values)."""
        paper: Preset = rule()
        demo: Preset = rule()
        smoke: Preset = rule()
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
        lightgbm: Any = rule()  # LGBMRegressor's own parameters
        score_output: bool = rule()
        cap_mode: str = rule(choices=("waterfill", "sequential"))

    def __init__(self, scale: str = "demo", paper: dict | None = None, demo: dict | None = None,
                 smoke: dict | None = None, base: str = "natural", base_tokens: int | None = None,
                 component_tokens: int | None = None, component_lr_scale: float = 0.1,
                 component_warmup_steps: int | None = None, rank_check_threshold: float = 0.5,
                 rounds: int = 3, score: str = "objective",
                 regressor: str = "auto", ridge_max_n0: int = 32, ridge_alpha: float = 0.5,
                 lightgbm: dict | None = None, score_output: bool = True, **generator):
        preset = pick_preset("demix", scale, {"paper": paper, "demo": demo, "smoke": smoke},
                             ("n0", "n_candidates", "pool_draws", "top_k", "component_fraction",
                              "rank_check"))
        self.n0, self.n_candidates, self.pool_draws, self.top_k, self.rank_check = (
            int(preset[k]) for k in ("n0", "n_candidates", "pool_draws", "top_k", "rank_check"))
        self.component_fraction = float(preset["component_fraction"])
        if not 0 < self.component_fraction <= 1 or self.rank_check < 0 or self.rank_check == 1:
            raise UserError(f"optimizer.{scale}: component_fraction must be in (0, 1] (got "
                            f"{self.component_fraction}) and rank_check 0 (off) or >= 2 "
                            f"(got {self.rank_check}).")
        bad_warmup = component_warmup_steps is not None and int(component_warmup_steps) < 0
        if not component_lr_scale > 0 or bad_warmup:
            raise UserError(f"optimizer.component_lr_scale must be > 0 (got {component_lr_scale}) and "
                            f"component_warmup_steps >= 0 or null (got {component_warmup_steps}).")
        self.component_lr_scale = float(component_lr_scale)
        self.component_warmup_steps = None if component_warmup_steps is None else int(component_warmup_steps)
        self.rank_check_threshold = float(rank_check_threshold)
        self.rounds = int(rounds)
        if self.rounds < 1 or self.n0 < 2 or self.n0 // 2 ** (self.rounds - 1) < 1:
            raise UserError(f"optimizer.{scale}.n0 is {self.n0} with rounds {self.rounds}; the predictor "
                            "needs n0 >= 2 and every round n0 / 2^r >= 1 mixture.")
        if not 1 <= self.top_k <= self.n_candidates or self.pool_draws < self.n_candidates:
            raise UserError(f"optimizer.{scale}: need 1 <= top_k ({self.top_k}) <= n_candidates "
                            f"({self.n_candidates}) <= pool_draws ({self.pool_draws}).")
        if self.rounds > 1 and self.top_k < self.n0 // 2:
            raise UserError(f"optimizer.{scale}.top_k is {self.top_k}; round 2 draws n0/2 = {self.n0 // 2} "
                            "mixtures from the top_k predicted: raise top_k.")
        for key, v, ok in (("base", base, ("natural", "uniform")), ("score", score, ("objective", "suite")),
                           ("regressor", regressor, ("auto", "ridge", "lightgbm"))):
            if v not in ok:
                raise UserError(f"optimizer.{key} '{v}' is unknown: use {' or '.join(ok)}.")
        for key, v in (("base_tokens", base_tokens), ("component_tokens", component_tokens)):
            if v is not None and int(v) < 1:
                raise UserError(f"optimizer.{key} must be >= 1 or null, got {v}.")
        self.generator = _check_generator(generator)
        self.base, self.score = base, score
        self.base_tokens, self.component_tokens = base_tokens, component_tokens
        self.kind = regressor if regressor != "auto" else ("ridge" if self.n0 <= ridge_max_n0 else "lightgbm")
        self.ridge_alpha, self.lgbm_params = float(ridge_alpha), dict(lightgbm or {})
        self.score_output = bool(score_output)

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
        gen = {k: v for k, v in self.generator.items() if k != "sample_multiplier"}
        X = demix_mixtures(prior, self.n0, rng, self.n0 * int(self.generator["sample_multiplier"]), **gen)
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
