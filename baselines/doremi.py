"""DoReMi: domain weights from Group DRO on a proxy model against a reference model.

Implements DoReMi (Xie et al., arXiv 2305.10429, NeurIPS 2023), Sec. 2 and
Algorithm 1, checked against the public code (sangmichaelxie/doremi,
doremi/trainer.py `DoReMiTrainer.update_domain_weights` / `training_step`,
scripts/runs/run_pile_doremi120M.sh):

* Step 1: a reference model trained on the reference mixture alpha_ref by
  sampling sources with probability alpha_ref: one ordinary proxy run.
  alpha_ref = token share by default (the public code's Pile baseline configs
  count tokens; its README recommends domain sizes), or uniform.
* Step 2: a proxy of the same size (the job's `proxy` config, as every method)
  trained with Group DRO. Sources are sampled uniformly (Algorithm 1: B ~ P_u;
  public code: configs/pile_uniform.json) and each token's loss is weighted by
  alpha of its domain (`weighted=True`; public code: alpha / sampling weights,
  which is alpha under uniform sampling), normalised over the micro-batch.
  Each update (Algorithm 1):
  - per-token excess loss max(l_proxy - l_ref, 0), clipped per token (public
    code `torch.clip(scores, min=0)` before the mean);
  - lambda_k = mean of the clipped excess over domain k's counted tokens of the
    update's micro-batches (sum over tokens / number of tokens, not a mean of
    per-sequence means);
  - alpha' = alpha * exp(eta * lambda) renormalised (softmax of
    log alpha + eta * lambda), eta = 1;
  - smoothing alpha = (1 - c) alpha' + c / K, c = 1e-3;
  - the micro-batch that triggered the update trains with the new alpha
    (Algorithm 1: theta_t is updated for the objective L(theta_{t-1}, alpha_t)).
  The proxy's per-token losses are those of its training forward (one forward,
  see `fastmix.train.loop`, hooks with `needs_token_losses`); the reference's come
  from a no-grad forward of the same micro-batch, charged to the cost meter as
  2 * N_ref * tokens.
* Output: the average of alpha_1..alpha_T over the T updates (Algorithm 1's
  return value; the public code also folds alpha_0 into its running mean).

DoReMi ignores `ctx.objective`: it is distributionally robust over the training
domains themselves (minimax excess loss), with no target set. Weight entropy is
traced over the run (users report collapse onto one domain).

Choices the paper and code leave open (docs/DECISIONS.md, "DoReMi"):
`update_every: step` (default, public code) accumulates the excess losses of all
micro-batches of an optimizer step and updates once, on the step's last
micro-batch; `micro_batch` updates on every micro-batch. `absent: carry`
(default, public code) gives a domain with no counted token in the update its
last excess loss again, and a domain not yet seen log(vocabulary size), the
value the public code's `perdomain_scores` buffer starts at (doremi/train.py:
`torch.ones(K) * np.log(len(tokenizer))`); `zero` gives it 0 (no change before
renormalisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastmix.schema import rule
from fastmix.search.optimizer import SearchContext, SearchResult
from fastmix.train import distributed
from fastmix.train.loop import HookContext, StepInfo, token_losses
from fastmix.train.models import flop_params
from fastmix.train.sampling import Batch


def excess_loss_sums(proxy_tok: torch.Tensor, ref_tok: torch.Tensor, batch: Batch,
                     n_domains: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per domain: the sum of max(l_proxy - l_ref, 0) over its counted tokens,
    and the number of those tokens (float64, [K] each)."""
    excess = (proxy_tok.detach().double() - ref_tok.detach().double()).clamp_min(0.0).cpu()
    mask = (torch.ones_like(excess) if batch.loss_mask is None else batch.loss_mask.double().cpu())
    src = batch.source.cpu()
    sums = torch.zeros(n_domains, dtype=torch.float64).index_add_(0, src, (excess * mask).sum(1))
    counts = torch.zeros(n_domains, dtype=torch.float64).index_add_(0, src, mask.sum(1))
    return sums, counts


def doremi_update(alpha: torch.Tensor, excess: torch.Tensor, eta: float, smoothing: float) -> torch.Tensor:
    """Algorithm 1: exponentiated step, renormalise, smooth towards uniform."""
    new = torch.softmax(torch.log(alpha) + eta * excess, 0)
    return (1 - smoothing) * new + smoothing / len(alpha)


