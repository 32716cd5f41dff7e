"""Regret against a fitted landscape, and the statistics a verdict rests on.

* A job's regret: the fitted loss of its objective at its mixture minus the fitted
  optimum (both on the landscape's fit, fit.json), and the same on each bootstrap
  refit of the fit: the spread of those is the fit's own uncertainty.
* Per (objective, method): the mean over seeds and a 95% interval whose half-width
  is t_{n-1} * sqrt(s^2 / n + var_fit), s the seeds' std and var_fit the bootstrap
  variance of the seed-mean regret: the search's spread and the fit's, together.
* "Within noise" (`≈`) is an equivalence test (TOST-style, docs/DECISIONS.md "Within
  noise"): the interval's upper end is below the objective's noise floor, the
  seed-to-seed std of one mixture's target. A method gets `≈` only when it is shown
  to be as close to the optimum as one more training seed could tell, not when its
  spread is too wide to tell it apart.
* The leaderboard: per method and role (tuning, held-out) the mean normalised regret
  over objectives with a t-interval over them, wins (the lowest mean regret of an
  objective, the oracle aside) and ties (`≈`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from baselines.landscape_fit import fine_grid, predict_json

LEVEL = 0.95


class Landscape:
    """fit.json as functions: an objective (loss column -> weight) at mixtures, its optimum,
    and both on every bootstrap refit."""

    def __init__(self, fit: dict):
        self.fit, self.sources = fit, fit["sources"]
        self.grid = fine_grid(len(self.sources))
        self.n_boot = min(len(c.get("bootstrap", [])) for c in fit["columns"].values())
        self._opt: dict = {}

    def loss(self, columns: dict, W, boot: int | None = None) -> np.ndarray:
        pick = (lambda c: self.fit["columns"][c]) if boot is None else (
            lambda c: self.fit["columns"][c]["bootstrap"][boot])
        return sum(a * predict_json(pick(c), W) for c, a in columns.items())

    def optimum(self, columns: dict, boot: int | None = None) -> tuple[np.ndarray, float]:
        key = (tuple(sorted(columns.items())), boot)
        if key not in self._opt:
            v = self.loss(columns, self.grid, boot)
            self._opt[key] = self.grid[int(np.argmin(v))], float(v.min())
        return self._opt[key]

    def regret(self, columns: dict, W) -> tuple[np.ndarray, np.ndarray]:
        """(regret at each mixture of W, [bootstrap, mixture] regrets on the refits)."""
        W = np.atleast_2d(W)
        main = self.loss(columns, W) - self.optimum(columns)[1]
        boot = np.array([self.loss(columns, W, b) - self.optimum(columns, b)[1] for b in range(self.n_boot)])
        return main, boot.reshape(self.n_boot, len(W))


def interval(values: np.ndarray, boot_means: np.ndarray | None, level: float = LEVEL) -> tuple[float, float]:
    """(mean, half-width): the t-interval over seeds widened by the fit's bootstrap variance
    of the seed mean; one seed: the fit's part alone (z)."""
    values = np.asarray(values, float)
    n, mean = len(values), float(np.mean(values))
    var_fit = float(np.var(boot_means, ddof=1)) if boot_means is not None and len(boot_means) > 1 else 0.0
    if n < 2:
        return mean, float(stats.norm.ppf((1 + level) / 2) * np.sqrt(var_fit))
    s2 = float(np.var(values, ddof=1))
    return mean, float(stats.t.ppf((1 + level) / 2, n - 1) * np.sqrt(s2 / n + var_fit))


def within_noise(mean: float, half: float, floor: float | None) -> bool:
    """The equivalence test: the interval's upper end below the noise floor."""
    return floor is not None and np.isfinite(half) and mean + half < floor


def per_objective(rows: pd.DataFrame, floors: dict[str, float]) -> pd.DataFrame:
    """A row per (objective, method): seeds, mean regret, interval, `≈`, normalised regret,
    search cost. `rows`: regret.csv's rows with `boot` (the per-refit regrets) beside."""
    out = []
    for (obj, method), g in rows.groupby(["objective", "method"], sort=False):
        boot = np.mean(np.stack(g["boot"].to_list()), axis=0) if g["boot"].notna().all() else None
        mean, half = interval(g["regret"].to_numpy(), boot)
        out.append({"objective": obj, "role": g["role"].iloc[0], "method": method, "seeds": len(g),
                    "regret": mean, "ci": half, "within_noise": within_noise(mean, half, floors.get(obj)),
                    "normalized_regret": float(g["normalized_regret"].mean()),
                    "search_hours": float(g["search_hours"].mean())})
    return pd.DataFrame(out)


def leaderboard(per: pd.DataFrame, reference: str = "fastmix", level: float = LEVEL) -> pd.DataFrame:
    """Per (role, method): mean normalised regret over the role's objectives and its
    t-interval over them, wins, ties within noise, objectives, search cost, x reference."""
    rows = []
    for role, g in per.groupby("role", sort=False):
        searched = g[g["method"] != "oracle"]
        best = searched.loc[searched.groupby("objective")["regret"].idxmin()]
        wins = best["method"].value_counts()
        for method, m in g.groupby("method", sort=False):
            v = m["normalized_regret"].dropna().to_numpy()
            half = (float(stats.t.ppf((1 + level) / 2, len(v) - 1) * np.std(v, ddof=1) / np.sqrt(len(v)))
                    if len(v) > 1 else float("nan"))
            rows.append({"role": role, "method": method, "normalized_regret": float(np.mean(v)) if len(v) else np.nan,
                         "ci": half, "wins": int(wins.get(method, 0)) if method != "oracle" else 0,
                         "ties": int(m["within_noise"].sum()), "objectives": len(m),
                         "search_hours": float(m["search_hours"].mean())})
    board = pd.DataFrame(rows)
    ref = board[board["method"] == reference].set_index("role")["search_hours"]
    board["x_fastmix"] = [h / ref[r] if r in ref and ref[r] > 0 else np.nan
                          for r, h in zip(board["role"], board["search_hours"])]
    return board.sort_values(["role", "normalized_regret"], kind="stable").reset_index(drop=True)


def budget_stability(land: pd.DataFrame, columns_by_objective: dict[str, dict]) -> pd.DataFrame:
    """Per objective: the Spearman correlation, over the mixtures trained at both budgets
    (the `budget` stage and the same mixtures at the job's budget and seed), of their
    objective losses, and whether the best of them is the same mixture at both."""
    big = land[land["stage"] == "budget"]
    if big.empty:
        return pd.DataFrame()
    small = land[(land["tokens"] == land["tokens"].min()) & (land["seed"].isin(big["seed"].unique()))
                 & land["mixture"].isin(big["mixture"])].drop_duplicates(["mixture", "seed"]).set_index("mixture")
    big = big.set_index("mixture").loc[small.index]
    out = []
    for name, cols in columns_by_objective.items():
        a = sum(small[c] * w for c, w in cols.items())
        b = sum(big[c] * w for c, w in cols.items())
        rho = stats.spearmanr(a, b).statistic
        out.append({"objective": name, "mixtures": len(a), "spearman": float(rho),
                    "best_small": a.idxmin(), "best_large": b.idxmin(), "optimum_moved": a.idxmin() != b.idxmin()})
    return pd.DataFrame(out)
