"""DeMix: linear merging (one-hot = the component exactly, two = the hand average,
bad weights refused, in place = as a new state dict), the public generator's cap,
rounding and temperature by hand, the search on hand-built components through a
fake context, the presets, and end to end."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, method, run_cli, scripted_context

from baselines.merging import merge, merge_into
from baselines.proxy_search import cap_weights, demix_mixtures
from fastmix.errors import UserError
from fastmix.train.models import build_model, flop_params

SHAPE = {"layers": 1, "hidden": 16, "ffn": 32, "heads": 2, "context": 12}
V = 40


@pytest.fixture(scope="module")
def components():
    return [build_model(SHAPE, V, seed=s) for s in range(3)]


# ---- merging ------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1, 2])
def test_one_hot_merge_reproduces_the_component_exactly(components, k):
    w = [float(i == k) for i in range(3)]
    merged = merge(components, w)
    target = components[k].state_dict()
    assert merged.keys() == target.keys() and all(torch.equal(merged[n], target[n]) for n in target)
    # in place into a fourth model (the search's reused model): the same model, bit for bit
    model = build_model(SHAPE, V, seed=99)
    merge_into(model, [c.state_dict() for c in components], w)
    ids = torch.randint(0, V, (2, SHAPE["context"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, components[k](input_ids=ids).logits)


def test_merge_of_two_is_the_hand_average(components):
    a, b = components[0].state_dict(), components[1].state_dict()
    merged = merge([a, b], [0.3, 0.7])
    assert all(torch.equal(merged[n], 0.3 * a[n] + 0.7 * b[n]) for n in a)
    assert not torch.equal(merged["lm_head.weight"], a["lm_head.weight"])
    # three, in place: the same numbers as the new state dict
    model = build_model(SHAPE, V, seed=99)
    merge_into(model, [c.state_dict() for c in components], [0.2, 0.5, 0.3])
    again = merge(components, [0.2, 0.5, 0.3])
    assert all(torch.equal(t, again[n]) for n, t in model.state_dict().items())


@pytest.mark.parametrize("w,msg", [([0.5, 0.4, 0.0], "sum to 0.9"), ([1.2, -0.2, 0.0], ">= 0"),
                                   ([float("nan"), 0.5, 0.5], "finite"), ([0.5, 0.5], "2 weights for 3")])
def test_bad_merge_weights_are_refused(components, w, msg):
    with pytest.raises(UserError, match=msg):
        merge(components, w)
    with pytest.raises(UserError, match=msg):
        merge_into(build_model(SHAPE, V), [c.state_dict() for c in components], w)


def test_models_of_another_shape_are_refused(components):
    other = build_model({**SHAPE, "hidden": 8}, V)
    with pytest.raises(UserError, match="architecture"):
        merge([components[0], other], [0.5, 0.5])


# ---- the generator (sample.py) ------------------------------------------------------------------

def test_sequential_cap_clips_and_rescales_one_weight_after_the_other():
    bound = np.array([1.0, 0.8, 0.4])
    x = cap_weights(np.array([[0.1, 0.3, 0.6], [0.05, 0.9, 0.05], [0.2, 0.5, 0.3]]), bound, "sequential")
    # row 0: w2 over by 0.2, others x (1 + 0.2 / 0.4); row 1: w1 over by 0.1, others x 2; row 2 untouched
    assert x == pytest.approx(np.array([[0.15, 0.45, 0.4], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3]]))
    # a later cap may push an earlier weight over its own bound: the public code leaves it so
    y = cap_weights(np.array([[0.3, 0.1, 0.6]]), np.array([0.3, 1.0, 0.2]), "sequential")
    assert y == pytest.approx(np.array([[0.6, 0.2, 0.2]]))
    # everything on one capped weight cannot be rescaled
    assert np.isnan(cap_weights(np.array([[1.0, 0.0]]), np.array([0.5, 1.0]), "sequential")).all()


def test_waterfill_cap_holds_every_cap():
    # the row sequential leaves at [0.6, 0.2, 0.2]: w2 capped (others x 2), then w0 capped, the rest to w1
    y = cap_weights(np.array([[0.3, 0.1, 0.6]]), np.array([0.3, 1.0, 0.2]))
    assert y == pytest.approx(np.array([[0.3, 0.5, 0.2]]))
    bound = np.array([1.0, 0.8, 0.4])  # one pass is enough: the same as sequential
    x = cap_weights(np.array([[0.1, 0.3, 0.6], [0.05, 0.9, 0.05], [0.2, 0.5, 0.3]]), bound)
    assert x == pytest.approx(np.array([[0.15, 0.45, 0.4], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3]]))
    assert np.isnan(cap_weights(np.array([[1.0, 0.0]]), np.array([0.5, 1.0]))).all()
    # many random rows against tight caps (bounds summing to 1.3): every cap holds, rows sum to 1
    rng = np.random.default_rng(0)
    bound = np.array([0.05, 0.1, 0.15, 0.3, 0.7])
    z = cap_weights(rng.dirichlet(np.full(5, 0.3), size=5000), bound)
    z = z[np.isfinite(z).all(axis=1)]
    assert len(z) > 4900 and np.all(z <= bound) and np.allclose(z.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_generator_caps_hold_for_every_draw(seed):
    """The embedded corpus' shape: a small source (the 0.052 cap sample.py's cap let reach 0.659)."""
    prior = np.array([0.013, 0.25, 0.25, 0.1, 0.2, 0.187])
    bound = np.minimum(4 * prior, 1.0)
    x = demix_mixtures(prior, 20000, np.random.default_rng(seed), draws=20000)
    assert len(x) > 15000 and np.all(x <= bound) and np.allclose(x.sum(axis=1), 1.0, atol=1e-12)
    assert x[:, 0].max() == pytest.approx(bound[0])  # the cap binds, and holds exactly
    seq = demix_mixtures(prior, 20000, np.random.default_rng(seed), draws=20000, cap_mode="sequential")
    assert seq[:, 0].max() > 2 * bound[0]  # the public code's cap does not hold


def test_generator_caps_on_the_untempered_prior_and_rounds_to_the_grid():
    prior = np.array([0.05, 0.95])  # cap min(4 x 0.05, 1) = 0.2 on the first weight
    x = demix_mixtures(prior, 500, np.random.default_rng(0), draws=5000)
    assert len(x) == 500 and np.allclose(x.sum(axis=1), 1.0)
    assert x[:, 0].max() == pytest.approx(0.2) and len(np.unique(x, axis=0)) == 500
    assert np.allclose(x / 2e-4, np.round(x / 2e-4), atol=1e-6)  # K=2: the grid sums to 1 already
    small = np.array([[0.0001, 0.4999, 0.5], [0.12345, 0.5, 0.37655]])
    from baselines.proxy_search import finish_mixtures  # the shared post-processing sample.py also does
    assert finish_mixtures(small, 2e-4) == pytest.approx(np.array([[0, 0.5, 0.5], [0.1234, 0.5, 0.3766]]))


def test_generator_centre_is_the_prior_to_the_power_0_7():
    prior = np.array([0.6, 0.3, 0.1])
    x = demix_mixtures(prior, 20000, np.random.default_rng(1), draws=20000, max_usage=100.0, minimum=0.0)
    centre = prior ** 0.7 / (prior ** 0.7).sum()  # (0.521, 0.320, 0.159): flatter than the prior
    assert x.mean(axis=0) == pytest.approx(centre, abs=0.01)
    wide = demix_mixtures(prior, 20000, np.random.default_rng(1), draws=20000, max_usage=100.0, minimum=0.0,
                          min_strength=50.0, max_strength=50.0, n_strengths=1)
    assert wide.std(axis=0).max() < 0.5 * x.std(axis=0).max()  # strengths 0.5..5 spread the draws


# ---- the search ---------------------------------------------------------------------------------

OPT = np.array([0.15, 0.35, 0.3, 0.2])


class NormObjective:
    """Reads the merged model: its final-norm weights [:K] are w (component k has e_k there),
    loss = squared distance to OPT. Charges nothing, so the meter holds the merges alone."""
    weights = {"norm": 1.0}

    def loss(self, model, device, meter=None, precision="bf16"):
        return float(((model.model.norm.weight[:4].detach().double().numpy() - OPT) ** 2).sum())


def trained_objective(w):
    """A trained proxy of w in the fake: L1 distance to OPT (ranks close to the merge's, not the same)."""
    return float(np.abs(np.array(list(w.values())) - OPT).sum())


PROXY = {"tokens": 1000, "lr": 0.01, "warmup_steps": 10, "precision": "fp32"}


def fake_ctx(tmp_path, seed=0, eval=None):
    """A real SearchContext whose base and components are saved models with w read back
    from their norm weights, and whose checked proxies score `trained_objective`."""
    base = build_model(SHAPE, V, seed=0)
    base.save_pretrained(tmp_path / "base")
    for k in range(4):
        with torch.no_grad():
            base.model.norm.weight[:4] = torch.eye(4)[k]
        base.save_pretrained(tmp_path / f"comp{k}")

    def score(job):
        if job.tag == "demix_check":
            return trained_objective(job.weights), None
        return 1.0, str(tmp_path / ("base" if job.tag == "demix_base" else f"comp{job.index}"))
    ctx = scripted_context(dict.fromkeys("abcd", 0.25), NormObjective(), tmp_path, score, seed, PROXY, eval)
    ctx.n_params = sum(t.numel() for t in base.state_dict().values())
    return ctx


def calls(ctx) -> list[tuple]:
    """(tag, proxies, init_from, keep_model, tokens, overrides) of each call to ctx.proxies.run."""
    return [(j[0].tag, len(j), j[0].init_from, j[0].keep_model, j[0].tokens, j[0].overrides)
            for j in ctx.proxies.calls]


def test_search_narrows_towards_the_best_merge(tmp_path):
    ctx = fake_ctx(tmp_path)
    opt = method("demix", scale="demo", demo={"n0": 64, "n_candidates": 5000, "pool_draws": 5000, "top_k": 40,
                                    "component_fraction": 0.2, "rank_check": 5},
                lightgbm={"n_estimators": 300, "learning_rate": 0.05, "min_child_samples": 5})
    with ctx.meter.stage("search"):
        res = opt.search(ctx).validated(ctx.sources)
    # components: 0.2 of the base's 1000 tokens, at 0.1 x the proxy's lr, warmup 10 x 0.2 steps;
    # the check: 5 proxies of the proxy config from scratch (no init, default budget and lr)
    assert calls(ctx) == [("demix_base", 1, None, True, None, None),
                         ("demix_component", 4, str(tmp_path / "base"), True, 200,
                          {"lr": pytest.approx(0.001), "warmup_steps": 2}),
                         ("demix_check", 5, None, False, None, None)]
    assert res.info["components"] == {"tokens": 200, "fraction_of_base": 0.2, "lr": pytest.approx(0.001),
                                      "warmup_steps": 2}
    merged = [r for r in res.trace if r["kind"] == "merged"]
    assert [sum(r["round"] == k for r in merged) for k in (1, 2, 3)] == [64, 32, 16]
    # each scored mixture is what the merged model reads back: merging worked in place
    assert all(r["objective"] == pytest.approx(((np.array(list(r["weights"].values())) - OPT) ** 2).sum(),
                                               abs=1e-6) for r in merged)  # float32 weights
    later = np.mean([r["objective"] for r in merged if r["round"] == 3])
    assert later < 0.25 * np.mean([r["objective"] for r in merged if r["round"] == 1])  # narrowing helps
    w = np.array([res.weights[s] for s in ctx.sources])
    assert np.linalg.norm(w - OPT) < 0.5 * np.linalg.norm(0.25 - OPT), w
    assert res.info["regressor"]["regressor"] == "lightgbm" and res.info["n_merged"] == 112
    # the merges' multiply-adds are charged: 2 x (nonzero weights) x parameters, output included
    nnz = sum(sum(v > 0 for v in r["weights"].values()) for r in res.trace if r["kind"].startswith("merged"))
    assert ctx.meter.stages["search"].flops == 2.0 * nnz * ctx.n_params
    json.dumps([res.trace, res.info], allow_nan=False)
    # the rank check: a real Spearman of the recorded pairs, over spread-out merged scores
    from scipy.stats import spearmanr
    check = res.info["proxy_check"]
    (row,) = [r for r in res.trace if r["kind"] == "proxy_check"]
    assert check["n"] == 5 == len(check["merged"]) == len(check["trained"]) and check["threshold"] == 0.5
    assert check["spearman"] == pytest.approx(spearmanr(check["merged"], check["trained"])[0])
    assert row["spearman"] == check["spearman"] and check["passed"] == (check["spearman"] >= 0.5)
    scored = {tuple(r["weights"].values()): r["objective"] for r in merged}
    assert [scored[tuple(w.values())] for w in row["weights"]] == check["merged"]  # as recorded
    assert check["trained"] == [trained_objective(w) for w in row["weights"]]
    ys = sorted(scored.values())
    assert check["merged"] == sorted(check["merged"])
    assert check["merged"][0] == ys[0] and check["merged"][-1] == ys[-1]  # spread: best and worst included
    roles = [r["role"] for r in res.trace if r["kind"] == "proxy"]
    assert roles == ["base"] + ["component"] * 4 + ["check"] * 5


def test_rank_check_flags_a_merge_that_ranks_against_training(tmp_path, monkeypatch):
    ctx = fake_ctx(tmp_path)
    inner = ctx.proxies.score

    def reversed_proxies(job):  # trained proxies that rank opposite to the merges
        value, model_dir = inner(job)
        return (-value if job.tag == "demix_check" else value), model_dir
    ctx.proxies.score = reversed_proxies
    opt = method("demix", scale="smoke", smoke={"n0": 8, "n_candidates": 200, "pool_draws": 500, "top_k": 8,
                                      "component_fraction": 0.5, "rank_check": 4}, component_lr_scale=0.3,
                component_warmup_steps=0)
    with ctx.meter.stage("search"):
        res = opt.search(ctx)
    check = res.info["proxy_check"]
    assert check["n"] == 4 and check["spearman"] < 0 and check["passed"] is False
    assert calls(ctx)[1][4:] == (500, {"lr": pytest.approx(0.003), "warmup_steps": 0})
    off = method("demix", scale="smoke", smoke={"n0": 8, "n_candidates": 200, "pool_draws": 500, "top_k": 8,
                                      "component_fraction": 0.5, "rank_check": 0})
    ctx = fake_ctx(tmp_path / "off")
    with ctx.meter.stage("search"):
        res = off.search(ctx)
    assert "proxy_check" not in res.info and not any(r["kind"] == "proxy_check" for r in res.trace)


def test_suite_score_is_maximised(tmp_path, monkeypatch):
    """score=suite: the merged model's eval-suite average, higher is better (the paper's
    benchmarks); the search minimises its negative and charges through the suite."""

    import fastmix.eval.harness as ev
    seen = []

    def fake_suite(model, tokenizer, suite, device, batch_size, limit, meter, precision):
        seen.append((tokenizer, suite, batch_size, limit, precision))
        return {"average": 1.0 - NormObjective().loss(model, device)}
    splits = []
    monkeypatch.setattr(ev, "suite_from_config",
                        lambda cfg, corpus, split="test": splits.append(split) or {"t": {"task": "t"}})
    monkeypatch.setattr(ev, "load_tasks", lambda suite: None)
    monkeypatch.setattr(ev, "evaluate_suite", fake_suite)

    def suite_ctx(path):
        ctx = fake_ctx(path, eval={"name": "local", "batch_size": 4, "limit": 7})
        ctx.corpus.tokenizer = "tok"
        return ctx
    ctx = suite_ctx(tmp_path)
    opt = method("demix", scale="demo", score="suite", regressor="lightgbm",
                lightgbm={"n_estimators": 300, "learning_rate": 0.05, "min_child_samples": 5},
                demo={"n0": 64, "n_candidates": 5000, "pool_draws": 5000, "top_k": 40,
                      "component_fraction": 0.2, "rank_check": 0})
    with ctx.meter.stage("search"):
        res = opt.search(ctx).validated(ctx.sources)
    assert len(seen) == 113 and seen[0] == ("tok", {"t": {"task": "t"}}, 4, 7, "fp32")
    assert splits == ["val"]  # the search's suite is built from the validation split
    merged = [r for r in res.trace if r["kind"] == "merged"]
    assert all(r["objective"] == pytest.approx(((np.array(list(r["weights"].values())) - OPT) ** 2).sum() - 1,
                                               abs=1e-6) for r in merged)  # minus the average
    w = np.array([res.weights[s] for s in ctx.sources])
    assert np.linalg.norm(w - OPT) < 0.5 * np.linalg.norm(0.25 - OPT), w
    monkeypatch.setattr(ev, "suite_from_config", lambda cfg, corpus, split="test": {})  # eval=loss: no suite
    again = suite_ctx(tmp_path / "again")
    with pytest.raises(UserError, match="eval suite"):
        opt.search(again)
    assert again.proxies.calls == []  # refused before any proxy trains


def test_ridge_below_32_and_presets():
    from fastmix.run.pipeline import build
    built = {s: build(compose(["optimizer=demix", f"scale={s}"]).optimizer) for s in
             ("smoke", "demo", "paper")}
    assert [(o.n0, o.n_candidates, o.top_k, o.kind) for o in built.values()] == [
        (8, 2000, 16, "ridge"), (32, 20000, 128, "ridge"), (512, 200000, 1280, "lightgbm")]
    assert [(o.component_fraction, o.rank_check) for o in built.values()] == [(0.2, 4), (0.2, 6), (0.05, 16)]
    assert all(o.component_lr_scale == 0.1 and o.rank_check_threshold == 0.5 for o in built.values())
    paper = built["paper"]
    assert paper.lgbm_params["n_estimators"] == 300 and paper.lgbm_params["learning_rate"] == 0.01
    assert paper.generator == dict(temperature=0.7, min_strength=0.5, max_strength=5.0, n_strengths=15,
                                   max_usage=4.0, minimum=2e-4, sample_multiplier=100)
    assert paper.cap_mode == "waterfill"
    assert paper.planned_proxy_runs(17) == 18 + 16 and paper.ridge_alpha == 0.5
    # the regime from a paper-scale proxy config: 5% of 1,049,624,576 tokens at 0.1 x 4e-4, 5 warmup steps
    proxy = compose(["proxy=regmix_1m"]).proxy
    assert paper.component_regime(proxy) == (52481229, {"lr": pytest.approx(4e-5), "warmup_steps": 5})


def preset(n0, top_k, n=100, **kw):
    return {"demo": {"n0": n0, "n_candidates": n, "pool_draws": n, "top_k": top_k, "component_fraction": 0.2,
                     "rank_check": 4, **kw}}


@pytest.mark.parametrize("kw,key", [(preset(1, 5), "n0"), (preset(32, 8), "top_k"),
                                    (preset(8, 200), "top_k"), ({"base": "best"}, "base"), ({"regressor": "forest"}, "regressor"),
                                    ({"score": "acc"}, "score"), ({"component_tokens": 0}, "component_tokens"),
                                    ({"temperatur": 1}, "temperatur"), ({"cap_mode": "clip"}, "cap_mode"),
                                    (preset(8, 8, component_fraction=0), "component_fraction"),
                                    (preset(8, 8, rank_check=1), "rank_check"),
                                    ({"component_lr_scale": 0}, "component_lr_scale"),
                                    ({"demo": {"n0": 8, "n_candidates": 100, "pool_draws": 100, "top_k": 8}},
                                     "component_fraction")])
def test_bad_options_are_refused(kw, key):
    args = {**preset(8, 8), **kw}
    with pytest.raises(UserError, match=key):
        method("demix", scale="demo", **args)


def test_end_to_end(smoke_args, tiny_corpus, tmp_path):
    r = run_cli(smoke_args + ["optimizer=demix", "eval=loss"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list((tmp_path / "outputs" / "runs").iterdir())
    mix = json.loads((run / "mixture.json").read_text())
    w, sources = mix["weights"], sorted(p.name for p in tiny_corpus.iterdir())
    assert sorted(w) == sources and math.isclose(sum(w.values()), 1.0, abs_tol=1e-9)
    trace = [json.loads(x) for x in (run / "search_trace.jsonl").read_text().splitlines()]
    proxies = [t for t in trace if t["kind"] == "proxy"]
    assert [p["role"] for p in proxies] == ["base"] + ["component"] * len(sources) + ["check"] * 4
    # components: 0.2 of the base's budget (whole steps), at 0.1 x the proxy's lr after a 1-step warmup
    cfg = compose(smoke_args + ["optimizer=demix"])
    step = cfg.proxy.batch_size * cfg.proxy.grad_accum * cfg.proxy.model.context
    base, comps, checks = proxies[0], proxies[1:1 + len(sources)], proxies[1 + len(sources):]
    whole = lambda tokens: math.ceil(tokens / step) * step  # cost tokens also count the objective's: the same
    shorter = whole(0.2 * cfg.proxy.tokens) - whole(cfg.proxy.tokens)
    assert all(c["cost"]["tokens"] - base["cost"]["tokens"] == shorter for c in comps)
    assert all(c["overrides"] == {"lr": pytest.approx(0.1 * cfg.proxy.lr), "warmup_steps": 1} for c in comps)
    for c in comps:
        lrs = [json.loads(x)["lr"] for x in (Path(c["dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert lrs and max(lrs) == pytest.approx(0.1 * cfg.proxy.lr)
    base_lrs = [json.loads(x)["lr"] for x in (Path(base["dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert max(base_lrs) == pytest.approx(cfg.proxy.lr)
    # the check: full proxies from scratch; the recorded Spearman is scipy's on the recorded pairs
    from scipy.stats import spearmanr
    assert all(c["cost"]["tokens"] == base["cost"]["tokens"] and "overrides" not in c for c in checks)
    check = mix["info"]["proxy_check"]
    assert check["n"] == 4 and check["trained"] == [c["objective"] for c in checks]
    rho = spearmanr(check["merged"], check["trained"])[0]
    assert check["spearman"] == (None if math.isnan(rho) else pytest.approx(rho))
    assert check["passed"] == (check["spearman"] is not None and check["spearman"] >= 0.5)
    merged = [t for t in trace if t["kind"].startswith("merged")]
    assert len(merged) == 8 + 4 + 2 + 1 and mix["info"]["n_merged"] == 14
    assert all(math.isfinite(t["objective"]) for t in merged)
    assert not list((run / "search").rglob("merged*"))  # nothing written per candidate
    assert mix["info"]["merged_objective"] == merged[-1]["objective"]
    # cost: base + K components (training + the unit's own score) + 15 merges and scores
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(proxies[1]["model_dir"])
    n, p = flop_params(m), sum(t.numel() for t in m.state_dict().values())
    res = json.loads((run / "result.json").read_text())
    assert res["search_cost"]["proxy_runs"] == len(sources) + 1 + 4
    assert res["search_info"]["proxy_check"] == check
    T = (6 * n * proxies[0]["cost"]["tokens"] - proxies[0]["cost"]["flops"]) / (4 * n)  # objective tokens
    nnz = sum(sum(v > 0 for v in t["weights"].values()) for t in merged)
    spent = sum(q["cost"]["flops"] for q in proxies)
    assert T > 0
    assert res["search_cost"]["flops"] == pytest.approx(spent + 15 * 2 * n * T + 2 * nnz * p, rel=1e-9)
