"""The oracle suite: designs, the landscape's loss columns end to end, grid reuse across
objectives, the fit on a known landscape, the noise statistics on synthetic seeds, and
an objective added at analysis time."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from analysis.regret import Landscape, interval, per_objective, within_noise
from baselines import landscape_fit as lf
from baselines.oracle import noise_floor
from baselines.oracle_suite import parse_weights, simplex_grid, space_filling_design
from fastmix.errors import UserError


@pytest.mark.parametrize("k,r", [(3, 1), (3, 2), (3, 4), (3, 10), (4, 3), (2, 5)])
def test_grid_enumerates_the_simplex(k, r):
    grid = simplex_grid(k, r)
    assert len(grid) == math.comb(r + k - 1, k - 1) and len(set(grid)) == len(grid)
    assert all(len(c) == k and sum(c) == r and min(c) >= 0 for c in grid)
    assert all(tuple(r * (i == j) for i in range(k)) in grid for j in range(k))  # the corners


def test_space_filling_design_for_five_sources():
    names = ["a", "b", "c", "d", "e"]
    natural = dict(zip(names, [0.4, 0.3, 0.15, 0.1, 0.05]))
    design = space_filling_design(names, natural, interior=30, seed=0)
    assert len(design) == 5 + 10 + 2 + 30
    W = np.array([[w[s] for s in names] for _, w in design])
    assert np.allclose(W.sum(1), 1.0, atol=1e-12) and (W >= 0).all()
    labels = dict(design)
    assert labels["vertex_c"]["c"] == 1.0 and labels["centre"]["e"] == 0.2 and labels["natural"]["a"] == 0.4
    assert labels["mid_a_d"] == {"a": 0.5, "b": 0.0, "c": 0.0, "d": 0.5, "e": 0.0}
    assert (W > 0.05).sum(1).max() == 5  # interior draws hold blends of all five
    assert space_filling_design(names, natural, 30, seed=0) == design  # seeded


def sweep(tiny_corpus, cache_dir, out: Path, extra: list[str]):
    # the sweep folder relative to the command's directory, as `make oracle` gives it: every
    # shared folder (proxies, the grid) must still land in it, not in each job's folder
    return run_cli(["-m", "experiment=oracle_smoke", "data=folder", f"data.root={tiny_corpus}",
                    f"data.cache_dir={cache_dir}", "oracle.resolution=2", f"hydra.sweep.dir={out.name}", *extra],
                   cwd=out.parent)


def job(out: Path, method: str, seed: int, pick: str) -> dict:
    (d,) = [p for p in out.iterdir() if f"optimizer={method}," in p.name and p.name.endswith(f"seed={seed}")
            and f"objective.pick={pick}," in p.name]
    return json.loads((d / "result.json").read_text())


def test_suite_end_to_end(tiny_corpus, cache_dir, tmp_path):
    """A landscape with a registered text, scored per column; a target's per-source losses
    are the landscape's columns and its objective the weighted sum of them; jobs with
    fitted targets; another objective reuses the grid; the leaderboard and files."""
    text = tmp_path / "notes.txt"
    docs = (tiny_corpus / "techdocs" / "docs.jsonl").read_text().splitlines()
    text.write_text("\n\n".join(json.loads(line)["text"] for line in docs[::-1]))
    out = tmp_path / "sweep"
    extra = [f"++oracle.texts={{notes: '{text}'}}", "++oracle.suite={techdocs: {weights: {techdocs: 1}, role: tuning}, "
             "code_drama: {weights: {code: 0.5, drama: 0.5}, role: held_out}, equal: {weights: {code: 1, "
             "techdocs: 1, drama: 1}, role: held_out}, notes: {text: notes, role: held_out}}"]
    r = sweep(tiny_corpus, cache_dir, out, ["optimizer=oracle,uniform,natural,regmix", "seed=0", *extra])
    assert r.returncode == 0, r.stderr[-3000:]
    land = pd.read_csv(out / "oracle" / "landscape.csv")
    assert {"loss:code", "loss:techdocs", "loss:drama", "loss:notes"} <= set(land.columns)
    assert set(land["stage"]) == {"design", "floor", "check"} and (land["stage"] == "design").sum() == 6
    # uniform at seed 0 (a floor unit) and the uniform verify job: one target, one set of test windows
    uni = land[(land["mixture"] == "mix_333-333-333") & (land["seed"] == 0)].iloc[0]
    for pick, weights in [("techdocs", {"techdocs": 1.0}), ("code_drama", {"code": 0.5, "drama": 0.5})]:
        res = job(out, "uniform", 0, pick)
        assert res["scored_by"] == "trained target"
        for s, v in res["val_loss"].items():
            assert v == pytest.approx(uni[f"loss:{s}"], rel=1e-5), s
        assert res["objective_loss"] == pytest.approx(sum(w * res["val_loss"][s] for s, w in weights.items()), rel=1e-6)
    fitted = job(out, "natural", 0, "equal")
    assert fitted["scored_by"] == "fitted landscape" and fitted["objective_loss"] is None and fitted["train_cost"]["flops"] == 0
    fit = json.loads((out / "oracle" / "fit.json").read_text())
    assert set(fit["columns"]) == {"loss:code", "loss:techdocs", "loss:drama", "loss:notes"}
    assert all(c["form"] in lf.FORMS and c["loo_rmse"] > 0 for c in fit["columns"].values())
    assert [e["name"] for e in fit["suite"]] == ["techdocs", "code_drama", "equal", "notes"]
    assert fit["suite"][3]["id"].startswith("text:") and fit["noise_floor"]["loss:code"]["seeds"] >= 2

    # proxies reused across objectives: RegMix's prior-sampled proxies trained once for all four,
    # each job charged the whole search, its objective read off the recorded losses
    units = sorted((out / "proxies" / "regmix_seed0").glob("regmix_*/record.json"))
    runs = {pick: job(out, "regmix", 0, pick) for pick in ("techdocs", "code_drama", "equal", "notes")}
    assert len(units) == runs["equal"]["search_cost"]["proxy_runs"] > 0
    assert len({r["search_cost"]["proxy_runs"] for r in runs.values()}) == 1
    rec = json.loads(units[0].read_text())
    assert set(rec["losses"]) == {"code", "techdocs", "drama", "notes"}
    assert len({json.dumps(r["weights"]) for r in runs.values()}) > 1  # the objectives do differ

    # another objective in the same folder: no target of the landscape is retrained (only
    # the new objective's own check of its fitted optimum may be added)
    units = {p: p.stat().st_mtime_ns for p in (out / "oracle" / "units").rglob("record.json")}
    more = extra[1][:-1] + ", cd73: {weights: {code: 0.7, drama: 0.3}, role: held_out}}"
    r = sweep(tiny_corpus, cache_dir, out, ["optimizer=oracle", "seed=3", "objective.pick=cd73", extra[0], more])
    assert r.returncode == 0, r.stderr[-3000:]
    again = {p: p.stat().st_mtime_ns for p in (out / "oracle" / "units").rglob("record.json")}
    assert {p: again[p] for p in units} == units
    assert all("/check/" in str(p) for p in set(again) - set(units))

    from analysis.oracle import main
    assert main([str(out), "--objective", "cd73=code:0.7,drama:0.3"]) == 0
    regret = pd.read_csv(out / "oracle" / "regret.csv")
    assert list(regret.columns[:6]) == ["objective", "role", "method", "seed", "regret", "normalized_regret"]
    assert set(regret["objective"]) == {"techdocs", "code_drama", "equal", "notes", "cd73"}
    uni = regret[regret["method"] == "uniform"]
    assert (uni["normalized_regret"] - 1).abs().max() < 1e-9  # 1 by definition
    assert regret.loc[regret["method"] == "oracle", "regret"].abs().max() < 0.02  # its fitted optimum, rounded
    md = (out / "oracle" / "regret.md").read_text()
    assert "**tuning objectives**" in md and "**held-out objectives**" in md and "Verification: 2 jobs" in md
    for f in ("regret_vs_cost.png", "landscape.png", "objectives.csv"):
        assert (out / "oracle" / f).stat().st_size > 0, f


def test_fit_recovers_a_known_interior_optimum():
    """A smooth landscape with its optimum at (0.3, 0.5, 0.2), noise 0.01 on a 1/10 grid:
    the chosen form's minimum on the fine grid lands within 0.06 of it, its LOO error
    near the noise, and Data Mixing Laws' form (corner-bound) loses the LOO contest."""
    W = np.array(simplex_grid(3, 10)) / 10
    opt = np.array([0.3, 0.5, 0.2])
    true = lambda W: 4.0 + 3.0 * ((W - opt) ** 2).sum(1) + 0.5 * W[:, 0] * W[:, 2]  # noqa: E731
    y = true(W) + np.random.default_rng(0).normal(0, 0.01, len(W))
    fit = lf.fit_column(W, y)
    assert fit.form != "exp_linear" and fit.candidates["exp_linear"] > 2 * fit.loo_rmse
    assert fit.loo_rmse < 0.02
    grid = lf.fine_grid(3)
    best = grid[np.argmin(fit.predict(grid))]
    assert np.abs(best - grid[np.argmin(true(grid))]).max() < 0.06
    # the JSON round trip predicts the same
    assert np.allclose(lf.predict_json(json.loads(json.dumps(fit.to_json())), W), fit.predict(W))


