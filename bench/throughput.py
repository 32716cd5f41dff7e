"""Training throughput of a proxy model vs. the machine's matmul peak (a benchmark, not a test).

    python bench/throughput.py [--shape regmix_1m] [--context 512] [--vocab 50432] [--batch 8]
                               [--loss fused logits] [--optim fused foreach] [--device cpu|cuda]

In one run: the fp32 GEMM peak (2048^3, best clean burst, same thread count),
then forward + backward + AdamW steps of the proxy, reported as tokens/s and
6*N*tokens/s as a fraction of that peak (N = fastmix.train.models.flop_params).
Several values per flag are run as a grid.

Findings on 2 CPU cores (2026-11-23), regmix_1m shape at context 512, vocab 50432,
micro-batch 8, glibc malloc tuned (fastmix.train.fused_loss.tune_malloc):
  plain logits + F.cross_entropy, foreach AdamW   37% of peak  (815 tok/s)
  plain logits,                   fused AdamW     48%
  fused chunked head + loss,      foreach AdamW   65%
  fused chunked head + loss,      fused AdamW     74-75%       (1600-1640 tok/s)
The [tokens, vocab] logits (800 MB here) make the plain path memory-bound; the
fused head + loss (fastmix/train/fused_loss.py) and fused AdamW are what the one
training loop (fastmix/train/loop.py) uses, so this script measures its code path.
Without the malloc tuning every step mmaps and page-faults its big tensors.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmix.train.fused_loss import fused_linear_cross_entropy, tune_malloc
from fastmix.train.models import build_model, flop_params

SHAPES = {
    "regmix_1m": dict(layers=2, hidden=256, ffn=512, heads=8),   # conf/proxy/regmix_1m.yaml
    "tiny": dict(layers=2, hidden=64, ffn=256, heads=4),         # conf/proxy/tiny.yaml
    "tiny_target": dict(layers=4, hidden=128, ffn=512, heads=4),  # conf/train/tiny.yaml
}
DEFAULT_CONTEXT = {"regmix_1m": 512, "tiny": 128, "tiny_target": 256}


# --------------------------------------------------------------------------- allocator



def _busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy (all but idle/iowait), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return math.nan
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


class Others:
    """How many cores *other* processes kept busy over an interval (machine busy time from
    /proc/stat minus this process's os.times()). The machine may be shared: a step during
    which anything else ran is slower for reasons that have nothing to do with the code,
    so such steps (and GEMM bursts) are set aside. NaN where /proc/stat is missing."""

    def __init__(self):
        self.t, self.busy, self.own = time.perf_counter(), _busy_seconds(), self._own()

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def cores(self) -> float:
        t, busy, own = time.perf_counter(), _busy_seconds(), self._own()
        out = max(0.0, (busy - self.busy) - (own - self.own)) / max(t - self.t, 1e-9)
        self.t, self.busy, self.own = t, busy, own
        return out


CLEAN = 0.1  # an interval is clean when other processes used < 0.1 core on average


# --------------------------------------------------------------------------- measurements
class Gemm:
    """fp32 (bf16 on cuda) n x n x n GEMM rate in FLOP/s, in short bursts so it can be
    re-measured right next to each timed training step (on a shared VM the speed of the
    cores drifts by 20% or more from second to second; paired measurements cancel it)."""

    def __init__(self, n: int, device: torch.device, dtype: torch.dtype):
        self.n, self.device = n, device
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype)
        self.c = torch.empty(n, n, device=device, dtype=dtype)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.rates: list[float] = []
        self.clean: list[bool] = []
        self.burst(1)
        t = time.perf_counter()
        self.burst(1)
        self.reps = max(1, int(0.1 / max(time.perf_counter() - t, 1e-6)))  # ~0.1 s per burst
        self.rates.clear()
        self.clean.clear()

    def burst(self, reps: int | None = None) -> float:
        reps = reps or self.reps
        self.sync()
        others = Others()
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(self.a, self.b, out=self.c)
        self.sync()
        rate = 2.0 * self.n ** 3 * reps / (time.perf_counter() - t)
        self.rates.append(rate)
        self.clean.append(not others.cores() >= CLEAN)  # NaN (unknown) counts as clean
        return rate

    def best_of(self, bursts: int) -> float:
        for _ in range(bursts):
            self.burst()
        return self.peak

    @property
    def peak(self) -> float:
        """Best clean burst (best of all when none was clean)."""
        clean = [r for r, c in zip(self.rates, self.clean) if c]
        return max(clean or self.rates)


class Run:
    """One training configuration: model, AdamW, data; `step()` is one timed optimizer step
    (forward + backward of `accum` micro-batches, grad clipping, AdamW, zero_grad)."""

    def __init__(self, shape: str, context: int, vocab: int, batch: int, accum: int, loss: str,
                 chunk: int, optim: str, compile_mode: str, device: torch.device):
        self.label = dict(shape=shape, ctx=context, vocab=vocab,
                          B=f"{batch}x{accum}" if accum > 1 else str(batch), loss=loss,
                          chunk=str(chunk) if loss == "fused" else "-", adamw=optim, compile=compile_mode)
        self.loss_mode, self.chunk, self.accum, self.device = loss, chunk, accum, device
        torch.manual_seed(0)
        self.model = build_model({**SHAPES[shape], "context": context}, vocab).to(device)
        self.model.train()
        self.n_params = flop_params(self.model)
        kw = {"foreach": True} if optim == "foreach" else {"fused": True} if optim == "fused" else {"foreach": False}
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **kw)
        self.fwd_model, self.fwd_body = self.model, self.model.model
        if compile_mode != "no":
            mode = None if compile_mode == "default" else compile_mode
            if loss == "fused":  # the head + loss stay eager; compile the transformer body
                self.fwd_body = torch.compile(self.model.model, mode=mode)
            else:
                self.fwd_model = torch.compile(self.model, mode=mode)
        self.amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
        gen = torch.Generator().manual_seed(0)
        self.data = [torch.randint(0, vocab, (batch, context + 1), generator=gen).to(device) for _ in range(4)]
        self.tokens = batch * context * accum
        self.flop = 6.0 * self.n_params * self.tokens
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.i = 0
        self.first_s = math.nan
        self.times: list[float] = []
        self.clean: list[bool] = []

    def micro(self, ids: torch.Tensor) -> None:
        x, y = ids[:, :-1], ids[:, 1:]
        with self.amp():
            if self.loss_mode == "labels":  # HF shifts the labels itself: pass the whole window
                loss = self.fwd_model(input_ids=ids, labels=ids).loss
            elif self.loss_mode == "logits":
                logits = self.fwd_model(input_ids=x).logits
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            else:
                h = self.fwd_body(input_ids=x).last_hidden_state
                loss, _ = fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.model.lm_head.weight,
                                                     y.reshape(-1), chunk=self.chunk)
        (loss / self.accum).backward()

    def step(self) -> float:
        t = time.perf_counter()
        for _ in range(self.accum):
            self.micro(self.data[self.i % len(self.data)])
            self.i += 1
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sync()
        return time.perf_counter() - t

    def timed_step(self) -> None:
        others = Others()
        self.times.append(self.step())
        self.clean.append(not others.cores() >= CLEAN)

    def summary(self, peak: float) -> dict:
        """Median and best of the clean steps (of all steps when none was clean)."""
        times = [t for t, c in zip(self.times, self.clean) if c]
        n_clean = len(times)
        times = times or self.times
        med, best = statistics.median(times), min(times)
        return dict(n_params=self.n_params, first_s=self.first_s, n_clean=n_clean, n=len(self.times),
                    tok_s=self.tokens / med, tok_s_best=self.tokens / best, gflops=self.flop / med / 1e9,
                    frac=self.flop / med / peak, frac_best=self.flop / best / peak)


KINDS = ("matmul", "attention", "softmax/CE", "optimizer", "other")


def profile_shares(fn) -> dict:
    """Share of self CPU time by kind of op, from one profiled step (profiled, so a bit slower)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    kinds = dict.fromkeys(KINDS, 0.0)
    mm = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
    ce = ("softmax", "nll_loss", "logsumexp", "amax", "scatter", "gather")
    opt = ("adamw", "_foreach_", "lerp", "addcdiv", "addcmul", "vector_norm", "Optimizer")
    for ev in prof.key_averages():
        t, name = ev.self_cpu_time_total, ev.key
        if name in mm:
            kinds["matmul"] += t
        elif "scaled_dot_product" in name:
            kinds["attention"] += t
        elif any(k in name for k in ce):
            kinds["softmax/CE"] += t
        elif any(k in name for k in opt):
            kinds["optimizer"] += t
        else:
            kinds["other"] += t
    total = sum(kinds.values()) or 1.0
    return {k: v / total for k, v in kinds.items()}


# --------------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    many = dict(nargs="+")
    ap.add_argument("--shape", default=["regmix_1m"], choices=sorted(SHAPES), **many)
    ap.add_argument("--context", type=int, default=None, help="default: 512 regmix_1m, 128 tiny, 256 tiny_target")
    ap.add_argument("--vocab", type=int, default=[50432], **many)
    ap.add_argument("--batch", type=int, default=[8], help="micro-batch (sequences)", **many)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (GEMM peak too)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--loss", default=["fused"], choices=["fused", "logits", "labels"], **many)
    ap.add_argument("--chunk", type=int, default=[512], help="tokens per chunk of the fused head+loss", **many)
    ap.add_argument("--optim", default=["fused"], choices=["fused", "foreach", "forloop"], **many)
    ap.add_argument("--compile", default=["no"], **many,
                    help="no | default | max-autotune ... (torch.compile mode; 'no' = eager)")
    ap.add_argument("--no-malloc-tune", action="store_true", help="keep glibc's default mmap behaviour")
    ap.add_argument("--steps", type=int, default=5, help="clean timed steps wanted per configuration")
    ap.add_argument("--max-steps", type=int, default=12, help="give up waiting for clean steps after this many")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (the first includes compiling)")
    ap.add_argument("--gemm-n", type=int, default=2048)
    ap.add_argument("--no-profile", action="store_true", help="skip the per-op-kind time shares")
    args = ap.parse_args(argv)

    overall = Others()
    t_start = time.perf_counter()
    malloc = False if args.no_malloc_tune else tune_malloc()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gemm = Gemm(args.gemm_n, device, dtype)
    gemm.best_of(20)
    print(f"# {device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}, malloc tuned: {malloc}; "
          f"GEMM {args.gemm_n}^3 {str(dtype).split('.')[-1]}, best of 20 bursts: {gemm.peak / 1e9:.1f} GFLOP/s "
          f"({sum(gemm.clean)} clean)", flush=True)

    runs = []
    for shape in args.shape:
        context = args.context or DEFAULT_CONTEXT[shape]
        for vocab, batch, loss, optim, comp in itertools.product(args.vocab, args.batch, args.loss, args.optim,
                                                                 args.compile):
            for chunk in (args.chunk if loss == "fused" else [0]):
                r = Run(shape, context, vocab, batch, args.accum, loss, chunk, optim, comp, device)
                r.first_s = r.step()  # includes torch.compile's compile time, if any
                for _ in range(args.warmup - 1):
                    r.step()
                runs.append(r)
    # Round-robin over the configurations, with a GEMM burst per round, so that all of them
    # (and the peak) see the same machine; rounds go on until every configuration has
    # `--steps` clean steps (no other process busy), or `--max-steps` steps in all.
    for _ in range(args.max_steps):
        todo = [r for r in runs if sum(r.clean) < args.steps]
        if not todo:
            break
        gemm.burst()
        for r in todo:
            r.timed_step()
    peak = gemm.peak
    cols = list(runs[0].label) + ["N(M)", "1st step s", "clean/steps", "tok/s", "GFLOP/s", "frac", "tok/s best",
                                  "frac best"]
    shares = not args.no_profile and device.type == "cpu"
    if shares:
        cols += [f"{k} %" for k in KINDS]
    print(" | ".join(cols))
    for r in runs:
        s = r.summary(peak)
        row = list(r.label.values()) + [
            f"{s['n_params'] / 1e6:.2f}", f"{s['first_s']:.1f}", f"{s['n_clean']}/{s['n']}", f"{s['tok_s']:.0f}",
            f"{s['gflops']:.1f}", f"{s['frac']:.1%}", f"{s['tok_s_best']:.0f}", f"{s['frac_best']:.1%}"]
        if shares:
            row += [f"{100 * v:.0f}" for v in profile_shares(r.step).values()]
        print(" | ".join(str(c) for c in row), flush=True)
    wall = time.perf_counter() - t_start
    bg = overall.cores()
    print(f"# GEMM peak: {peak / 1e9:.1f} GFLOP/s (best clean burst; {sum(gemm.clean)}/{len(gemm.rates)} bursts "
          f"clean). tok/s, frac: median clean step; frac = 6*N*tok/s / GEMM peak.")
    print(f"# other processes kept {bg:.2f} of {os.cpu_count()} cores busy during this {wall:.0f} s run"
          + ("  <-- shared machine: trust only configurations with clean steps" if bg >= CLEAN else ""))


if __name__ == "__main__":
    main()
