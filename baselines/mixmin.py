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

The convex problem and its optimiser (`step`, the line search, the stopping
rules, and why the default is not the code's) are in `baselines.mirror_descent`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from baselines.mirror_descent import STEPS, STOP_RULES, mirror_descent, mixmin_loss
from fastmix.errors import UserError
from fastmix.schema import rule
from fastmix.search.optimizer import SearchContext, SearchResult
from fastmix.search.proxies import ProxyJob
from fastmix.train.loop import token_losses
from fastmix.train.models import flop_params
from fastmix.train.sampling import Batch

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


@dataclass
class MixMin:
    name = "mixmin"
    eta: float = rule(gt=0)
    step: str = rule(choices=STEPS)
    max_steps: int = rule(ge=1)
    tol: float = rule(ge=0)
    stop_rule: str = rule(choices=STOP_RULES)
    holdout: float = rule(ge=0, lt=1)
    proxy_tokens: Optional[int] = rule(ge=1)  # null = the proxy config's tokens
    batch_size: Optional[int] = rule(ge=1)  # null = the objective's batch_size

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
