"""The oracle testbed: the grid, a micro oracle end to end with its tables, regret
by hand, and the analysis on a sweep without an oracle."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli

from baselines.oracle import simplex_grid


@pytest.mark.parametrize("k,r", [(3, 1), (3, 2), (3, 4), (3, 10), (4, 3), (2, 5)])
def test_grid_enumerates_the_simplex(k, r):
    grid = simplex_grid(k, r)
    assert len(grid) == math.comb(r + k - 1, k - 1) and len(set(grid)) == len(grid)
    if k == 3:
        assert len(grid) == (r + 1) * (r + 2) // 2  # R = 10: 66
    assert all(len(c) == k and sum(c) == r and min(c) >= 0 for c in grid)
    assert all(tuple(r * (i == j) for i in range(k)) in grid for j in range(k))  # the corners


def micro_oracle(tiny_corpus, cache_dir, out: Path, extra: list[str]):
    return run_cli(["-m", "experiment=oracle_smoke", "data=folder", f"data.root={tiny_corpus}",
                    f"data.cache_dir={cache_dir}", "data.sources=[code,techdocs,drama]", "oracle.resolution=2",
                    f"hydra.sweep.dir={out}", *extra], cwd=out.parent)


def job(out: Path, method: str, seed: int) -> Path:
    """A sweep job's folder (named from its overrides)."""
    (d,) = [p for p in out.iterdir() if f"optimizer={method}," in p.name and p.name.endswith(f"seed={seed}")]
    return d


