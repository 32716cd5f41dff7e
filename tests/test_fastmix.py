"""FastMix: the hypergradient against the true effect of an inner step, the
softmax chain rule against autograd, and the search on real sources."""
import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from torch.func import functional_call

from fastmix.fastmix import (
    FastMix,
    FastMixHook,
    entropy_grad,
    head_hypergradient,
    hypergradient,
    movement_schedule,
    softmax_chain,
)
from fastmix.train.loop import StepInfo, masked_mean, token_losses
from fastmix.train.models import build_model
from fastmix.train.sampling import Batch, MixtureSampler

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


@pytest.mark.parametrize("case", ["plain", "masked", "absent source", "weighted objective rows"])
def test_fused_head_hypergradient_is_the_autograd_one(case):
    """The fast LM-head path (two gradient-free passes, no per-source backward) gives
    the autograd formula's numbers to 1e-5 relative: with loss masks, with a source
    missing from the micro-batch (its entry stays 0) and with weighted objective rows."""
    model, batch, val_batch = setup_case(seed=3)
    g = torch.Generator().manual_seed(0)
    if case == "masked":
        batch.loss_mask = (torch.rand(batch.input_ids.shape[0], CTX, generator=g) > 0.3).float()
        batch.loss_mask[0] = 0  # a row with nothing counted
    if case == "absent source":
        keep = batch.source != 1
        batch = Batch(batch.input_ids[keep], batch.source[keep], batch.weight[keep])
    if case == "weighted objective rows":
        val_batch.weight = torch.rand(len(val_batch.weight), generator=g) + 0.1
        val_batch.loss_mask = (torch.rand(len(val_batch.weight), CTX, generator=g) > 0.5).float()
    head = model.get_output_embeddings().weight
    info = StepInfo(0, 1, batch)
    ref, ref_inner, ref_loss = hypergradient(model, [head], val_batch, info, 3, 0.05, "cpu", "fp32")
    est, inner, loss = head_hypergradient(model, val_batch, info, 3, 0.05, "cpu", "fp32")
    assert torch.allclose(est, ref, rtol=1e-5, atol=1e-12 * float(ref.abs().max())), (est, ref)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    if case == "absent source":
        assert inner[1] == 0 and ref_inner[1] == 0 and (inner[[0, 2]] != 0).all()


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


@pytest.mark.parametrize("override,message", [
    ("optimizer.grad_params=everything", "optimizer.grad_params='everything' is not allowed: use one of lm_head, all"),
    ("optimizer.init=random", "optimizer.init='random'"), ("optimizer.lr=nan", "optimizer.lr=nan .*finite"),
    ("optimizer.lr=-1", "optimizer.lr=-1.0 .*> 0"), ("optimizer.lr=0", "optimizer.lr=0.0"),
    ("optimizer.lr=abc", "optimizer.lr='abc'"), ("optimizer.betas=[1.5,0.9]", "optimizer.betas=.*two numbers"),
    ("optimizer.outer_every=0", "optimizer.outer_every=0"), ("optimizer.val_rows_per_group=0", "auto .*or an integer"),
    ("optimizer.val_batch=all", "optimizer.val_batch='all'"), ("optimizer.scale_rule=none", "scale_rule"),
    ("optimizer.entropy_reg=-0.1", "entropy_reg"), ("optimizer.movement=0", "movement.*number > 0"),
    ("optimizer.movement=abc", "movement"), ("optimizer.diagnose_every=-1", "diagnose_every"),
    ("optimizer.average_tail=1.5", "average_tail")])
def test_bad_options_are_refused(override, message):
    """Each bad value stops with one line naming the key, the value and what is allowed."""
    from conftest import compose

    from fastmix.errors import UserError
    from fastmix.run.pipeline import build
    with pytest.raises(UserError, match=message):
        build(compose(["optimizer=fastmix", override]).optimizer)
    assert isinstance(build(compose(["optimizer=fastmix", "optimizer.val_rows_per_group=3"]).optimizer), FastMix)


