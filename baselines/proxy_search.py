"""What the many-proxy methods share (RegMix, CLIMB, DeMix): scale presets, RegMix's
Dirichlet mixture generator (sail-sg/regmix mixture_config/synthesize_mixture.py),
the regressor mixture -> objective (regression_fitting/regression.ipynb's LightGBM,
or linear regression), the top-k average and Spearman's rho. Each method file
holds its method; the generator and the regressor are documented where they are
used first, in baselines/regmix.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fastmix.errors import UserError
from fastmix.schema import check_fields, rule

SCALES = ("smoke", "demo", "paper")
REGRESSORS = ("lightgbm", "linear")


GENERATOR_KEYS = ("temperature", "min_strength", "max_strength", "n_strengths", "max_usage", "minimum",
                  "sample_multiplier")


@dataclass
class RegressorParams:
    """The keys RegMix, CLIMB and DeMix share, as fields of each method's dataclass:
    the scale preset in use (each method types its own presets `paper`, `demo`,
    `smoke`), LightGBM's own parameters and the Dirichlet generator's settings
    (synthesize_mixture.py's constants; DeMix's sample.py has the same)."""
    scale: str = rule(choices=SCALES)
    # the presets: counts per scale, typed by the method's own `Preset` dataclass
    paper: Any = rule()
    demo: Any = rule()
    smoke: Any = rule()
    lightgbm: Any = rule()  # LGBMRegressor's own parameters
    temperature: float = rule(gt=0)
    min_strength: float = rule(gt=0)
    max_strength: float = rule(gt=0)
    n_strengths: int = rule(ge=1)
    max_usage: float = rule(gt=0)
    minimum: float = rule(ge=0, lt=0.5)
    sample_multiplier: int = rule(ge=1)

    Preset: ClassVar[type]

    @classmethod
    def check_config(cls, node, prefix: str) -> None:
        """Called by fastmix.schema.check_params: the presets against the method's `Preset`."""
        for scale in SCALES:
            check_fields(cls.Preset, node[scale], f"{prefix}.{scale}")

    def __post_init__(self):
        if self.min_strength > self.max_strength:
            raise UserError(f"optimizer.min_strength {self.min_strength} > max_strength {self.max_strength}.")

    @property
    def preset(self) -> dict:
        """The scale-dependent counts of `conf/optimizer/<method>.yaml` for `scale`."""
        return dict(getattr(self, self.scale))

    @property
    def generator(self) -> dict:
        """The generator's settings, as `dirichlet_mixtures` takes them."""
        return {k: int(getattr(self, k)) if k in ("n_strengths", "sample_multiplier") else float(getattr(self, k))
                for k in GENERATOR_KEYS}


@dataclass
class LightGBMPreset:
    """What every RegMix and CLIMB preset holds: LightGBM's minimum runs per leaf,
    which must shrink with the runs a scale trains."""
    min_child_samples: int = rule(ge=1)


@dataclass
class EarlyStoppedParams(RegressorParams):
    """RegMix's and CLIMB's regressor: LightGBM (or OLS) with early stopping on a
    held-out share of the proxies."""
    regressor: str = rule(choices=REGRESSORS)
    early_stopping_rounds: int = rule(ge=0)  # 0 = every round
    early_stopping_holdout: float = rule(ge=0, lt=1)

    @property
    def lgbm_params(self) -> dict:
        """LGBMRegressor's parameters: the YAML's `lightgbm`, and the preset's minimum runs per leaf."""
        return {**(self.lightgbm or {}), "min_child_samples": self.preset["min_child_samples"]}

    def new_regressor(self, seed: int) -> Regressor:
        return Regressor(self.regressor, self.lgbm_params, self.early_stopping_rounds, self.early_stopping_holdout,
                         seed)


def as_prior(prior, what: str = "prior") -> np.ndarray:
    p = np.asarray(prior, dtype=np.float64)
    if p.ndim != 1 or len(p) < 2 or not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise UserError(f"the {what} must be >= 2 finite weights > 0 (Dirichlet parameters); got {p}.")
    return p / p.sum()


