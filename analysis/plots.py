"""Run folders -> the paper's figures (matplotlib).

`python -m analysis.plots outputs/sweep/<name> [--out DIR]` writes, into
<sweep>/plots/ by default:

* cost_vs_quality.png: search device-hours (log scale) against the average
  score of the target model, one point per method (mean over seeds, error bars
  = std), the Pareto front marked; methods with no search (uniform, natural)
  are dashed horizontal lines, since log scale has no zero (FastMix Fig. 1).
* cost_vs_objective.png: the same against the job's objective measured on the
  test split (the headline at CPU scale, where benchmark scores sit near chance).
* mixtures.png: each method's weights as a stacked bar.
* fastmix_weights.png: FastMix's weights over its outer steps (search_trace).
* val_loss.png: each source's test-split loss of each method's target.

The notebooks in analysis/ call the same functions. Reads outputs/ only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # a notebook keeps its inline backend; elsewhere headless files
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import pandas as pd

from analysis.tables import (
    TableError,
    hours_label,
    load_results,
    mixtures_table,
    per_source,
    quality,
    summarize,
)
from fastmix import records
from fastmix.cli import run_tool

NO_SEARCH_HOURS = 1e-4  # a search cheaper than this (0.36 s) is "no search": drawn as a line


def pareto_front(cost: pd.Series, value: pd.Series, higher: bool) -> list[str]:
    """Methods no other method beats on both cost (lower) and value, cheapest first."""
    front, best = [], None
    for m in cost.sort_values(kind="stable").index:
        v = value[m]
        if best is None or (v > best if higher else v < best):
            front.append(m)
            best = v
    return front


def cost_vs_quality(df: pd.DataFrame, ax=None, metric: str = "auto"):
    """Search cost against quality: metric auto/val as in `quality`, or `objective`
    (the job's objective on the test split, the CPU-scale headline)."""
    s = summarize(df, "val" if metric == "objective" else metric)
    _, higher, _ = quality(df, "val" if metric == "objective" else metric)
    if metric == "objective":
        s = s.assign(average=s["objective_loss"], **{"average std": s["objective_loss std"]})
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    searched = s[s["search_hours"] >= NO_SEARCH_HOURS]
    for m, row in searched.iterrows():
        ax.errorbar(row["search_hours"], row["average"], yerr=row["average std"] if row["seeds"] > 1 else None,
                    fmt="o", capsize=3, label=m)
        ax.annotate(m, (row["search_hours"], row["average"]), textcoords="offset points", xytext=(5, 4))
    for m, row in s[s["search_hours"] < NO_SEARCH_HOURS].iterrows():
        ax.axhline(row["average"], ls="--", lw=1, color="grey")
        ax.annotate(f"{m} (no search)", (0.01, row["average"]), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 3), color="grey", fontsize=8)
    if len(searched):
        front = pareto_front(searched["search_hours"], searched["average"], higher)
        ax.plot(searched.loc[front, "search_hours"], searched.loc[front, "average"], "k-", lw=1, alpha=0.5,
                label="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
    ax.set_xlabel(f"search cost ({hours_label(df)}, log scale)")
    ax.set_ylabel("objective loss on the test split (lower is better)" if metric == "objective" else
                  "average score (%)" if higher else "average test-split loss (lower is better)")
    if len(searched):
        ax.legend(fontsize=7)
    return ax


def mixture_bars(df: pd.DataFrame, ax=None):
    w = mixtures_table(df)
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    w.T.plot.bar(stacked=True, ax=ax, width=0.7, colormap="tab20")
    ax.set_ylabel("mixture weight")
    ax.set_xlabel("")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return ax


def fastmix_trace(df: pd.DataFrame) -> pd.DataFrame:
    """FastMix's weights per outer step (the first seed's run): a row per step."""
    runs = df[df["method"] == "fastmix"].sort_values("seed")
    if runs.empty:
        raise TableError("no FastMix run in this sweep: its weights-over-steps plot needs optimizer=fastmix")
    trace = records.read_jsonl(Path(runs["dir"].iloc[0]) / "search_trace.jsonl")
    return pd.DataFrame([t["weights"] for t in trace], index=[t["step"] for t in trace]).rename_axis("step")


def fastmix_weights(df: pd.DataFrame, ax=None):
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    fastmix_trace(df).plot(ax=ax, colormap="tab20")
    ax.set_xlabel("optimizer step of the proxy")
    ax.set_ylabel("mixture weight")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return ax


def val_loss_bars(df: pd.DataFrame, ax=None):
    v = per_source(df, "val")
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    v.plot.bar(ax=ax, width=0.8)
    ax.set_ylim(v.min().min() * 0.97, v.max().max() * 1.02)
    ax.set_ylabel("test-split loss of the target")
    ax.legend(fontsize=7)
    return ax


def write_plots(root: Path, out: Path | None = None) -> list[Path]:
    df = load_results(root)
    out = Path(out) if out else Path(root) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    figures = {"cost_vs_objective": lambda d: cost_vs_quality(d, metric="objective"),
               "cost_vs_quality": cost_vs_quality, "mixtures": mixture_bars, "val_loss": val_loss_bars}
    if quality(df)[1]:  # benchmark scores: the per-source losses get their own cost plot
        figures["cost_vs_val_loss"] = lambda d: cost_vs_quality(d, metric="val")
    if (df["method"] == "fastmix").any():
        figures["fastmix_weights"] = fastmix_weights
    written = []
    for name, draw in figures.items():
        written.append(save_figure(draw(df).figure, out / f"{name}.png"))
    return written


def save_figure(fig, path: Path) -> Path:
    """Laid out, written whole, then renamed (no half images), and closed."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="a sweep folder (outputs/sweep/<name>)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the figures (default <sweep>/plots)")
    def run(args):
        for p in write_plots(args.sweep, args.out):
            print(p)
    return run_tool(ap, run, argv)


if __name__ == "__main__":
    sys.exit(main())
