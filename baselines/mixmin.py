"""MixMin: the mixture as a convex minimisation over per-source proxy models.

Implements MixMin (Thudi et al., arXiv 2502.10510, ICML 2025): for
cross-entropy, as the model class grows, the best model of a mixture is the
mixture of the per-source models, so the bi-level problem becomes the convex
L(w) below, minimised by entropic descent on the simplex. Section numbers are
not cited (the paper's text was not at hand); every value below is checked
against the public code (Anvith-Thudi/MixMin, LLM_DataMixing/mixmin_gen.py and
logprobs.py):

* One proxy per source (K runs, one-hot mixtures) through `ctx.proxies.run`,
  each kept on disk (`keep_model`) to be scored.
* Scoring (logprobs.py): for every objective row n and proxy k the row's
  *total* log-likelihood l_{k,n} (sum over its counted target tokens) and its
  length len_n (number of counted tokens). One forward per proxy over the
  objective rows, charged as 2·N·tokens.
* L(w) = -sum_n c_n [log sum_k w_k exp(l_{k,n})] / len_n: the length divides
  outside the log-sum-exp (mixmin_gen.py `loss_fn`: logsumexp with b = w,
  then / lengths, then -mean). c_n = 1/N with one objective group (the public
  code exactly); with weighted groups c_n = w_g / N_g, so each group counts
  with its objective weight, as in `Objective.loss`.
* Entropic mirror descent (`update_with_stop`): w <- w exp(-eta grad) /
  normaliser, eta = 1, from uniform, at most 100 steps; the step's gradient is
  taken at the current w, the update applied, then the loop stops if
  max |grad| < 1e-4 (so the last update is always applied, as in the code).
  Kept as `step: public, max_steps: 100, stop_rule: raw`; not the default
  (below).
* The fit uses a seeded random 80% of the rows (public code: a Bernoulli(0.8)
  mask); the other 20% give the held-out loss of the output, of uniform and of
  each proxy alone (the code's "Group Model Losses" / "MixMin Ensemble Loss").

Choices left open (docs/DECISIONS.md, "MixMin"): the split is stratified per
objective group with exactly round(20%) held out of each; the optimiser.

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

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fastmix.errors import UserError
from fastmix.schema import MethodParams, rule
from fastmix.search.optimizer import SearchContext, SearchResult
from fastmix.search.proxies import ProxyJob
from fastmix.train.loop import token_losses
from fastmix.train.models import flop_params
from fastmix.train.sampling import Batch

STOP_RULES = ("gap", "centered", "raw")
STEPS = ("length", "public")
LOG_W_FLOOR = -700.0  # step: length keeps every log-weight above this
ETA_GROWTH = 1e6  # the line search never tries a step above ETA_GROWTH x eta
CRITERION = {"gap": "gap", "centered": "centered_grad", "raw": "max_abs_grad"}  # curve key of each rule


# ---- the convex objective and its optimiser (numpy, float64) ---------------------------------

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
    return -(ratio * (c / lengths)[None, :]).sum(axis=1)


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
    rows, t, halvings, fired = [], 0, 0, False
    while True:
        lse = _log_mix(w, ll)
        with np.errstate(over="ignore"):
            r = np.exp(ll - lse)  # p_kn / mixture_n: <= 1 / w_k, and sum_k w_k r_kn = 1
        g_norm = -(r @ c_hat)  # grad of L / u; grad L = u * g_norm
        g_raw = u * g_norm
        row = {"step": t, "loss": float(-(c * lse / lengths).sum()), "weights": w.tolist(),
               "max_abs_grad": float(np.abs(g_raw).max()), "centered_grad": centered_grad(w, g_norm),
               "gap": fw_gap(w, g_norm)}
        row["stop_criterion"] = row[CRITERION[stop_rule]]
        fired = fired or (stop_rule != "raw" and row["stop_criterion"] < tol)
        if fired or t >= max_steps:
            break
        g = g_raw if step == "public" else g_norm
        # ours: try twice the last accepted step, then halve. Where L is flat (proxies that score
        # the rows alike, an optimum on a face) eta 1 crawls at O(1/t) (1871 steps on the fake
        # proxies of the tests, 11 with the growth): take what the decrease condition allows
        e = eta if step == "public" or t == 0 else min(2 * e, ETA_GROWTH * eta)
        with np.errstate(divide="ignore"):
            log_w = np.log(w)
        on_w = w > 0
        while True:
            # w exp(-e g) / normaliser in log space: a large g on a tiny weight cannot overflow
            with np.errstate(invalid="ignore"):
                z = np.where(on_w, log_w - e * g, -np.inf)  # a weight of 0 stays 0 (its g may be -inf)
            top = z.max()
            log_w_new = z - (top + np.log(np.exp(z - top).sum()))
            if step == "public":
                w_new = np.exp(log_w_new)
                break
            # ours: no weight reaches 0, so none is lost for good to one long step; e^-700 keeps
            # r <= 1 / w finite
            log_w_new = np.maximum(log_w_new, LOG_W_FLOOR)
            w_new = np.exp(log_w_new)
            w_new /= w_new.sum()
            # L~(w') - L~(w) - <g, w' - w> = sum_n c^_n (x_n - log1p x_n), x_n = sum_k (w'_k - w_k) r_kn:
            # exact, free of the cancellation between two losses of ~len nats each
            x = (w_new - w)[on_w] @ r[on_w]  # zero weights stay 0 (and their r may be inf)
            with np.errstate(divide="ignore", invalid="ignore"):
                excess = float(c_hat @ (x - np.log1p(x)))  # inf / nan (-> halve) if a row lost all its mass
            kl = float(w_new[on_w] @ (log_w_new[on_w] - log_w[on_w]))
            if excess <= max(kl, 0.0) / e or e < 1e-12:
                break
            e /= 2
            halvings += 1
        row["eta"] = e
        if _kept(t):
            rows.append(row)
        w = w_new
        t += 1
        fired = stop_rule == "raw" and row["max_abs_grad"] < tol  # after the update, as the code does
    stop = "tolerance" if fired else "max_steps"
    rows.append({**row, "stopped": stop, "converged": fired, "halvings": halvings})
    return w, rows


# ---- scoring the objective rows with each proxy ------------------------------------------------

@torch.no_grad()
def row_logliks(model, rows: dict, device, meter=None, precision: str = "bf16",
                batch_size: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """group -> (total log-likelihood of each row over its counted tokens, their number),
    float64. The same forward and token losses as `Objective.loss`, kept per row."""
    was_training = model.training
    model.eval()
    out = {}
    for g, (ids, mask) in rows.items():
        ll, n = [], []
        for i in range(0, len(ids), batch_size):
            b = Batch(ids[i:i + batch_size], torch.zeros(0), torch.ones(0),
                      None if mask is None else mask[i:i + batch_size])
            tl = token_losses(model, b, device, precision).double()
            m = torch.ones_like(tl) if b.loss_mask is None else b.loss_mask.to(tl.device).double()
            ll.append((-(tl * m).sum(1)).cpu().numpy())
            n.append(m.sum(1).cpu().numpy())
            if meter is not None:
                meter.add_forward(flop_params(model), tl.numel())
        out[g] = (np.concatenate(ll), np.concatenate(n))
    model.train(was_training)
    return out


def split_rows(groups: dict[str, int], holdout: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """group -> bool mask of its held-out rows: round(holdout x N_g) of each group at random,
    never all of them (a group must stay in the fit)."""
    out = {}
    for g, n in groups.items():
        k = min(int(round(holdout * n)), n - 1)
        m = np.zeros(n, dtype=bool)
        m[rng.permutation(n)[:k]] = True
        out[g] = m
    return out


def stack_rows(per_source: list[dict], group_weights: dict[str, float], pick: dict[str, np.ndarray]):
    """(l [K, N], len [N], c [N]) over the picked rows of every group; c_n = w_g / N_g,
    renormalised over the groups present."""
    ll, lens, c = [], [], []
    for g, sel in pick.items():
        if not sel.any():
            continue
        ll.append(np.stack([d[g][0][sel] for d in per_source]))
        lens.append(per_source[0][g][1][sel])
        c.append(np.full(int(sel.sum()), group_weights[g] / sel.sum()))
    if not ll:
        return None
    c = np.concatenate(c)
    return np.concatenate(ll, axis=1), np.concatenate(lens), c / c.sum()


class MixMin:
    name = "mixmin"

    @dataclass
    class Params(MethodParams):
        """conf/optimizer/mixmin.yaml: types and allowed values (the YAML has the values)."""
        eta: float = rule(gt=0)
        step: str = rule(choices=STEPS)
        max_steps: int = rule(ge=1)
        tol: float = rule(ge=0)
        stop_rule: str = rule(choices=STOP_RULES)
        holdout: float = rule(ge=0, lt=1)
        proxy_tokens: Optional[int] = rule(ge=1)  # null = the proxy config's tokens
        batch_size: Optional[int] = rule(ge=1)  # null = the objective's batch_size

    def __init__(self, eta: float = 1.0, step: str = "length", max_steps: int = 2000, tol: float = 1e-5,
                 stop_rule: str = "gap", holdout: float = 0.2, proxy_tokens: int | None = None,
                 batch_size: int | None = None):
        # values checked against Params when the job starts (fastmix.schema.check_params)
        self.eta, self.step, self.max_steps, self.tol, self.stop_rule = (float(eta), step, int(max_steps),
                                                                         float(tol), stop_rule)
        self.holdout = float(holdout)
        self.proxy_tokens = None if proxy_tokens is None else int(proxy_tokens)
        self.batch_size = batch_size

    def planned_proxy_runs(self, n_sources: int) -> int:
        return n_sources  # one proxy per source

    def search(self, ctx: SearchContext) -> SearchResult:
        from transformers import AutoModelForCausalLM
        sources = list(ctx.sources)
        K = len(sources)
        onehots = [{s: float(s == k) for s in sources} for k in sources]
        records = ctx.proxies.run([ProxyJob(w, "mixmin", keep_model=True, tokens=self.proxy_tokens) for w in onehots])
        device, precision = ctx.device, ctx.proxy.precision
        objective = ctx.objective
        bs = self.batch_size or getattr(objective, "batch_size", 16)
        per_source = []
        for r in records:  # one scoring pass over the objective per proxy, charged as forward work
            model = AutoModelForCausalLM.from_pretrained(r.model_dir).to(device)
            rows = objective.rows(model.config.max_position_embeddings)
            per_source.append(row_logliks(model, rows, device, ctx.meter, precision, bs))
            del model
        # rows with no counted token (an empty answer) have no per-token likelihood: left out
        keep = {g: per_source[0][g][1] > 0 for g in per_source[0]}
        for d in per_source:
            for g in d:
                d[g] = (d[g][0][keep[g]], d[g][1][keep[g]])
        sizes = {g: int(m.sum()) for g, m in keep.items() if m.sum() > 0}
        if not sizes:
            raise UserError("the objective has no row with a counted token: MixMin has nothing to fit.")
        gw = {g: float(objective.weights[g]) for g in sizes}
        held = split_rows(sizes, self.holdout, np.random.default_rng(ctx.seed))
        fit = stack_rows(per_source, gw, {g: ~m for g, m in held.items()})
        test = stack_rows(per_source, gw, held)
        w, curve = mirror_descent(*fit, eta=self.eta, max_steps=self.max_steps, tol=self.tol,
                                  stop_rule=self.stop_rule, step=self.step)
        w = w / w.sum()
        trace = [{"kind": "proxy", **r.to_dict()} for r in records]
        trace += [{"kind": "mirror_descent", **row} for row in curve]
        last = curve[-1]
        info = {"steps": last["step"], "stopped": last["stopped"], "converged": last["converged"],
                "fit_loss": last["loss"], "fit_loss_uniform": curve[0]["loss"], "n_fit": len(fit[1]),
                "n_heldout": 0 if test is None else len(test[1]), "eta": self.eta, "step": self.step,
                "stop_rule": self.stop_rule, "tol": self.tol, "final_gap": last["gap"],
                "final_centered_grad": last["centered_grad"], "step_halvings": last["halvings"]}
        if test is not None:
            heldout = {"kind": "heldout", "n": len(test[1]), "loss": mixmin_loss(w, *test),
                       "loss_uniform": mixmin_loss(np.full(K, 1.0 / K), *test),
                       "loss_per_source": {s: mixmin_loss(np.eye(K)[k], *test)
                                           for k, s in enumerate(sources)}}
            trace.append(heldout)
            info.update(heldout_loss=heldout["loss"], heldout_loss_uniform=heldout["loss_uniform"],
                        heldout_loss_per_source=heldout["loss_per_source"])
        return SearchResult(dict(zip(sources, map(float, w))), trace=trace, info=info)
