"""Regret against the oracle: how far each method's mixture lands from the best one.

`python -m analysis.oracle OUT` reads a sweep that holds an `optimizer=oracle` job
(experiment=oracle or oracle_smoke) and writes, into OUT/oracle/:

* landscape.csv: every grid mixture (a column per source weight) and `loss`, the
  objective on the test split of the target trained on it.
* regret.csv: a row per method and seed: `regret` = the objective's test loss of
  the target trained on the method's mixture minus the oracle's at the same seed
  (the best grid mixture, trained again at that seed; the mean of its seeds for a
  seed it was not trained at), `normalized_regret` = regret / uniform's regret at
  that seed (0 = found the best, 1 = no better than uniform, > 1 = worse than not
  searching), `search_device_hours`, then the mixture.
* regret.md: per method, mean ± std over seeds, `≈` when the mean regret is at
  most the measured noise floor (the seed-to-seed std of one mixture's target:
  a method that close to the oracle found a mixture as good as the best, as far as
  one more training seed could tell), the search cost (device-hours,
  FLOPs, proxy runs, x FastMix); the noise floor and the landscape's range; the
  landscape's best mixtures.
* regret_vs_cost.png (log cost, Pareto front) and, for 3 sources, landscape.png:
  a ternary map of the landscape with every method's mixtures marked.

Reads outputs/ only.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # a notebook keeps its inline backend; elsewhere headless files
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback

from analysis.plots import NO_SEARCH_HOURS, pareto_front, save_figure
from analysis.tables import (
    COST_COLS,
    TableError,
    hours_label,
    load_results,
    mean_std_cell,
    paired_within_noise,
)
from fastmix import records
from fastmix.cli import run_tool

HOW = ("run one: python run.py -m experiment=oracle_smoke hydra.sweep.dir={root} (or experiment=oracle), "
       "or add optimizer=oracle to this sweep")


def oracle_info(df: pd.DataFrame, root: Path) -> dict:
    """The landscape of the sweep's oracle job (any seed: they share one grid)."""
    rows = df[df["method"] == "oracle"].sort_values("seed")
    if rows.empty:
        raise TableError(f"no oracle in {root}: regret needs the brute-force grid; " + HOW.format(root=root))
    info = (records.read_json(Path(rows["dir"].iloc[0]) / "result.json").get("search_info") or {}).get("oracle")
    if not info:
        raise TableError(f"{rows['dir'].iloc[0]}/result.json has no oracle landscape (search_info.oracle): "
                         f"it was written before the oracle recorded one; re-run it")
    return info


def landscape(info: dict) -> pd.DataFrame:
    return pd.DataFrame([{**g["weights"], "loss": g["loss"]} for g in info["grid"]])


def regret_rows(df: pd.DataFrame, info: dict) -> pd.DataFrame:
    """A row per job: regret and normalised regret, paired by seed with the oracle's
    and uniform's runs at that seed."""
    def at(by_seed: dict, seed) -> float:
        return by_seed.get(str(seed), float(np.mean(list(by_seed.values()))))
    best, uni = info["best_loss_by_seed"], info["uniform_loss_by_seed"]
    out = df[["method", "seed", "objective_loss", "search_hours", "search_flops", "proxy_runs",
              *[c for c in df.columns if c.startswith("weight:")]]].copy()
    out["regret"] = [loss - at(best, s) for loss, s in zip(out["objective_loss"], out["seed"])]
    denom = np.array([at(uni, s) - at(best, s) for s in out["seed"]])
    with np.errstate(divide="ignore", invalid="ignore"):
        out["normalized_regret"] = np.where(denom > 0, out["regret"] / denom, np.nan)
    return out


