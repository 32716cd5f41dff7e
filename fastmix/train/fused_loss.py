"""The LM head and cross-entropy fused and chunked over tokens (written by hand:
no library offers it for CPU; see docs/DECISIONS.md).

The plain path materialises [tokens, vocab] logits (800 MB for 8 x 512 tokens
at vocab 50432) and reads them several times; on CPU that costs more than the
matmuls. Here each chunk's logits stay in one reused buffer, the softmax is
computed in place, and the head's gradients are formed in the forward pass.
Measured by bench/throughput.py: regmix_1m at context 512 on 2 cores trains at
~37% of the GEMM peak with plain logits + F.cross_entropy, ~66-75% fused.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch


def tune_malloc() -> bool:
    """glibc only: serve every allocation from the heap and never hand memory back to
    the OS, so the big per-step tensors (logits, grads) reuse already-mapped pages
    instead of being mmap'ed, page-faulted and zeroed by the kernel on every step.
    Equivalent to MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge> in the environment."""
    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(name)
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1
        ok &= libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


_BUFFERS: dict = {}


def _buffer(rows: int, cols: int, device: torch.device, slot: int = 0) -> torch.Tensor:
    """One reusable [rows, cols] fp32 scratch per device and slot (kept between calls: a
    fresh 100 MB tensor per chunk costs more in page faults than the softmax itself)."""
    key = (device.type, device.index, slot)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < rows * cols:
        buf = _BUFFERS[key] = torch.empty(rows * cols, dtype=torch.float32, device=device)
    return buf[: rows * cols].view(rows, cols)


def _dlogits(hc: torch.Tensor, W: torch.Tensor, tc: torch.Tensor, tok_out: torch.Tensor | None) -> torch.Tensor:
    """softmax(hc W^T) - onehot(tc), the cross-entropy's gradient w.r.t. the logits, in
    the reused buffer (valid until the next call); writes the token losses to tok_out
    (None: not needed, two row-max passes saved)."""
    p = _buffer(hc.shape[0], W.shape[0], hc.device)
    tc = tc[:, None]
    torch.mm(hc, W.t(), out=p)                       # logits
    if tok_out is not None:
        xt = p.gather(1, tc).squeeze(1)              # target logit
        m = p.amax(1)                                # max logit
    torch._softmax(p, 1, False, out=p)               # in place: p = softmax
    if tok_out is not None:
        # softmax at the argmax is 1/sum(exp(x - m)), never underflows:
        # logsumexp = m - log(max p), exactly, without a second pass of exps
        tok_out.copy_(m - p.amax(1).log() - xt)
    p.scatter_add_(1, tc, torch.full((tc.shape[0], 1), -1.0, device=p.device))  # p - onehot
    return p


class _FusedLinearCE(torch.autograd.Function):
    """loss = sum_i w_i * CE(h_i @ W^T, y_i) / sum_i w_i, computed chunk by chunk over
    tokens; the gradients w.r.t. h and W are computed in the forward pass (so the
    [tokens, vocab] logits never exist in full, and each chunk's softmax stays hot in
    cache) and only scaled by the incoming scalar gradient in backward."""

    @staticmethod
    def forward(ctx, h, W, targets, weight, chunk):
        M, _ = h.shape
        wn = (weight / weight.sum().clamp_min(1e-12)).to(torch.float32)
        tok = torch.empty(M, dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h)
        gW = torch.empty_like(W) if ctx.needs_input_grad[1] else None
        whs = h * wn[:, None].to(h.dtype)  # weights folded into h for dW
        first = True
        for s in range(0, M, chunk):
            e = min(M, s + chunk)
            p = _dlogits(h[s:e], W, targets[s:e], tok[s:e])
            torch.mm(p, W, out=gh[s:e])
            gh[s:e].mul_(wn[s:e, None])
            if gW is not None:
                if first:
                    torch.mm(p.t(), whs[s:e], out=gW)
                else:
                    gW.addmm_(p.t(), whs[s:e])
            first = False
        ctx.save_for_backward(gh, gW if gW is not None else torch.empty(0))
        ctx.has_gW = gW is not None
        loss = (wn * tok).sum()
        return loss, tok

    @staticmethod
    def backward(ctx, g_loss, g_tok):
        gh, gW = ctx.saved_tensors
        scale = None if torch.equal(g_loss, torch.ones_like(g_loss)) else g_loss
        gh = gh if scale is None else gh * scale
        gW = None if not ctx.has_gW else (gW if scale is None else gW * scale)
        return gh, gW, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               token_weight: torch.Tensor | None = None, chunk: int = 512):
    """(weighted mean loss, detached per-token loss) of the LM head + cross-entropy.

    hidden [M, H] (the final-norm output, `model.model(ids).last_hidden_state`),
    weight [V, H] (`model.lm_head.weight`), targets [M]. Per-token losses are fp32 and
    detached (the gradient flows only through the returned scalar)."""
    if token_weight is None:
        token_weight = torch.ones(hidden.shape[0], device=hidden.device)
    if (targets < 0).any():  # ignore_index-style targets (-100): weight 0
        token_weight = token_weight * (targets >= 0)
        targets = targets.clamp_min(0)
    with torch.autocast(hidden.device.type, enabled=False):
        loss, tok = _FusedLinearCE.apply(hidden.float(), weight.float() if weight.dtype != torch.float32
                                         else weight, targets, token_weight.float(), chunk)
    return loss, tok.detach()


@torch.no_grad()
def head_gradient(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  token_weight: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, float]:
    """(dL/dW, L) for L = sum_t w_t CE_t / sum_t w_t: the LM head's gradient alone,
    sum_t (w_t / sum w) d_t h_t^T with d_t = softmax(W h_t) - onehot(y_t), chunk by
    chunk (no [tokens, vocab] logits, no gradient w.r.t. h). FastMix's G_val."""
    h, W = hidden.float(), weight.float()
    wn = (token_weight / token_weight.sum().clamp_min(1e-12)).float()
    tok = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    gW = torch.zeros_like(W)
    for s in range(0, h.shape[0], chunk):
        e = min(h.shape[0], s + chunk)
        gW.addmm_(_dlogits(h[s:e], W, targets[s:e], tok[s:e]).t(), h[s:e] * wn[s:e, None])
    return gW, float((wn * tok).sum())


@torch.no_grad()
def head_gradient_dots(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, G: torch.Tensor,
                       chunk: int = 512) -> torch.Tensor:
    """Per token t, <G, dCE_t/dW> = <G, d_t h_t^T> = d_t . (G h_t): one more
    [chunk, hidden] x [hidden, vocab] product per chunk. Any mean of these over a set
    of tokens is <G, the gradient of that mean loss>, so FastMix's <G_val, G_k> for
    every source k comes from one pass over the micro-batch, with no per-source
    backward pass and no full logits."""
    h, W, G = hidden.float(), weight.float(), G.float()
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        e = min(h.shape[0], s + chunk)
        p = _dlogits(h[s:e], W, targets[s:e], None)
        a = _buffer(e - s, W.shape[0], h.device, slot=1)
        torch.mm(h[s:e], G.t(), out=a)               # G h_t for every token of the chunk
        out[s:e] = a.mul_(p).sum(1)
    return out
