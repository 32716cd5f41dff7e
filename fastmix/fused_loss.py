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


def _buffer(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """One reusable [rows, cols] fp32 scratch per device (kept between calls: a fresh
    100 MB tensor per chunk costs more in page faults than the softmax itself)."""
    key = (device.type, device.index)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < rows * cols:
        buf = _BUFFERS[key] = torch.empty(rows * cols, dtype=torch.float32, device=device)
    return buf[: rows * cols].view(rows, cols)


class _FusedLinearCE(torch.autograd.Function):
    """loss = sum_i w_i * CE(h_i @ W^T, y_i) / sum_i w_i, computed chunk by chunk over
    tokens; the gradients w.r.t. h and W are computed in the forward pass (so the
    [tokens, vocab] logits never exist in full, and each chunk's softmax stays hot in
    cache) and only scaled by the incoming scalar gradient in backward."""

    @staticmethod
    def forward(ctx, h, W, targets, weight, chunk):
        M, _ = h.shape
        V = W.shape[0]
        wn = (weight / weight.sum().clamp_min(1e-12)).to(torch.float32)
        tok = torch.empty(M, dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h)
        gW = torch.empty_like(W) if ctx.needs_input_grad[1] else None
        whs = h * wn[:, None].to(h.dtype)  # weights folded into h for dW
        first = True
        for s in range(0, M, chunk):
            e = min(M, s + chunk)
            hc, tc = h[s:e], targets[s:e, None]
            p = _buffer(e - s, V, h.device)
            torch.mm(hc, W.t(), out=p)                       # logits
            xt = p.gather(1, tc).squeeze(1)                  # target logit
            m = p.amax(1)                                    # max logit
            torch._softmax(p, 1, False, out=p)               # in place: p = softmax
            # softmax at the argmax is 1/sum(exp(x - m)), never underflows:
            # logsumexp = m - log(max p), exactly, without a second pass of exps
            tok[s:e] = m - p.amax(1).log() - xt
            p.scatter_add_(1, tc, torch.full_like(xt, -1.0)[:, None])  # p - onehot
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
