"""The oracle's fitted landscape: every loss column as a smooth function of the mixture.

A trained target's loss is the landscape plus seed noise. Fitting each `loss:` column
over the simplex from the grid (or design) gives the denoised ground truth: the
oracle optimum of an objective is the fit's minimum on a fine grid, and a method's
regret is the fitted loss at its mixture minus that (analysis/oracle.py).

Candidate forms, one chosen per column by leave-one-out error over the design
(the error is reported beside the noise floor in fit.json):

* `exp_linear`: L(w) = c + exp(t . w), Data Mixing Laws' form (Ye et al. 2024,
  Eq. 1; its `b` is absorbed in t since the weights sum to 1) and, linearised,
  Aioli's static law. Its exponent is linear in w, so a single column's minimum
  is at a corner: it cannot place an interior optimum.
* `scheffe_quadratic` and `scheffe_cubic`: Scheffé's mixture polynomials (Cornell,
  Experiments with Mixtures, Ch. 2), the classic mixture-design models, with a
  ridge penalty chosen by LOO (closed form); the cubic has every w_i w_j (w_i - w_j)
  and w_i w_j w_k term. They can bend, so they can place interior optima.
* `gp`: a Gaussian process (scikit-learn; RBF + white noise, hyperparameters by
  marginal likelihood), the flexible non-parametric choice.
* `gp_log`: the same GP on log(w + LOG_EPS). A source's own loss falls steeply as
  its weight leaves 0 and flattens near 1 (a power law in the weight, as in the
  per-domain laws of BiMix and Data Mixing Laws' own-domain term), so on raw
  weights one length scale cannot serve both ends; the log warp spreads the
  near-zero end. On the K = 5 design it cut the LOO error of 6 of 7 columns
  (docs/DECISIONS.md "The landscape fit").

Everything a prediction needs is in `Fit.to_json()` and `predict_json`, so fit.json
scores a mixture without this package's models.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

FORMS = ("exp_linear", "scheffe_quadratic", "scheffe_cubic", "gp", "gp_log")
LOG_EPS = 0.01  # gp_log's offset: log(w + eps) stays finite at w = 0 (1/eps = 100x the smallest weight's scale)
RIDGE = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2)  # the polynomials' penalties tried (LOO, closed form)


def scheffe_features(W: np.ndarray, degree: int) -> np.ndarray:
    """Scheffé's canonical mixture polynomial terms (no intercept: the w_i carry it)."""
    W = np.asarray(W, float)
    k = W.shape[1]
    cols = [W[:, i] for i in range(k)]
    pairs = list(itertools.combinations(range(k), 2))
    cols += [W[:, i] * W[:, j] for i, j in pairs]
    if degree >= 3:
        cols += [W[:, i] * W[:, j] * (W[:, i] - W[:, j]) for i, j in pairs]
        cols += [W[:, i] * W[:, j] * W[:, l] for i, j, l in itertools.combinations(range(k), 3)]
    return np.stack(cols, axis=1)