def entropy(w: torch.Tensor) -> float:
    """H(w) in nats (0 * log 0 = 0)."""
    w = w.double()
    return float(-(w * torch.log(w.clamp_min(1e-300))).sum())


class DoReMiHook:
    """Group DRO's weight update, called by the one training loop on every
    micro-batch after its forward (`needs_token_losses`)."""

    needs_token_losses = True

    def __init__(self, names: list[str], ref_model, eta: float = 1.0, smoothing: float = 1e-3,
                 update_every: str = "step", absent: str = "carry", trace_every: int = 10,
                 vocab_size: int | None = None):
        K = len(names)
        if vocab_size is None:  # the model's vocabulary (public code: len(tokenizer), the same here)
            vocab_size = getattr(getattr(ref_model, "config", None), "vocab_size", None)
        if vocab_size is None or int(vocab_size) < 2:
            raise ValueError(f"DoReMiHook needs the vocabulary size (>= 2) for the initial carried excess "
                             f"loss log(V); got {vocab_size!r}: pass vocab_size or a reference model with a config")
        self.names, self.ref_model = names, ref_model
        self.eta, self.smoothing, self.update_every, self.absent = eta, smoothing, update_every, absent
        self.trace_every = trace_every
        self.alpha = torch.full((K,), 1.0 / K, dtype=torch.float64)  # alpha_0 = uniform (Algorithm 1)
        self.alpha_sum = torch.zeros(K, dtype=torch.float64)  # sum of alpha_1..alpha_t, for the output
        self.entropy_sum = 0.0
        self.updates = 0
        # What an absent domain gets with `carry`: its last excess loss, and until it is first
        # seen log(V), the loss of a uniform prediction (public code's perdomain_scores buffer).
        self.last_excess = torch.full((K,), math.log(int(vocab_size)), dtype=torch.float64)
        self.pending_sums = torch.zeros(K, dtype=torch.float64)  # this optimizer step's micro-batches so far
        self.pending_counts = torch.zeros(K, dtype=torch.float64)
        self.ref_tokens = 0  # reference forward tokens over the whole run, resumed parts included
        self.ref_tokens_here = 0  # ... of which this process charged to its meter (not checkpointed)
        self.trace: list[dict] = []

    @property
    def average(self) -> torch.Tensor:
        """The output: mean of alpha_1..alpha_T (alpha_0 before any update)."""
        return self.alpha_sum / self.updates if self.updates else self.alpha.clone()

    def domain_excess(self) -> torch.Tensor:
        """lambda: mean clipped excess loss of each domain over the pending tokens."""
        seen = self.pending_counts > 0
        fallback = self.last_excess if self.absent == "carry" else torch.zeros_like(self.last_excess)
        return torch.where(seen, self.pending_sums / self.pending_counts.clamp_min(1.0), fallback)

    def observe(self, proxy_tok: torch.Tensor, ref_tok: torch.Tensor, batch: Batch, update: bool) -> bool:
        """Add one micro-batch's excess losses; with `update`, take the DRO step
        over everything observed since the last one. Returns whether alpha moved."""
        sums, counts = excess_loss_sums(proxy_tok, ref_tok, batch, len(self.names))
        # Data-parallel: each rank saw its rows of the micro-batch; the mean over ranks of
        # sums and of counts has the global ratio, and keeps alpha identical on every rank.
        sums, counts = distributed.all_reduce_mean(torch.stack([sums, counts]))
        self.pending_sums += sums
        self.pending_counts += counts
        if not update:
            return False
        lam = self.domain_excess()
        self.alpha = doremi_update(self.alpha, lam, self.eta, self.smoothing)
        self.last_excess = lam
        self.alpha_sum += self.alpha
        self.entropy_sum += entropy(self.alpha)
        self.updates += 1
        self.pending_sums.zero_()
        self.pending_counts.zero_()
        return True

    def __call__(self, ctx: HookContext, info: StepInfo) -> None:
        if info.token_losses is None:
            raise RuntimeError("DoReMiHook needs the micro-batch's token losses: the trainer must honour "
                               "`needs_token_losses`")
        batch = info.batch
        with torch.no_grad():
            ref_tok = token_losses(self.ref_model, batch, ctx.device, ctx.precision)
        n_tok = batch.input_ids.shape[0] * (batch.input_ids.shape[1] - 1) * ctx.world  # all ranks' rows
        ctx.meter.add_forward(flop_params(self.ref_model), n_tok)
        self.ref_tokens += n_tok
        self.ref_tokens_here += n_tok
        accum = 1 if self.update_every == "micro_batch" else ctx.grad_accum
        last_of_step = (info.micro_step + 1) % accum == 0
        if not self.observe(info.token_losses, ref_tok, batch, update=last_of_step):
            return
        ctx.set_loss_weights(dict(zip(self.names, self.alpha.tolist())))
        final = info.step + 1 == ctx.total_steps
        if self.updates == 1 or self.updates % self.trace_every == 0 or final:
            self.trace.append({"run": "proxy", "step": info.step, "micro_step": info.micro_step,
                               "update": self.updates,
                               "weights": dict(zip(self.names, self.alpha.tolist())),
                               "average_weights": dict(zip(self.names, self.average.tolist())),
                               "excess_loss": dict(zip(self.names, self.last_excess.tolist())),
                               "entropy": entropy(self.alpha)})

    def state_dict(self) -> dict:
        return {"alpha": self.alpha.clone(), "alpha_sum": self.alpha_sum.clone(),
                "entropy_sum": self.entropy_sum, "updates": self.updates,
                "last_excess": self.last_excess.clone(), "pending_sums": self.pending_sums.clone(),
                "pending_counts": self.pending_counts.clone(), "ref_tokens": self.ref_tokens,
                "trace": list(self.trace)}

    def load_state_dict(self, state: dict) -> None:
        for k in ("alpha", "alpha_sum", "last_excess", "pending_sums", "pending_counts"):
            setattr(self, k, state[k].detach().cpu().double().clone())
        self.entropy_sum, self.updates = float(state["entropy_sum"]), int(state["updates"])
        self.ref_tokens, self.trace = int(state["ref_tokens"]), list(state["trace"])


