"""Run folders -> the paper's cost-versus-quality tables.

`python -m analysis.tables outputs/sweep/<name> [--paper pretrain]` reads every
result.json under the folder into one pandas frame (a row per job) and writes,
into <folder>/tables/ (or --out), as Markdown, CSV and LaTeX:

* results: one row per method, ordered by the headline: the job's objective
  measured on the test split (lower is better; `≈` marks every method whose
  mean is within noise of the best, see `within_noise`); then a column per
  benchmark (accuracy in %, or each source's test-split loss when the suite
  scored none), the average, on how
  many benchmarks the method is best, the search's device-hours (named
  GPU-hours only when every search ran on GPUs), FLOPs, proxy runs and cost
  as a multiple of FastMix's device-hours; mean ± std over seeds. A method
  that checks its own proxy (DeMix: merged scores against trained proxies)
  shows the check, flagged when it failed.
* val_loss: the same layout over each source's test-split loss of the
  target (when the main table holds benchmark scores).
* mixtures: the found weights side by side, a column per method.

With --paper, the figures the papers report (analysis/reported.yaml) are
printed beside the measured cost multiples. Reads outputs/ only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from fastmix import records
from fastmix.cli import print_sections, run_tool
from fastmix.errors import UserError

REPORTED = Path(__file__).with_name("reported.yaml")
COST_COLS = ["search_hours", "search_flops", "proxy_runs"]
NOISE_LEVEL = 0.95  # two-sided confidence of the paired-by-seed interval in `within_noise`


class TableError(UserError):
    """Bad input to the table builder: one message naming the thing and the fix."""


def load_results(root: Path) -> pd.DataFrame:
    """One row per finished job (a result.json) under `root`: method, seed, the
    scores `score:<task>`, `val:<source>`, `weight:<source>`, the search cost and
    the job's folder."""
    root = Path(root)
    if not root.exists():
        raise TableError(f"{root} does not exist: pass a sweep folder, e.g. outputs/sweep/<sweep_name>")
    paths = sorted(root.rglob("result.json"))
    if not paths:
        raise TableError(f"no result.json under {root}: no job of this sweep has finished "
                         f"(a job writes result.json and DONE last); run the sweep first")
    rows, bad = [], []
    for p in paths:
        try:
            rows.append(result_row(p))
        except (OSError, ValueError, KeyError, TypeError) as e:  # truncated, hand-edited, another tool's
            bad.append(p)
            print(f"warning: skipping {p}: not a readable result.json ({type(e).__name__}: {e}); "
                  f"re-run its job (delete its DONE) or remove the folder", file=sys.stderr)
    if not rows:
        raise TableError(f"none of the {len(bad)} result.json under {root} could be read: see the warnings")
    return pd.DataFrame(rows)


def result_row(p: Path) -> dict:
    """One job's row of `load_results`."""
    r = records.read_json(p)
    cost = r["search_cost"]
    row = {"method": r["optimizer"], "seed": r["seed"], "dir": str(p.parent), "suite": r.get("eval_suite"),
           "device": cost["device"], "search_hours": cost["device_hours"], "search_flops": cost["flops"],
           "proxy_runs": cost["proxy_runs"], "eval_average": r.get("eval_average"),
           "val_loss_average": r["val_loss_average"], "objective_loss": r["objective_loss"],
           "eval_split": r.get("eval_split", "val"),  # rows from before test-split scoring say val
           "objective_id": (r.get("objective") or {}).get("id"), "objective_name": (r.get("objective") or {}).get("name"),
           "scored_by": r.get("scored_by", "trained target")}
    check = (r.get("search_info") or {}).get("proxy_check")
    if check:
        row.update({"check_spearman": check.get("spearman"), "check_passed": check.get("passed")})
    row.update({f"score:{k}": v for k, v in (r.get("eval") or {}).items()})
    row.update({f"val:{k}": v for k, v in r["val_loss"].items()})
    row.update({f"weight:{k}": v for k, v in r["weights"].items()})
    return row


def _columns(df: pd.DataFrame, prefix: str) -> list[str]:
    return [c for c in df.columns if c.startswith(prefix)]


def quality(df: pd.DataFrame, metric: str = "auto") -> tuple[list[str], bool, float]:
    """(the per-benchmark columns, higher-is-better, display scale): benchmark
    accuracies in % when the suite scored any (metric auto), else (or with
    metric val) each source's validation loss."""
    scores = [c for c in _columns(df, "score:") if df[c].notna().any()]
    if scores and metric == "auto":
        return scores, True, 100.0
    return _columns(df, "val:"), False, 1.0