def test_log_warped_gp_fits_a_power_law_in_the_own_weight():
    """A source's own loss as a power law in its weight, 2 + (w + 0.02)^-0.4, on a K = 5
    space-filling design (as conf/landscape/k5): the log-warped GP's LOO error is under
    half the raw GP's, and its fit.json form predicts what the fitted object does."""
    names = list("abcde")
    W = np.array([[m[s] for s in names] for _, m in
                  space_filling_design(names, dict(zip(names, [0.2] * 5)), 40, seed=0)])
    y = 2.0 + (W[:, 0] + 0.02) ** -0.4 + np.random.default_rng(2).normal(0, 0.01, len(W))
    fit = lf.fit_column(W, y, forms=("gp", "gp_log"))
    assert fit.form == "gp_log" and fit.candidates["gp_log"] < 0.5 * fit.candidates["gp"]
    assert np.allclose(lf.predict_json(json.loads(json.dumps(fit.to_json())), W), fit.predict(W))
    assert np.abs(fit.predict(W) - y).max() < 0.1


def test_exp_linear_recovers_its_parameters():
    W = np.array(simplex_grid(3, 10)) / 10
    y = 3.5 + np.exp(W @ np.array([1.0, 0.2, -0.5])) + np.random.default_rng(1).normal(0, 0.003, len(W))
    p = lf._params("exp_linear", W, y)[0]
    assert p["c"] == pytest.approx(3.5, abs=0.05) and np.allclose(p["t"], [1.0, 0.2, -0.5], atol=0.05)


