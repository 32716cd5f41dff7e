"""Regret against the oracle's fitted landscape: how far each method's mixture lands
from the best one, objective by objective (analysis/regret.py has the statistics).

`python -m analysis.oracle OUT [--landscape DIR] [--objective 'name=src:w,src:w']
[--objective-text name=FILE]` reads a sweep's method jobs (experiment=oracle) and the
landscape they are scored against (DIR; else the jobs' `oracle.landscape`; else
OUT/oracle, where an optimizer=oracle job of the sweep wrote one), and writes into
OUT/oracle/:

* regret.csv: a row per (objective, method, seed): `regret` (fitted loss at the
  method's mixture minus the fitted optimum), `normalized_regret` (/ uniform's
  regret: 0 = found the best, 1 = no better than uniform), `regret_fit_std` (over
  the fit's bootstrap refits), the search cost, the weights, and for a job that
  trained its target its `trained_loss` beside the `fitted_loss`;
* regret.md: the leaderboard (tuning and held-out objectives apart), the
  methods x objectives matrix, the objectives and their fitted optima, the fit's
  error against the noise floor, the verification jobs, the budget check;
* landscape.csv, fit.json, objectives.csv: the landscape's, copied when it lives elsewhere;
* regret_vs_cost.png and landscape.png (a ternary map per objective for 3 sources,
  the fitted optima's weights for more).

`--objective` adds a weighting of the sources at analysis time (scored for the jobs
that searched for it: same definition, whatever their config called it);
`--objective-text` a text the landscape scored (registered in oracle.texts).
Reads outputs/ and the landscape's files only.
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

from analysis.plots import NO_SEARCH_HOURS, save_figure
from analysis.regret import Landscape, budget_stability, leaderboard, per_objective
from analysis.tables import TableError, hours_label, load_results
from baselines.oracle import noise_floor
from baselines.oracle_suite import parse_weights
from fastmix import records
from fastmix.cli import run_tool
from fastmix.errors import UserError
from fastmix.search.objective import file_identity, weights_identity

HOW = ("train one: python run.py -m experiment=oracle_landscape landscape=k3 (or your data with an "
       "oracle.suite), or pass --landscape DIR (the shipped landscapes/k3, landscapes/k5)")


def find_landscape(df: pd.DataFrame, root: Path, given: Path | None) -> Path:
    """The landscape folder: `given`, else the jobs' oracle.landscape, else the sweep's oracle/."""
    candidates = [given] if given else []
    for d in df["dir"]:
        conf = (records.read_json(Path(d) / "result.json").get("config") or {}).get("oracle") or {}
        if conf.get("landscape"):
            candidates.append(Path(conf["landscape"]))
            break
    candidates.append(root / "oracle")
    for c in candidates:
        if (Path(c) / "fit.json").exists():
            return Path(c)
    raise TableError(f"no landscape for {root} (looked in {', '.join(map(str, candidates))}): regret needs "
                     f"the fitted landscape; " + HOW)


def objectives(fit: dict, land: pd.DataFrame, added: list[str], texts: list[str]) -> pd.DataFrame:
    """The suite's objectives and any added at analysis time: name, role, id, columns, floor."""
    rows = [{k: e[k] for k in ("name", "role", "id", "definition", "columns")} | {"floor": e["noise_floor"]["std"]}
            for e in fit["suite"]]
    text_ids = {n: t["id"] for n, t in fit["texts"].items()}
    for spec in added:
        name, _, body = spec.partition("=")
        w = parse_weights(body, fit["sources"])
        rows.append({"name": name, "role": "added", "id": weights_identity(w), "definition": body,
                     "columns": {f"loss:{s}": v for s, v in w.items()}})
    for spec in texts:
        name, _, path = spec.partition("=")
        ident = file_identity(Path(path))
        match = [n for n, t in text_ids.items() if t == ident]
        if not match:
            raise UserError(f"--objective-text {path}: the landscape did not score this text and keeps no models "
                            f"to score it now (oracle.keep_models is not built yet): register it in oracle.texts "
                            f"and train the landscape again.")
        rows.append({"name": name, "role": "added", "id": ident, "definition": f"text {path}",
                     "columns": {f"loss:{match[0]}": 1.0}})
    base = land[land["tokens"] == land["tokens"].min()]
    for r in rows:
        r.setdefault("floor", None)
        if r["floor"] is None:
            r["floor"] = noise_floor(base, r["columns"])["std"]
    out = pd.DataFrame(rows).drop_duplicates("id", keep="first")
    return out[out["role"] != "job"] if (out["role"] != "job").any() else out


