"""A sweep's report: tables + plots, and optionally the README's results section.

`python -m analysis.report outputs/sweep/demo [--paper pretrain] [--readme README.md]`
writes <sweep>/tables/ and <sweep>/plots/ and, with --readme, replaces the text
between `<!-- results:start -->` and `<!-- results:end -->` with the results
table, the mixtures and the cost-versus-quality plot (copied to docs/figures/),
stamped with the machine, the date and the sweep's wall time.

`SweepReport` does the same as a Hydra callback at the end of a sweep
(experiment=demo sets it), so one command runs the sweep and refreshes all.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback

from analysis.plots import write_plots
from analysis.tables import TableError, load_results, write_tables
from fastmix import records
from fastmix.cli import print_sections, run_tool

START, END = "<!-- results:start -->", "<!-- results:end -->"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux: the platform's name will do
        pass
    import torch
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{len(os.sched_getaffinity(0))} cores of {cpu}{gpu}"


def sweep_wall_hours(sweep: Path) -> float | None:
    """From the first job's start to the last job's end, as each job's status.json
    records them (a re-run that skips a job keeps its times). None when a job does
    not say (a folder from before the times were kept): no number beats a wrong one."""
    times = [records.read_json(p) for p in sweep.glob("*/status.json")]
    starts = [t.get("started") for t in times]
    ends = [t.get("finished") for t in times]
    if not times or None in starts or None in ends:
        return None
    return (max(ends) - min(starts)) / 3600


def readme_section(sweep: Path, texts: dict[str, str], figure: Path, readme: Path, command: str) -> str:
    df = load_results(sweep)
    wall = sweep_wall_hours(sweep)
    rel = os.path.relpath(figure, readme.parent)
    lines = [START,
             f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; {len(df)} jobs "
             f"({df['method'].nunique()} methods x {df['seed'].nunique()} seeds)"
             + (f", {wall * 60:.0f} min of wall time" if wall else "") + f". Regenerate with `{command}`.",
             "",
             "Every score is measured on the test split, which no search read. The headline is the first "
             "column, the job's objective on the test split (lower is better), mean ± std over seeds; "
             "`≈` marks a method within noise of the best: paired by seed, the 95% t-interval of its "
             "mean difference to the best reaches 0 (analysis/tables.py `within_noise`).",
             "", texts["results"], ""]
    if "val_loss" in texts:
        lines += ["Test-split loss of each target per source (lower is better):", "", texts["val_loss"], ""]
    objective_fig = figure.with_name(figure.name.replace("quality", "objective"))
    if objective_fig.exists():
        lines += [f"![cost versus objective loss]({rel.replace('quality', 'objective')})", ""]
    lines += [f"![cost versus quality]({rel})", ""]
    if figure.with_name(figure.name.replace("quality", "val_loss")).exists():
        lines += [f"![cost versus test-split loss]({rel.replace('quality', 'val_loss')})", ""]
    lines += ["Mixtures found (mean over seeds):", "", texts["mixtures"]]
    if "reported" in texts:
        lines += ["", "Beside the papers' reported figures (analysis/reported.yaml):", "", texts["reported"]]
    return "\n".join(lines + [END])


def report(sweep: Path, paper: str | None = None, readme: Path | None = None,
           command: str = "make demo") -> dict[str, str]:
    sweep = Path(sweep).absolute()
    texts = write_tables(sweep, None, paper)
    plots = write_plots(sweep)
    if readme:
        readme = Path(readme).absolute()
        text = readme.read_text()
        if START not in text or END not in text:
            raise TableError(f"{readme} has no {START} ... {END} markers: add them where the results go")
        figure = readme.parent / "docs" / "figures" / f"{sweep.name}_cost_vs_quality.png"
        figure.parent.mkdir(parents=True, exist_ok=True)
        for p in plots:
            if p.stem.startswith("cost_vs_"):
                shutil.copyfile(p, figure.with_name(f"{sweep.name}_{p.stem}.png"))
        head, rest = text.split(START, 1)
        records.write_text_atomic(readme, head + readme_section(sweep, texts, figure, readme, command)
                                  + rest.split(END, 1)[1])
    return texts


class SweepReport(Callback):
    """Hydra callback: the report of the sweep folder once every job returned."""

    def __init__(self, paper: str | None = None, readme: str | None = None, command: str = "make demo"):
        self.paper, self.readme, self.command = paper, readme, command

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            report(Path(config.hydra.sweep.dir), self.paper, Path(self.readme) if self.readme else None,
                   self.command)
        except TableError as e:  # no job finished: the summary already says why
            print(f"report: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--paper", default=None, help="pretrain | posttrain: the papers' figures beside ours")
    ap.add_argument("--readme", type=Path, default=None, help="replace this file's results section")
    return run_tool(ap, lambda args: print_sections(report(args.sweep, args.paper, args.readme)), argv)


if __name__ == "__main__":
    sys.exit(main())