def test_noise_statistics_on_synthetic_seeds():
    """Six mixtures x 3 seeds with seed noise 0.05: the pooled floor is near 0.05; a method
    at regret 0.008 with seed spread 0.1 is not within noise, one at 0.004 with spread
    0.002 is; the interval widens with the fit's bootstrap variance."""
    rng = np.random.default_rng(0)
    rows = pd.DataFrame([{"mixture": f"m{m}", "seed": s, "loss:a": 5 + 0.1 * m + rng.normal(0, 0.05)}
                         for m in range(6) for s in range(3)])
    floor = noise_floor(rows, {"loss:a": 1.0})
    assert floor["mixtures"] == 6 and floor["seeds"] == 3 and 0.03 < floor["std"] < 0.07
    mean, half = interval(np.array([0.108, -0.092, 0.008]), None)
    assert mean == pytest.approx(0.008) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-3)
    assert not within_noise(mean, half, 0.05)
    assert within_noise(*interval(np.array([0.004, 0.002, 0.006]), None), 0.05)
    wide = interval(np.array([0.004, 0.002, 0.006]), np.array([0.0, 0.1, -0.1, 0.05]))[1]
    assert wide > interval(np.array([0.004, 0.002, 0.006]), None)[1]
    per = per_objective(pd.DataFrame([{"objective": "o", "role": "tuning", "method": "m", "seed": s,
                                       "regret": r, "normalized_regret": r / 0.2, "search_hours": 1.0, "boot": None}
                                      for s, r in enumerate([0.004, 0.002, 0.006])]), {"o": 0.05})
    assert per.loc[0, "within_noise"] and per.loc[0, "seeds"] == 3