def test_search_favours_the_objective_source(smoke_args, tmp_path):
    """Sources of clearly different kinds, objective = the math source's
    validation text: at the smoke preset (scale rule on, as shipped) FastMix
    moves clearly towards math."""
    r = run_cli(smoke_args + ["optimizer=fastmix", "proxy.tokens=40000",
                              "objective.weights={math: 1}", "train.tokens=5000", "eval=loss"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list((tmp_path / "outputs" / "runs").iterdir())
    w = json.loads((run / "mixture.json").read_text())["weights"]
    assert max(w, key=w.get) == "math" and w["math"] > 2 / len(w), w
    trace = [json.loads(x) for x in (run / "search_trace.jsonl").read_text().splitlines()]
    assert len(trace) >= 30 and {"weights", "hypergradient", "objective_loss"} <= set(trace[-1])
    res = json.loads((run / "result.json").read_text())
    assert res["search_cost"]["proxy_runs"] == 1 and res["search_cost"]["flops"] > 0


class _Recorder:
    """A HookContext whose meter and sampler record what the hook gives them."""

    def __init__(self, model, lr):
        from types import SimpleNamespace

        from fastmix.train.loop import HookContext
        self.loss_weights, self.forward_flops = None, []
        self.ctx = HookContext(model, "cpu", "bf16", lr, world=1, grad_accum=1, total_steps=1,
                               meter=SimpleNamespace(add_forward=lambda n, t: self.forward_flops.append((n, t))),
                               set_loss_weights=lambda w: setattr(self, "loss_weights", w))


class _FixedObjective:
    def __init__(self, batch):
        self.batch = batch

    def fixed_batch(self, rows_per_group, context):
        return self.batch


def test_hook_against_independent_code():
    """One outer step of the hook against code written here from the paper's
    equations only (plain forward + F.cross_entropy + autograd, no project loss
    helper): the LM-head weight is the only parameter used, the model's current
    learning rate scales the hypergradient, z takes one AdamW step, and w moves
    towards the source the objective is made of."""
    model, batch, val_batch = setup_case(seed=2)
    lr_model, lr_z = 0.03, 0.01
    head = model.get_output_embeddings().weight

    def ce(ids, rows=None):
        logits = model(input_ids=ids[:, :-1]).logits
        tl = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
        return tl.mean()
    g_val = torch.autograd.grad(ce(val_batch.input_ids), head)[0]
    inner = torch.tensor([float((g_val * torch.autograd.grad(ce(batch.input_ids[batch.source == k]), head)[0]).sum())
                          for k in range(3)], dtype=torch.float64)
    g = -lr_model * inner
    w0 = torch.full((3,), 1 / 3, dtype=torch.float64)
    dz = w0 * (g - (w0 * g).sum())
    z1 = -lr_z * dz / (dz.abs() + 1e-8)  # AdamW's first step from z = 0: m_hat / sqrt(v_hat) = sign

    hook = FastMixHook(["a", "b", "c"], _FixedObjective(val_batch), torch.zeros(3), lr_z, (0.9, 0.95), 0.0,
                       "lm_head", 16, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _Recorder(model, lr_model)
    hook(trainer.ctx, StepInfo(0, 20, batch))
    assert torch.allclose(hook.z.detach(), z1, rtol=1e-5, atol=1e-9), (hook.z, z1)
    traced = torch.tensor(list(hook.trace[-1]["hypergradient"].values()), dtype=torch.float64)
    assert torch.allclose(traced, g, rtol=1e-4)  # -lr x <G_val, G_k> at the model's current lr
    w1 = hook.weights
    assert w1[0] > 1 / 3 > w1[1], w1  # towards "a", the objective's kind of text
    # the sampler trains the next rows with the new w, handed over by source name
    assert list(trainer.loss_weights) == ["a", "b", "c"]
    assert np.allclose(list(trainer.loss_weights.values()), w1.numpy())
    # only the head is differentiated: the outer step charges forwards of the full model
    # and gradient work on the head's parameters alone, and changes no model weight
    assert {n for n, _ in trainer.forward_flops} >= {head.numel()}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("micro,T,steps,lr", [
    (32032, 20, 1601, 0.01),   # the paper's shape: T = 20, lr 0.01, 1,601 outer steps
    (64064, 20, 3203, 0.01),   # longer than the reference: the paper's values
    (196, 1, 195, 0.01 * 1601 / 195),   # demo proxy: an outer step every micro-batch
    (8000, 4, 1999, 0.01),
    (3000, 1, 2999, 0.01),
])
def test_movement_schedule(micro, T, steps, lr):
    t, lr_z, n = movement_schedule(micro, 20, 0.01, 1601)
    assert (t, n) == (T, steps) and lr_z == pytest.approx(lr)
    assert lr_z * n >= 0.01 * 1601 - 1e-9  # the reference's movement budget, at least


def test_average_tail_is_the_mean_of_the_last_weights():
    trace = [{"weights": {"a": a, "b": 1 - a}} for a in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    fm = FastMix(**{**_fastmix_defaults(), "average_tail": 0.5})
    assert fm.output_weights(trace)["a"] == pytest.approx(0.9)
    fm = FastMix(**{**_fastmix_defaults(), "average_tail": 0.01})  # at least the last step
    assert fm.output_weights(trace)["a"] == pytest.approx(1.0)
    assert fm.output_weights(trace)["a"] + fm.output_weights(trace)["b"] == pytest.approx(1.0)


def _fastmix_defaults() -> dict:
    from omegaconf import OmegaConf

    from fastmix.config import CONF_DIR
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "optimizer" / "fastmix.yaml"))
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "name"}


def test_movement_sets_the_budget_not_the_period():
    """`movement` sets lr_z x outer steps and leaves T to the rule (one factor at a time)."""
    for m in (0.5, 2.0, 16.0):
        T, lr, steps = movement_schedule(196, 20, 0.01, 1601, movement=m)
        assert (T, steps) == (1, 195) and lr * steps == pytest.approx(m)
    T, lr, steps = movement_schedule(32032, 20, 0.01, 1601, movement=4.0)
    assert (T, steps) == (20, 1601) and lr == pytest.approx(4.0 / 1601)


def test_paper_preset_is_the_reference_shape():
    """proxy=regmix_1m is the public run: 16 x 32 micro-batches, 1,001 steps,
    so the rule picks the paper's T = 20 and lr 0.01 (1,601 outer steps)."""
    from conftest import compose

    from fastmix.run.pipeline import build
    cfg = compose(["proxy=regmix_1m", "optimizer=fastmix"])
    assert (cfg.proxy.batch_size, cfg.proxy.grad_accum) == (16, 32)
    fm = build(cfg.optimizer)
    assert fm.schedule(cfg.proxy) == (20, 0.01, 1601)
    demo = compose(["experiment=demo", "optimizer=fastmix"])
    T, lr_z, n = build(demo.optimizer).schedule(demo.proxy)
    assert T == 1 and lr_z * n == pytest.approx(16.01)


def test_killed_and_resumed_search_ends_with_the_same_weights(tmp_path):
    """The hook's state (z, its AdamW, the RNG, the trace) goes through the checkpoint,
    which loads with torch.load(weights_only=True): a run cut after step 5
    (checkpoint at 3) and resumed with a fresh hook ends where an uncut one does."""
    from omegaconf import OmegaConf

    from fastmix.train.cost import CostMeter
    from fastmix.train.loop import Trainer
    g = np.random.default_rng(0)
    src = {"a": g.choice(V // 2, size=3000).astype(np.uint16), "b": (np.arange(3000) % 11 + 30).astype(np.uint16),
           "c": g.integers(0, V, 3000).astype(np.uint16)}
    _, _, val_batch = setup_case(seed=5)
    cfg = OmegaConf.create(dict(tokens=6 * 2 * 8 * CTX, batch_size=8, grad_accum=2, lr=3e-3, warmup_steps=2,
                                schedule="constant", min_lr_ratio=0.1, weight_decay=0.1, betas=[0.9, 0.95],
                                grad_clip=1.0, precision="bf16", log_every=2, ckpt_every=3))

    def run(out, stop_after=None):
        hook = FastMixHook(["a", "b", "c"], _FixedObjective(val_batch), torch.zeros(3), 0.05, (0.9, 0.95), 0.0,
                           "lm_head", 16, seed=0)
        model = build_model({"layers": 1, "hidden": 24, "ffn": 48, "heads": 2, "context": CTX}, V, seed=1)
        sampler = MixtureSampler(src, CTX, 8, seed=3, loss_weights={n: 1 / 3 for n in src})
        meter = CostMeter(torch.device("cpu"))
        with meter.stage("search"):
            Trainer(model, sampler, cfg, torch.device("cpu"), meter, out, hook=hook,
                    progress=False).train(stop_after=stop_after)
        return hook
    full = run(tmp_path / "full")
    run(tmp_path / "cut", stop_after=5)
    resumed = run(tmp_path / "cut")
    assert len(full.trace) == 11 and resumed.trace == full.trace
    assert torch.equal(full.z.detach(), resumed.z.detach())


def test_diagnostics_on_two_sources(smoke_args, tmp_path):
    """Two sources, objective = math alone, where the hypergradient's sign is known:
    more math lowers the math loss more than drama does, so g_math < g_drama on average,
    z's gradient is negative for math and positive for drama, and w moves to math. Every trace line's entropy is its w's; `diagnose_every=5` adds the held-out
    objective every 5th outer step and changes neither the search (same weights) nor
    its cost (same FLOPs); the diagnosis figure and summary come out."""
    from analysis import fastmix_diagnosis as fd
    args = smoke_args + ["optimizer=fastmix", "data.sources=[math,drama]", "proxy.tokens=24000",
                         "objective.weights={math: 1}", "train.tokens=3000", "eval=loss"]
    runs = {}
    for every in (0, 5):
        cwd = tmp_path / f"d{every}"
        cwd.mkdir()
        r = run_cli(args + [f"optimizer.diagnose_every={every}"], cwd=cwd)
        assert r.returncode == 0, r.stderr[-3000:]
        (runs[every],) = list((cwd / "outputs" / "runs").iterdir())
    res = {k: json.loads((v / "result.json").read_text()) for k, v in runs.items()}
    assert res[0]["weights"] == res[5]["weights"] and res[0]["search_cost"]["flops"] == res[5]["search_cost"]["flops"]
    trace = [json.loads(x) for x in (runs[5] / "search_trace.jsonl").read_text().splitlines()]
    for i, t in enumerate(trace):
        w = np.array(list(t["weights"].values()))
        assert t["entropy"] == pytest.approx(float(-(w * np.log(w)).sum()), abs=1e-9)
        assert ("heldout_objective_loss" in t) == (i % 5 == 0)
    tr = fd.load_trace(runs[5])
    s = fd.summary(tr)
    assert s["mean_hypergradient"]["math"] < s["mean_hypergradient"]["drama"]
    assert s["mean_z_grad"]["math"] < 0 < s["mean_z_grad"]["drama"]
    assert s["final_weights"]["math"] > 0.5 and s["final_entropy"] < np.log(2)
    first, last, best = s["heldout_first_last_best"]
    assert np.isfinite([first, last, best]).all() and best <= min(first, last)
    assert tr["heldout_objective_loss"].notna().sum() == len(range(0, len(trace), 5))
    assert fd.main([str(runs[5])]) == 0 and (runs[5] / "fastmix_diagnosis.png").stat().st_size > 0
    assert fd.main([str(tmp_path / "nowhere")]) != 0