def within_noise(df: pd.DataFrame, column: str = "objective_loss", level: float = NOISE_LEVEL) -> pd.Series:
    """Per method: is its mean `column` (lower is better) within noise of the best
    method's? Paired by seed: d_s = method - best on every seed both ran; within
    noise when the two-sided `level` t-interval of mean(d) reaches 0, i.e.
    mean(d) <= t_{(1+level)/2, n-1} * sd(d) / sqrt(n). The best method is within
    noise of itself; a method sharing fewer than 2 seeds with it is not marked
    (its noise is unknown)."""
    per_seed = df.pivot_table(index="seed", columns="method", values=column, aggfunc="mean")
    best = per_seed.mean().idxmin()
    return pd.Series({m: m == best or paired_within_noise(per_seed[m] - per_seed[best], level)
                      for m in per_seed.columns})


def paired_within_noise(d: pd.Series, level: float = NOISE_LEVEL) -> bool:
    """Per-seed differences to a reference (lower is better): within noise when the
    two-sided `level` t-interval of their mean reaches 0; unknown (False) below 2 seeds."""
    d = d.dropna()
    if len(d) < 2:
        return False
    return bool(d.mean() <= stats.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))


def summarize(df: pd.DataFrame, metric: str = "auto") -> pd.DataFrame:
    """Per method: mean and std over seeds of the objective's test loss (the
    headline, with `within_noise`), every benchmark, the average, the best count
    and the search cost (columns `<name>` and `<name> std`), best first."""
    bench, higher, scale = quality(df, metric)
    df = df.copy()
    df[bench] = df[bench] * scale
    df["average"] = df[bench].mean(axis=1)
    cols = ["objective_loss"] + bench + ["average"] + COST_COLS
    g = df.groupby("method", sort=False)
    mean, std = g[cols].mean(), g[cols].std(ddof=1)  # one seed -> NaN std, shown as a bare mean
    out = mean.join(std.add_suffix(" std"))
    out["seeds"] = g.size()
    best = mean[bench].max() if higher else mean[bench].min()
    # ties count for every tied method (np.isclose: equal up to float noise)
    out["best_on"] = sum(np.isclose(mean[c], best[c], rtol=0, atol=1e-9).astype(int) for c in bench)
    ref = out["search_hours"].get("fastmix")
    out["x_fastmix"] = out["search_hours"] / ref if ref else np.nan
    out["within_noise"] = within_noise(df)
    if "check_passed" in df:  # a method's own proxy check (DeMix): failed if any seed's failed
        checked = df.dropna(subset=["check_passed"]).groupby("method")
        out["check_spearman"] = checked["check_spearman"].mean()
        out["check_passed"] = checked["check_passed"].all()
    out["eval_split"] = g["eval_split"].agg(lambda s: "/".join(sorted(set(s))))
    return out.sort_values("objective_loss", kind="stable")


def hours_label(df: pd.DataFrame) -> str:
    """GPU-hours only when every search ran on a GPU (DESIGN.md: cost)."""
    return "GPU-hours" if df["device"].str.startswith("cuda").all() else "device-hours"


def mean_std_cell(mean: float, std: float, fmt: str, pm: str) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:{fmt}}" if pd.isna(std) else f"{mean:{fmt}}{pm}{std:{fmt}}"


def results_table(df: pd.DataFrame, metric: str = "auto") -> pd.DataFrame:
    """The paper-layout table of strings: a row per method (metric: see `quality`)."""
    s = summarize(df, metric)
    bench, higher, _ = quality(df, metric)
    pm, fmt = " ± ", (".1f" if higher else ".3f")
    table = pd.DataFrame(index=s.index)
    split = "/".join(sorted(set(s["eval_split"]))) or "test"
    table[f"Objective loss ({split})"] = [("≈ " if near else "") + mean_std_cell(m, v, ".3f", pm) for m, v, near in
                                         zip(s["objective_loss"], s["objective_loss std"], s["within_noise"])]
    for c in bench:
        table[c.split(":", 1)[1]] = [mean_std_cell(m, v, fmt, pm) for m, v in zip(s[c], s[f"{c} std"])]
    table["Avg" if higher else "Avg loss"] = [mean_std_cell(m, v, fmt, pm) for m, v in zip(s["average"], s["average std"])]
    table["#Best"] = [f"{b}/{len(bench)}" for b in s["best_on"]]
    table[f"Search {hours_label(df)}"] = [mean_std_cell(m, v, ".3g", pm) for m, v in zip(s["search_hours"], s["search_hours std"])]
    table["FLOPs"] = [f"{f:.2e}" for f in s["search_flops"]]
    table["Proxy runs"] = [f"{p:g}" for p in s["proxy_runs"]]
    table["x FastMix"] = ["-" if pd.isna(x) else f"{x:.3g}" for x in s["x_fastmix"]]
    table["Seeds"] = s["seeds"].astype(int)
    if "check_passed" in s:
        table["Proxy check"] = ["-" if pd.isna(ok) else f"ρ={r:.2f} " + ("ok" if ok else "FAILED")
                                for r, ok in zip(s["check_spearman"], s["check_passed"])]
    table.index.name = "Method"
    return table