def _ridge(X: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(coefficients, leave-one-out residuals) of ridge least squares, LOO by the hat matrix."""
    A = X.T @ X + alpha * np.eye(X.shape[1])
    beta = np.linalg.solve(A, X.T @ y)
    h = np.einsum("ij,ji->i", X, np.linalg.solve(A, X.T))
    return beta, (y - X @ beta) / np.maximum(1.0 - h, 1e-9)


def _fit_exp(W: np.ndarray, y: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """[c, t...] of c + exp(t . w) by least squares, started from a log-linear fit."""
    if start is None:
        c0 = y.min() - 0.1 * (np.ptp(y) + 1e-6)
        t0 = np.linalg.lstsq(W, np.log(y - c0), rcond=None)[0]
        start = np.concatenate([[c0], t0])
    res = least_squares(lambda p: p[0] + np.exp(W @ p[1:]) - y, start, method="lm", max_nfev=2000)
    return res.x


def _rbf(A: np.ndarray, B: np.ndarray, scale: np.ndarray) -> np.ndarray:
    d = (A[:, None, :] - B[None, :, :]) / scale
    return np.exp(-0.5 * (d ** 2).sum(-1))


def _fit_gp(W: np.ndarray, y: np.ndarray, kernel=None):
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
    if kernel is None:
        kernel = (ConstantKernel(1.0, (1e-3, 1e3)) * RBF(np.full(W.shape[1], 0.5), (0.05, 20.0))
                  + WhiteKernel(1e-3, (1e-8, 1.0)))
        opt = "fmin_l_bfgs_b"
    else:
        opt = None  # refits (LOO, bootstrap) keep the full fit's hyperparameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GaussianProcessRegressor(kernel, normalize_y=True, optimizer=opt, n_restarts_optimizer=2,
                                        random_state=0).fit(W, y)


@dataclass
class Fit:
    """One column's chosen form: `params` (JSON-able) predict it (predict_json)."""
    form: str
    params: dict
    loo_rmse: float
    candidates: dict = field(default_factory=dict)  # form -> LOO RMSE

    def predict(self, W) -> np.ndarray:
        return predict_json({"form": self.form, "params": self.params}, W)

    def to_json(self) -> dict:
        return {"form": self.form, "params": self.params, "loo_rmse": self.loo_rmse, "candidates": self.candidates}


def predict_json(fit: dict, W) -> np.ndarray:
    """A fit.json column's prediction at mixtures W ([n, K], columns in the fit's source order)."""
    W = np.atleast_2d(np.asarray(W, float))
    p = fit["params"]
    if fit["form"] == "exp_linear":
        return p["c"] + np.exp(W @ np.asarray(p["t"]))
    if fit["form"].startswith("scheffe"):
        return scheffe_features(W, p["degree"]) @ np.asarray(p["beta"])
    if fit["form"] in ("gp", "gp_log"):
        if fit["form"] == "gp_log":
            W = np.log(W + p["eps"])  # p["X"] is stored warped
        k = p["amplitude"] * _rbf(W, np.asarray(p["X"]), np.asarray(p["length_scale"]))
        return p["y_mean"] + p["y_std"] * (k @ np.asarray(p["dual"]))
    raise ValueError(f"unknown fit form {fit['form']!r}")


def _params(form: str, W: np.ndarray, y: np.ndarray, gp_kernel=None) -> tuple[dict, object]:
    """(params, the kernel for a GP's refits) of `form` fitted to (W, y)."""
    if form == "exp_linear":
        x = _fit_exp(W, y)
        return {"c": float(x[0]), "t": x[1:].tolist()}, None
    if form.startswith("scheffe"):
        degree = 2 if form == "scheffe_quadratic" else 3
        X = scheffe_features(W, degree)
        alpha = min(RIDGE, key=lambda a: float(np.mean(_ridge(X, y, a)[1] ** 2)))
        return {"degree": degree, "alpha": alpha, "beta": _ridge(X, y, alpha)[0].tolist()}, None
    X = np.log(W + LOG_EPS) if form == "gp_log" else W
    gp = _fit_gp(X, y, gp_kernel)
    k = gp.kernel_
    amp, rbf = k.k1.k1.constant_value, k.k1.k2.length_scale
    out = {"X": X.tolist(), "dual": np.asarray(gp.alpha_).ravel().tolist(), "amplitude": float(amp),
           "length_scale": np.atleast_1d(rbf).tolist(), "y_mean": float(gp._y_train_mean),
           "y_std": float(gp._y_train_std), "noise": float(k.k2.noise_level)}
    if form == "gp_log":
        out["eps"] = LOG_EPS
    return out, k


def loo_residuals(form: str, W: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Leave-one-out residuals (observed - predicted without it). `groups`: points that
    share a mixture (seeds of it) are left out together, so a repeated mixture cannot
    predict itself."""
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    if form.startswith("scheffe") and len(np.unique(groups)) == len(y):
        params, _ = _params(form, W, y)  # its LOO is closed form at the chosen penalty
        X = scheffe_features(W, params["degree"])
        return _ridge(X, y, params["alpha"])[1]
    kernel = _params(form, W, y)[1] if form.startswith("gp") else None
    out = np.empty(len(y))
    for g in np.unique(groups):
        held = groups == g
        p, _ = _params(form, W[~held], y[~held], kernel)
        out[held] = y[held] - predict_json({"form": form, "params": p}, W[held])
    return out


def fit_column(W, y, forms=FORMS, groups=None) -> Fit:
    """Every candidate form, the one with the least leave-one-out RMSE kept (fitted on all points)."""
    W, y = np.asarray(W, float), np.asarray(y, float)
    loo = {}
    for form in forms:
        if form == "scheffe_cubic" and scheffe_features(W[:1], 3).shape[1] >= len(y):
            continue  # more terms than points: ridge alone would carry it
        try:
            loo[form] = float(np.sqrt(np.mean(loo_residuals(form, W, y, groups) ** 2)))
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            continue
    best = min(loo, key=loo.get)
    return Fit(best, _params(best, W, y)[0], loo[best], loo)


def bootstrap_fits(fit: Fit, W, y, n: int, seed: int = 0) -> list[dict]:
    """`n` refits of the chosen form on design points resampled with replacement (a
    GP keeps its hyperparameters): the fit's own uncertainty, for regret intervals."""
    W, y = np.asarray(W, float), np.asarray(y, float)
    rng = np.random.default_rng(seed)
    kernel = _params(fit.form, W, y)[1] if fit.form.startswith("gp") else None
    out = []
    for _ in range(n):
        i = rng.integers(len(y), size=len(y))
        out.append({"form": fit.form, "params": _params(fit.form, W[i], y[i], kernel)[0]})
    return out


def fine_grid(k: int, points: int = 6000) -> np.ndarray:
    """The mixtures an optimum is searched on: every multiple of 1/R over the simplex,
    R the largest with at most `points` mixtures (K = 3: R = 108; K = 5: R = 17)."""
    from math import comb
    r = 1
    while comb(r + 1 + k - 1, k - 1) <= points:
        r += 1
    grid = [np.array(c) / r for c in itertools.product(range(r + 1), repeat=k - 1) if sum(c) <= r]
    return np.array([np.concatenate([g, [1.0 - g.sum()]]) for g in grid])
