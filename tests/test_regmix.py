"""RegMix: the public generator's temperature, caps, rounding and dedup against
hand-computed values; the regressors on noiseless data; the search on a known
objective through a fake context; the recorded-results CLI."""
import json

import numpy as np
import pandas as pd
import pytest
from conftest import compose, method, scripted_context

from baselines.proxy_search import (
    Regressor,
    dirichlet_mixtures,
    finish_mixtures,
    strengths,
    temper,
    usage_bound,
)
from baselines.regmix_replay import main
from fastmix.errors import UserError
from fastmix.run import pipeline

SRC = ["a", "b", "c", "d"]
PRIOR = dict(zip(SRC, [0.4, 0.3, 0.2, 0.1]))
OPT = np.array([0.1, 0.2, 0.3, 0.4])  # optimum of the synthetic objective, inside the simplex
FAST_LGBM = dict(boosting_type="gbdt", objective="regression", metric=["l1", "l2"], n_estimators=300,
                 learning_rate=0.03)


def quadratic(w: dict) -> float:
    return float(np.sum((np.array([w[s] for s in SRC]) - OPT) ** 2))


def fake_ctx(seed: int, tmp_path, objective=quadratic):
    """A real SearchContext whose proxies score `objective(w)` instead of training."""
    return scripted_context(PRIOR, None, tmp_path, lambda job: (objective(job.weights), None), seed)


def calls(ctx) -> list[tuple[str, int]]:
    return [(jobs[0].tag, len(jobs)) for jobs in ctx.proxies.calls]


# ---- generator -------------------------------------------------------------------------------

def test_cap_is_on_the_untempered_prior_and_temperature_flattens():
    assert usage_bound([0.9, 0.05, 0.05], 15) == pytest.approx([1.0, 0.75, 0.75])
    assert usage_bound([0.002, 0.998], 15) == pytest.approx([0.03, 1.0])
    # sqrt(.9), sqrt(.05), sqrt(.05) = .948683, .223607, .223607; sum 1.395897
    assert temper([0.9, 0.05, 0.05], 0.5) == pytest.approx([0.679622, 0.160189, 0.160189], abs=1e-6)
    s = strengths(0.1, 5.0, 15)
    assert s[0] == pytest.approx(0.1) and s[-1] == pytest.approx(5.0) and len(s) == 15
    assert np.allclose(s[1:] / s[:-1], 50 ** (1 / 14))  # log-spaced


def test_small_weights_are_dropped_then_rounded_as_the_public_code_does():
    x = finish_mixtures(np.array([[0.6, 0.39985, 0.00015], [1 / 3, 1 / 3, 1 / 3]]), 2e-4)
    # row 1: 0.00015 < 2e-4 -> 0; renormalised .600090/.399910 = 3000.45/1999.55 units -> .6/.4
    # (rounding without dropping first would give .6/.3998/.0002)
    assert x[0] == pytest.approx([0.6, 0.4, 0.0], abs=1e-12)
    # row 2: 1666.67 units each -> 1667 -> 0.3334, and the sum is left at 1.0002 (public configs)
    assert x[1] == pytest.approx([0.3334] * 3, abs=1e-12) and x[1].sum() == pytest.approx(1.0002)


def test_generator_respects_caps_grid_and_minimum():
    prior = [0.9, 0.05, 0.05]
    x = dirichlet_mixtures(prior, 2000, np.random.default_rng(0))
    units = x / 2e-4
    assert np.allclose(units, np.rint(units), atol=1e-6)  # multiples of the minimum
    assert np.all((x == 0) | (x >= 2e-4 - 1e-12))
    assert len(np.unique(np.rint(units), axis=0)) == 2000  # deduplicated
    assert np.all(np.abs(x.sum(axis=1) - 1) <= 3 * 1e-4 + 1e-12)
    # The cap (0.75) is checked before the minimum is dropped and the rest renormalised,
    # so a weight may end just above it: by at most the rounding of the dropped mass.
    assert x[:, 1:].max() <= 0.75 / (1 - 2 * 2e-4) + 1e-4
    assert x[:, 1:].max() > 0.6  # the cap binds: low strengths push single sources near 1 ...
    free = dirichlet_mixtures(prior, 2000, np.random.default_rng(0), max_usage=1e9)
    assert free[:, 1:].max() > 0.9  # ... and without it they get there


