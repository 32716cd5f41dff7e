"""FastMix: mixture weights learned by gradient descent alongside one proxy model.

Implements FastMix (arXiv 2606.14971, ICLR 2026), Sec. 3 and Algorithm 1,
checked against the public code (hrtan/fastmix, pretrain/train_fastmix_val.py):

* w = softmax(z), z = 0 (uniform) at the start (Sec. 3.2; public code: ones).
* Inner step (Eq. 3): sources sampled uniformly, each sequence's token loss
  weighted by w of its source, normalised by the sum of weights; AdamW on the
  model. This is `fastmix.train.Trainer` with `weighted=True`.
* Outer step every T = 20 micro-batches (Sec. 3.3; `eval_step_interval: 20`):
  - G_val = d L_obj / d W_head on one objective batch (Eq. 5);
  - G_k  = d L_k / d W_head on the current micro-batch's rows of source k;
  - one-step-unrolled hypergradient (Eq. 6): dL_obj/dw_k = -lr * <G_val, G_k>
    (0 for a source absent from the micro-batch, as in the public code),
    lr = the model's current learning rate;
  - softmax chain rule (Eq. 7): dL/dz_j = w_j (g_j - sum_i w_i g_i);
  - optional entropy regulariser: minimise L_obj - lambda * H(w), so lambda > 0
    keeps w spread out (see docs/DECISIONS.md for the public code's sign);
  - AdamW on z: lr 0.01, betas (0.9, 0.95), no weight decay.
* Output: w after the last outer step; every outer step is traced.

Options beyond the paper, off by default: `grad_params: all` (inner products
over every parameter instead of the LM head) and `init: prior` (z = log of the
token-share prior).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastmix import distributed
from fastmix.errors import UserError
from fastmix.models import flop_params
from fastmix.optimizer import SearchContext, SearchResult
from fastmix.train import StepInfo, Trainer, masked_mean, token_losses, weighted_loss


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
    if distributed.world_size() > 1:
        # Each rank holds its rows of the global micro-batch. G_k is a token mean, so the
        # global <G_val, G_k> is the token-weighted mean of the ranks' values; the same
        # on every rank, so w stays identical everywhere.
        tot = distributed.all_reduce_mean(torch.stack([inner * counted, counted]))
        inner = torch.where(tot[1] > 0, tot[0] / tot[1].clamp_min(1e-300), torch.zeros_like(inner))
    return -lr * inner, inner, float(val_loss.detach())


class FastMixHook:
    """The outer step, called by the one training loop every T micro-batches."""

    def __init__(self, names: list[str], objective, z0: torch.Tensor, lr: float, betas, entropy_reg: float,
                 grad_params: str, val_batch_size: int, seed: int):
        self.names, self.objective = names, objective
        self.z = z0.clone().double()
        self.z.requires_grad_(True)
        self.opt = torch.optim.AdamW([self.z], lr=lr, betas=tuple(betas), weight_decay=0.0)
        self.entropy_reg, self.grad_params, self.val_batch_size = entropy_reg, grad_params, val_batch_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.trace: list[dict] = []

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.z.detach(), 0)

    def _params(self, model) -> list[torch.Tensor]:
        if self.grad_params == "lm_head":
            return [model.get_output_embeddings().weight]
        return [p for p in model.parameters() if p.requires_grad]

    def __call__(self, trainer: Trainer, info: StepInfo) -> None:
        if info.micro_step == 0:
            return  # public code: no outer step before the first inner step
        model = trainer.model
        params = self._params(model)
        vb = self.objective.sample_batch(self.rng, self.val_batch_size, model.config.max_position_embeddings)
        lr = trainer.scheduler.get_last_lr()[0]
        g, inner, val_loss = hypergradient(model, params, vb, info, len(self.names), lr, trainer.device,
                                           trainer.cfg.precision)
        w = self.weights
        dz = softmax_chain(w, g) - self.entropy_reg * entropy_grad(w)
        self.opt.zero_grad()
        self.z.grad = dz
        self.opt.step()
        trainer.sampler.set_loss_weights(self.weights.numpy())
        # Cost of the outer step: forwards of the objective batch and the micro-batch,
        # and the gradient passes to `params` (forward-sized work on those parameters).
        n_grad = sum(p.numel() for p in params)
        # The objective batch is the same on every rank (counted once); the micro-batch's
        # rows are split over the ranks (counted for all of them).
        val_tokens = vb.input_ids.shape[0] * (vb.input_ids.shape[1] - 1)
        batch_tokens = info.batch.input_ids.shape[0] * (info.batch.input_ids.shape[1] - 1) * trainer.world
        trainer.meter.add_forward(flop_params(model), val_tokens + batch_tokens)
        trainer.meter.add_forward(n_grad, val_tokens + batch_tokens)
        self.trace.append({"step": info.step, "micro_step": info.micro_step, "objective_loss": val_loss,
                           "inner_products": dict(zip(self.names, inner.tolist())),
                           "hypergradient": dict(zip(self.names, g.tolist())),
                           "z_grad": dict(zip(self.names, dz.tolist())),
                           "weights": dict(zip(self.names, self.weights.tolist())), "lr": lr})

    def state_dict(self) -> dict:
        return {"z": self.z.detach().clone(), "opt": self.opt.state_dict(), "rng": self.rng.bit_generator.state,
                "trace": list(self.trace)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.z.copy_(state["z"])
        self.opt.load_state_dict(state["opt"])
        self.rng.bit_generator.state = state["rng"]
        self.trace = list(state["trace"])


class FastMix:
    name = "fastmix"

    def __init__(self, outer_every: int = 20, lr: float = 0.01, betas=(0.9, 0.95), entropy_reg: float = 0.0,
                 grad_params: str = "lm_head", init: str = "uniform", val_batch_size: int = 16):
        if grad_params not in ("lm_head", "all"):
            raise UserError(f"optimizer.grad_params '{grad_params}' is unknown: use lm_head or all.")
        if init not in ("uniform", "prior"):
            raise UserError(f"optimizer.init '{init}' is unknown: use uniform or prior.")
        if outer_every < 1:
            raise UserError(f"optimizer.outer_every must be >= 1, got {outer_every}.")
        self.outer_every, self.lr, self.betas, self.entropy_reg = outer_every, lr, betas, entropy_reg
        self.grad_params, self.init, self.val_batch_size = grad_params, init, val_batch_size

    def planned_proxy_runs(self, n_sources: int) -> int:
        return 1  # one proxy, whatever K

    def search(self, ctx: SearchContext) -> SearchResult:
        names = ctx.sources
        if self.init == "prior":
            share = ctx.token_share()
            z0 = torch.tensor([math.log(share[n]) for n in names])
        else:
            z0 = torch.zeros(len(names))
        hook = FastMixHook(names, ctx.objective, z0, self.lr, self.betas, self.entropy_reg, self.grad_params,
                           self.val_batch_size, ctx.seed)
        w0 = dict(zip(names, torch.softmax(z0.double(), 0).tolist()))
        ctx.train_proxy(w0, ctx.out_dir / "proxy", weighted=True, hook=hook, hook_every=self.outer_every,
                        desc="fastmix")
        weights = dict(zip(names, hook.weights.tolist()))
        return SearchResult(weights, trace=hook.trace, info={"outer_steps": len(hook.trace)})
