"""The one training loop: proxies, DoReMi, FastMix and target models all train here.

Read top to bottom: draw a micro-batch from the sampler, weighted token
cross-entropy, backward, (every `grad_accum` micro-batches) clip + AdamW +
schedule, and every `hook_every` micro-batches call the method's hook before the
micro-batch is trained on (FastMix's outer step, DoReMi's weight update). Checkpoints hold everything that decides
the next batch and update (model, optimizer, schedule, sampler RNG, hook
state, cost so far), so a killed run resumes and ends with the same numbers.

Two hook timings. By default the hook runs *before* the micro-batch's forward:
the fused loss folds the loss weights into the forward, so they must be final
by then (FastMix). A hook with `needs_token_losses = True` runs *between* the
forward and the backward (DoReMi: its weight update reads the proxy's per-token
losses of the same micro-batch, and that micro-batch then trains with the new
weights). For such a micro-batch the loop takes the plain path: token losses
with grad (`token_losses`), the hook sees them detached in
`StepInfo.token_losses`, the batch's weights are refreshed from the sampler,
and `weighted_loss` of the same forward is backpropagated. One forward, the
same FLOPs as any step; slower in wall time on CPU at large vocabularies, where
it materialises the [tokens, vocab] logits the fused path avoids.

Data-parallel (fastmix.train.distributed: torchrun or Submitit tasks): every rank draws
the same global micro-batch of `batch_size x world size` rows from its own copy of
the sampler (same seed, so the RNG state matches on all ranks) and trains on its
rows [rank*B, (rank+1)*B); gradients are averaged by hand after the last
micro-batch of a step (see docs/DECISIONS.md, "Data-parallel training"), so a
run on W ranks follows the curve of one process with W times the batch. Rank 0
alone writes metrics.jsonl and checkpoint.pt.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from fastmix.records import atomic_file, write_text_atomic
from fastmix.schema import run_config
from fastmix.train import distributed
from fastmix.train.cost import Cost, CostMeter
from fastmix.train.fused_loss import fused_linear_cross_entropy, tune_malloc
from fastmix.train.models import build_model, flop_params
from fastmix.train.sampling import Batch, MixtureSampler

if TYPE_CHECKING:
    from fastmix.data.corpus import Corpus

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA if there is one. Data-parallel ranks each take their own GPU,
    cuda:LOCAL_RANK (call `distributed.init()` first)."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if dev.type == "cuda" and dev.index is None and distributed.world_size() > 1:
        dev = torch.device("cuda", distributed.local_rank())
    return dev


def set_threads(threads: int | None) -> int:
    """One process's torch thread count. Oversubscribed threads make CPU training
    many times slower, so sweeps set this to cores / parallel jobs."""
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    tune_malloc()  # reuse heap pages for the per-step tensors instead of mmap + page faults
    return n


def autocast(device: torch.device, precision: str):
    """bf16 autocast on GPUs; fp32 on CPU (CPU bf16 matmuls are slower here)."""
    if torch.device(device).type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class StepInfo:
    """What a hook sees: the micro-batch about to be trained on (data-parallel: this
    rank's rows of it; a hook that moves the mixture averages its statistics over ranks)."""
    step: int  # optimizer steps done
    micro_step: int  # micro-batches done before this one
    batch: Batch
    # [B, T] detached token losses of this micro-batch's forward; only for hooks
    # with `needs_token_losses = True` (called after the forward), else None.
    token_losses: torch.Tensor | None = None


@dataclass
class HookContext:
    """What a hook may use of the trainer, and no more."""
    model: torch.nn.Module
    device: torch.device
    precision: str
    lr: float  # the model's current learning rate
    world: int  # data-parallel ranks
    grad_accum: int
    total_steps: int
    meter: CostMeter  # charge the hook's own work here
    set_loss_weights: Callable[[Mapping[str, float]], None]  # the sampler's loss weights, by source name


class Hook(Protocol):
    """A method's hook into the one loop (FastMix's outer step, DoReMi's update)."""
    # True: called after the forward, with the micro-batch's token losses; False: before it
    needs_token_losses: bool

    def __call__(self, ctx: HookContext, info: StepInfo) -> None: ...

    def state_dict(self) -> dict: ...  # checkpointed with the model

    def load_state_dict(self, state: dict) -> None: ...


def token_losses(model, batch: Batch, device, precision: str) -> torch.Tensor:
    """[B, T] next-token cross-entropy, fp32 (logits are not upcast: cross_entropy
    accumulates in fp32 under autocast)."""
    ids = batch.input_ids.to(device, non_blocking=True)
    with autocast(device, precision):
        logits = model(input_ids=ids[:, :-1]).logits
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V).float(), ids[:, 1:].reshape(-1),
                           reduction="none").view(B, T)