def regret_table(rows: pd.DataFrame, noise_floor: float | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(numbers, strings): per method the mean and std over seeds, best first.
    `within_noise`: mean regret <= the noise floor. A paired t-interval over 3 seeds
    (t = 4.30) cannot separate even uniform from the oracle (measured: 0.153 ± 0.069
    counts as 0), so the measured floor is the yardstick; without one, the paired test."""
    g = rows.groupby("method", sort=False)
    cols = ["regret", "normalized_regret", "objective_loss"] + COST_COLS
    s = g[cols].mean().join(g[cols].std(ddof=1).add_suffix(" std"))
    s["seeds"] = g.size()
    if noise_floor:
        s["within_noise"] = s["regret"] <= noise_floor
    else:
        s["within_noise"] = [paired_within_noise(rows.loc[rows["method"] == m].set_index("seed")["regret"])
                             for m in s.index]
    ref = s["search_hours"].get("fastmix")
    s["x_fastmix"] = s["search_hours"] / ref if ref else np.nan
    s = s.sort_values("regret", kind="stable")
    t = pd.DataFrame(index=s.index)
    t["Regret"] = [("≈ " if near else "") + mean_std_cell(m, v, ".3f", " ± ")
                   for m, v, near in zip(s["regret"], s["regret std"], s["within_noise"])]
    t["Normalised regret"] = [mean_std_cell(m, v, ".2f", " ± ") for m, v in zip(s["normalized_regret"],
                                                                         s["normalized_regret std"])]
    t["Objective loss (test)"] = [mean_std_cell(m, v, ".3f", " ± ") for m, v in zip(s["objective_loss"],
                                                                             s["objective_loss std"])]
    t["Search device-hours"] = [mean_std_cell(m, v, ".3g", " ± ") for m, v in zip(s["search_hours"], s["search_hours std"])]
    t["FLOPs"] = [f"{f:.2e}" for f in s["search_flops"]]
    t["Proxy runs"] = [f"{p:g}" for p in s["proxy_runs"]]
    t["x FastMix"] = ["-" if pd.isna(x) else f"{x:.3g}" for x in s["x_fastmix"]]
    t["Seeds"] = s["seeds"].astype(int)
    t.index.name = "Method"
    return s, t


def summary_text(info: dict, table: pd.DataFrame, land: pd.DataFrame, hours: str) -> str:
    sources = info["sources"]
    best = land.sort_values("loss").head(5)
    lines = [table.rename(columns={"Search device-hours": f"Search {hours}"}).to_markdown(), "",
             f"Oracle: {len(land)} grid mixtures (resolution 1/{info['resolution']}), best "
             + ", ".join(f"{s}={info['best'][s]:.2f}" for s in sources)
             + f"; landscape range {info['range']:.3f}, noise floor {info['noise_floor'] or float('nan'):.3f} "
             f"(std over seeds of the best grid mixture's and uniform's targets, averaged), so the range is "
             f"{info['range'] / info['noise_floor'] if info['noise_floor'] else float('nan'):.1f}x the floor. "
             + ("`≈`: mean regret at most the noise floor." if info["noise_floor"] else
                "`≈`: regret within noise of 0 (paired by seed, 95% t-interval)."), "",
             "Best grid mixtures:", "", best.to_markdown(index=False, floatfmt=".3f")]
    return "\n".join(lines)


def regret_vs_cost(s: pd.DataFrame, hours: str, ax=None):
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    searched = s[(s["search_hours"] >= NO_SEARCH_HOURS) & (s.index != "oracle")]
    for m, row in searched.iterrows():
        ax.errorbar(row["search_hours"], row["regret"], yerr=row["regret std"] if row["seeds"] > 1 else None,
                    fmt="o", capsize=3)
        ax.annotate(m, (row["search_hours"], row["regret"]), textcoords="offset points", xytext=(5, 4))
    for m, row in s[s["search_hours"] < NO_SEARCH_HOURS].iterrows():
        ax.axhline(row["regret"], ls="--", lw=1, color="grey")
        ax.annotate(f"{m} (no search)", (0.01, row["regret"]), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 3), color="grey", fontsize=8)
    if "oracle" in s.index:  # its cost is the brute force: the far right of the axis
        row = s.loc["oracle"]
        ax.plot(row["search_hours"], row["regret"], "k*", ms=10)
        ax.annotate("oracle (brute force)", (row["search_hours"], row["regret"]), textcoords="offset points",
                    xytext=(-60, 8), fontsize=8)
    if len(searched):
        front = pareto_front(searched["search_hours"], searched["regret"], higher=False)
        ax.plot(searched.loc[front, "search_hours"], searched.loc[front, "regret"], "k-", lw=1, alpha=0.5)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel(f"search cost ({hours}, log scale)")
    ax.set_ylabel("regret: objective test loss - oracle's (lower is better)")
    return ax


def ternary(land: pd.DataFrame, rows: pd.DataFrame, sources: list[str], ax=None):
    """The landscape over the simplex of 3 sources (barycentric -> plane), every
    method's mixtures marked (one marker per seed)."""
    def xy(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return w[:, 1] + w[:, 2] / 2, w[:, 2] * math.sqrt(3) / 2
    ax = ax or plt.subplots(figsize=(6, 5.5))[1]
    x, y = xy(land[sources].to_numpy())
    tc = ax.tricontourf(x, y, land["loss"], levels=14, cmap="viridis_r")
    plt.colorbar(tc, ax=ax, label="objective test loss of the target")
    ax.scatter(x, y, s=6, c="white", alpha=0.6)
    b = land.loc[land["loss"].idxmin(), sources].to_numpy(float)[None]
    ax.plot(*xy(b), "r*", ms=16, label="oracle (best grid)", clip_on=False, zorder=3)
    markers = iter("osD^v<>ph8")
    for m, grp in rows[rows["method"] != "oracle"].groupby("method", sort=True):
        w = grp[[f"weight:{s}" for s in sources]].to_numpy(float)
        ax.scatter(*xy(w), marker=next(markers, "o"), s=36, edgecolor="black", label=m, clip_on=False,
                   zorder=4, alpha=0.85)
    for (cx, cy, ha, dy), s in zip([(0, 0, "right", -12), (1, 0, "left", -12),
                                    (0.5, math.sqrt(3) / 2, "center", 8)], sources):  # the corners
        ax.annotate(s, (cx, cy), textcoords="offset points", xytext=(0, dy), ha=ha)
    ax.plot([0, 1, 0.5, 0], [0, 0, math.sqrt(3) / 2, 0], "k-", lw=1)
    ax.set_xlim(-0.12, 1.12)
    ax.set_ylim(-0.1, 0.95)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=5, frameon=False)
    return ax


def write_oracle(root: Path, out: Path | None = None) -> str:
    """Write OUT/oracle/{landscape.csv, regret.csv, regret.md, regret_vs_cost.png,
    landscape.png (3 sources)}; returns regret.md's text. Everything is computed
    before anything is written."""
    root = Path(root)
    df = load_results(root)
    info = oracle_info(df, root)
    sources = info["sources"]
    land = landscape(info)
    missing = [c for c in (f"weight:{s}" for s in sources) if c not in df]
    if missing:
        raise TableError(f"the jobs in {root} mix other sources than the oracle's {sources}: a sweep with an "
                         f"oracle must keep data.sources fixed")
    rows = regret_rows(df, info)
    s, table = regret_table(rows, info["noise_floor"])
    text = summary_text(info, table, land, hours_label(df))
    csv = rows.rename(columns={"search_hours": "search_device_hours"})
    csv = csv[["method", "seed", "regret", "normalized_regret", "search_device_hours",
               *[f"weight:{x}" for x in sources], "objective_loss"]]
    csv.columns = [c.split(":", 1)[-1] for c in csv.columns]
    figures = {"regret_vs_cost": lambda ax: regret_vs_cost(s, hours_label(df), ax)}
    if len(sources) == 3:
        figures["landscape"] = lambda ax: ternary(land, rows, sources, ax)
    out = Path(out) if out else root / "oracle"
    out.mkdir(parents=True, exist_ok=True)
    records.write_text_atomic(out / "landscape.csv", land[[*sources, "loss"]].to_csv(index=False))
    records.write_text_atomic(out / "regret.csv", csv.to_csv(index=False))
    records.write_text_atomic(out / "regret.md", text + "\n")
    for name, draw in figures.items():
        fig, ax = plt.subplots(figsize=(7, 5))
        draw(ax)
        save_figure(fig, out / f"{name}.png")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="a sweep folder holding an optimizer=oracle job")
    ap.add_argument("--out", type=Path, default=None, help="where to write (default <sweep>/oracle)")
    return run_tool(ap, lambda args: print(write_oracle(args.sweep, args.out)), argv)



