"""FastMix: mixture weights learned by gradient descent alongside one proxy model.

Implements FastMix (arXiv 2606.14971, ICLR 2026), Sec. 3 and Algorithm 1,
checked against the public code (hrtan/fastmix, pretrain/train_fastmix_val.py):

* w = softmax(z), z = 0 (uniform) at the start (Sec. 3.2; public code: ones).
* Inner step (Eq. 3): sources sampled uniformly, each sequence's token loss
  weighted by w of its source, normalised by the sum of weights; AdamW on the
  model. This is `fastmix.train.loop.Trainer` with `weighted=True`.
* Outer step every T = 20 micro-batches (Sec. 3.3; `eval_step_interval: 20`):
  - G_val = d L_obj / d W_head on one objective batch (Eq. 5);
  - G_k  = d L_k / d W_head on the current micro-batch's rows of source k;
  - one-step-unrolled hypergradient (Eq. 6): dL_obj/dw_k = -lr * <G_val, G_k>
    (0 for a source absent from the micro-batch, as in the public code),
    lr = the model's current learning rate. On the LM head both gradients have a
    closed form (sum of d_t h_t^T, d_t = softmax - one-hot), so the hook computes
    every <G_val, G_k> in two gradient-free passes inside the fused head
    (`head_hypergradient`; the same numbers as autograd's `hypergradient` to 1e-5,
    tested) instead of the public code's backward pass per source;
  - softmax chain rule (Eq. 7): dL/dz_j = w_j (g_j - sum_i w_i g_i);
  - optional entropy regulariser: minimise L_obj - lambda * H(w), so lambda > 0
    keeps w spread out (see docs/DECISIONS.md for the public code's sign);
  - AdamW on z: lr 0.01, betas (0.9, 0.95), no weight decay.
  - the objective batch: micro_batch_size // 8 rows (at least 1) of every
    objective group, the same rows every outer step (public code: `micro_batch_size
    // 8` rows from each validation loader, restarted each time, averaged over
    loaders); `val_batch: random`
    draws `val_batch_size` random windows instead.
* Output: w after the last outer step; every outer step is traced.

Scale: `scale_rule: movement` (ours) picks T and lr_z from the run's length
(`movement_schedule`); why, and what it does at CPU scale, is in
docs/DECISIONS.md, "Movement budget". `scale_rule: off` uses outer_every and lr
as given.

Options beyond the paper, off by default: `grad_params: all` (inner products
over every parameter instead of the LM head) and `init: prior` (z = log of the
token-share prior) and `average_tail: f` (w averaged over the last f of the outer
steps instead of the last w). Every trace line also holds w's entropy; `diagnose_every: N`
adds, every N outer steps, the objective's loss on val rows the outer step never
sees (a diagnostic, not charged to the search: issue 25's collapse analysis).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastmix.schema import BETAS, rule
from fastmix.search.optimizer import SearchContext, SearchResult
from fastmix.train import distributed
from fastmix.train.fused_loss import head_gradient, head_gradient_dots
from fastmix.train.loop import (
    HookContext,
    StepInfo,
    last_hidden,
    masked_mean,
    planned_steps,
    token_losses,
    weighted_loss,
)
from fastmix.train.models import flop_params


def softmax_chain(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dL/dz from dL/dw through w = softmax(z): w_j (g_j - sum_i w_i g_i)."""
    return w * (g - (w * g).sum())


def entropy_grad(w: torch.Tensor) -> torch.Tensor:
    """dH/dz for H(w) = -sum w log w, w = softmax(z)."""
    return softmax_chain(w, -(1 + torch.log(w.clamp_min(1e-12))))