def regret_rows(df: pd.DataFrame, L: Landscape, objs: pd.DataFrame) -> pd.DataFrame:
    """A row per job whose objective is one of `objs` (matched by definition)."""
    by_id = objs.set_index("id")
    uniform = np.full((1, len(L.sources)), 1.0 / len(L.sources))
    out = []
    for _, r in df[df["objective_id"].isin(by_id.index)].iterrows():
        e = by_id.loc[r["objective_id"]]
        W = np.array([[r.get(f"weight:{s}", 0.0) for s in L.sources]], float)
        regret, boot = L.regret(e["columns"], W)
        uni = L.regret(e["columns"], uniform)[0][0]
        trained = r["objective_loss"] if r.get("scored_by") != "fitted landscape" else None
        out.append({"objective": e["name"], "role": e["role"], "method": r["method"], "seed": r["seed"],
                    # normalised only where uniform is measurably off the optimum: below the floor the
                    # ratio divides by noise (docs/DECISIONS.md "Normalised regret")
                    "regret": float(regret[0]),
                    "normalized_regret": float(regret[0] / uni) if uni > (e["floor"] or 1e-9) else np.nan,
                    "regret_fit_std": float(np.std(boot[:, 0], ddof=1)) if len(boot) > 1 else np.nan,
                    "boot": boot[:, 0] if len(boot) else None, "search_hours": r["search_hours"],
                    "fitted_loss": float(L.loss(e["columns"], W)[0]), "trained_loss": trained,
                    **{s: W[0, i] for i, s in enumerate(L.sources)},
                    **({"variant": r["variant"]} if "variant" in r else {})})
    if not out:
        raise TableError(f"no job searched for an objective of this landscape ({', '.join(objs['name'])}): "
                         f"run experiment=oracle with its landscape, or add theirs with --objective")
    return pd.DataFrame(out)


def _cell(mean, half, fmt=".3f"):
    return "-" if pd.isna(mean) else (f"{mean:{fmt}}" if pd.isna(half) else f"{mean:{fmt}} ± {half:{fmt}}")