def usage_bound(prior, max_usage: float) -> np.ndarray:
    """Upper bound of each weight: min(max_usage x prior, 1), on the un-tempered prior
    (public code: number_bound, computed before the temperature is applied)."""
    return np.minimum(as_prior(prior) * max_usage, 1.0)


def temper(prior, temperature: float) -> np.ndarray:
    """p**t renormalised (public code: prior_dist ** TEMP when temperature < 1)."""
    p = as_prior(prior) ** temperature
    return p / p.sum()


def strengths(min_strength: float, max_strength: float, n: int) -> np.ndarray:
    return np.logspace(np.log10(min_strength), np.log10(max_strength), n)


def finish_mixtures(x: np.ndarray, minimum: float) -> np.ndarray:
    """Public post-processing of accepted samples: weights < minimum -> 0,
    renormalise, round to multiples of minimum (the sum may end off 1 by up to
    K x minimum / 2, as in the public configs)."""
    x = np.where(x < minimum, 0.0, x)
    x = x / x.sum(axis=1, keepdims=True)
    return np.round(x / minimum) * minimum if minimum > 0 else x


def dirichlet_mixtures(prior, n: int, rng: np.random.Generator, *, temperature=0.5, min_strength=0.1,
                       max_strength=5.0, n_strengths=15, max_usage=15.0, minimum=2e-4,
                       sample_multiplier=100, max_rounds: int = 50) -> np.ndarray:
    """n distinct mixtures [n, K] from RegMix's generator (see the module docstring).
    Rows are rounded as the public code leaves them (use `renormalise` before training)."""
    bound = usage_bound(prior, max_usage)
    alpha = temper(prior, temperature)
    s = strengths(min_strength, max_strength, n_strengths)
    pool = np.zeros((0, len(alpha)))
    for _ in range(max_rounds):  # the public code draws once; more rounds only if too few survive
        trials = n * sample_multiplier
        which = rng.integers(len(s), size=trials)
        x = np.empty((trials, len(alpha)))
        for i, strength in enumerate(s):  # numpy's dirichlet is exact for tiny alphas; a gamma trick is not
            rows = which == i
            x[rows] = rng.dirichlet(alpha * strength, size=int(rows.sum()))
        x = x[np.all(x <= bound, axis=1)]
        pool = np.concatenate([pool, finish_mixtures(x, minimum)])
        if minimum > 0:  # rounded rows are equal or >= minimum apart: exact dedup (sort_and_deduplicate)
            _, keep = np.unique(np.rint(pool / minimum).astype(np.int64), axis=0, return_index=True)
            pool = pool[np.sort(keep)]
        if len(pool) >= n:
            return pool[rng.choice(len(pool), size=n, replace=False)]
    raise UserError(f"the mixture generator found only {len(pool)} distinct mixtures of {n}: the cap rejects "
                    f"most draws (raise optimizer.max_usage, {max_usage}) or the rounding leaves too few "
                    f"distinct ones (lower optimizer.minimum, {minimum}).")


# DeMix's generator (Lucius-lsr/DeMix iterative_sample/sample.py, generate_weights_dirichlet);
# documented in baselines/demix.py, where it is used
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


def renormalise(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) / np.sum(x, axis=-1, keepdims=True)


def _fit_eval(model, X, y, X_eval, y_eval, callbacks):
    """fit with one evaluation set (`eval_X`/`eval_y` where LightGBM has them: 4.7 deprecates `eval_set`)."""
    import inspect
    new = "eval_X" in inspect.signature(model.fit).parameters
    kw = dict(eval_X=(X_eval,), eval_y=(y_eval,)) if new else dict(eval_set=[(X_eval, y_eval)])
    return model.fit(X, y, callbacks=callbacks, **kw)


