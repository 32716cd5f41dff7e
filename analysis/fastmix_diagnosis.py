"""FastMix's search, step by step: why its mixture goes where it goes.

`python -m analysis.fastmix_diagnosis RUN_DIR [--landscape landscapes/k3]` reads a
FastMix run folder's search_trace.jsonl (run it with `optimizer.diagnose_every=N` for
the held-out objective) and writes RUN_DIR/fastmix_diagnosis.png: w per source over
the outer steps, dashed at the landscape's fitted optimum for the run's objective
(objectives.csv, matched by the objective's identity), and the objective's loss on
the fixed outer-step batch and on held-out val rows, with w's entropy. It prints
the numbers the collapse analysis needs (docs/DECISIONS.md, "FastMix at small
scale"): the mean hypergradient per source, the step where the held-out objective
is lowest, and the final w and entropy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.plots import plt, save_figure
from analysis.tables import TableError
from fastmix.cli import run_tool
from fastmix import records


def load_trace(run: Path) -> pd.DataFrame:
    """A row per outer step: w_<source>, g_<source> (the hypergradient), dz_<source>
    (z's gradient), entropy,
    objective_loss and, where recorded, heldout_objective_loss."""
    path = Path(run) / "search_trace.jsonl"
    if not path.exists():
        raise TableError(f"{path} does not exist: give a FastMix run folder (optimizer=fastmix) "
                         "that finished its search.")
    trace = records.read_jsonl(path)
    if not trace or "hypergradient" not in trace[0]:
        raise TableError(f"{path} is not a FastMix trace (no hypergradient): give an optimizer=fastmix run.")
    rows = []
    for t in trace:
        w = t["weights"]
        row = {"step": t["step"], "objective_loss": t["objective_loss"],
               "entropy": t.get("entropy", float(-sum(v * np.log(max(v, 1e-300)) for v in w.values()))),
               "heldout_objective_loss": t.get("heldout_objective_loss", np.nan)}
        row.update({f"w_{k}": v for k, v in w.items()})
        row.update({f"g_{k}": v for k, v in t["hypergradient"].items()})
        row.update({f"dz_{k}": v for k, v in t["z_grad"].items()})
        rows.append(row)
    return pd.DataFrame(rows).set_index("step")


def fitted_optimum(landscape: Path, objective_id: str) -> dict[str, float] | None:
    """The landscape's fitted optimum for the objective with this identity, if it has it."""
    objs = pd.read_csv(Path(landscape) / "objectives.csv")
    hit = objs[objs["id"] == objective_id]
    if hit.empty:
        return None
    return {c.split(":", 1)[1]: float(hit.iloc[0][c]) for c in objs.columns if c.startswith("optimum:")}


def summary(tr: pd.DataFrame) -> dict:
    sources = [c[2:] for c in tr.columns if c.startswith("w_")]
    held = tr["heldout_objective_loss"].dropna()
    return {"outer_steps": len(tr),
            "mean_hypergradient": {s: float(tr[f"g_{s}"].mean()) for s in sources},
            # what moves w: the softmax chain's d/dz (each source's g against w's average)
            "mean_z_grad": {s: float(tr[f"dz_{s}"].mean()) for s in sources},
            "final_weights": {s: float(tr[f"w_{s}"].iloc[-1]) for s in sources},
            "final_entropy": float(tr["entropy"].iloc[-1]),
            "heldout_best_step": int(held.idxmin()) if len(held) else None,
            "heldout_first_last_best": ([float(held.iloc[0]), float(held.iloc[-1]), float(held.min())]
                                        if len(held) else None)}


def figure(tr: pd.DataFrame, best: dict[str, float] | None = None):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    sources = [c[2:] for c in tr.columns if c.startswith("w_")]
    colors = plt.get_cmap("tab10")
    for i, s in enumerate(sources):
        a.plot(tr.index, tr[f"w_{s}"], color=colors(i % 10), label=s)
        if best and s in best:
            a.axhline(best[s], color=colors(i % 10), ls="--", lw=1)
    a.set_xlabel("proxy step")
    a.set_ylabel("w (dashed: the landscape's fitted optimum)" if best else "w")
    a.legend(fontsize=7)
    b.plot(tr.index, tr["objective_loss"], color="0.6", lw=0.8, label="objective, fixed outer-step batch")
    held = tr["heldout_objective_loss"].dropna()
    if len(held):
        b.plot(held.index, held, "o-", color="C3", ms=3, label="objective, held-out val rows")
    b.set_xlabel("proxy step")
    b.set_ylabel("objective loss")
    e = b.twinx()
    e.plot(tr.index, tr["entropy"], color="C0", ls=":", label="entropy of w (nats)")
    e.set_ylabel("entropy of w (nats)")
    b.legend(fontsize=7, loc="upper right")
    e.legend(fontsize=7, loc="lower left")
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a FastMix run folder (holds search_trace.jsonl)")
    ap.add_argument("--landscape", type=Path, default=None,
                    help="a landscape folder (objectives.csv): dashes at its fitted optimum")
    ap.add_argument("--out", type=Path, default=None, help="the figure (default RUN/fastmix_diagnosis.png)")

    def run(args):
        tr = load_trace(args.run)
        best = None
        if args.landscape is not None:
            if not (args.landscape / "objectives.csv").exists():
                raise TableError(f"{args.landscape / 'objectives.csv'} does not exist: give a landscape folder "
                                 "(landscapes/k3, or a sweep's oracle/).")
            result = args.run / "result.json"
            oid = records.read_json(result)["objective"].get("id") if result.exists() else None
            best = fitted_optimum(args.landscape, oid) if oid else None
        out = args.out or args.run / "fastmix_diagnosis.png"
        save_figure(figure(tr, best), out)
        for k, v in summary(tr).items():
            print(f"{k}: {v}")
        print(out)
    return run_tool(ap, run, argv)


if __name__ == "__main__":
    sys.exit(main())
