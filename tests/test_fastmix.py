"""FastMix: the hypergradient against the true effect of an inner step, the
softmax chain rule against autograd, and the search on real sources."""
import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from torch.func import functional_call

from fastmix.method import FastMix, entropy_grad, hypergradient, softmax_chain
from fastmix.models import build_model
from fastmix.sampling import Batch, MixtureSampler
from fastmix.train import StepInfo, masked_mean, token_losses

CTX, V = 16, 48


def setup_case(seed=0):
    g = np.random.default_rng(seed)
    # "a" is what the objective measures; "b" is a cycle unlike it; "c" is noise.
    a = g.choice(V // 2, size=3000, p=np.linspace(2, 0.1, V // 2) / np.linspace(2, 0.1, V // 2).sum())
    src = {"a": a.astype(np.uint16), "b": (np.arange(3000) % 11 + 30).astype(np.uint16),
           "c": g.integers(0, V, 3000).astype(np.uint16)}
    model = build_model({"layers": 1, "hidden": 24, "ffn": 48, "heads": 2, "context": CTX}, V, seed=seed)
    batch = MixtureSampler(src, CTX, 24, seed=seed).next_batch()
    val_arr = g.choice(V // 2, size=400, p=np.linspace(2, 0.1, V // 2) / np.linspace(2, 0.1, V // 2).sum())
    val = torch.from_numpy(np.stack([val_arr[i:i + CTX + 1] for i in range(0, 320, 20)]).astype(np.int64))
    val_batch = Batch(val, torch.zeros(len(val), dtype=torch.long), torch.ones(len(val)))
    return model, batch, val_batch


def per_source_grads(model, batch, params, create_graph=False):
    tl = token_losses(model, batch, "cpu", "bf16")
    return [torch.autograd.grad(masked_mean(tl, batch, batch.source == k), params, retain_graph=True)
            for k in range(3)]


def val_loss_at(model, overrides, val_batch):
    ids = val_batch.input_ids
    logits = functional_call(model, overrides, (ids[:, :-1],)).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("lr", [0.01, 0.05, 0.2])
def test_hypergradient_matches_autograd_through_one_head_step(lr):
    """Eq. 6 against the exact derivative of L_val(W - lr * sum_k w_k G_k) w.r.t. w,
    the inner step taken on the LM head (the parameters FastMix differentiates)."""
    model, batch, val_batch = setup_case()
    head = model.get_output_embeddings().weight
    info = StepInfo(0, 1, batch)
    est, _, _ = hypergradient(model, [head], val_batch, info, 3, lr, "cpu", "bf16")

    G = [g[0].detach() for g in per_source_grads(model, batch, [head])]
    w = torch.full((3,), 1 / 3, dtype=torch.float32, requires_grad=True)
    stepped = head.detach() - lr * sum(w[k] * G[k] for k in range(3))
    true = torch.autograd.grad(val_loss_at(model, {"lm_head.weight": stepped}, val_batch), w)[0].double()
    assert torch.equal(torch.sign(est), torch.sign(true)), (est, true)
    # The one-step estimate is exact up to O(lr^2): relative error grows like lr
    # (measured 0.3%, 1.5%, 6% at lr 0.01, 0.05, 0.2).
    assert float((est - true).norm() / true.norm()) < 0.5 * lr, (est, true)
    assert est[0] < 0 and est[0] == est.min()  # the objective's own source helps it most


def test_hypergradient_all_params_matches_finite_differences():
    """With grad_params=all, Eq. 6 predicts the change of the objective loss after
    one explicit SGD step on every parameter (central finite differences in w_k)."""
    model, batch, val_batch = setup_case(seed=1)
    params = dict(model.named_parameters())
    plist = list(params.values())
    lr, eps = 0.05, 0.05
    info = StepInfo(0, 1, batch)
    est, _, _ = hypergradient(model, plist, val_batch, info, 3, lr, "cpu", "bf16")
    G = [[x.detach() for x in g] for g in per_source_grads(model, batch, plist)]

    def after_step(w):
        new = {n: p.detach() - lr * sum(w[k] * G[k][i] for k in range(3)) for i, (n, p) in enumerate(params.items())}
        with torch.no_grad():
            return float(val_loss_at(model, new, val_batch))
    w0 = np.full(3, 1 / 3)
    fd = torch.tensor([(after_step(w0 + eps * np.eye(3)[k]) - after_step(w0 - eps * np.eye(3)[k])) / (2 * eps)
                       for k in range(3)], dtype=torch.float64)
    assert torch.equal(torch.sign(est), torch.sign(fd)), (est, fd)
    assert float((est - fd).norm() / fd.norm()) < 0.2, (est, fd)


def test_softmax_chain_and_entropy_against_autograd():
    z = torch.tensor([0.3, -1.2, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.7, -0.1, 0.2, -0.4], dtype=torch.float64)
    w = torch.softmax(z, 0)
    (dz,) = torch.autograd.grad((w * g).sum(), z)
    assert torch.allclose(softmax_chain(w.detach(), g), dz)
    (dh,) = torch.autograd.grad(-(torch.softmax(z, 0) * torch.log_softmax(z, 0)).sum(), z)
    assert torch.allclose(entropy_grad(w.detach()), dh)


def test_bad_options_are_refused():
    from fastmix.errors import UserError
    with pytest.raises(UserError, match="grad_params"):
        FastMix(grad_params="everything")
    with pytest.raises(UserError, match="init"):
        FastMix(init="random")


def test_search_favours_the_objective_source(smoke_args, tmp_path):
    """Sources of clearly different kinds, objective = the math source's
    validation text: FastMix's weight on math ends largest."""
    r = run_cli(smoke_args + ["optimizer=fastmix", "optimizer.outer_every=2", "proxy.tokens=40000",
                              "objective.weights={math: 1}", "train.tokens=5000", "eval=loss"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list((tmp_path / "outputs" / "runs").iterdir())
    w = json.loads((run / "mixture.json").read_text())["weights"]
    assert max(w, key=w.get) == "math", w
    trace = [json.loads(x) for x in (run / "search_trace.jsonl").read_text().splitlines()]
    assert len(trace) >= 30 and {"weights", "hypergradient", "objective_loss"} <= set(trace[-1])
    res = json.loads((run / "result.json").read_text())
    assert res["search_cost"]["proxy_runs"] == 1 and res["search_cost"]["flops"] > 0
