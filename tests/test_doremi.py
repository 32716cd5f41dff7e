"""DoReMi: the Group DRO update against hand-computed numbers, the loop's
after-forward hook path against autograd, resuming, a reference that is better
on one domain pulling weight to it, and the search end to end."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli
from omegaconf import OmegaConf

from baselines.doremi import DoReMiHook, entropy, excess_loss_sums
from fastmix.errors import UserError
from fastmix.train.cost import CostMeter
from fastmix.train.loop import Trainer, token_losses, weighted_loss
from fastmix.train.models import build_model, flop_params
from fastmix.train.sampling import Batch, MixtureSampler

NAMES = ["a", "b", "c"]
SHAPE = {"layers": 1, "hidden": 32, "ffn": 64, "heads": 2, "context": 32}
V = 64


def cfg(**over):
    base = dict(tokens=8 * 8 * 32, batch_size=8, grad_accum=1, lr=3e-3, warmup_steps=2, schedule="constant",
                min_lr_ratio=0.1, weight_decay=0.1, betas=[0.9, 0.95], grad_clip=1.0, precision="bf16",
                log_every=2, ckpt_every=3)
    return OmegaConf.create({**base, **over})


def arrays(n=4000, seed=0):
    g = np.random.default_rng(seed)
    return {"cycle": (np.arange(n) % 17).astype(np.uint16),
            "skew": np.minimum(g.geometric(0.3, n), V - 1).astype(np.uint16),
            "flat": g.integers(0, V, n).astype(np.uint16)}


# ------------------------------------------------------------ the update by hand
def step1_batch():
    """K=3, four rows of 3 target tokens; domain c absent. Token losses chosen so
    clipping, the loss mask and the per-token (not per-row) mean all matter."""
    proxy = torch.tensor([[2.0, 1.0, 3.0], [1.0, 1.0, 1.0], [0.5, 2.5, 1.5], [2.0, 0.2, 4.0]])
    ref = torch.tensor([[1.0, 1.5, 2.0], [0.5, 2.0, 1.0], [0.5, 1.0, 2.5], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]])
    batch = Batch(torch.zeros(4, 4, dtype=torch.long), torch.tensor([0, 1, 0, 1]), torch.ones(4), mask)
    # a: excess [1, 0, 1] + [0, (1.5 masked), 0] -> 2.0 / 5 tokens = 0.4
    # b: [0.5, 0, (masked)] + [(masked), 0, 3.0] -> 3.5 / 4 tokens = 0.875
    return proxy, ref, batch


def step2_batch():
    """One row of domain a: excess [1.5, 0 (clipped -1.0), 2.1] -> 1.2; b and c absent."""
    proxy, ref = torch.tensor([[3.0, 1.0, 2.5]]), torch.tensor([[1.5, 2.0, 0.4]])
    return proxy, ref, Batch(torch.zeros(1, 4, dtype=torch.long), torch.tensor([0]), torch.ones(1))


def test_excess_losses_by_hand():
    sums, counts = excess_loss_sums(*step1_batch(), 3)
    assert torch.allclose(sums, torch.tensor([2.0, 3.5, 0.0], dtype=torch.float64))
    assert torch.equal(counts, torch.tensor([5.0, 4.0, 0.0], dtype=torch.float64))


def test_update_by_hand():
    """Domain c is absent from the first update: it gets log(V) = log 64, the public
    code's initial perdomain_scores, so alpha_1 = (1-c) softmax(log(1/3) + [0.4, 0.875,
    log 64]) + c/3 with c = 1e-3. The uniform log(1/3) cancels: the softmax is
    [e^0.4, e^0.875, 64] / (1.491825 + 2.398875 + 64) = [0.021974, 0.035334, 0.942692],
    and (1-c) x + c/3 = [0.022285, 0.035632, 0.942082]. Then a second update where b
    and c are absent and carry 0.875 and log 64 (public code)."""
    hook = DoReMiHook(NAMES, ref_model=None, eta=1.0, smoothing=1e-3, vocab_size=V)
    logv = math.log(V)
    assert torch.allclose(hook.last_excess, torch.full((3,), logv, dtype=torch.float64))
    assert hook.observe(*step1_batch(), update=True)
    assert torch.allclose(hook.last_excess, torch.tensor([0.4, 0.875, logv], dtype=torch.float64))
    a1 = torch.tensor([0.0222852778, 0.0356323716, 0.9420823506], dtype=torch.float64)
    assert torch.allclose(hook.alpha, a1, atol=1e-8)
    assert hook.observe(*step2_batch(), update=True)  # a: 1.2 measured; b: 0.875, c: log 64 carried
    assert torch.allclose(hook.last_excess, torch.tensor([1.2, 0.875, logv], dtype=torch.float64))
    a2 = torch.tensor([0.0015560362, 0.0017458771, 0.9966980867], dtype=torch.float64)
    assert torch.allclose(hook.alpha, a2, atol=1e-8)
    # Output = mean of alpha_1 and alpha_2 (alpha_0 not included, Algorithm 1).
    assert torch.allclose(hook.average, (a1 + a2) / 2, atol=1e-8)
    assert hook.updates == 2
    assert hook.entropy_sum / 2 == pytest.approx((0.25979262589195523 + 0.02444437446558257) / 2, abs=1e-8)
    assert entropy(torch.full((4,), 0.25)) == pytest.approx(math.log(4))


def test_initial_carried_value_is_log_vocab_of_the_reference_model():
    """Without vocab_size the hook reads the reference model's vocabulary; a domain
    keeps log(V) until it is first seen, then its measured excess replaces it."""
    hook = DoReMiHook(NAMES, build_model(SHAPE, 100, seed=0))
    assert torch.allclose(hook.last_excess, torch.full((3,), math.log(100), dtype=torch.float64))
    hook.observe(*step2_batch(), update=True)  # only a seen
    assert torch.allclose(hook.last_excess, torch.tensor([1.2, math.log(100), math.log(100)],
                                                         dtype=torch.float64))
    hook.observe(*step1_batch(), update=True)  # a and b seen, c still not
    assert torch.allclose(hook.last_excess, torch.tensor([0.4, 0.875, math.log(100)], dtype=torch.float64))
    with pytest.raises(ValueError, match="vocab"):
        DoReMiHook(NAMES, None)


def test_absent_zero_and_pooled_step_by_hand():
    zero = DoReMiHook(NAMES, None, absent="zero", vocab_size=V)  # c absent in step 1: excess 0, not log V
    zero.observe(*step1_batch(), update=True)
    zero.observe(*step2_batch(), update=True)  # b absent: excess 0, not its last 0.875
    assert torch.allclose(zero.alpha, torch.tensor([0.59281452, 0.28716797, 0.12001751], dtype=torch.float64),
                          atol=1e-8)
    # update_every=step with two micro-batches: one update from the pooled tokens,
    # a: (2.0 + 3.6) / (5 + 3) = 0.7, b: 3.5 / 4 = 0.875, c never seen: log 64.
    pooled = DoReMiHook(NAMES, None, vocab_size=V)
    assert not pooled.observe(*step1_batch(), update=False)
    assert torch.allclose(pooled.alpha, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert pooled.observe(*step2_batch(), update=True)
    # softmax [e^0.7, e^0.875, 64] / 68.412628 = [0.029435, 0.035065, 0.935500], smoothed
    pooled_alpha = torch.tensor([0.0297392926, 0.0353630711, 0.9348976363], dtype=torch.float64)
    assert torch.allclose(pooled.alpha, pooled_alpha, atol=1e-8)
    assert pooled.updates == 1 and float(pooled.pending_counts.sum()) == 0


def test_bad_options_are_refused():
    from conftest import compose

    from fastmix.run.pipeline import build
    for override, word in [("reference=best", "reference"), ("update_every=epoch", "update_every"),
                           ("absent=skip", "absent"), ("eta=0", "eta"), ("smoothing=2", "smoothing"),
                           ("trace_every=0", "trace_every"), ("eta=x", "eta")]:
        with pytest.raises(UserError, match=f"optimizer.{word}="):
            build(compose(["optimizer=doremi", f"optimizer.{override}"]).optimizer)


# ------------------------------------------------- the loop's after-forward path
class LossDependentWeights:
    """Sets loss weights that can only be known after the forward: 0.8 on the
    source with the highest mean token loss in this micro-batch, 0.1 on the others."""
    needs_token_losses = True

    def __init__(self):
        self.calls = []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __call__(self, ctx, info):
        tl = info.token_losses
        assert tl is not None and not tl.requires_grad and tl.shape == (8, 32)
        src = info.batch.source
        means = torch.tensor([float(tl[src == k].mean()) if (src == k).any() else 0.0 for k in range(3)])
        w = torch.full((3,), 0.1)
        w[int(means.argmax())] = 0.8
        self.calls.append((info.batch.input_ids.clone(), info.batch.source.clone(), tl.clone(),
                           info.batch.weight.clone(), w))
        ctx.set_loss_weights(dict(zip(arrays(), w.tolist())))  # by source name, in the sampler's order


def test_hook_after_forward_backprops_the_new_weights(tmp_path):
    """The gradient of the step equals autograd of weighted_loss with the weights the
    hook set, on the same forward, and not the one with the weights before the hook."""
    model = build_model(SHAPE, V, seed=0)
    twin = build_model(SHAPE, V, seed=0)
    grads = {}
    for n, p in model.named_parameters():
        p.register_hook(lambda g, n=n: grads.__setitem__(n, g.detach().clone()))
    hook = LossDependentWeights()
    meter = CostMeter(torch.device("cpu"))
    with meter.stage("s"):
        Trainer(model, MixtureSampler(arrays(), 32, 8, seed=3, loss_weights={n: 1 / 3 for n in arrays()}),
                cfg(tokens=8 * 32), torch.device("cpu"), meter, tmp_path, hook=hook, progress=False).train()
    (ids, src, tl, w_before, w_new), = hook.calls
    assert len(set(src.tolist())) >= 2  # weights matter only with several sources in the batch

    def grads_with(weights):
        b = Batch(ids, src, weights[src].float())
        tok = token_losses(twin, b, "cpu", "bf16")
        return tok, dict(zip([n for n, _ in twin.named_parameters()],
                             torch.autograd.grad(weighted_loss(tok, b), list(twin.parameters()))))
    tok, expected = grads_with(w_new)
    assert torch.allclose(tl, tok.detach(), atol=1e-6)  # the hook saw this forward's losses
    assert torch.allclose(w_before, torch.full((8,), 1 / 3))
    _, stale = grads_with(torch.full((3,), 1 / 3))
    for n in expected:
        assert torch.allclose(grads[n], expected[n], atol=1e-6, rtol=1e-4), n
    head = "lm_head.weight"
    assert float((stale[head] - expected[head]).norm()) > 0.05 * float(expected[head].norm())


class _Plain:
    needs_token_losses = False

    def __init__(self):
        self.seen = []

    def __call__(self, ctx, info):
        self.seen.append(info.token_losses)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_plain_hook_sees_no_token_losses(tmp_path):
    hook = _Plain()
    meter = CostMeter(torch.device("cpu"))
    with meter.stage("s"):
        Trainer(build_model(SHAPE, V, seed=0), MixtureSampler(arrays(), 32, 8, seed=3),
                cfg(tokens=2 * 8 * 32), torch.device("cpu"), meter, tmp_path,
                hook=hook, progress=False).train()
    assert hook.seen == [None, None]


# --------------------------------------------------- behaviour and resuming
@pytest.fixture(scope="module")
def cycle_reference(tmp_path_factory):
    """A reference trained on the cycle source only: far better than a fresh proxy there."""
    model = build_model(SHAPE, V, seed=1)
    meter = CostMeter(torch.device("cpu"))
    with meter.stage("ref"):
        only_cycle = {"cycle": 1.0, "skew": 0.0, "flat": 0.0}
        Trainer(model, MixtureSampler(arrays(), 32, 8, seed=0, probs=only_cycle),
                cfg(tokens=30 * 8 * 32, ckpt_every=100), torch.device("cpu"), meter,
                tmp_path_factory.mktemp("ref"), progress=False).train()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def dro_run(ref, out, stop_after=None, steps=8, grad_accum=1, trace_every=1):
    names = list(arrays())
    hook = DoReMiHook(names, ref, trace_every=trace_every)
    meter = CostMeter(torch.device("cpu"))
    model = build_model(SHAPE, V, seed=2)
    trainer = Trainer(model, MixtureSampler(arrays(), 32, 8, seed=4, loss_weights={n: 1 / 3 for n in names}),
                      cfg(tokens=steps * 8 * 32 * grad_accum, grad_accum=grad_accum), torch.device("cpu"),
                      meter, out, hook=hook, progress=False)
    with meter.stage("s"):
        trainer.train(stop_after=stop_after)
    return hook, trainer, meter


def test_reference_better_on_a_domain_pulls_weight_to_it(cycle_reference, tmp_path):
    hook, trainer, meter = dro_run(cycle_reference, tmp_path)
    w, avg = dict(zip(hook.names, hook.alpha.tolist())), dict(zip(hook.names, hook.average.tolist()))
    assert max(avg, key=avg.get) == "cycle" and avg["cycle"] > 0.5, avg
    assert hook.trace[0]["excess_loss"]["cycle"] > 1.0  # a fresh proxy is far behind the reference there
    assert hook.updates == 8 and math.isclose(sum(w.values()), 1.0)
    # The sampler trains with the hook's alpha; the cost has the reference's forwards (2 N D).
    assert np.allclose(trainer.sampler.loss_weights, hook.alpha.numpy())
    tokens = 8 * 8 * 32
    c = meter.stages["s"]
    assert c.flops == pytest.approx((6 + 2) * flop_params(trainer.model) * tokens) and c.tokens == 2 * tokens
    assert all({"step", "weights", "excess_loss", "entropy"} <= set(r) for r in hook.trace)
    assert hook.trace[-1]["entropy"] < math.log(3) - 0.1  # weights moved away from uniform


def test_killed_and_resumed_run_ends_with_the_same_weights(cycle_reference, tmp_path):
    """grad_accum 2, update_every=step: one update per optimizer step. Killed after
    step 5 (checkpoint at 3), resumed with a fresh hook: same alpha, average, trace."""
    full, _, full_meter = dro_run(cycle_reference, tmp_path / "full", steps=6, grad_accum=2)
    dro_run(cycle_reference, tmp_path / "cut", stop_after=5, steps=6, grad_accum=2)
    resumed, _, meter = dro_run(cycle_reference, tmp_path / "cut", steps=6, grad_accum=2)
    assert full.updates == resumed.updates == 6
    assert torch.equal(full.alpha, resumed.alpha) and torch.equal(full.average, resumed.average)
    assert full.trace == resumed.trace and full.entropy_sum == resumed.entropy_sum
    assert resumed.ref_tokens == full.ref_tokens and resumed.ref_tokens_here == 3 * 2 * 8 * 32
    # The reference forwards before the checkpoint are what DoReMi.search charges on top.
    missing = resumed.ref_tokens - resumed.ref_tokens_here
    assert meter.stages["s"].flops + 2 * flop_params(cycle_reference) * missing == pytest.approx(
        full_meter.stages["s"].flops)
    # state_dict / load_state_dict round-trip
    copy = DoReMiHook(full.names, cycle_reference)
    copy.load_state_dict(full.state_dict())
    again = copy.state_dict()
    for k, v in full.state_dict().items():
        assert (torch.equal(v, again[k]) if isinstance(v, torch.Tensor) else v == again[k]), k


# ---------------------------------------------------------------- end to end
def test_search_end_to_end(smoke_args, tiny_corpus, tmp_path):
    r = run_cli(smoke_args + ["optimizer=doremi", "eval=loss"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list((tmp_path / "outputs" / "runs").iterdir())
    mix = json.loads((run / "mixture.json").read_text())
    w = mix["weights"]
    assert sorted(w) == sorted(p.name for p in tiny_corpus.iterdir())
    assert math.isclose(sum(w.values()), 1.0, abs_tol=1e-9) and min(w.values()) > 0
    assert len(set(round(v, 4) for v in w.values())) > 1  # moved away from uniform
    steps = math.ceil(20000 / (8 * 64))  # smoke proxy: tokens / (batch_size * context)
    assert mix["info"]["updates"] == steps and mix["info"]["reference"] == "natural"
    assert 0 < mix["info"]["entropy_mean"] <= math.log(len(w)) + 1e-9
    trace = [json.loads(x) for x in (run / "search_trace.jsonl").read_text().splitlines()]
    assert trace[0]["run"] == "reference"
    dro = [t for t in trace if t.get("run") == "proxy"]
    assert [t["update"] for t in dro] == [1, 10, 20, 30, 40]
    assert all(0 < t["entropy"] <= math.log(len(w)) + 1e-9 for t in dro)
    assert dro[-1]["average_weights"] == pytest.approx(w)
    # Cost: reference run (6ND) + DRO proxy (6ND) + the reference's forwards (2ND).
    res = json.loads((run / "result.json").read_text())
    vocab = json.loads((run / "model" / "config.json").read_text())["vocab_size"]
    n = flop_params(build_model({"layers": 1, "hidden": 32, "ffn": 64, "heads": 2, "context": 64}, vocab))
    tokens = steps * 8 * 64
    assert res["search_cost"]["proxy_runs"] == 2
    assert res["search_cost"]["flops"] == pytest.approx(14 * n * tokens)
    assert res["search_cost"]["tokens"] == 3 * tokens