class Regressor:
    """mixture -> objective. `lightgbm`: the notebook's LGBMRegressor, early stopping on `eval_set`
    if given, else on held-out runs, then refit on all with those rounds. `linear`: OLS."""

    def __init__(self, kind: str = "lightgbm", params: dict | None = None, early_stopping_rounds: int = 3,
                 holdout: float = 0.2, seed: int = 0):
        if kind not in REGRESSORS:
            raise UserError(f"optimizer.regressor is '{kind}'; use one of {list(REGRESSORS)}.")
        if not 0 <= holdout < 1:
            raise UserError(f"optimizer.early_stopping_holdout is {holdout}; it must be in [0, 1).")
        self.kind, self.params = kind, dict(params or {})
        self.early_stopping_rounds, self.holdout, self.seed = int(early_stopping_rounds), float(holdout), seed
        self.model, self.info = None, {}

    def _lgbm(self, **over):
        import lightgbm as lgb  # only methods that use it pay its import
        # deterministic + row-wise histograms: a resumed search re-derives the same predictions.
        # One thread: on a few hundred runs OpenMP threads cost more than they give (a 48-run fit
        # took 0.3 s on 1 thread, 59 s on 2 busy cores); `lightgbm.n_jobs` in the config overrides.
        p = {"verbosity": -1, "random_state": self.seed, "deterministic": True, "force_row_wise": True,
             "n_jobs": 1, **self.params, **over}
        return lgb.LGBMRegressor(**p)

    def fit(self, X, y, eval_set: tuple | None = None) -> Regressor:
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
        ok = np.isfinite(y)  # a diverged proxy (NaN loss) says nothing about its mixture: left out
        X, y, dropped = X[ok], y[ok], int((~ok).sum())
        if len(X) < 2:
            raise UserError(f"the regressor needs >= 2 runs with finite objectives; got {len(X)} "
                            f"({dropped} non-finite).")
        if self.kind == "linear":
            from sklearn.linear_model import LinearRegression
            self.model = LinearRegression().fit(X, y)
            self.info = {"regressor": "linear", "n_train": len(X), "dropped_nonfinite": dropped}
            return self
        import lightgbm as lgb
        rounds = self.early_stopping_rounds
        stop = [lgb.early_stopping(rounds, verbose=False)] if rounds else []
        n_hold = int(round(self.holdout * len(X)))
        if eval_set is not None and stop:  # the notebook: stop on the test runs, no refit
            self.model = _fit_eval(self._lgbm(), X, y, *eval_set, stop)
            rounds, how = self.model.best_iteration_ or self.model.n_estimators, "eval_set"
        elif stop and n_hold >= 2 and len(X) - n_hold >= 2:
            idx = np.random.default_rng(self.seed).permutation(len(X))
            hold, train = idx[:n_hold], idx[n_hold:]
            probe = _fit_eval(self._lgbm(), X[train], y[train], X[hold], y[hold], stop)
            rounds, how = probe.best_iteration_ or probe.n_estimators, f"holdout {n_hold} runs, refit on all"
            self.model = self._lgbm(n_estimators=rounds).fit(X, y)
        else:  # early stopping off, or too few runs to hold any out: all rounds
            self.model = self._lgbm().fit(X, y)
            rounds, how = self.model.n_estimators, "too few runs to hold out" if stop else "off"
        self.info = {"regressor": "lightgbm", "n_train": len(X), "rounds": int(rounds), "early_stopping": how,
                     "dropped_nonfinite": dropped}
        return self

    def predict(self, X) -> np.ndarray:
        return self.model.predict(np.asarray(X, dtype=np.float64))


def top_k_mean(candidates: np.ndarray, predicted: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the k candidates with the lowest predicted objective (notebook: argsort[:k])."""
    order = np.argsort(predicted, kind="stable")[:k]
    return renormalise(candidates[order].mean(axis=0)), order


def spearman(a, b) -> float | None:
    """Rank correlation; None where undefined (a constant predictor, e.g. at smoke scale)."""
    from scipy.stats import spearmanr
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(spearmanr(a, b)[0]) if len(a) > 1 and np.ptp(a) > 0 and np.ptp(b) > 0 else None
