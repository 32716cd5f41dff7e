"""The oracle: ground truth for a mixture search, by brute force and a fit (ours; no paper).

A method's mixture is only as good as the target trained on it. The oracle trains
that target (the job's `train` config: same model, tokens and schedule as every
method's target) on a design of mixtures, scores each on the test split of every
source and every registered external text (`oracle.texts`), and fits each such
`loss:` column over the simplex (baselines/landscape_fit.py). Any objective that
weights those columns, the suite's (`oracle.suite`) or one named at analysis time,
is then read off the landscape without training again; a method's regret is the
fitted loss at its mixture minus the fitted optimum (analysis/oracle.py).

Stages, each a set of resumable units in the shared folder (fastmix.search.proxies):
1. design: every mixture of a 1/R grid (`design: grid`), or for K >= 5 a space-filling
   design (vertices, edge midpoints, centre, natural, Dirichlet draws), at `grid_seed`;
2. noise floor: `noise_mixtures` mixtures (uniform and each suite objective's best
   design mixture) at `noise_seeds` more seeds: the seed-to-seed spread of a target;
3. the fit of every column (form chosen by leave-one-out error), with bootstrap refits;
4. checks: each suite objective's fitted optimum trained at `check_seeds` seeds;
5. budget: `budget_mixtures` mixtures trained again with `budget_factor` x the
   target's tokens (does the small-budget ranking hold? DataDecide's question).

Its files are in the landscape folder (`grid_dir`; experiment=oracle: <sweep>/oracle):
landscape.csv (a row per trained target: stage, mixture, seed, tokens, weights,
`loss:` columns), fit.json (per column the form, parameters, LOO error, bootstrap
refits; the noise floors; the corpus's content hash), objectives.csv (per suite
objective its definition, fitted optimum, best design mixture and checks). The
grid's folder is named by the data, the target and what it is scored on, not by
the job's objective: a sweep for another objective reuses every target. Every unit
is charged to the search like any proxy run: the oracle row says what brute force
costs. Its mixture is the fitted optimum of the job's objective.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from baselines import landscape_fit as lf
from baselines.oracle_suite import (design_size, grid_design, objective_columns, space_filling_design,
                                    suite_entries)
from fastmix import records
from fastmix.config import abspath
from fastmix.schema import rule
from fastmix.search.objective import file_identity
from fastmix.search.optimizer import SearchContext, SearchResult
from fastmix.search.proxies import ProxyJob, ProxyRecord

FIT_BOOTSTRAP = 20  # refits per column for the fit's uncertainty (regret intervals)


def label_of(w: dict[str, float]) -> str:
    """A mixture's unit name: its weights in thousandths, in source order."""
    return "mix_" + "-".join(f"{round(v * 1000):d}" for v in w.values())