def summary_text(fit: dict, objs: pd.DataFrame, per: pd.DataFrame, board: pd.DataFrame, rows: pd.DataFrame,
                 budget: pd.DataFrame, hours: str, corpus_note: str) -> str:
    L = Landscape(fit)
    out = [corpus_note] if corpus_note else []
    for role in [r for r in ("tuning", "held_out", "added") if r in set(board["role"])]:
        b = board[board["role"] == role]
        t = pd.DataFrame({"Method": b["method"], "Normalised regret (mean ± 95% CI over objectives)":
                          [_cell(m, h, ".2f") for m, h in zip(b["normalized_regret"], b["ci"])],
                          "Wins": b["wins"], "Ties (≈)": b["ties"], "Objectives": b["objectives"],
                          f"Search {hours}": [f"{h:.3g}" for h in b["search_hours"]],
                          "x FastMix": ["-" if pd.isna(x) else f"{x:.3g}" for x in b["x_fastmix"]]})
        out += [f"**{role.replace('_', '-')} objectives** ({b['objectives'].max()}):", "",
                t.to_markdown(index=False), ""]
    m = per.pivot(index="method", columns="objective", values="normalized_regret")
    raw = per.pivot(index="method", columns="objective", values="regret")
    near = per.pivot(index="method", columns="objective", values="within_noise")
    cells = m.combine(raw, lambda a, b: pd.Series([f"{x:.2f}" if pd.notna(x) else
                                                   ("-" if pd.isna(y) else f"({y:+.3f})") for x, y in zip(a, b)],
                                                  index=a.index))
    cells = cells.where(~near.fillna(False).astype(bool), "≈ " + cells)
    order = [o for o in objs["name"] if o in cells.columns]
    out += ["Normalised regret per objective (`≈`: within noise of the optimum, an equivalence test; "
            "in parentheses the raw regret where uniform's own is below the noise floor, so no ratio is drawn):", "",
            cells[order].to_markdown(), ""]
    o = objs.copy()
    o["fitted optimum"] = [", ".join(f"{s}={v:.2f}" for s, v in zip(L.sources, L.optimum(c)[0]) if v >= 0.005)
                           for c in o["columns"]]
    o["fitted loss"] = [f"{L.optimum(c)[1]:.3f}" for c in o["columns"]]
    o["noise floor"] = [f"{f:.3f}" if f else "-" for f in o["floor"]]
    out += ["Objectives (fitted optimum on the fit's fine grid):", "",
            o[["name", "role", "definition", "fitted optimum", "fitted loss", "noise floor"]].to_markdown(index=False), ""]
    cols = fit["columns"]
    fl = fit["noise_floor"]
    ft = pd.DataFrame({"column": list(cols), "form": [c["form"] for c in cols.values()],
                       "LOO RMSE": [f"{c['loo_rmse']:.3f}" for c in cols.values()],
                       "noise floor": [f"{fl[c]['std']:.3f}" if fl[c]["std"] else "-" for c in cols],
                       "LOO / floor": [f"{cols[c]['loo_rmse'] / fl[c]['std']:.2f}" if fl[c]["std"] else "-" for c in cols]})
    out += ["Fit per loss column (form chosen by leave-one-out error; the floor: pooled seed std of the "
            f"{fl[next(iter(cols))]['mixtures']} mixtures trained at 2+ seeds):", "", ft.to_markdown(index=False), ""]
    ver = rows[rows["trained_loss"].notna() & (rows["method"] != "oracle")]
    if len(ver):
        v = ver[["objective", "method", "seed", "trained_loss", "fitted_loss"]].copy()
        v["|trained - fitted|"] = (v["trained_loss"] - v["fitted_loss"]).abs()
        v["floor"] = [objs.set_index("name").loc[n, "floor"] for n in v["objective"]]
        out += [f"Verification: {len(v)} jobs trained their target; median |trained - fitted| "
                f"{v['|trained - fitted|'].median():.3f} against a median floor of {v['floor'].median():.3f}:", "",
                v.to_markdown(index=False, floatfmt=".3f"), ""]
    if len(budget):
        out += [f"Budget check: {budget['mixtures'].iloc[0]} mixtures trained again at "
                f"{fit.get('budget_factor', 4)}x the tokens; Spearman of their losses between budgets, per objective "
                f"(median {budget['spearman'].median():.2f}):", "", budget.to_markdown(index=False, floatfmt=".2f"), ""]
    return "\n".join(out)


def regret_vs_cost(board: pd.DataFrame, hours: str, ax=None):
    """Each method's mean normalised regret over every objective against its search cost."""
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    g = board.groupby("method").agg(nr=("normalized_regret", "mean"), h=("search_hours", "mean"))
    for m, row in g.iterrows():
        if row["h"] < NO_SEARCH_HOURS:  # no search: a line across
            ax.axhline(row["nr"], ls="--", lw=1, color="grey")
            ax.annotate(f"{m} (no search)", (0.01, row["nr"]), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 3), color="grey", fontsize=8)
        else:
            ax.plot(row["h"], row["nr"], "k*" if m == "oracle" else "o", ms=10 if m == "oracle" else 6)
            ax.annotate(m, (row["h"], row["nr"]), textcoords="offset points", xytext=(5, 4))
    if (g["h"] >= NO_SEARCH_HOURS).any():
        ax.set_xscale("log")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel(f"search cost ({hours}, log scale)")
    ax.set_ylabel("normalised regret, mean over objectives")
    return ax


def _xy(w: np.ndarray):
    return w[:, 1] + w[:, 2] / 2, w[:, 2] * math.sqrt(3) / 2