def synthetic_sweep(root: Path, weights_by_seed: list[dict], objective_id: str, info: list[dict] = ()) -> None:
    for seed, w in enumerate(weights_by_seed):
        d = root / f"m_{seed}"
        d.mkdir(parents=True)
        cost = {"wall_seconds": 1, "device": "cpu", "devices": 1, "device_hours": 0.01, "flops": 1e12,
                "tokens": 1, "proxy_runs": 1, "peak_memory_bytes": 0}
        (d / "result.json").write_text(json.dumps({
            "optimizer": "method", "seed": seed, "search_cost": cost, "eval": {}, "eval_average": None,
            "val_loss": {}, "val_loss_average": None, "objective_loss": None, "weights": w, "scored_by": "fitted landscape",
            "eval_split": "test", "objective": {"name": "val", "id": objective_id}, "corpus": "c0",
            "search_info": info[seed] if info else {}}))


def known_landscape(tmp_path: Path) -> tuple[Path, dict]:
    """Two exp_linear columns, no bootstrap spread: regrets computable by hand."""
    land_dir = tmp_path / "land"
    land_dir.mkdir()
    cols = {"loss:a": {"form": "exp_linear", "params": {"c": 1.0, "t": [0.0, 1.0]}, "loo_rmse": 0.01},
            "loss:b": {"form": "exp_linear", "params": {"c": 1.0, "t": [1.0, 0.0]}, "loo_rmse": 0.01}}
    for c in cols.values():
        c["bootstrap"] = [{"form": c["form"], "params": c["params"]}] * 3
    fit = {"sources": ["a", "b"], "corpus": "c0", "texts": {}, "columns": cols, "suite": [],
           "noise_floor": {c: {"std": 0.01, "mixtures": 6, "seeds": 3} for c in cols}}
    (land_dir / "fit.json").write_text(json.dumps(fit))
    pd.DataFrame({"stage": ["design"], "mixture": ["m"], "seed": [0], "tokens": [1], "a": [1.0], "b": [0.0],
                  "loss:a": [2.0], "loss:b": [3.7]}).to_csv(land_dir / "landscape.csv", index=False)
    (land_dir / "objectives.csv").write_text("objective\n")
    return land_dir, fit


