"""The one training loop: it learns, the weighting identity holds, it resumes exactly."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fastmix.train.cost import CostMeter
from fastmix.train.loop import Trainer, lr_factor, token_losses, weighted_loss
from fastmix.train.models import build_model, flop_params
from fastmix.train.sampling import Batch, MixtureSampler, eval_windows

TINY = {"layers": 1, "hidden": 32, "ffn": 64, "heads": 2, "context": 32}


def train_cfg(**over):
    base = dict(tokens=40 * 8 * 32, batch_size=8, grad_accum=1, lr=3e-3, warmup_steps=2,
                schedule="constant", min_lr_ratio=0.1, weight_decay=0.1, betas=[0.9, 0.95],
                grad_clip=1.0, precision="bf16", log_every=5, ckpt_every=4)
    return OmegaConf.create({**base, **over})


def arrays(vocab=64, n=4000, seed=0):
    """Three sources with different statistics: a cycle, a skewed random stream, a uniform one."""
    g = np.random.default_rng(seed)
    return {"cycle": (np.arange(n) % 17).astype(np.uint16),
            "skew": np.minimum(g.geometric(0.3, n), vocab - 1).astype(np.uint16),
            "flat": g.integers(0, vocab, n).astype(np.uint16)}


@torch.no_grad()
def evaluate_loss(model, windows):
    n = len(windows)
    return float(token_losses(model, Batch(windows, torch.zeros(n, dtype=torch.long), torch.ones(n)), "cpu", "bf16").mean())


def test_loss_goes_down(tmp_path):
    torch.manual_seed(0)
    src = arrays()
    model = build_model(TINY, 64, seed=0)
    meter = CostMeter(torch.device("cpu"))
    held_out = eval_windows(src["cycle"], 32, 512)
    before = evaluate_loss(model, held_out)
    with meter.stage("train"):
        Trainer(model, MixtureSampler(src, 32, 8, seed=0), train_cfg(), torch.device("cpu"), meter,
                tmp_path, progress=False).train()
    after = evaluate_loss(model, held_out)
    assert after < before - 1.0, (before, after)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[-1]["source_loss"]) <= set(src) and rows[-1]["loss"] < rows[0]["loss"]
    c = meter.stages["train"]
    assert c.tokens == 40 * 8 * 32 and c.flops == 6 * flop_params(model) * c.tokens


def test_weighting_identity():
    """Sampling sources by w and sampling uniformly with loss weights w have the same
    expected gradient (FastMix Sec. 3). Each source here has exactly M windows, so
    the sampling-by-w expectation is computed exactly by enumeration."""
    ctx, M = 8, 6
    g = np.random.default_rng(1)
    src = {k: g.integers(0, 32, ctx + M).astype(np.uint16) for k in ("a", "b", "c")}
    w = {"a": 0.7, "b": 0.2, "c": 0.1}
    model = build_model({"layers": 1, "hidden": 16, "ffn": 32, "heads": 2, "context": ctx}, 32, seed=0)

    def grad_of(sampler_batch):
        model.zero_grad()
        weighted_loss(token_losses(model, sampler_batch, "cpu", "bf16"), sampler_batch).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    per_source = {}
    for k, arr in src.items():
        rows = torch.stack([torch.from_numpy(arr[i:i + ctx + 1].astype(np.int64)) for i in range(M)])
        one = torch.ones(M)
        per_source[k] = grad_of(Batch(rows, torch.zeros(M, dtype=torch.long), one))  # mean over M
    exact = sum(w[k] * per_source[k] for k in src)
    uniform_mix = sum(per_source[k] / 3 for k in src)

    def monte_carlo(sampler, n=60):
        return sum(grad_of(sampler.next_batch()) for _ in range(n)) / n

    weighted = monte_carlo(MixtureSampler(src, ctx, 128, seed=2, loss_weights=w))
    sampled = monte_carlo(MixtureSampler(src, ctx, 128, seed=3, probs=w))
    rel = lambda a, b: float((a - b).norm() / b.norm())
    assert rel(weighted, exact) < 0.05 and rel(sampled, exact) < 0.05
    assert rel(uniform_mix, exact) > 4 * max(rel(weighted, exact), rel(sampled, exact))


def run(tmp_path, stop_after=None, fresh=False):
    model = build_model(TINY, 64, seed=0)
    meter = CostMeter(torch.device("cpu"))
    trainer = Trainer(model, MixtureSampler(arrays(), 32, 8, seed=5, probs={"cycle": .5, "skew": .3, "flat": .2}),
                      train_cfg(tokens=14 * 8 * 32), torch.device("cpu"), meter, tmp_path, progress=False)
    with meter.stage("train"):
        last = trainer.train(stop_after=stop_after)
    return model, last, meter


def test_resume_gives_the_same_numbers(tmp_path):
    ref_model, ref_last, _ = run(tmp_path / "ref")
    # "Kill" after step 6: the checkpoint is at step 4, steps 5-6 are lost and redone.
    run(tmp_path / "cut", stop_after=6)
    model, last, meter = run(tmp_path / "cut")
    assert last["loss"] == ref_last["loss"] and last["step"] == 14
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    steps = [json.loads(r)["step"] for r in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated rows from the redone steps
    # The resumed job still pays for the whole run (work before the kill included).
    assert meter.stages["train"].tokens >= 14 * 8 * 32


def test_lr_schedule_by_hand():
    assert lr_factor(0, 100, 10, "constant", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "constant", 0.1) == 1.0
    assert lr_factor(50, 100, 10, "constant", 0.1) == 1.0
    assert lr_factor(10, 100, 10, "cosine", 0.1) == 1.0
    assert lr_factor(55, 100, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)


def test_flop_params_by_hand():
    m = build_model({"layers": 2, "hidden": 256, "ffn": 512, "heads": 8, "context": 512}, 1000)
    per_layer = 4 * 256 * 256 + 3 * 256 * 512 + 2 * 256  # attention, SwiGLU MLP, two RMSNorms
    assert flop_params(m) == 2 * per_layer + 256 + 1000 * 256  # + final norm + LM head


@pytest.mark.parametrize("masked", [False, True])
def test_fused_head_loss_matches_autograd(masked):
    """The chunked LM head + cross-entropy gives the plain path's loss, token losses
    and gradients (weights and a loss mask included), with chunks that do not divide
    the token count."""
    from fastmix.train.fused_loss import fused_linear_cross_entropy
    torch.manual_seed(0)
    M, H, V = 37, 16, 50
    h = torch.randn(M, H, dtype=torch.float64).float().requires_grad_()
    W = (torch.randn(V, H) * 0.3).requires_grad_()
    y = torch.randint(0, V, (M,))
    w = torch.rand(M) * (torch.rand(M) > 0.3 if masked else 1)
    tok_ref = torch.nn.functional.cross_entropy(h @ W.t(), y, reduction="none")
    loss_ref = (w * tok_ref).sum() / w.sum()
    gh_ref, gW_ref = torch.autograd.grad(loss_ref, [h, W])
    loss, tok = fused_linear_cross_entropy(h, W, y, w, chunk=8)
    gh, gW = torch.autograd.grad(2.0 * loss, [h, W])  # a scaled upstream gradient too
    assert torch.allclose(loss, loss_ref, atol=1e-6) and torch.allclose(tok, tok_ref.detach(), atol=1e-5)
    assert torch.allclose(gh, 2 * gh_ref, atol=1e-6) and torch.allclose(gW, 2 * gW_ref, atol=1e-6)


def test_fused_and_plain_training_agree(tmp_path):
    """The loop trains the same with the fused loss as with plain logits."""
    losses = {}
    for fused in (True, False):
        model = build_model(TINY, 64, seed=0)
        meter = CostMeter(torch.device("cpu"))
        with meter.stage("train"):
            last = Trainer(model, MixtureSampler(arrays(), 32, 8, seed=5, loss_weights={"cycle": .5, "skew": .3, "flat": .2}),
                           train_cfg(tokens=6 * 8 * 32, fused_loss=fused), torch.device("cpu"), meter,
                           tmp_path / str(fused), progress=False).train()
        losses[fused] = last["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_stop_signal_during_checkpoint_write_waits_for_a_whole_file(tmp_path, monkeypatch):
    """SLURM's USR2 arriving while torch.save writes: the handler (Submitit's exits to
    requeue) runs once the file is whole, so the resume point is there and loadable.
    Without the hold, the exit fires inside torch.save and the file is never written."""
    import os
    import signal

    import fastmix.train.loop as train_mod

    real_save = torch.save

    def save_then_signal(obj, fh):
        os.kill(os.getpid(), signal.SIGUSR2)  # delivered at once unless held
        real_save(obj, fh)

    def exit_like_submitit(signum, frame):
        raise SystemExit(144)

    old = signal.signal(signal.SIGUSR2, exit_like_submitit)
    monkeypatch.setattr(train_mod.torch, "save", save_then_signal)
    try:
        with pytest.raises(SystemExit):
            train_mod._atomic_save({"w": torch.arange(1000.0)}, tmp_path / "checkpoint.pt")
        assert signal.getsignal(signal.SIGUSR2) is exit_like_submitit  # the handler is back
    finally:
        signal.signal(signal.SIGUSR2, old)
    monkeypatch.undo()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert torch.equal(state["w"], torch.arange(1000.0))