def landscape_figure(L: Landscape, objs: pd.DataFrame, rows: pd.DataFrame):
    """3 sources: per objective the fitted landscape on the simplex, its optimum (star) and
    every method's mixtures; more: each objective's fitted optimum as stacked weights."""
    n = len(objs)
    if len(L.sources) != 3:
        fig, ax = plt.subplots(figsize=(8, 0.4 * n + 1.5))
        opt = np.array([L.optimum(c)[0] for c in objs["columns"]])
        left = np.zeros(n)
        for i, s in enumerate(L.sources):
            ax.barh(objs["name"], opt[:, i], left=left, label=s)
            left += opt[:, i]
        ax.set_xlabel("fitted optimum's weights")
        ax.legend(fontsize=7, ncol=len(L.sources), loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
        return fig
    cols = min(3, n)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4 * cols, 3.6 * math.ceil(n / cols)), squeeze=False)
    x, y = _xy(L.grid)
    methods = sorted(set(rows["method"]) - {"oracle"})
    for ax, (_, o) in zip(axes.flat, objs.iterrows()):
        ax.tricontourf(x, y, L.loss(o["columns"], L.grid), levels=14, cmap="viridis_r")
        ax.plot(*_xy(L.optimum(o["columns"])[0][None]), "r*", ms=14, clip_on=False, zorder=3)
        for m, marker in zip(methods, "osD^v<>ph8"):
            w = rows[(rows["objective"] == o["name"]) & (rows["method"] == m)][L.sources].to_numpy(float)
            if len(w):
                ax.scatter(*_xy(w), marker=marker, s=22, edgecolor="black", label=m, clip_on=False, zorder=4)
        ax.set_title(f"{o['name']} ({o['role']})", fontsize=9)
        ax.plot([0, 1, 0.5, 0], [0, 0, math.sqrt(3) / 2, 0], "k-", lw=1)
        ax.set_aspect("equal")
        ax.axis("off")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=8, frameon=False)
    fig.suptitle(f"fitted landscapes over {', '.join(L.sources)} (corners: first at left, second right, "
                 f"third top); star: fitted optimum", fontsize=9)
    return fig


def describe_landscape(where: Path) -> str:
    """A landscape on its own (no method jobs): its targets, each objective's fitted optimum
    against its best design mixture and its checks, the fit's error against the floor, the
    budget check. `python -m analysis.oracle --landscape DIR`."""
    where = Path(where)
    if not (where / "fit.json").exists():
        raise TableError(f"{where} holds no fit.json: " + HOW)
    fit, land = records.read_json(where / "fit.json"), pd.read_csv(where / "landscape.csv")
    L, objs = Landscape(fit), objectives(fit, land, [], [])
    names = fit["sources"]
    stages = land["stage"].value_counts()
    rows = []
    for _, o in objs.iterrows():
        opt, best = L.optimum(o["columns"])
        loss = sum(land[c] * a for c, a in o["columns"].items())
        design = land[land["stage"] == "design"].assign(loss=loss)
        top = design.loc[design["loss"].idxmin()]
        # the checks were trained at the builder's optimum (fit.json's suite entry); the rounded
        # parameters of fit.json can move the recomputed one by a grid step
        built = {e["id"]: e.get("optimum") for e in fit.get("suite", [])}.get(o["id"])
        at = np.array([built[s] for s in names]) if built else opt
        label = "mix_" + "-".join(f"{round(v * 1000):d}" for v in np.round(at, 3) / np.round(at, 3).sum())
        mask = (land["stage"] == "check") & (land["mixture"] == label)
        check = land[mask].assign(loss=loss[mask])  # (pandas 3: assigning a longer Series to an empty frame grows it)
        rows.append({"objective": o["name"], "role": o["role"], "definition": o["definition"],
                     "fitted optimum": ", ".join(f"{s}={v:.2f}" for s, v in zip(names, opt) if v >= 0.005),
                     "fitted": best, "trained there (seeds)": (f"{check['loss'].mean():.3f} ({len(check)})"
                                                               if len(check) else "-"),
                     "best design mixture": ", ".join(f"{s}={top[s]:.2f}" for s in names if top[s] >= 0.005),
                     "its loss": top["loss"], "floor": o["floor"]})
    t = pd.DataFrame(rows)
    cols, fl = fit["columns"], fit["noise_floor"]
    ft = pd.DataFrame({"column": list(cols), "form": [c["form"] for c in cols.values()],
                       "LOO RMSE": [c["loo_rmse"] for c in cols.values()], "noise floor": [fl[c]["std"] for c in cols],
                       **{f: [c["candidates"].get(f, np.nan) for c in cols.values()] for f in
                          dict.fromkeys(f for c in cols.values() for f in c["candidates"])}})
    budget = budget_stability(land, {e["name"]: e["columns"] for _, e in objs.iterrows()})
    hours = sum(records.read_json(p)["cost"]["device_hours"] for p in (where / "units").rglob("record.json")) \
        if (where / "units").exists() else float("nan")
    out = [f"{len(land)} targets over {', '.join(names)} (" + ", ".join(f"{k} {v}" for k, v in stages.items())
           + f"), {hours:.2f} device-hours of training; corpus {fit['corpus']}.", "",
           t.to_markdown(index=False, floatfmt=".3f"), "",
           "Fit per loss column (LOO RMSE of every candidate form; the chosen one is the least):", "",
           ft.to_markdown(index=False, floatfmt=".3f"), ""]
    if len(budget):
        out += [f"Budget check ({budget['mixtures'].iloc[0]} mixtures at {fit.get('budget_factor', 4)}x the target's "
                f"tokens): median Spearman {budget['spearman'].median():.2f}; the best of them moves for "
                f"{int(budget['optimum_moved'].sum())} of {len(budget)} objectives.", "",
                budget.to_markdown(index=False, floatfmt=".2f"), ""]
    return "\n".join(out)