def test_objective_added_at_analysis_time(tmp_path):
    """A job that searched for 0.7 a + 0.3 b is scored for `--objective x=a:0.7,b:0.3`
    on a known fitted landscape, by hand."""
    land_dir, fit = known_landscape(tmp_path)
    sweep_dir = tmp_path / "sweep"
    synthetic_sweep(sweep_dir, [{"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 0.0}], "w:a=0.7,b=0.3")
    from analysis.oracle import main
    assert main([str(sweep_dir), "--landscape", str(land_dir), "--objective", "x=a:0.7,b:0.3"]) == 0
    r = pd.read_csv(sweep_dir / "oracle" / "regret.csv").set_index("seed")
    L = Landscape(fit)
    f = lambda a: 1.0 + 0.7 * math.exp(1 - a) + 0.3 * math.exp(a)  # noqa: E731  (w = (a, 1 - a))
    best = L.optimum({"loss:a": 0.7, "loss:b": 0.3})[1]
    assert best == pytest.approx(min(f(a) for a in np.linspace(0, 1, 2001)), abs=1e-4)
    assert r.loc[0, "regret"] == pytest.approx(f(0.5) - best, abs=1e-9)
    assert r.loc[1, "regret"] == pytest.approx(f(1.0) - best, abs=1e-9)
    assert r.loc[0, "normalized_regret"] == pytest.approx(1.0)  # seed 0 is uniform


def test_variant_rows_and_curve(tmp_path):
    """--variant search_info.movement_budget: each job's row is named by its value, the
    regrets are the by-hand ones, variant.png is drawn; a key no job has is refused."""
    land_dir, _ = known_landscape(tmp_path)
    sweep_dir = tmp_path / "sweep"
    synthetic_sweep(sweep_dir, [{"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 0.0}, {"a": 0.2, "b": 0.8}], "w:a=0.7,b=0.3",
                    info=[{"movement_budget": 0.5}, {"movement_budget": 16.0}, {"movement_budget": 2.0}])
    from analysis.oracle import main
    args = [str(sweep_dir), "--landscape", str(land_dir), "--objective", "x=a:0.7,b:0.3"]
    assert main(args + ["--variant", "search_info.movement_budget"]) == 0
    r = pd.read_csv(sweep_dir / "oracle" / "regret.csv").set_index("seed")
    assert list(r["method"]) == ["method movement_budget=0.5", "method movement_budget=16",
                                 "method movement_budget=2"]
    f = lambda a: 1.0 + 0.7 * math.exp(1 - a) + 0.3 * math.exp(a)  # noqa: E731
    assert r.loc[1, "regret"] - r.loc[0, "regret"] == pytest.approx(f(1.0) - f(0.5), abs=1e-9)
    assert (sweep_dir / "oracle" / "variant.png").stat().st_size > 0
    assert main(args + ["--variant", "search_info.nothing"]) != 0


def test_bad_objective_specs():
    with pytest.raises(UserError, match="not a source"):
        parse_weights("z:1", ["a", "b"])
    with pytest.raises(UserError, match="needs a weight"):
        parse_weights("a:x", ["a", "b"])
    with pytest.raises(UserError, match="no positive weight"):
        parse_weights("a:0", ["a", "b"])


def test_no_landscape_gives_one_message(tmp_path, capsys):
    synthetic_sweep(tmp_path, [{"a": 0.5, "b": 0.5}], "w:a=1")
    from analysis.oracle import main
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no landscape for" in err and "experiment=oracle_landscape" in err and "Traceback" not in err
    assert not (tmp_path / "oracle").exists()


@pytest.mark.parametrize("landscape", ["k3", "k5"])
def test_each_landscape_sweeps_into_its_own_folder(landscape):
    """experiment=oracle names its sweep folder by the landscape (make oracle runs both)."""
    from hydra import compose, initialize_config_dir

    from fastmix.config import CONF_DIR, register_resolvers
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        c = compose(config_name="config", overrides=["experiment=oracle", f"landscape={landscape}"],
                    return_hydra_config=True)
    assert c.hydra.sweep.dir == f"outputs/sweep/oracle_{landscape}"


@pytest.mark.parametrize("roles", ["tuning", "held_out", "tuning|held_out"])
def test_sensitivity_sweeps_the_named_roles(roles):
    """experiment=fastmix_sensitivity sweeps the suite's objectives of `sensitivity_roles`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fastmix.config import CONF_DIR, register_resolvers
    register_resolvers()
    suite = OmegaConf.load(CONF_DIR / "landscape" / "k3.yaml").oracle.suite
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        c = compose(config_name="config", return_hydra_config=True,
                    overrides=["experiment=fastmix_sensitivity", "landscape=k3", f"sensitivity_roles={roles}"])
    picked = c.hydra.sweeper.params["objective.pick"].split(",")
    assert picked == [n for n, e in suite.items() if e.role in roles.split("|")] and picked
    assert c.hydra.sweep.dir == "outputs/sweep/fastmix_sensitivity_k3"