def hypergradient(model, params: list[torch.Tensor], val_batch, info: StepInfo, n_sources: int, lr: float,
                  device, precision: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Eq. 5-6: g_k = -lr * <G_val, G_k>. G_val from a forward of the objective
    batch; G_k from one forward of the micro-batch about to be trained on, one
    source's rows at a time, differentiated to `params` only (cheap for the LM
    head). Returns (g, inner products, objective batch loss)."""
    val_loss = weighted_loss(token_losses(model, val_batch, device, precision), val_batch)
    g_val = torch.autograd.grad(val_loss, params)
    token_loss = token_losses(model, info.batch, device, precision)
    inner = torch.zeros(n_sources, dtype=torch.float64)
    counted = torch.zeros(n_sources, dtype=torch.float64)  # source k's counted tokens in this batch
    mask = (torch.ones_like(token_loss) if info.batch.loss_mask is None
            else info.batch.loss_mask.to(token_loss.device))
    for k in range(n_sources):
        rows = (info.batch.source == k).to(token_loss.device)
        if rows.any():  # a source absent from the micro-batch keeps 0 (public code)
            g_k = torch.autograd.grad(masked_mean(token_loss, info.batch, rows), params, retain_graph=True)
            inner[k] = sum(float((a.float() * b.float()).sum()) for a, b in zip(g_val, g_k))
            counted[k] = float(mask[rows].sum())
    inner = _over_ranks(inner, counted)
    return -lr * inner, inner, float(val_loss.detach())


def _over_ranks(inner: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Each rank holds its rows of the global micro-batch. G_k is a token mean, so the
    global <G_val, G_k> is the token-weighted mean of the ranks' values; the same on
    every rank, so w stays identical everywhere."""
    if distributed.world_size() == 1:
        return inner
    tot = distributed.all_reduce_mean(torch.stack([inner * counted, counted]))
    return torch.where(tot[1] > 0, tot[0] / tot[1].clamp_min(1e-300), torch.zeros_like(inner))