O_START, O_END = "<!-- oracle:start -->", "<!-- oracle:end -->"


def readme_section(sweep: Path, text: str, readme: Path, command: str) -> str:
    """The README's oracle section: stamp, regret table, the two figures (copied to docs/figures/)."""
    from analysis.report import machine, sweep_wall_hours
    df = load_results(sweep)
    wall = sweep_wall_hours(sweep)
    figures = readme.parent / "docs" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    lines = [O_START, f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; {len(df)} jobs "
             f"({df['method'].nunique()} methods incl. the oracle x {df['seed'].nunique()} seeds)"
             + (f", {wall * 60:.0f} min of wall time" if wall else "") + f". Regenerate with `{command}`.", "",
             text, ""]
    for name in ("regret_vs_cost", "landscape"):
        src = sweep / "oracle" / f"{name}.png"
        if src.exists():
            shutil.copyfile(src, figures / f"{sweep.name}_{name}.png")
            lines += [f"![{name.replace('_', ' ')}]({os.path.relpath(figures / f'{sweep.name}_{name}.png', readme.parent)})", ""]
    return "\n".join(lines + [O_END])


class OracleReport(Callback):
    """Hydra callback (experiment=oracle): the regret tables and plots of the sweep once
    every job returned, and, given `readme`, its oracle section rewritten."""

    def __init__(self, readme: str | None = None, command: str = "make oracle"):
        self.readme, self.command = readme, command

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir).absolute()
        try:
            text = write_oracle(sweep)
            if self.readme:
                readme = Path(self.readme).absolute()
                body = readme.read_text()
                if O_START not in body or O_END not in body:
                    raise TableError(f"{readme} has no {O_START} ... {O_END} markers: add them where the "
                                     f"oracle's results go")
                head, rest = body.split(O_START, 1)
                records.write_text_atomic(readme, head + readme_section(sweep, text, readme, self.command)
                                          + rest.split(O_END, 1)[1])
        except TableError as e:  # no oracle or no job finished: the summary already says what failed
            print(f"oracle report: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