def test_micro_oracle_end_to_end(tiny_corpus, cache_dir, tmp_path):
    out = tmp_path / "sweep"
    r = micro_oracle(tiny_corpus, cache_dir, out, ["optimizer=oracle,uniform,fastmix", "seed=0,1"])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((job(out, "oracle", 0) / "result.json").read_text())
    info = res["search_info"]["oracle"]
    assert len(info["grid"]) == 6 and all(math.isclose(sum(g["weights"].values()), 1) for g in info["grid"])
    best = min(info["grid"], key=lambda g: g["loss"])
    assert res["weights"] == best["weights"]
    # the oracle's own target at seed 0 is the best grid target: same config, seed and numbers
    assert math.isclose(res["objective_loss"], best["loss"], rel_tol=1e-6)
    assert set(info["uniform_loss_by_seed"]) == {"0", "1", "2"} and set(info["best_loss_by_seed"]) == {"0", "1", "2"}
    assert info["noise_floor"] > 0 and info["range"] > 0
    assert res["search_cost"]["proxy_runs"] == 6 + 2 + 3 and res["search_cost"]["flops"] > 0

    from analysis.oracle import main
    assert main([str(out)]) == 0
    land = pd.read_csv(out / "oracle" / "landscape.csv")
    assert list(land.columns) == ["code", "techdocs", "drama", "loss"] and len(land) == 6
    regret = pd.read_csv(out / "oracle" / "regret.csv")
    assert list(regret.columns[:5]) == ["method", "seed", "regret", "normalized_regret", "search_device_hours"]
    assert len(regret) == 6
    oracle = regret[regret["method"] == "oracle"]
    assert oracle["regret"].abs().max() < 1e-6  # paired by seed: the oracle's regret is 0
    uni = regret[regret["method"] == "uniform"]
    assert (uni["normalized_regret"] - 1).abs().max() < 1e-6  # uniform is 1 by definition
    for f in ("regret.md", "regret_vs_cost.png", "landscape.png"):
        assert (out / "oracle" / f).stat().st_size > 0, f

    # a re-run skips every job; a new seed's oracle reuses the grid (trains 0 grid targets)
    grid_records = {p: p.stat().st_mtime_ns for p in (out / "oracle_grid").rglob("record.json")}
    r = micro_oracle(tiny_corpus, cache_dir, out, ["optimizer=oracle,uniform,fastmix", "seed=0,1"])
    assert r.returncode == 0 and "6 skipped" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    r = micro_oracle(tiny_corpus, cache_dir, out, ["optimizer=oracle", "seed=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "oracle_grid").rglob("record.json")} == grid_records
    again = json.loads((job(out, "oracle", 2) / "result.json").read_text())["search_info"]["oracle"]
    assert again["grid"] == info["grid"]


def test_oracle_on_a_text_file_objective(tiny_corpus, cache_dir, tmp_path):
    """Any objective composes with the oracle experiment: here an external text file
    (its windows alternate between the searched and the scored split)."""
    text = tmp_path / "target.txt"
    docs = (tiny_corpus / "techdocs" / "docs.jsonl").read_text().splitlines()
    text.write_text("\n\n".join(json.loads(line)["text"] for line in docs))
    out = tmp_path / "sweep"
    r = micro_oracle(tiny_corpus, cache_dir, out, ["optimizer=oracle", "seed=0", "oracle.resolution=1",
                                                   "objective=text", f"objective.path={text}"])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((job(out, "oracle", 0) / "result.json").read_text())
    assert res["objective"]["name"] == "text" and len(res["search_info"]["oracle"]["grid"]) == 3
    from analysis.oracle import main
    assert main([str(out)]) == 0 and len(pd.read_csv(out / "oracle" / "landscape.csv")) == 3


def write_result(root: Path, method: str, seed: int, loss: float, weights: dict, info: dict | None = None,
                 hours: float = 1.0) -> None:
    d = root / f"{method}_{seed}"
    d.mkdir(parents=True)
    cost = {"wall_seconds": hours * 3600, "device": "cpu", "devices": 1, "device_hours": hours,
            "flops": hours * 1e12, "tokens": 1, "proxy_runs": 1, "peak_memory_bytes": 0}
    (d / "result.json").write_text(json.dumps({
        "optimizer": method, "seed": seed, "search_cost": cost, "eval": {}, "eval_average": None,
        "val_loss": {"a": loss}, "val_loss_average": loss, "objective_loss": loss, "weights": weights,
        "eval_split": "test", "search_info": info or {}}))


def test_regret_by_hand(tmp_path):
    """Oracle 1.0 / 1.2 and uniform 1.5 / 1.6 at seeds 0 / 1. A method at 1.25 and
    1.3: regret 0.25 and 0.1, normalised 0.25 / 0.5 = 0.5 and 0.1 / 0.4 = 0.25."""
    info = {"oracle": {"resolution": 1, "sources": ["a", "b"], "grid_seed": 0, "best": {"a": 1.0, "b": 0.0},
                       "grid": [{"weights": {"a": 1.0, "b": 0.0}, "loss": 1.0},
                                {"weights": {"a": 0.0, "b": 1.0}, "loss": 2.0}],
                       "best_loss_by_seed": {"0": 1.0, "1": 1.2}, "uniform_loss_by_seed": {"0": 1.5, "1": 1.6},
                       "noise_floor": 0.1, "range": 1.0}}
    for seed, (o, m, u) in enumerate([(1.0, 1.25, 1.5), (1.2, 1.3, 1.6)]):
        write_result(tmp_path, "oracle", seed, o, {"a": 1.0, "b": 0.0}, info, hours=10.0)
        write_result(tmp_path, "method", seed, m, {"a": 0.7, "b": 0.3})
        write_result(tmp_path, "uniform", seed, u, {"a": 0.5, "b": 0.5}, hours=0.0)
    from analysis.oracle import write_oracle
    text = write_oracle(tmp_path)
    r = pd.read_csv(tmp_path / "oracle" / "regret.csv").set_index(["method", "seed"])
    assert r.loc[("method", 0), "regret"] == pytest.approx(0.25)
    assert r.loc[("method", 1), "regret"] == pytest.approx(0.1)
    assert r.loc[("method", 0), "normalized_regret"] == pytest.approx(0.5)
    assert r.loc[("method", 1), "normalized_regret"] == pytest.approx(0.25)
    assert r.loc[("uniform", 1), "normalized_regret"] == pytest.approx(1.0)
    assert r.loc[("method", 1), "a"] == pytest.approx(0.7)
    assert "0.175 ± 0.106" in text  # mean and sample std of (0.25, 0.1)
    assert "| ≈ 0.000 ± 0.000" in text and "| 0.175 ± 0.106" in text  # the floor (0.1) is the yardstick
    assert "range 1.000, noise floor 0.100" in text and not (tmp_path / "oracle" / "landscape.png").exists()


def test_no_oracle_gives_one_message(tmp_path, capsys):
    write_result(tmp_path, "uniform", 0, 1.5, {"a": 0.5, "b": 0.5})
    from analysis.oracle import main
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no oracle in" in err and "experiment=oracle_smoke" in err and "Traceback" not in err
    assert not (tmp_path / "oracle").exists()