def variant_value(result: dict, key: str):
    """The value at dotted `key` of a result.json (search_info.movement_budget,
    config.optimizer.outer_every), None where it has none."""
    v = result
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return v


def label_variants(df: pd.DataFrame, key: str) -> pd.DataFrame:
    """Each job's method named with its value of `key` ("fastmix movement_budget=2"), so the
    rows of one method's settings are compared as methods; `variant` holds the value."""
    vals = [variant_value(records.read_json(Path(d) / "result.json"), key) for d in df["dir"]]
    if all(v is None for v in vals):
        raise TableError(f"--variant {key}: no job's result.json has it; give a dotted key of result.json, "
                         f"e.g. search_info.movement_budget or config.optimizer.outer_every")
    leaf = key.rsplit(".", 1)[-1]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    df = df.copy()
    df["variant"] = vals
    df["method"] = [m if v is None else f"{m} {leaf}={fmt(v)}" for m, v in zip(df["method"], vals)]
    return df


def variant_figure(rows: pd.DataFrame, variant: str, ax=None):
    """Mean regret per objective against the variant's value (issue 25's sensitivity
    curves): tuning objectives solid, held-out dashed."""
    ax = ax or plt.subplots(figsize=(7, 5))[1]
    num = rows[pd.to_numeric(rows["variant"], errors="coerce").notna()].copy()
    num["variant"] = num["variant"].astype(float)
    for (obj, role), g in num.groupby(["objective", "role"], sort=False):
        m = g.groupby("variant")["regret"].mean()
        ax.plot(m.index, m.to_numpy(), "o-" if role == "tuning" else "s--", label=f"{obj} ({role})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(variant)
    ax.set_ylabel("regret (fitted loss - fitted optimum), mean over seeds")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return ax


def write_oracle(root: Path, out: Path | None = None, landscape: Path | None = None,
                 added: list[str] = (), texts: list[str] = (), variant: str | None = None) -> str:
    """Write OUT/oracle/ (module docstring); returns regret.md's text. Everything is computed
    before anything is written. `variant`: a result.json key whose value names each job's
    row (a sensitivity sweep of one method), with variant.png."""
    root = Path(root)
    df = load_results(root)
    if variant:
        df = label_variants(df, variant)
    where = find_landscape(df, root, landscape)
    fit = records.read_json(where / "fit.json")
    land = pd.read_csv(where / "landscape.csv")
    missing = [s for s in fit["sources"] if f"weight:{s}" not in df]
    if missing:
        raise TableError(f"the jobs in {root} mix other sources than the landscape's {fit['sources']}: "
                         f"score them against a landscape of their sources")
    L = Landscape(fit)
    objs = objectives(fit, land, list(added), list(texts))
    rows = regret_rows(df, L, objs)
    per = per_objective(rows, dict(zip(objs["name"], objs["floor"])))
    board = leaderboard(per)
    budget = budget_stability(land, {e["name"]: e["columns"] for _, e in objs.iterrows()})
    other = sorted({c for c in df.get("corpus", pd.Series(dtype=str)).dropna()} - {fit["corpus"]})
    note = (f"Note: these jobs' corpus ({', '.join(other)}) is not the one the landscape was trained on "
            f"({fit['corpus']}): the embedded corpus is built from this machine's packages, so the regrets "
            f"below score these mixtures on another machine's landscape." if other else "")
    hours = hours_label(df)
    text = summary_text(fit, objs, per, board, rows, budget, hours, note)
    csv = rows.drop(columns=["boot"]).rename(columns={"search_hours": "search_device_hours"})
    out = Path(out) if out else root / "oracle"
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != where.resolve():
        for f in ("landscape.csv", "fit.json", "objectives.csv"):
            shutil.copyfile(where / f, out / f)
    records.write_text_atomic(out / "regret.csv", csv.to_csv(index=False))
    records.write_text_atomic(out / "regret.md", text + "\n")
    fig, ax = plt.subplots(figsize=(7, 5))
    regret_vs_cost(board, hours, ax)
    save_figure(fig, out / "regret_vs_cost.png")
    save_figure(landscape_figure(L, objs, rows), out / "landscape.png")
    if variant:
        save_figure(variant_figure(rows, variant).figure, out / "variant.png")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, nargs="?", help="a sweep folder of method jobs (experiment=oracle); "
                    "left out with --landscape: describe the landscape alone")
    ap.add_argument("--out", type=Path, default=None, help="where to write (default <sweep>/oracle)")
    ap.add_argument("--landscape", type=Path, default=None, help="the landscape folder (fit.json, landscape.csv)")
    ap.add_argument("--objective", action="append", default=[], metavar="NAME=SRC:W,SRC:W",
                    help="add an objective that weights the sources (repeatable)")
    ap.add_argument("--objective-text", action="append", default=[], metavar="NAME=FILE",
                    help="add an objective on a text the landscape scored (repeatable)")
    ap.add_argument("--variant", default=None, metavar="KEY",
                    help="a dotted result.json key (search_info.movement_budget): rows per value, variant.png")
    ap.add_argument("--readme", type=Path, default=None,
                    help="with --landscape alone: also write the description into this README's "
                         "landscape:<folder name> section")

    def go(a):
        if a.sweep is None:
            if a.landscape is None:
                raise TableError("give a sweep folder, or --landscape DIR to describe a landscape")
            text = describe_landscape(a.landscape)
            if a.readme:
                replace_section(a.readme, f"landscape:{a.landscape.name}",
                                f"{a.landscape.name}: measured {time.strftime('%Y-%m-%d')}. " + text)
            print(text)
        else:
            print(write_oracle(a.sweep, a.out, a.landscape, a.objective, a.objective_text, a.variant))
    return run_tool(ap, go, argv)



