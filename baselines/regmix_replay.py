"""RegMix on recorded proxy runs: `python -m baselines.regmix_replay --mixtures M.csv
--targets T.csv --target-column COLUMN --out mixture.json` replays the notebook
(sail-sg/regmix regression_fitting/regression.ipynb) on tables in the public
repository's data/ layout: fit the regressor, simulate, average the top k, write
the mixture. Optionally reports Spearman's rho on held-out runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from baselines.proxy_search import REGRESSORS, Regressor, as_prior, spearman, top_k_mean
from fastmix.cli import run_tool
from fastmix.errors import UserError


def _read_table(path: str, what: str):
    import pandas as pd
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file {p} does not exist.")
    try:
        df = pd.read_csv(p)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"{what} file {p} is not a readable CSV: {e}") from None
    if "index" not in df.columns:  # the two tables are joined on it, as in sail-sg/regmix data/
        raise UserError(f"{what} file {p} has no `index` column (columns: {list(df.columns)[:8]}).")
    return df


def load_runs(mixtures: str, targets: str, column: str, sources: list[str] | None = None):
    """(source names, X, y) of the runs in both tables, joined on `index`."""
    m, t = _read_table(mixtures, "mixture"), _read_table(targets, "target")
    if column not in t.columns:
        raise UserError(f"target column '{column}' is not in {targets}; its columns are "
                        f"{[c for c in t.columns if c != 'index']}.")
    names = [c for c in m.columns if c != "index"]
    if sources is not None and names != sources:
        raise UserError(f"{mixtures} has columns {names}, but the training mixtures have {sources}.")
    if len(names) < 2:
        raise UserError(f"{mixtures} needs >= 2 mixture columns besides `index`.")
    j = m.merge(t[["index", column]], on="index", how="inner")
    if j.empty:
        raise UserError(f"{mixtures} and {targets} share no value of `index`: nothing to fit.")
    try:
        j = j[np.isfinite(j[column].to_numpy(dtype=np.float64))]  # runs without a value (crashed) drop out
        X = j[names].to_numpy(dtype=np.float64)
    except ValueError as e:
        raise UserError(f"{mixtures} / {targets}: mixture and target values must be numbers ({e}).") from None
    if not np.all(np.isfinite(X)) or np.any(X < 0):
        raise UserError(f"{mixtures}: mixture weights must be finite and >= 0.")
    if len(j) < 2:
        raise UserError(f"{mixtures} and {targets} share {len(j)} run(s) with a finite {column}; need 2.")
    return names, X, j[column].to_numpy(dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m baselines.regmix_replay",
                                 description="RegMix on recorded proxy runs: fit, simulate, write.")
    for flag, text in [("--mixtures", "CSV: index + one weight column per domain"),
                       ("--targets", "CSV: index + objective columns (lower is better)"),
                       ("--target-column", "objective column, e.g. metric/the_pile_pile_cc_val_loss"),
                       ("--out", "mixture JSON to write")]:
        ap.add_argument(flag, required=True, help=text)
    ap.add_argument("--test-mixtures", help="held-out runs' mixtures and targets: report Spearman's rho")
    ap.add_argument("--test-targets")
    ap.add_argument("--regressor", choices=REGRESSORS, default="lightgbm")
    ap.add_argument("--n-candidates", type=int, default=1_000_000, help="simulated mixtures (paper: 1M)")
    ap.add_argument("--top-k", type=int, default=100, help="best averaged (paper 100; notebook 128)")
    ap.add_argument("--prior", help="JSON {domain: token share}; default: mean of the training mixtures")
    ap.add_argument("--early-stopping", choices=("holdout", "test"), default="holdout", help="holdout: 20%% "
                    "of the runs pick the rounds, refit on all; test: stop on the test runs (notebook)")
    ap.add_argument("--seed", type=int, default=42, help="notebook: np.random.seed(42)")
    return run_tool(ap, _run_cli, argv)


def _run_cli(a) -> None:
    import json

    from omegaconf import OmegaConf

    from fastmix.config import CONF_DIR
    from fastmix.records import write_json
    if (a.test_mixtures is None) != (a.test_targets is None):
        raise UserError("give both --test-mixtures and --test-targets, or neither.")
    if a.early_stopping == "test" and a.test_mixtures is None:
        raise UserError("--early-stopping test needs --test-mixtures and --test-targets.")
    if not 1 <= a.top_k <= a.n_candidates:
        raise UserError(f"--top-k is {a.top_k}; need 1 <= top-k <= --n-candidates ({a.n_candidates}).")
    names, X, y = load_runs(a.mixtures, a.targets, a.target_column)
    test = load_runs(a.test_mixtures, a.test_targets, a.target_column, names) if a.test_mixtures else None
    if a.prior:
        try:
            given = json.loads(Path(a.prior).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--prior {a.prior}: not a readable JSON file ({e}).") from None
        if not isinstance(given, dict) or set(given) != set(names):
            raise UserError(f"--prior must be a JSON object with exactly the mixture columns {names}.")
        prior, prior_from = as_prior([given[n] for n in names], "--prior"), a.prior
    else:  # the notebook hard-codes the Pile token share; recorded runs do not carry it, and
        # the mean of the training mixtures is the centre of the region they cover
        prior, prior_from = as_prior(X.mean(axis=0), "mean of the training mixtures (give --prior)"), \
            "mean of the training mixtures"
    # One source of truth for the notebook's LightGBM parameters: the method's own config.
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "optimizer" / "regmix.yaml"))
    params = {**yaml["lightgbm"], "min_child_samples": yaml["paper"]["min_child_samples"]}
    reg = Regressor(a.regressor, params, yaml["early_stopping_rounds"], yaml["early_stopping_holdout"],
                    a.seed)
    reg.fit(X, y, eval_set=(test[1], test[2]) if a.early_stopping == "test" else None)
    rng = np.random.default_rng(a.seed)
    candidates = rng.dirichlet(prior, size=a.n_candidates)  # the notebook's simulation
    predicted = reg.predict(candidates)
    weights, top = top_k_mean(candidates, predicted, a.top_k)
    out = {"weights": dict(zip(names, map(float, weights))), "target_column": a.target_column,
           "regressor": reg.info, "n_train": len(y), "prior": dict(zip(names, map(float, prior))),
           "prior_from": prior_from, "simulation": "Dirichlet(prior x 1), as regression.ipynb",
           "n_candidates": a.n_candidates, "top_k": a.top_k, "seed": a.seed,
           "top_k_mean_predicted": float(predicted[top].mean()),
           **({"spearman": spearman(reg.predict(test[1]), test[2]), "n_test": len(test[2])} if test else {})}
    write_json(Path(a.out), out)
    extra = f", Spearman {out['spearman']:.4f} on {out['n_test']} test runs" if test is not None else ""
    print(f"wrote {a.out}: {len(names)} domains, {len(y)} training runs{extra}")


if __name__ == "__main__":
    sys.exit(main())