def last_hidden(model, batch: Batch, device, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The input of the LM head for the fused loss: ([B*T, H] final-norm hidden states,
    [B*T] targets, [B*T] token weights = the row's loss weight x the loss mask)."""
    ids = batch.input_ids.to(device, non_blocking=True)
    with autocast(device, precision):
        h = model.model(input_ids=ids[:, :-1]).last_hidden_state
    B, T, H = h.shape
    w = batch.weight.to(device)[:, None].expand(B, T)
    if batch.loss_mask is not None:
        w = w * batch.loss_mask.to(device)
    return h.reshape(B * T, H), ids[:, 1:].reshape(-1), w.reshape(-1)


def weighted_loss(tok_loss: torch.Tensor, batch: Batch) -> torch.Tensor:
    """sum(w_src * mask * token_loss) / sum(w_src * mask) over the micro-batch
    (FastMix Eq. 3's weighted objective; with w = 1 it is the plain mean)."""
    w = batch.weight.to(tok_loss.device)[:, None].expand_as(tok_loss)
    if batch.loss_mask is not None:
        w = w * batch.loss_mask.to(tok_loss.device)
    return (w * tok_loss).sum() / w.sum().clamp_min(1e-12)


def masked_mean(tok_loss: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token loss over the counted tokens (loss mask) of the selected rows."""
    m = torch.ones_like(tok_loss) if batch.loss_mask is None else batch.loss_mask.to(tok_loss.device)
    if rows is not None:
        tok_loss, m = tok_loss[rows], m[rows]
    return (tok_loss * m).sum() / m.sum().clamp_min(1.0)


def source_stats(tok_loss: torch.Tensor, batch: Batch, n_sources: int) -> torch.Tensor:
    """[K, 3] float64 per source: sum of counted token losses, counted tokens, rows.
    Sums, not means, so data-parallel ranks can add theirs up."""
    # Reduced per row where the losses are, so only [K, 3] numbers cross to the host.
    tl = tok_loss.detach().double()
    m = torch.ones_like(tl) if batch.loss_mask is None else batch.loss_mask.to(tl.device).double()
    rows = torch.stack([(tl * m).sum(1), m.sum(1), torch.ones_like(tl[:, 0])], dim=1).cpu()
    return torch.zeros(n_sources, 3, dtype=torch.float64).index_add_(0, batch.source.cpu(), rows)


def loss_normaliser(batch: Batch, weight: torch.Tensor) -> float:
    """sum(w_src * mask) over the batch: the denominator of `weighted_loss`."""
    m = (torch.ones(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1) if batch.loss_mask is None
         else batch.loss_mask)
    return float((weight.double()[:, None] * m.double()).sum())


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule '{schedule}': use constant or cosine")


def planned_steps(cfg, world: int = 1, context: int | None = None) -> int:
    """Optimizer steps of a run of `cfg` (proxy/ or train/): the token budget rounded
    up to whole steps of batch_size x ranks x grad_accum x context tokens."""
    context = context or cfg.model.context
    return max(1, math.ceil(cfg.tokens / (cfg.batch_size * world * cfg.grad_accum * context)))


# the signals SLURM and Submitit send to stop a job (USR2 before the time limit, TERM
# on preemption); Submitit's handlers checkpoint and exit from inside whatever runs
_STOP_SIGNALS = {signal.SIGUSR2, signal.SIGTERM}


@contextmanager
def _stop_signals_held():
    """Hold SLURM's stop signals for the block; a held one goes to its handler after it.
    A handler that exits in the middle of torch.save leaves its zip writer half done,
    and the writer's own error then replaces the exit: the job failed instead of being
    requeued (seen in CI)."""
    # Handlers, not the signal mask: the kernel hands a process-directed signal to any
    # thread not blocking it (torch's pool threads), so masking this thread holds nothing.
    # signal.signal works only in the main thread; elsewhere no handler of ours runs anyway.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: held.append(signum)) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    for sig in held:
        signal.raise_signal(sig)  # to the handler just restored (the default one stops us)


def _atomic_save(obj, path: Path) -> None:
    """torch.save through atomic_file, the stop signals held until the file is whole."""
    with _stop_signals_held(), atomic_file(path, "wb") as fh:
        torch.save(obj, fh)


class Trainer:
    """Trains `model` for `cfg.tokens` tokens (rounded up to whole optimizer steps).

    cfg: a proxy/ or train/ node (fastmix.schema.RunSchema: its keys, types and
    defaults)."""

    def __init__(self, model, sampler: MixtureSampler, cfg, device: torch.device, meter: CostMeter,
                 out_dir: Path, hook: Hook | None = None, hook_every: int = 1, desc: str = "train",
                 progress: bool = True, identity: str | None = None):
        """`identity`: what this run is (the job's or the proxy record's fingerprint,
        fastmix.records): a checkpoint.pt saved under another one is not resumed."""
        cfg = run_config(cfg)  # the schema's defaults for keys the node leaves out
        self.model, self.sampler, self.cfg = model.to(device), sampler, cfg
        self.device, self.meter, self.out_dir = device, meter, Path(out_dir)
        self.hook, self.hook_every, self.desc, self.identity = hook, hook_every, desc, identity
        distributed.init()
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.progress = progress and distributed.is_main()
        # cfg.batch_size is per rank; the sampler draws the global micro-batch (see the docstring).
        if sampler.batch_size != cfg.batch_size * self.world:
            raise ValueError(f"the sampler draws {sampler.batch_size} rows, but batch_size {cfg.batch_size} x "
                             f"{self.world} ranks = {cfg.batch_size * self.world}")
        # tokens of one optimizer step over all ranks: the budget, the schedule and the cost count these
        self.tokens_per_step = cfg.batch_size * self.world * cfg.grad_accum * sampler.context
        self.total_steps = planned_steps(cfg, self.world, sampler.context)
        self.n_params = flop_params(model)
        # fused AdamW (one kernel over all parameters) where torch has it for the
        # device; measured 1.3x faster than foreach on CPU (bench/throughput.py).
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
            fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, self.total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio))
        self.step = self.micro_step = 0
        self.cost = Cost(device=meter.device_name, devices=meter.devices)  # this run's own work,
        # kept across resumes
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        self.metrics_path = self.out_dir / "metrics.jsonl"

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "step": self.step, "micro_step": self.micro_step, "cost": self.cost.to_dict(),
                "torch_rng": torch.get_rng_state(),
                "hook": self.hook.state_dict() if self.hook is not None else None, "identity": self.identity}

    def save_checkpoint(self) -> None:
        if distributed.is_main():  # every rank holds the same state
            _atomic_save(self.state_dict(), self.ckpt_path)

    def _resume(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.micro_step = state["step"], state["micro_step"]
        torch.set_rng_state(state["torch_rng"])
        if state["hook"] is not None:
            self.hook.load_state_dict(state["hook"])
        # The killed part's work was paid for: charge it to this stage too.
        self.cost = Cost.from_dict(state["cost"])
        self.meter.add(self.cost)
        # Forget metrics written after the checkpoint: they are about to be redone.
        if distributed.is_main() and self.metrics_path.exists():
            rows = [r for r in self.metrics_path.read_text().splitlines() if r.strip()]
            kept = [r for r in rows if json.loads(r)["step"] <= self.step]
            write_text_atomic(self.metrics_path, "".join(r + "\n" for r in kept))

    # ------------------------------------------------------------------ loop
    def micro_batch_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted loss to backward, [B, T] detached token losses). `fused_loss`
        (default) runs the LM head + cross-entropy chunked (fastmix.train.fused_loss):
        same numbers, about twice the CPU throughput at large vocabularies."""
        if not self.cfg.fused_loss:
            tok = token_losses(self.model, batch, self.device, self.cfg.precision)
            return weighted_loss(tok, batch), tok.detach()
        h, targets, w = last_hidden(self.model, batch, self.device, self.cfg.precision)
        loss, tok = fused_linear_cross_entropy(h, self.model.get_output_embeddings().weight, targets, w)
        return loss, tok.view(batch.input_ids.shape[0], -1)

    def train(self, stop_after: int | None = None) -> dict:
        """Run to the end (or `stop_after` optimizer steps, for tests of resuming);
        returns the last logged metrics."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()  # every rank decides on resuming from the same checkpoint.pt
        state = (torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
                 if self.ckpt_path.exists() else None)
        if state is not None and self.identity is not None and state.get("identity") != self.identity:
            # a folder reused by another config (a re-run after a change, a shared grid): start
            # afresh; the stale file is overwritten by the first checkpoint (no rank deletes what
            # another may be reading)
            log.warning("%s: %s was saved by another setup (%s, now %s): not resumed", self.desc,
                        self.ckpt_path, state.get("identity") or "no identity", self.identity)
            state = None
        if state is not None:
            self._resume(state)
        elif distributed.is_main() and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh start: rows there belong to a run whose state is gone
        self.model.train()
        last: dict = {}
        self._t0 = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, disable=not self.progress,
                   leave=False)
        with open(self.metrics_path, "a") if distributed.is_main() else nullcontext() as metrics:
            while self.step < self.total_steps:
                # per-source losses are only needed for a step that is logged
                logged = (self.step + 1) % self.cfg.log_every == 0 or self.step + 1 == self.total_steps
                results = [self._micro_batch(logged) for _ in range(self.cfg.grad_accum)]
                grad_norm = self._optimizer_step()
                bar.update(1)
                if logged:
                    last = self._log(results, grad_norm, metrics)
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
                if self.step % self.cfg.ckpt_every == 0 or self.step == self.total_steps:
                    self._checkpoint()
                if stop_after is not None and self.step >= stop_after:
                    break
        bar.close()
        distributed.barrier()  # rank 0's checkpoint is on disk before any rank reads the folder
        return last

    def hook_context(self) -> HookContext:
        return HookContext(self.model, self.device, self.cfg.precision, self.scheduler.get_last_lr()[0],
                           self.world, self.cfg.grad_accum, self.total_steps, self.meter,
                           self.sampler.set_loss_weights)

    def _micro_batch(self, logged: bool) -> tuple[float, torch.Tensor | None]:
        """Draw a micro-batch, call the hook when due, forward, backward. Returns
        (its loss, its [K, 3] per-source sums when the step is logged)."""
        full = self.sampler.next_batch()
        batch = full if self.world == 1 else full.rows(slice(self.rank * self.cfg.batch_size,
                                                             (self.rank + 1) * self.cfg.batch_size))
        call_hook = self.hook is not None and self.micro_step % self.hook_every == 0
        if call_hook and self.hook.needs_token_losses:
            # After the forward, before the backward: the method reads this micro-batch's
            # token losses (DoReMi's excess losses), changes the loss weights, and the
            # same forward is weighted with the new ones.
            tok = token_losses(self.model, batch, self.device, self.cfg.precision)
            self.hook(self.hook_context(), StepInfo(self.step, self.micro_step, batch, tok.detach()))
            batch.weight = self.sampler.weights_of(batch.source)
            loss, tok_loss = weighted_loss(tok, batch), tok.detach()
        else:
            if call_hook:
                # Before this micro-batch is trained on: the method may look at it (FastMix's
                # per-source gradients), change the loss weights, and this micro-batch
                # already trains with the new ones.
                self.hook(self.hook_context(), StepInfo(self.step, self.micro_step, batch))
                batch.weight = self.sampler.weights_of(batch.source)
            loss, tok_loss = self.micro_batch_loss(batch)
        if self.world > 1:
            # The rank's loss is normalised by its own rows' weight sum; rescale it to the
            # global micro-batch's, so the mean over ranks (of losses and of gradients) is
            # one process's weighted mean, whatever weights or masks each rank's rows
            # carry. Exactly 1 for plain sampling without masks.
            full_norm = loss_normaliser(full, self.sampler.weights_of(full.source))
            loss = loss * (self.world * loss_normaliser(batch, batch.weight) / max(full_norm, 1e-12))
        (loss / self.cfg.grad_accum).backward()
        self.micro_step += 1
        stats = source_stats(tok_loss, batch, len(self.sampler.names)) if logged else None
        return float(loss.detach()), stats

    def _optimizer_step(self) -> float:
        """Average over ranks, clip, AdamW, schedule; charge the step (6ND, once)."""
        distributed.average_gradients(self.model.parameters())  # no-op for one process
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        step_cost = Cost(device=self.meter.device_name, devices=self.meter.devices)
        step_cost.add_train(self.n_params, self.tokens_per_step)
        self.meter.add(step_cost)  # the open stage
        self.cost += step_cost  # this run's own, kept across resumes
        return float(grad_norm)

    def _log(self, results: list[tuple[float, torch.Tensor | None]], grad_norm: float, metrics) -> dict:
        """Over all ranks: the step's loss and per-source losses, to metrics.jsonl and run.log."""
        loss = sum(r[0] for r in results) / len(results)
        loss = float(distributed.all_reduce_mean(torch.tensor(loss, dtype=torch.float64)))
        stats = distributed.all_reduce_mean(torch.stack([r[1] for r in results]))  # [accum, K, 3]
        source_loss = {}
        for k, n in enumerate(self.sampler.names):  # mean over the micro-batches that drew source k
            seen = stats[:, k, 2] > 0
            if seen.any():
                source_loss[n] = float((stats[seen, k, 0] / stats[seen, k, 1].clamp_min(1e-12)).mean())
        last = {"step": self.step, "tokens": self.step * self.tokens_per_step, "loss": loss,
                "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], "source_loss": source_loss}
        if metrics is not None:
            metrics.write(json.dumps(last) + "\n")
            metrics.flush()
            # run.log holds them too (sweeps and proxies run without progress bars)
            log.info("%s step %d/%d loss %.4f lr %.3g", self.desc, self.step, self.total_steps, loss, last["lr"])
        return last

    def _checkpoint(self) -> None:
        now = time.perf_counter()
        self.cost.add_time(now - self._t0, self.meter.devices)
        self._t0 = now
        self.save_checkpoint()


# ------------------------------------------------ one model on one mixture ---
def new_model(corpus: Corpus, shape: DictConfig, seed: int):
    tok = corpus.tokenizer
    return build_model(OmegaConf.to_container(shape), corpus.vocab_size, tok.bos_token_id,
                       tok.eos_token_id, tok.pad_token_id, seed=seed)


def train_on_mixture(corpus: Corpus, run_cfg: DictConfig, weights: dict[str, float], out_dir: Path,
                     device: torch.device, meter: CostMeter, seed: int, weighted: bool = False,
                     hook=None, hook_every: int = 1, desc: str = "train", progress: bool = True,
                     init_from: Path | None = None, identity: str | None = None):
    """Train a fresh model of `run_cfg.model` on a mixture through the one loop.
    weighted=False: sources sampled by w. weighted=True: sampled uniformly, loss
    weighted by w (FastMix, DoReMi). `init_from`: start from a saved model's
    weights instead (DeMix's components continue one shared base). `identity`: the
    fingerprint a checkpoint must carry to be resumed (fastmix.train.loop.Trainer). Returns
    (model, last metrics)."""
    model = new_model(corpus, run_cfg.model, seed)
    if init_from is not None:
        from transformers import AutoModelForCausalLM
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(init_from).state_dict())
    arrays = {s: corpus.tokens[s]["train"] for s in corpus.sources}
    masks = {s: corpus.mask(s, "train") for s in corpus.sources}
    # batch_size is per rank: every rank draws the global micro-batch and trains on its rows
    sampler = MixtureSampler(arrays, run_cfg.model.context, run_cfg.batch_size * distributed.world_size(), seed,
                             probs=None if weighted else weights,
                             loss_weights=weights if weighted else None, masks=masks)
    trainer = Trainer(model, sampler, run_cfg, device, meter, out_dir, hook=hook, hook_every=hook_every,
                      desc=desc, progress=progress, identity=identity)
    last = trainer.train()
    return model, last