@dataclass
class DoReMi:
    name = "doremi"
    reference: str = rule(choices=("natural", "uniform"))
    eta: float = rule(gt=0)
    smoothing: float = rule(ge=0, le=1)
    update_every: str = rule(choices=("step", "micro_batch"))
    absent: str = rule(choices=("carry", "zero"))
    trace_every: int = rule(ge=1)

    def planned_proxy_runs(self, n_sources: int) -> int:
        return 2  # the reference and the DRO proxy, whatever K

    def search(self, ctx: SearchContext) -> SearchResult:
        names = ctx.sources
        K = len(names)
        # Step 1: the reference model, an ordinary proxy run on alpha_ref.
        w_ref = ctx.token_share() if self.reference == "natural" else {n: 1.0 / K for n in names}
        ref_model, ref_last = ctx.proxies.train(w_ref, ctx.out_dir / "reference", desc="doremi-ref")
        ref_model.eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
        # Step 2: the Group DRO proxy, uniform sampling, loss weighted by alpha.
        hook = DoReMiHook(names, ref_model, self.eta, self.smoothing, self.update_every, self.absent,
                          self.trace_every)
        ctx.proxies.train({n: 1.0 / K for n in names}, ctx.out_dir / "proxy", weighted=True, hook=hook,
                        hook_every=1, desc="doremi")
        # Reference forwards done before a resume were charged in the killed process's
        # meter, which is gone: charge them here (the trainer does the same for its own work).
        if hook.ref_tokens > hook.ref_tokens_here:
            ctx.meter.add_forward(flop_params(ref_model), hook.ref_tokens - hook.ref_tokens_here)
        avg = hook.average
        weights = dict(zip(names, (avg / avg.sum()).tolist()))
        trace = [{"run": "reference", "weights": w_ref, "last_metrics": ref_last}] + hook.trace
        info = {"reference": self.reference, "reference_weights": w_ref,
                "final_weights": dict(zip(names, hook.alpha.tolist())), "updates": hook.updates,
                "entropy_mean": hook.entropy_sum / max(1, hook.updates), "entropy_output": entropy(avg),
                "entropy_max": math.log(K)}
        return SearchResult(weights, trace=trace, info=info)