def test_generator_deduplicates_down_to_the_grid():
    """Two sources, minimum 0.1: only the 11 points 0, 0.1, ..., 1 exist after rounding."""
    x = dirichlet_mixtures([0.5, 0.5], 11, np.random.default_rng(1), minimum=0.1)
    assert sorted(np.round(x[:, 0], 9)) == pytest.approx([i / 10 for i in range(11)])
    with pytest.raises(UserError, match="distinct"):
        dirichlet_mixtures([0.5, 0.5], 12, np.random.default_rng(1), minimum=0.1, max_rounds=3)


# ---- regressors ------------------------------------------------------------------------------

def test_linear_regressor_is_exact_on_linear_data():
    rng = np.random.default_rng(0)
    X, Xt = rng.dirichlet(np.ones(4), 30), rng.dirichlet(np.ones(4), 10)
    coef = np.array([1.0, -2.0, 0.5, 3.0])
    reg = Regressor("linear").fit(X, X @ coef + 4.0)
    assert reg.predict(Xt) == pytest.approx(Xt @ coef + 4.0, abs=1e-9)
    y = X @ coef
    y[3] = np.nan  # a diverged proxy is left out, not fitted, not fatal
    reg = Regressor("linear").fit(X, y)
    assert reg.info["dropped_nonfinite"] == 1 and reg.predict(Xt) == pytest.approx(Xt @ coef, abs=1e-9)


def test_lightgbm_regressor_ranks_unseen_mixtures():
    rng = np.random.default_rng(0)
    X, Xt = rng.dirichlet(np.ones(4), 300), rng.dirichlet(np.ones(4), 200)
    y = lambda Z: ((Z - OPT) ** 2).sum(axis=1)
    reg = Regressor("lightgbm", {**FAST_LGBM, "min_child_samples": 5}, early_stopping_rounds=3,
                    holdout=0.2).fit(X, y(X))
    from scipy.stats import spearmanr
    assert spearmanr(reg.predict(Xt), y(Xt))[0] > 0.95
    assert reg.info["early_stopping"].startswith("holdout 60 runs") and 1 <= reg.info["rounds"] <= 300


# ---- search ----------------------------------------------------------------------------------

def test_search_finds_the_optimum_of_a_known_objective(tmp_path):
    uniform = np.linalg.norm(0.25 - OPT)  # 0.224; the prior is 0.447 away
    dists = []
    for seed in range(3):
        ctx = fake_ctx(seed, tmp_path)
        opt = method("regmix", scale="demo", demo={"n_proxies": 256, "n_candidates": 5000, "top_k": 20,
                                         "min_child_samples": 3}, lightgbm=FAST_LGBM)
        res = opt.search(ctx).validated(SRC)
        dists.append(np.linalg.norm(np.array([res.weights[s] for s in SRC]) - OPT))
        assert calls(ctx) == [("regmix", 256)]  # one fan-out of all proxies
        proxies = [r for r in res.trace if r["kind"] == "proxy"]
        assert len(proxies) == 256 and all("objective" in r and "cost" in r for r in proxies)
        assert [r["kind"] for r in res.trace[256:]] == ["regressor", "top_k", "choice"]
        json.dumps([res.trace, res.info], allow_nan=False)  # the run folder's files stay strict JSON
    # measured 0.035, 0.048, 0.079: the objective there is 8-40x lower than at uniform
    assert np.median(dists) < 0.4 * uniform and max(dists) < 0.75 * uniform, dists


def test_linear_option_runs_the_same_search(tmp_path):
    ctx = fake_ctx(0, tmp_path, objective=lambda w: -w["d"])  # best: as much d as the cap allows
    res = method("regmix", scale="smoke", smoke={"n_proxies": 16, "n_candidates": 2000, "top_k": 10,
                                                 "min_child_samples": 1},
                 regressor="linear").search(ctx).validated(SRC)
    assert res.info["regressor"]["regressor"] == "linear"
    assert res.weights["d"] > 0.9  # the cap is 15 x 0.1 = 1: d can take everything


def test_smoke_preset_searches(tmp_path):
    ctx = fake_ctx(0, tmp_path)
    res = build(["optimizer=regmix", "scale=smoke"]).search(ctx).validated(SRC)
    assert calls(ctx) == [("regmix", 4)] and res.info["n_candidates"] == 2000
    json.dumps([res.trace, res.info], allow_nan=False)  # 4 runs: a constant predictor, no NaN Spearman


# ---- config ----------------------------------------------------------------------------------

def build(overrides):
    """The optimizer as the pipeline builds it (checked against its Params, then built)."""
    return pipeline.build(compose(overrides).optimizer)