@torch.no_grad()
def head_hypergradient(model, val_batch, info: StepInfo, n_sources: int, lr: float, device,
                       precision: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`hypergradient` on the LM head (the paper's default), the same numbers in two
    gradient-free passes: G_val = sum_t (w_t / sum w) d_t h_t^T over the objective
    batch (`head_gradient`), then, on the LM head, G_k is the mean of d_t h_t^T over
    source k's counted tokens, so <G_val, G_k> = mean over them of d_t . (G_val h_t)
    (`head_gradient_dots`): one pass over the micro-batch for every source, no
    per-source backward, no [tokens, vocab] logits (d_t = softmax - one-hot, h_t the
    last hidden state). The trunk runs forward only: nothing below the head is
    differentiated."""
    W = model.get_output_embeddings().weight
    h, y, w = last_hidden(model, val_batch, device, precision)
    g_val, val_loss = head_gradient(h, W, y, w)
    h, y, _ = last_hidden(model, info.batch, device, precision)
    dots = head_gradient_dots(h, W, y, g_val).view(info.batch.input_ids.shape[0], -1).double()
    mask = (torch.ones_like(dots) if info.batch.loss_mask is None
            else info.batch.loss_mask.to(dots.device).double())
    source = info.batch.source.to(dots.device)
    per_row = torch.stack([(dots * mask).sum(1), mask.sum(1)], 1)
    sums = torch.zeros(n_sources, 2, dtype=torch.float64, device=dots.device).index_add_(0, source, per_row).cpu()
    # masked_mean's denominator (counted tokens, at least 1): a source absent from the
    # micro-batch has sums 0 and so keeps 0 (public code)
    inner = _over_ranks(sums[:, 0] / sums[:, 1].clamp_min(1.0), sums[:, 1])
    return -lr * inner, inner, val_loss


class FastMixHook:
    """The outer step, called by the one training loop every T micro-batches."""

    needs_token_losses = False  # runs before the micro-batch's forward

    def __init__(self, names: list[str], objective, z0: torch.Tensor, lr: float, betas, entropy_reg: float,
                 grad_params: str, val_batch_size: int, seed: int, val_batch: str = "fixed",
                 val_rows_per_group: int = 2, diagnose_every: int = 0, diagnose_rows: int = 8):
        self.names, self.objective = names, objective
        self.z = z0.clone().double()
        self.z.requires_grad_(True)
        self.opt = torch.optim.AdamW([self.z], lr=lr, betas=tuple(betas), weight_decay=0.0)
        self.entropy_reg, self.grad_params, self.val_batch_size = entropy_reg, grad_params, val_batch_size
        self.val_batch, self.val_rows_per_group = val_batch, val_rows_per_group
        self.diagnose_every, self.diagnose_rows = diagnose_every, diagnose_rows
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.trace: list[dict] = []

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.z.detach(), 0)

    def _params(self, model) -> list[torch.Tensor]:
        if self.grad_params == "lm_head":
            return [model.get_output_embeddings().weight]
        return [p for p in model.parameters() if p.requires_grad]

    def __call__(self, ctx: HookContext, info: StepInfo) -> None:
        if info.micro_step == 0:
            return  # public code: no outer step before the first inner step
        model = ctx.model
        params = self._params(model)
        context = model.config.max_position_embeddings
        vb = (self.objective.fixed_batch(self.val_rows_per_group, context) if self.val_batch == "fixed" else
              self.objective.sample_batch(self.rng, self.val_batch_size, context))
        lr = ctx.lr
        fused = self.grad_params == "lm_head" and model.get_input_embeddings().weight is not params[0]
        # a tied head's gradient also flows through the input embedding: autograd then
        g, inner, val_loss = (head_hypergradient(model, vb, info, len(self.names), lr, ctx.device,
                                                 ctx.precision) if fused else
                              hypergradient(model, params, vb, info, len(self.names), lr, ctx.device,
                                            ctx.precision))
        w = self.weights
        dz = softmax_chain(w, g) - self.entropy_reg * entropy_grad(w)
        self.opt.zero_grad()
        self.z.grad = dz
        self.opt.step()
        ctx.set_loss_weights(dict(zip(self.names, self.weights.tolist())))
        # Cost of the outer step: forwards of the objective batch and the micro-batch,
        # and the gradient passes to `params` (forward-sized work on those parameters).
        n_grad = sum(p.numel() for p in params)
        # The objective batch is the same on every rank (counted once); the micro-batch's
        # rows are split over the ranks (counted for all of them).
        val_tokens = vb.input_ids.shape[0] * (vb.input_ids.shape[1] - 1)
        batch_tokens = info.batch.input_ids.shape[0] * (info.batch.input_ids.shape[1] - 1) * ctx.world
        ctx.meter.add_forward(flop_params(model), val_tokens + batch_tokens)
        ctx.meter.add_forward(n_grad, val_tokens + batch_tokens)
        w = self.weights
        line = {"step": info.step, "micro_step": info.micro_step, "objective_loss": val_loss,
                "inner_products": dict(zip(self.names, inner.tolist())),
                "hypergradient": dict(zip(self.names, g.tolist())),
                "z_grad": dict(zip(self.names, dz.tolist())),
                "weights": dict(zip(self.names, w.tolist())), "lr": lr,
                "entropy": float(-(w * w.clamp_min(1e-300).log()).sum())}  # nats; log K = uniform, 0 = one-hot
        if self.diagnose_every and len(self.trace) % self.diagnose_every == 0:
            line["heldout_objective_loss"] = self.heldout_loss(model, ctx)
        self.trace.append(line)

    def heldout_loss(self, model, ctx: HookContext) -> float:
        """The diagnostic (ours, not the method's): the objective on `diagnose_rows` val
        rows per group after the fixed batch's, which the outer step never sees, so
        over-fitting to the fixed batch shows. No meter: it is not part of the search's
        cost. (With val_batch=random the outer step may have drawn these rows.)"""
        r = self.val_rows_per_group
        return self.objective.losses(model, ctx.device, None, ctx.precision, rows=slice(r, r + self.diagnose_rows))[0]

    def state_dict(self) -> dict:
        return {"z": self.z.detach().clone(), "opt": self.opt.state_dict(), "rng": self.rng.bit_generator.state,
                "trace": list(self.trace)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.z.copy_(state["z"])
        self.opt.load_state_dict(state["opt"])
        self.rng.bit_generator.state = state["rng"]
        self.trace = list(state["trace"])


def movement_schedule(micro_batches: int, outer_every: int, lr: float, reference_outer_steps: int,
                      movement: float | None = None) -> tuple[int, float, int]:
    """The movement-budget scale rule (docs/DECISIONS.md): (T, lr_z, outer steps) for
    a run of `micro_batches` micro-batches. The hook runs before micro-batches T,
    2T, ... (never before the first), so a run takes (M - 1) // T outer steps.
    `movement`: lr_z x outer steps when given (the budget swept in issue 25), else the
    reference run's lr x reference_outer_steps (~16) for a run shorter than it."""
    T = min(outer_every, max(1, micro_batches // reference_outer_steps))
    steps = max(1, (micro_batches - 1) // T)
    if movement is not None:
        return T, movement / steps, steps
    return T, (lr * reference_outer_steps / steps if steps < reference_outer_steps else lr), steps


def _rows_ok(v) -> bool:
    return v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)


@dataclass
class FastMix:
    name = "fastmix"
    outer_every: int = rule(ge=1)
    lr: float = rule(gt=0)
    betas: list[float] = rule(check=BETAS)
    entropy_reg: float = rule(ge=0)
    grad_params: str = rule(choices=("lm_head", "all"))
    init: str = rule(choices=("uniform", "prior"))
    val_batch: str = rule(choices=("fixed", "random"))  # public code's micro-batch // 8 rows | random windows
    val_rows_per_group: Any = rule(check=(_rows_ok, "auto (the public code's micro-batch // 8) or an "
                                                    "integer >= 1"))
    val_batch_size: int = rule(ge=1)
    scale_rule: str = rule(choices=("movement", "off"))
    reference_outer_steps: int = rule(ge=1)
    movement: Any = rule(check=(lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       and v > 0), "null (the rule's budget) or a number > 0"))
    average_tail: float = rule(ge=0, le=1)  # beyond the paper: w averaged over this last share of outer steps
    diagnose_every: int = rule(ge=0)  # ours: held-out objective every N outer steps (0 = off)
    diagnose_rows: int = rule(ge=1)

    def rows_per_group(self, proxy_cfg) -> int:
        """Objective rows per group and outer step: `auto` = the public code's
        micro_batch_size // 8 per validation loader (at least 1; 2 at its micro-batch 16)."""
        if self.val_rows_per_group == "auto":
            return max(1, int(proxy_cfg.batch_size) // 8)
        return int(self.val_rows_per_group)

    def schedule(self, proxy_cfg) -> tuple[int, float, int]:
        """(T, lr_z, planned outer steps) for a proxy run of `proxy_cfg`."""
        micro = planned_steps(proxy_cfg, distributed.world_size()) * proxy_cfg.grad_accum
        if self.scale_rule == "off":
            return self.outer_every, self.lr, max(1, (micro - 1) // self.outer_every)
        return movement_schedule(micro, self.outer_every, self.lr, self.reference_outer_steps, self.movement)

    def planned_proxy_runs(self, n_sources: int) -> int:
        return 1  # one proxy, whatever K

    def output_weights(self, trace: list[dict]) -> dict[str, float]:
        """Beyond the paper (`average_tail` > 0): the mean of w over the last
        average_tail share of the outer steps (at least one), as an iterate average
        damps the last steps' noise; the paper returns the last w."""
        tail = trace[-max(1, round(self.average_tail * len(trace))):]
        names = list(tail[0]["weights"])
        mean = np.mean([[t["weights"][n] for n in names] for t in tail], axis=0)
        return dict(zip(names, (mean / mean.sum()).tolist()))

    def search(self, ctx: SearchContext) -> SearchResult:
        names = ctx.sources
        if self.init == "prior":
            share = ctx.token_share()
            z0 = torch.tensor([math.log(share[n]) for n in names])
        else:
            z0 = torch.zeros(len(names))
        T, lr_z, planned = self.schedule(ctx.proxy)
        rows = self.rows_per_group(ctx.proxy)
        hook = FastMixHook(names, ctx.objective, z0, lr_z, self.betas, self.entropy_reg, self.grad_params,
                           self.val_batch_size, ctx.seed, self.val_batch, rows, self.diagnose_every,
                           self.diagnose_rows)
        w0 = dict(zip(names, torch.softmax(z0.double(), 0).tolist()))
        ctx.proxies.train(w0, ctx.out_dir / "proxy", weighted=True, hook=hook, hook_every=T, desc="fastmix")
        weights = self.output_weights(hook.trace) if self.average_tail > 0 else dict(zip(names, hook.weights.tolist()))
        return SearchResult(weights, trace=hook.trace, info={
            "outer_steps": len(hook.trace), "outer_every": T, "z_lr": lr_z, "planned_outer_steps": planned,
            "movement_budget": lr_z * planned, "scale_rule": self.scale_rule, "val_rows_per_group": rows})