def rounded(x, digits: int = 6):
    """Floats to `digits` significant digits (fit.json's bootstrap refits stay small)."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return x


def noise_floor(rows: pd.DataFrame, columns: dict[str, float]) -> dict:
    """The objective's seed-to-seed spread: the pooled std over seeds of every mixture
    trained at two or more seeds (the floor stage's), and how many mixtures and seeds."""
    loss = sum(rows[c] * a for c, a in columns.items())
    by = pd.DataFrame({"m": rows["mixture"], "loss": loss}).groupby("m")["loss"]
    var, n = by.var(ddof=1), by.size()
    keep = n >= 2
    if not keep.any():
        return {"std": None, "mixtures": 0, "seeds": 0}
    pooled = float(np.sqrt(((n[keep] - 1) * var[keep]).sum() / (n[keep] - 1).sum()))
    return {"std": pooled, "mixtures": int(keep.sum()), "seeds": int(n[keep].min())}


def fitted(fits: dict, columns: dict[str, float], W) -> np.ndarray:
    """An objective's fitted loss at mixtures W: the weighted sum of its columns' fits."""
    return sum(a * lf.predict_json(fits[c], W) for c, a in columns.items())


@dataclass
class Oracle:
    name = "oracle"
    # the ground truth, not a search: it scores its targets on the test split, so the
    # pipeline does not seal that split while it runs (fastmix.data.corpus.test_split_sealed)
    reads_test_split = True

    # conf/optimizer/oracle.yaml, whose values come from the top-level `oracle:` node
    resolution: int = rule(ge=1)  # R: the grid's weights in steps of 1/R
    design: str = rule(choices=("grid", "space_filling"))
    interior_points: int = rule(ge=0)  # space_filling: Dirichlet draws
    grid_dir: Optional[str] = rule()
    grid_seed: int = rule(ge=0)
    noise_seeds: int = rule(ge=0)
    noise_mixtures: int = rule(ge=1)
    check_seeds: int = rule(ge=0)
    budget_factor: int = rule(ge=1)
    budget_mixtures: int = rule(ge=0)
    texts: Dict[str, str] = rule()
    suite: Dict[str, Dict[str, Any]] = rule()

    def grid_root(self, ctx: SearchContext) -> Path:
        """`grid_dir`: a folder; `sweep` = <the sweep's folder>/oracle in a multirun (the
        job's own folder in a single run); null = the job's own folder."""
        if self.grid_dir == "sweep":
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                return abspath(HydraConfig.get().sweep.dir) / "oracle"
            return ctx.out_dir / "oracle"
        return abspath(self.grid_dir) if self.grid_dir else ctx.out_dir / "oracle"

    def planned_proxy_runs(self, n_sources: int) -> int:
        n = design_size(n_sources, self.design, self.resolution, self.interior_points)
        return n + self.noise_mixtures * self.noise_seeds + 1 + len(self.suite) * self.check_seeds + self.budget_mixtures

    def search(self, ctx: SearchContext) -> SearchResult:
        names, root = ctx.sources, self.grid_root(ctx)
        texts = {n: str(abspath(p)) for n, p in self.texts.items()}
        text_ids = {n: file_identity(Path(p)) for n, p in texts.items()}
        scored_on = {"_target_": "fastmix.search.objective.LandscapeObjective", "texts": texts,
                     "test_tokens_per_source": ctx.eval.test_tokens_per_source,
                     "max_tokens_per_source": ctx.eval.test_tokens_per_source, "batch_size": ctx.eval.batch_size}
        where = root / "units" / f"{self.design}_{ctx.proxies.landscape_key(scored_on)[:10]}"
        target = OmegaConf.to_container(ctx.target, resolve=True)  # every unit is the job's target

        def train(stage: str, runs: list[tuple[str, dict, int]], factor: int = 1) -> list[dict]:
            """Rows of landscape.csv for (mixture label, weights, seed) runs of one stage."""
            run_as = {**target, "tokens": ctx.target.tokens * factor}
            jobs = [ProxyJob(w, stage, seed=s, overrides=run_as, score="test", where=str(where / stage),
                             name=f"{label}_seed{s}", objective=scored_on) for label, w, s in runs]
            # a seeded walk order: oracle jobs of other seeds running beside this one start elsewhere
            order = (np.arange(len(jobs)) if ctx.seed == self.grid_seed
                     else np.random.default_rng(ctx.seed).permutation(len(jobs)))
            done: list[ProxyRecord] = [None] * len(jobs)
            for i, r in zip(order, ctx.proxies.run([jobs[i] for i in order])):
                done[i] = r
            return [{"stage": stage, "mixture": label, "seed": s, "tokens": ctx.target.tokens * factor,
                     **w, **{f"loss:{g}": v for g, v in r.losses.items()}}
                    for (label, w, s), r in zip(runs, done)]

        natural = ctx.token_share()
        design = (grid_design(names, self.resolution) if self.design == "grid" else
                  space_filling_design(names, natural, self.interior_points, self.grid_seed))
        # labels from the weights: a mixture is the same unit whichever stage asks for it
        rows = train("design", [(label_of(w), w, self.grid_seed) for _, w in design])
        suite = suite_entries(self.suite, names, text_ids)
        own = objective_columns(ctx.objective, text_ids)
        if ctx.objective.identity() not in {e["id"] for e in suite}:
            suite.append({"name": ctx.objective.name, "role": "job", "id": ctx.objective.identity(),
                          "definition": ctx.objective.identity(), "columns": own})

        rows += self.floor_runs(pd.DataFrame(rows), suite, names, train)
        land = pd.DataFrame(rows)
        fits = self.fit(land, names)
        checks = []
        for e in suite:
            e["optimum"], e["optimum_loss"] = self.optimum(fits, e["columns"], names)
            best = land[land["stage"] == "design"].assign(loss=sum(land[c] * a for c, a in e["columns"].items()))
            best = best.loc[best["loss"].idxmin()]
            e["best_design"], e["best_design_loss"] = {s: float(best[s]) for s in names}, float(best["loss"])
            checks += [(label_of(e["optimum"]), e["optimum"], self.grid_seed + j) for j in range(self.check_seeds)]
        rows += train("check", list({(label, s): (label, w, s) for label, w, s in checks}.values()))
        rows += self.budget_runs(land, train)
        land = pd.DataFrame(rows)
        self.write(root, land, fits, suite, names, ctx)
        mine = next(e for e in suite if e["id"] == ctx.objective.identity())
        info = {"oracle": {"dir": str(root), "units": str(where), "sources": names, "objective_id": mine["id"],
                           "fitted_optimum": mine["optimum"], "fitted_optimum_loss": mine["optimum_loss"],
                           "targets": len(land), "corpus": Path(ctx.corpus.root).name}}
        trace = [{"kind": "suite", **{k: v for k, v in e.items() if k != "columns"}} for e in suite]
        return SearchResult(mine["optimum"], trace=trace, info=info)

    def floor_runs(self, design: pd.DataFrame, suite: list[dict], names: list[str], train) -> list[dict]:
        """Uniform and the best design mixture of each suite objective (then their runners-up,
        in turn), `noise_mixtures` in all, at `noise_seeds` more seeds (uniform at grid_seed
        too when the design lacks it)."""
        if not self.noise_seeds:
            return []
        uniform = {s: 1.0 / len(names) for s in names}
        picks = {label_of(uniform): uniform}
        ranked = [design.assign(loss=sum(design[c] * a for c, a in e["columns"].items())).sort_values("loss")
                  for e in suite]
        for depth in range(len(design)):
            for r in ranked:
                if len(picks) >= self.noise_mixtures:
                    break
                row = r.iloc[depth]
                picks.setdefault(row["mixture"], {s: float(row[s]) for s in names})
        seeds = [self.grid_seed + j for j in range(1, self.noise_seeds + 1)]
        runs = [(label, w, s) for label, w in picks.items() for s in seeds]
        if label_of(uniform) not in set(design["mixture"]):
            runs.append((label_of(uniform), uniform, self.grid_seed))
        return train("floor", runs)

    def budget_runs(self, land: pd.DataFrame, train) -> list[dict]:
        """`budget_mixtures` design mixtures at `budget_factor` x the tokens: the floor's mixtures
        first, then design mixtures spread over the simplex (a seeded draw)."""
        if not self.budget_mixtures:
            return []
        names = [c for c in land.columns if c not in ("stage", "mixture", "seed", "tokens") and ":" not in c]
        base = land[land["seed"] == self.grid_seed].drop_duplicates("mixture")
        floor = [m for m in land.loc[land["stage"] == "floor", "mixture"].unique() if m in set(base["mixture"])]
        rest = [m for m in np.random.default_rng(self.grid_seed).permutation(base["mixture"].to_numpy())
                if m not in floor]
        pick = (floor + rest)[:self.budget_mixtures]
        by = base.set_index("mixture")
        return train("budget", [(m, {s: float(by.loc[m, s]) for s in names}, self.grid_seed) for m in pick],
                     factor=self.budget_factor)

    @staticmethod
    def fit(land: pd.DataFrame, names: list[str]) -> dict:
        """Every loss column fitted on the targets of the job's token budget (design, floor;
        seeds of one mixture left out together), with its bootstrap refits."""
        base = land[land["tokens"] == land["tokens"].min()]
        W = base[names].to_numpy(float)
        groups = pd.factorize(base["mixture"])[0]
        out = {}
        for col in [c for c in base.columns if c.startswith("loss:")]:
            f = lf.fit_column(W, base[col].to_numpy(float), groups=groups)
            out[col] = {**f.to_json(), "bootstrap": lf.bootstrap_fits(f, W, base[col].to_numpy(float), FIT_BOOTSTRAP)}
        return out

    @staticmethod
    def optimum(fits: dict, columns: dict[str, float], names: list[str]) -> tuple[dict, float]:
        grid = lf.fine_grid(len(names))
        loss = fitted(fits, columns, grid)
        w = np.round(grid[int(np.argmin(loss))], 3)
        return {s: float(v) for s, v in zip(names, w / w.sum())}, float(loss.min())

    def write(self, root: Path, land: pd.DataFrame, fits: dict, suite: list[dict], names: list[str], ctx) -> None:
        """landscape.csv, fit.json, objectives.csv (atomically; every oracle job writes the same)."""
        floors = {e["name"]: noise_floor(land[land["tokens"] == ctx.target.tokens], e["columns"]) for e in suite}
        fit_json = {"sources": names, "corpus": Path(ctx.corpus.root).name, "design": self.design,
                    "budget_factor": self.budget_factor,
                    "resolution": self.resolution, "target_tokens": ctx.target.tokens,
                    "texts": {n: {"path": p, "id": file_identity(Path(p))} for n, p in self.texts.items()},
                    "columns": fits,
                    "noise_floor": {c: noise_floor(land[land["tokens"] == ctx.target.tokens], {c: 1.0})
                                    for c in fits},
                    "suite": [{**e, "noise_floor": floors[e["name"]]} for e in suite]}
        obj = pd.DataFrame([{"objective": e["name"], "role": e["role"], "id": e["id"], "definition": e["definition"],
                             "fitted_optimum_loss": e["optimum_loss"], "best_design_loss": e["best_design_loss"],
                             "noise_floor": floors[e["name"]]["std"],
                             **{f"optimum:{s}": e["optimum"][s] for s in names},
                             **{f"best_design:{s}": e["best_design"][s] for s in names}} for e in suite])
        root.mkdir(parents=True, exist_ok=True)
        records.write_text_atomic(root / "landscape.csv", land.to_csv(index=False))
        records.write_json(root / "fit.json", rounded(fit_json))
        records.write_text_atomic(root / "objectives.csv", obj.to_csv(index=False))