@pytest.mark.parametrize("scale,n,cands,k", [("smoke", 4, 2000, 10), ("demo", 24, 100000, 100),
                                             ("paper", 512, 1000000, 100)])
def test_yaml_presets_build(scale, n, cands, k):
    opt = build(["optimizer=regmix", f"scale={scale}"])
    assert (type(opt).__name__, opt.n_proxies, opt.n_candidates, opt.top_k) == ("RegMix", n, cands, k)
    assert opt.lgbm_params["n_estimators"] == 1000 and opt.lgbm_params["learning_rate"] == 0.01
    assert opt.generator == dict(temperature=0.5, min_strength=0.1, max_strength=5.0, n_strengths=15,
                                 max_usage=15.0, minimum=2e-4, sample_multiplier=100)


@pytest.mark.parametrize("override,key", [("scale=huge", "scale"),
                                          ("optimizer.smoke.n_proxies=1", "n_proxies"),
                                          ("optimizer.regressor=forest", "regressor"),
                                          ("optimizer.temperature=0", "temperature")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UserError, match=key):
        build(["optimizer=regmix", "scale=smoke", override])


# ---- recorded-results CLI --------------------------------------------------------------------

def write_runs(folder, name, X, y, index=None):
    index = np.arange(1, len(X) + 1) if index is None else index
    mix = pd.DataFrame({"index": index, **{c: X[:, i] for i, c in enumerate("abc")}})
    mix.to_csv(folder / f"{name}_mix.csv", index=False)
    pd.DataFrame({"index": index, "loss": y, "other": y * 0}).to_csv(folder / f"{name}_loss.csv", index=False)
    return [str(folder / f"{name}_mix.csv"), str(folder / f"{name}_loss.csv")]


def cli(m, t, out, *extra):
    return main(["--mixtures", m, "--targets", t, "--target-column", "loss", "--out", str(out),
                 "--n-candidates", "2000", "--top-k", "10", *extra])


def test_cli_writes_the_mixture_and_spearman(tmp_path):
    rng = np.random.default_rng(0)
    X, Xt = rng.dirichlet(np.ones(3), 40), rng.dirichlet(np.ones(3), 20)
    loss = lambda Z: 3.0 - 2.0 * Z[:, 0] + Z[:, 1]
    m, t = write_runs(tmp_path, "train", X, loss(X))
    mt, tt = write_runs(tmp_path, "test", Xt, loss(Xt))
    out = tmp_path / "sub" / "mixture.json"
    assert cli(m, t, out, "--regressor", "linear", "--test-mixtures", mt, "--test-targets", tt) == 0
    d = json.loads(out.read_text())
    assert list(d["weights"]) == ["a", "b", "c"] and sum(d["weights"].values()) == pytest.approx(1)
    assert d["spearman"] == pytest.approx(1.0) and d["n_test"] == 20  # exact model, exact ranking
    assert d["weights"]["a"] > 0.8 and d["prior_from"] == "mean of the training mixtures"


def test_cli_lightgbm_without_test_pair(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.dirichlet(np.ones(3), 60)
    m, t = write_runs(tmp_path, "train", X, ((X - [0.6, 0.3, 0.1]) ** 2).sum(axis=1))
    assert cli(m, t, tmp_path / "m.json") == 0
    d = json.loads((tmp_path / "m.json").read_text())
    assert "spearman" not in d and d["regressor"]["regressor"] == "lightgbm"
    assert np.linalg.norm(np.array(list(d["weights"].values())) - [0.6, 0.3, 0.1]) < 0.25


@pytest.mark.parametrize("case,msg", [("missing_file", "does not exist"), ("missing_column", "not in"),
                                      ("no_common_index", "share no value"), ("half_test_pair", "both")])
def test_cli_bad_input_fails_cleanly(tmp_path, capsys, case, msg):
    X = np.random.default_rng(0).dirichlet(np.ones(3), 10)
    m, t = write_runs(tmp_path, "train", X, X[:, 0])
    args = {"missing_file": (str(tmp_path / "nope.csv"), t), "missing_column": (m, t),
            "no_common_index": (m, write_runs(tmp_path, "other", X, X[:, 0], index=np.arange(100, 110))[1]),
            "half_test_pair": (m, t)}[case]
    extra = {"missing_column": ["--target-column", "val_loss"],
             "half_test_pair": ["--test-mixtures", m]}.get(case, [])
    out = tmp_path / "out.json"
    assert cli(*args, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and msg in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out.json*"))
