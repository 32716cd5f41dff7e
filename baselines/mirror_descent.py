"""MixMin's convex objective L(w) and the entropic mirror descent that minimises
it (`baselines.mixmin` builds L from the proxies; see its docstring for L).

Why the default optimiser is not the code's: every term of L carries 1/len_n,
so the gradient, and with it a fixed-eta step, shrinks as the rows grow. The
code's rows are benchmark items of tens of tokens; ours are context windows
(128 demo, 2048 paper), where 100 steps at eta 1 close ~54% of the gap to the
optimum at 128 tokens and almost none at 2048. The objective L is kept (same
minimiser); the default (`step: length`) steps on L~ = L / u, u = sum_n
c_n / len_n (eta times the c-weighted harmonic mean row length), whose
gradient has <w, grad> = -1 at every w, so one scale at any row length. Long
rows make each row's responsibilities nearly one-hot, where a unit step on a
small weight overshoots (grad_k reaches -share_k / w_k) and cycles, so each
step is accepted only under the relative-smoothness decrease condition
  L~(w') <= L~(w) + <grad, w' - w> + KL(w' || w) / eta_t
(Bauschke-Bolte-Teboulle 2017; Lu-Freund-Nesterov 2018), which makes every
step a descent step: eta_t starts at twice the last accepted step (eta at the
first) and is halved until the condition holds (backtracking as in Nesterov
2013's gradient method with line search). The loop stops once the Frank-Wolfe
gap <w, grad> - min_k grad_k of L~ is below `tol` (`stop_rule: gap`): by
convexity it bounds L~(w) - min L~, and it vanishes at every optimum, on a
face too. The centred gradient max |grad_k - <w, grad>| (`stop_rule:
centered`) vanishes only inside the simplex: at the single-source optimum (one
proxy best on every row) the other weights tend to 0 with grad_k - <w, grad>
near 1, so it never fires.
"""
from __future__ import annotations

import numpy as np

STOP_RULES = ("gap", "centered", "raw")
STEPS = ("length", "public")
LOG_W_FLOOR = -700.0  # step: length keeps every log-weight above this
ETA_GROWTH = 1e6  # the line search never tries a step above ETA_GROWTH x eta
CRITERION = {"gap": "gap", "centered": "centered_grad", "raw": "max_abs_grad"}  # curve key of each rule


def _log_mix(w: np.ndarray, ll: np.ndarray) -> np.ndarray:
    """log sum_k w_k exp(l_kn) [N], shifted by each row's max so total log-likelihoods
    of -10^4 do not underflow."""
    with np.errstate(divide="ignore"):
        a = ll + np.log(w)[:, None]  # log w_k = -inf for a weight of 0 (a one-hot w): that term drops
    top = a.max(axis=0)
    return top + np.log(np.exp(a - top).sum(axis=0))