def markers(name: str) -> tuple[str, str]:
    """The README's markers of one landscape's leaderboard (`oracle:k3`) or description."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(readme: Path, name: str, body: str) -> None:
    start, end = markers(name)
    text = readme.read_text()
    if start not in text or end not in text:
        raise TableError(f"{readme} has no {start} ... {end} markers: add them where these results go")
    head, rest = text.split(start, 1)
    records.write_text_atomic(readme, head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1])


def readme_section(sweep: Path, text: str, readme: Path, command: str) -> str:
    """The README's leaderboard of one sweep: stamp, tables, the two figures (copied to docs/figures/)."""
    from analysis.report import machine, sweep_wall_hours
    df = load_results(sweep)
    wall = sweep_wall_hours(sweep)
    figures = readme.parent / "docs" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; {len(df)} jobs "
             f"({df['method'].nunique()} methods x {df['seed'].nunique()} seeds x "
             f"{df['objective_id'].nunique()} objectives)"
             + (f", {wall * 60:.0f} min of wall time" if wall else "") + f". Regenerate with `{command}`.", "",
             text, ""]
    for name in ("regret_vs_cost", "landscape"):
        src = sweep / "oracle" / f"{name}.png"
        if src.exists():
            shutil.copyfile(src, figures / f"{sweep.name}_{name}.png")
            lines += [f"![{name.replace('_', ' ')}]({os.path.relpath(figures / f'{sweep.name}_{name}.png', readme.parent)})", ""]
    return "\n".join(lines)


class OracleReport(Callback):
    """Hydra callback (experiment=oracle): the leaderboard and plots of the sweep once every
    job returned, and, given `readme`, its section for this landscape (`oracle:<landscape>`
    markers) rewritten. `variant`: as --variant (experiment=fastmix_sensitivity)."""

    def __init__(self, readme: str | None = None, command: str = "make oracle", variant: str | None = None):
        self.readme, self.command, self.variant = readme, command, variant

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir).absolute()
        try:
            text = write_oracle(sweep, variant=self.variant)
            if self.readme:
                land = config.hydra.runtime.choices.get("landscape") or "landscape"
                replace_section(Path(self.readme).absolute(), f"oracle:{land}",
                                readme_section(sweep, text, Path(self.readme).absolute(), self.command))
        except TableError as e:  # no landscape or no job finished: the summary already says what failed
            print(f"oracle report: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