def per_source(df: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """The mean over seeds of the `<prefix>:<source>` columns: a row per source, a
    column per method."""
    t = df.groupby("method", sort=False)[_columns(df, f"{prefix}:")].mean().T
    t.index = [c.split(":", 1)[1] for c in t.index]
    t.index.name = "source"
    return t


def mixtures_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean weight of each source (rows) per method (columns)."""
    return per_source(df, "weight")


def reported_beside(df: pd.DataFrame, setting: str) -> pd.DataFrame:
    """Measured cost multiples beside those the papers report for `setting`."""
    rep = yaml.safe_load(REPORTED.read_text())
    if setting not in rep:
        raise TableError(f"unknown --paper {setting!r}: pick one of {', '.join(rep)} (analysis/reported.yaml)")
    methods = rep[setting].get("methods", {})
    s = summarize(df)
    rows = []
    for m in sorted(set(s.index) | set(methods)):
        r = methods.get(m, {})
        speed = r.get("speedup_vs_fastmix")
        rows.append({"Method": m, "measured x FastMix": s["x_fastmix"].get(m, np.nan),
                     "reported x FastMix": "/".join(f"{v:g}" for v in speed) if speed else
                     ("1" if m == "fastmix" else "-"),
                     "measured search h": s["search_hours"].get(m, np.nan),
                     "reported GPU-h": r.get("search_gpu_hours", "-"),
                     "reported average": r.get("average", "-")})
    return pd.DataFrame(rows).set_index("Method")


def write_tables(root: Path, out: Path | None = None, paper: str | None = None) -> dict[str, str]:
    """Write results.{md,csv,tex}, mixtures.{md,csv,tex}, runs.csv (+ reported.md);
    returns the Markdown texts. Everything is built before anything is written."""
    df = load_results(root)
    out = Path(out) if out else Path(root) / "tables"
    results, mixtures = results_table(df), mixtures_table(df)
    texts = {"results": results.to_markdown(), "mixtures": mixtures.to_markdown(floatfmt=".3f")}
    if quality(df)[1]:  # benchmark scores: the validation losses get a table of their own
        texts["val_loss"] = results_table(df, "val").to_markdown()
    if paper:
        texts["reported"] = reported_beside(df, paper).to_markdown(floatfmt=".3g")
    files = {"results.md": texts["results"] + "\n",
             # escape=True for # and _ in names; then the ± of mean ± std as math
             "results.tex": results.to_latex(escape=True).replace("±", r"$\pm$"),
             "results.csv": summarize(df).to_csv(),
             "mixtures.md": texts["mixtures"] + "\n",
             "mixtures.tex": mixtures.to_latex(float_format="%.3f", escape=True),
             "mixtures.csv": mixtures.to_csv(),
             "runs.csv": df.to_csv(index=False)}
    if "val_loss" in texts:
        files["val_loss.md"] = texts["val_loss"] + "\n"
    if paper:
        files["reported.md"] = texts["reported"] + "\n"
    for name, text in files.items():
        records.write_text_atomic(out / name, text)
    return texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="a sweep folder (outputs/sweep/<name>) or any folder of run folders")
    ap.add_argument("--out", type=Path, default=None, help="where to write the tables (default <sweep>/tables)")
    ap.add_argument("--paper", default=None, help="print the papers' figures beside ours: pretrain | posttrain")
    return run_tool(ap, lambda args: print_sections(write_tables(args.sweep, args.out, args.paper)), argv)


if __name__ == "__main__":
    sys.exit(main())