def mixmin_loss(w, ll, lengths, c=None) -> float:
    """L(w) = -sum_n c_n log(sum_k w_k exp(l_kn)) / len_n; c = 1/N by default (public code)."""
    ll, lengths = np.asarray(ll, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
    c = np.full(ll.shape[1], 1.0 / ll.shape[1]) if c is None else np.asarray(c, dtype=np.float64)
    return float(-(c * _log_mix(np.asarray(w, dtype=np.float64), ll) / lengths).sum())


def mixmin_grad(w, ll, lengths, c=None) -> np.ndarray:
    """dL/dw_k = -sum_n c_n exp(l_kn - lse_n) / len_n (the raw gradient, as jax.grad gives)."""
    ll, lengths = np.asarray(ll, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
    c = np.full(ll.shape[1], 1.0 / ll.shape[1]) if c is None else np.asarray(c, dtype=np.float64)
    with np.errstate(over="ignore"):  # only a weight of 0 can overflow (ratio <= 1 / w_k otherwise)
        ratio = np.exp(ll - _log_mix(np.asarray(w, dtype=np.float64), ll))
    return -(ratio @ (c / lengths))


def centered_grad(w: np.ndarray, g: np.ndarray) -> float:
    """max |g_k - <w, g>| over the weights > 0: 0 at an optimum inside the simplex (every g_k
    is <w, g> there, -sum_n c_n / len_n for L), not at a corner; the `centered` stopping rule."""
    on = w > 0
    return float(np.abs(g[on] - w[on] @ g[on]).max())


def fw_gap(w: np.ndarray, g: np.ndarray) -> float:
    """<w, g> - min_k g_k >= L(w) - min L (convexity), 0 at every optimum, corners included:
    the `gap` stopping rule."""
    return float(w @ g - g.min())


def _kept(t: int) -> bool:
    """Curve rows kept in the trace: every step of the first 100 (the code's whole run),
    then every 10th to 1000, then every 100th."""
    return t < 100 or (t < 1000 and t % 10 == 0) or t % 100 == 0


def mirror_descent(ll, lengths, c=None, eta: float = 1.0, max_steps: int = 2000, tol: float = 1e-5,
                   stop_rule: str = "gap", step: str = "length") -> tuple[np.ndarray, list[dict]]:
    """Entropic mirror descent on L from uniform. Returns (w, the curve: one row per kept
    step with L, the weights and the three stopping criteria at that step's w; the last
    row is the returned w, with `stopped` and `converged`).

    `step: public` is mixmin_gen.py's loop: eta on the raw gradient, no line search.
    `step: length` steps on the gradient of L / u, u = sum_n c_n / len_n, with the line
    search of the module docstring (eta = the first step tried). `gap` and `centered`
    are measured on the gradient of L / u whatever the step, so `tol` means one thing at
    any row length; `raw` is max |grad L| as the code tests it, after the update. The
    other two are tested before it, so the returned w is the one that met the tolerance."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if stop_rule not in STOP_RULES:
        raise ValueError(f"stop_rule must be one of {STOP_RULES}, got {stop_rule!r}")
    ll, lengths = np.asarray(ll, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
    K, N = ll.shape
    c = np.full(N, 1.0 / N) if c is None else np.asarray(c, dtype=np.float64)
    u = float((c / lengths).sum())
    c_hat = c / lengths / u  # row weights of L / u (sum 1)
    w = np.full(K, 1.0 / K)
    rows, t, halvings, fired, e = [], 0, 0, False, eta
    while True:
        lse = _log_mix(w, ll)
        # L / u is L with row weights c^ and unit lengths: its gradient is mixmin_grad's
        g_norm = mixmin_grad(w, ll, np.ones(N), c_hat)
        g_raw = u * g_norm
        row = {"step": t, "loss": float(-(c * lse / lengths).sum()), "weights": w.tolist(),
               "max_abs_grad": float(np.abs(g_raw).max()), "centered_grad": centered_grad(w, g_norm),
               "gap": fw_gap(w, g_norm)}
        row["stop_criterion"] = row[CRITERION[stop_rule]]
        fired = fired or (stop_rule != "raw" and row["stop_criterion"] < tol)
        if fired or t >= max_steps:
            break
        # ours: try twice the last accepted step, then halve. Where L is flat (proxies that score
        # the rows alike, an optimum on a face) eta 1 crawls at O(1/t) (1871 steps on the fake
        # proxies of the tests, 11 with the growth): take what the decrease condition allows
        if step == "public":
            w_new, e = _entropic_step(w, g_raw, eta), eta
        else:
            with np.errstate(over="ignore"):
                r = np.exp(ll - lse)  # p_kn / mixture_n: <= 1 / w_k, and sum_k w_k r_kn = 1
            w_new, e, n = _line_search(w, g_norm, r, c_hat, eta if t == 0 else min(2 * e, ETA_GROWTH * eta))
            halvings += n
        row["eta"] = e
        if _kept(t):
            rows.append(row)
        w = w_new
        t += 1
        fired = stop_rule == "raw" and row["max_abs_grad"] < tol  # after the update, as the code does
    stop = "tolerance" if fired else "max_steps"
    rows.append({**row, "stopped": stop, "converged": fired, "halvings": halvings})
    return w, rows


def _log_step(w: np.ndarray, g: np.ndarray, e: float) -> np.ndarray:
    """log of w exp(-e g) / normaliser, in log space: a large g on a tiny weight cannot
    overflow; a weight of 0 stays 0 (its g may be -inf)."""
    with np.errstate(divide="ignore"):
        log_w = np.log(w)
    with np.errstate(invalid="ignore"):
        z = np.where(w > 0, log_w - e * g, -np.inf)
    top = z.max()
    return z - (top + np.log(np.exp(z - top).sum()))


def _entropic_step(w: np.ndarray, g: np.ndarray, eta: float) -> np.ndarray:
    """mixmin_gen.py's update: w exp(-eta g) / normaliser."""
    return np.exp(_log_step(w, g, eta))


def _line_search(w: np.ndarray, g: np.ndarray, r: np.ndarray, c_hat: np.ndarray,
                 e: float) -> tuple[np.ndarray, float, int]:
    """Ours (module docstring): the step from `e`, halved until the relative-smoothness
    decrease condition holds; returns (w', the step taken, the halvings)."""
    on_w = w > 0
    with np.errstate(divide="ignore"):
        log_w = np.log(w)
    halvings = 0
    while True:
        # no weight reaches 0, so none is lost for good to one long step; e^-700 keeps r <= 1 / w finite
        log_w_new = np.maximum(_log_step(w, g, e), LOG_W_FLOOR)
        w_new = np.exp(log_w_new)
        w_new /= w_new.sum()
        # L~(w') - L~(w) - <g, w' - w> = sum_n c^_n (x_n - log1p x_n), x_n = sum_k (w'_k - w_k) r_kn:
        # exact, free of the cancellation between two losses of ~len nats each
        x = (w_new - w)[on_w] @ r[on_w]  # zero weights stay 0 (and their r may be inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            excess = float(c_hat @ (x - np.log1p(x)))  # inf / nan (-> halve) if a row lost all its mass
        kl = float(w_new[on_w] @ (log_w_new[on_w] - log_w[on_w]))
        if excess <= max(kl, 0.0) / e or e < 1e-12:
            return w_new, e, halvings
        e /= 2
        halvings += 1
