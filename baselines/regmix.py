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
* One proxy per mixture through `ctx.run_proxies` (512 in the paper).
* Regressor mixture -> objective: LightGBM with the notebook's parameters
  (gbdt, 1000 rounds, lr 0.01, metrics l1 + l2, early stopping after 3 rounds
  without improvement), or linear regression (the paper's second option).
* Simulation: candidates from the same generator (1M in the paper), predicted;
  output = the mean of the top-k (lowest predicted objective; k = 100).

Choices left open (docs/DECISIONS.md, "RegMix and CLIMB"): early stopping
needs held-out runs (the notebook stops on its 256 test runs): a search holds
out 20% of its proxies to pick the rounds, then refits on all. Rounded weights
are renormalised (the public YAMLs keep sums off 1 by up to K x 1e-4).

`python -m baselines.regmix --mixtures M.csv --targets T.csv ...` replays the
notebook on recorded runs (see `main`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fastmix.cli import run_tool
from fastmix.errors import UserError
from fastmix.optimizer import SearchContext, SearchResult

SCALES = ("smoke", "demo", "paper")
REGRESSORS = ("lightgbm", "linear")
# synthesize_mixture.py's constants; the YAML repeats them with their sources
GENERATOR_DEFAULTS = dict(temperature=0.5, min_strength=0.1, max_strength=5.0, n_strengths=15,
                          max_usage=15.0, minimum=2e-4, sample_multiplier=100)


def pick_preset(method: str, scale: str, presets: dict, required: tuple[str, ...]) -> dict:
    """The scale-dependent counts of `conf/optimizer/<method>.yaml` for `scale`."""
    if scale not in SCALES:
        raise UserError(f"optimizer.scale (or top-level `scale`) is '{scale}'; use one of {list(SCALES)}.")
    preset = presets.get(scale)
    if not preset:
        raise UserError(f"conf/optimizer/{method}.yaml has no '{scale}' preset; add `{scale}: {{...}}`.")
    missing = [k for k in required if k not in preset]
    if missing:
        raise UserError(f"optimizer.{scale} misses {missing}; set them in conf/optimizer/{method}.yaml.")
    return dict(preset)


_POS, _ONE = (lambda v: v > 0, "> 0"), (lambda v: v >= 1, ">= 1")
_RULES = {"temperature": _POS, "min_strength": _POS, "max_strength": _POS, "n_strengths": _ONE,
          "max_usage": _POS, "minimum": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"), "sample_multiplier": _ONE}


def check_generator(**g) -> dict:
    """Validated generator settings (the YAML keys of the same names)."""
    unknown = sorted(set(g) - set(_RULES))
    if unknown:
        raise UserError(f"unknown optimizer keys {unknown}; the generator takes {sorted(_RULES)}.")
    g = {k: int(v) if k in ("n_strengths", "sample_multiplier") else float(v) for k, v in g.items()}
    for key, (ok, rule) in _RULES.items():
        if not ok(g[key]):
            raise UserError(f"optimizer.{key} is {g[key]}; it must be {rule} "
                            f"(published {GENERATOR_DEFAULTS[key]}).")
    if g["min_strength"] > g["max_strength"]:
        raise UserError(f"optimizer.min_strength {g['min_strength']} > max_strength {g['max_strength']}.")
    return g


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


class RegMix:
    name = "regmix"

    def __init__(self, scale: str = "demo", paper: dict | None = None, demo: dict | None = None,
                 smoke: dict | None = None, regressor: str = "lightgbm", lightgbm: dict | None = None,
                 early_stopping_rounds: int = 3, early_stopping_holdout: float = 0.2,
                 simulation: str = "generator", **generator):
        preset = pick_preset("regmix", scale, {"paper": paper, "demo": demo, "smoke": smoke},
                             ("n_proxies", "n_candidates", "top_k"))
        self.n_proxies, self.n_candidates, self.top_k = (int(preset.pop(k)) for k in
                                                         ("n_proxies", "n_candidates", "top_k"))
        if self.n_proxies < 2:
            raise UserError(f"optimizer.{scale}.n_proxies is {self.n_proxies}; set it >= 2 (a regression).")
        if not 1 <= self.top_k <= self.n_candidates:
            raise UserError(f"optimizer.{scale}.top_k is {self.top_k}; set it in 1..{self.n_candidates}.")
        if simulation not in ("generator", "notebook"):
            raise UserError(f"optimizer.simulation is '{simulation}'; use generator or notebook.")
        self.generator = check_generator(**{**GENERATOR_DEFAULTS, **generator})
        self.lgbm_params = {**(lightgbm or {}), **preset}  # e.g. min_child_samples per scale
        self.regressor, self.simulation = regressor, simulation
        self.early_stopping_rounds, self.holdout = early_stopping_rounds, early_stopping_holdout
        Regressor(regressor, holdout=early_stopping_holdout)  # bad values fail now, before any proxy

    def planned_proxy_runs(self, n_sources: int) -> int:
        return self.n_proxies  # one proxy per generated mixture, whatever K

    def search(self, ctx: SearchContext) -> SearchResult:
        sources, share = list(ctx.sources), ctx.token_share()
        prior = np.array([share[s] for s in sources])
        rng = np.random.default_rng(ctx.seed)
        mixtures = renormalise(dirichlet_mixtures(prior, self.n_proxies, rng, **self.generator))
        records = ctx.run_proxies([dict(zip(sources, map(float, w))) for w in mixtures], "regmix")
        X = np.array([[r["weights"][s] for s in sources] for r in records])
        y = np.array([r["objective"] for r in records], dtype=np.float64)
        reg = Regressor(self.regressor, self.lgbm_params, self.early_stopping_rounds, self.holdout,
                        ctx.seed).fit(X, y)
        if self.simulation == "notebook":  # regression.ipynb: Dirichlet(prior x 1), no cap or rounding
            candidates = rng.dirichlet(as_prior(prior), size=self.n_candidates)
        else:
            gen = {**self.generator, "sample_multiplier": 1}  # 1M x 100 trials would be 100M draws
            candidates = renormalise(dirichlet_mixtures(prior, self.n_candidates, rng, **gen))
        predicted = reg.predict(candidates)
        weights, top = top_k_mean(candidates, predicted, self.top_k)
        chosen_pred = float(reg.predict(weights[None])[0])
        trace = [{"kind": "proxy", **r} for r in records]
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
                "best_proxy": {"objective": float(y[best]), "weights": records[best]["weights"]}}
        return SearchResult(dict(zip(sources, map(float, weights))), trace=trace, info=info)


# ---- recorded-results CLI (sail-sg/regmix data/ layout) ----------------------------------------

def _read_table(path: str, what: str):
    import pandas as pd
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file {p} does not exist.")
    try:
        df = pd.read_csv(p)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"{what} file {p} is not a readable CSV: {e}") from None
    if "index" not in df.columns:  # the two tables are joined on it, as in sail-sg/regmix data/
        raise UserError(f"{what} file {p} has no `index` column (columns: {list(df.columns)[:8]}).")
    return df


def load_runs(mixtures: str, targets: str, column: str, sources: list[str] | None = None):
    """(source names, X, y) of the runs in both tables, joined on `index`."""
    m, t = _read_table(mixtures, "mixture"), _read_table(targets, "target")
    if column not in t.columns:
        raise UserError(f"target column '{column}' is not in {targets}; its columns are "
                        f"{[c for c in t.columns if c != 'index']}.")
    names = [c for c in m.columns if c != "index"]
    if sources is not None and names != sources:
        raise UserError(f"{mixtures} has columns {names}, but the training mixtures have {sources}.")
    if len(names) < 2:
        raise UserError(f"{mixtures} needs >= 2 mixture columns besides `index`.")
    j = m.merge(t[["index", column]], on="index", how="inner")
    if j.empty:
        raise UserError(f"{mixtures} and {targets} share no value of `index`: nothing to fit.")
    try:
        j = j[np.isfinite(j[column].to_numpy(dtype=np.float64))]  # runs without a value (crashed) drop out
        X = j[names].to_numpy(dtype=np.float64)
    except ValueError as e:
        raise UserError(f"{mixtures} / {targets}: mixture and target values must be numbers ({e}).") from None
    if not np.all(np.isfinite(X)) or np.any(X < 0):
        raise UserError(f"{mixtures}: mixture weights must be finite and >= 0.")
    if len(j) < 2:
        raise UserError(f"{mixtures} and {targets} share {len(j)} run(s) with a finite {column}; need 2.")
    return names, X, j[column].to_numpy(dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m baselines.regmix",
                                 description="RegMix on recorded proxy runs: fit, simulate, write.")
    for flag, text in [("--mixtures", "CSV: index + one weight column per domain"),
                       ("--targets", "CSV: index + objective columns (lower is better)"),
                       ("--target-column", "objective column, e.g. metric/the_pile_pile_cc_val_loss"),
                       ("--out", "mixture JSON to write")]:
        ap.add_argument(flag, required=True, help=text)
    ap.add_argument("--test-mixtures", help="held-out runs' mixtures and targets: report Spearman's rho")
    ap.add_argument("--test-targets")
    ap.add_argument("--regressor", choices=REGRESSORS, default="lightgbm")
    ap.add_argument("--n-candidates", type=int, default=1_000_000, help="simulated mixtures (paper: 1M)")
    ap.add_argument("--top-k", type=int, default=100, help="best averaged (paper 100; notebook 128)")
    ap.add_argument("--prior", help="JSON {domain: token share}; default: mean of the training mixtures")
    ap.add_argument("--early-stopping", choices=("holdout", "test"), default="holdout", help="holdout: 20%% "
                    "of the runs pick the rounds, refit on all; test: stop on the test runs (notebook)")
    ap.add_argument("--seed", type=int, default=42, help="notebook: np.random.seed(42)")
    return run_tool(ap, _run_cli, argv)


def _run_cli(a) -> None:
    import json

    from omegaconf import OmegaConf

    from fastmix.config import CONF_DIR
    from fastmix.records import write_json
    if (a.test_mixtures is None) != (a.test_targets is None):
        raise UserError("give both --test-mixtures and --test-targets, or neither.")
    if a.early_stopping == "test" and a.test_mixtures is None:
        raise UserError("--early-stopping test needs --test-mixtures and --test-targets.")
    if not 1 <= a.top_k <= a.n_candidates:
        raise UserError(f"--top-k is {a.top_k}; need 1 <= top-k <= --n-candidates ({a.n_candidates}).")
    names, X, y = load_runs(a.mixtures, a.targets, a.target_column)
    test = load_runs(a.test_mixtures, a.test_targets, a.target_column, names) if a.test_mixtures else None
    if a.prior:
        try:
            given = json.loads(Path(a.prior).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--prior {a.prior}: not a readable JSON file ({e}).") from None
        if not isinstance(given, dict) or set(given) != set(names):
            raise UserError(f"--prior must be a JSON object with exactly the mixture columns {names}.")
        prior, prior_from = as_prior([given[n] for n in names], "--prior"), a.prior
    else:  # the notebook hard-codes the Pile token share; recorded runs do not carry it, and
        # the mean of the training mixtures is the centre of the region they cover
        prior, prior_from = as_prior(X.mean(axis=0), "mean of the training mixtures (give --prior)"), \
            "mean of the training mixtures"
    # One source of truth for the notebook's LightGBM parameters: the method's own config.
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "optimizer" / "regmix.yaml"))
    params = {**yaml["lightgbm"], "min_child_samples": yaml["paper"]["min_child_samples"]}
    reg = Regressor(a.regressor, params, yaml["early_stopping_rounds"], yaml["early_stopping_holdout"],
                    a.seed)
    reg.fit(X, y, eval_set=(test[1], test[2]) if a.early_stopping == "test" else None)
    rng = np.random.default_rng(a.seed)
    candidates = rng.dirichlet(prior, size=a.n_candidates)  # the notebook's simulation
    predicted = reg.predict(candidates)
    weights, top = top_k_mean(candidates, predicted, a.top_k)
    out = {"weights": dict(zip(names, map(float, weights))), "target_column": a.target_column,
           "regressor": reg.info, "n_train": len(y), "prior": dict(zip(names, map(float, prior))),
           "prior_from": prior_from, "simulation": "Dirichlet(prior x 1), as regression.ipynb",
           "n_candidates": a.n_candidates, "top_k": a.top_k, "seed": a.seed,
           "top_k_mean_predicted": float(predicted[top].mean()),
           **({"spearman": spearman(reg.predict(test[1]), test[2]), "n_test": len(test[2])} if test else {})}
    write_json(Path(a.out), out)
    extra = f", Spearman {out['spearman']:.4f} on {out['n_test']} test runs" if test is not None else ""
    print(f"wrote {a.out}: {len(names)} domains, {len(y)} training runs{extra}")


if __name__ == "__main__":
    sys.exit(main())
