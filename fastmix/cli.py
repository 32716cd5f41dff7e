"""The one wrapper of the `python -m` tools (analysis.tables/plots/report/oracle,
baselines.regmix_replay, fastmix.run.export): parse the arguments, run, and turn bad input
(a `UserError`) into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback. And `refuse_non_tool`: a module that is not a tool, run
with `python -m`, says where the tools are and exits 2 instead of doing nothing."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fastmix.errors import UserError


def run_tool(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None],
             argv: list[str] | None = None) -> int:
    args = parser.parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def print_sections(sections: dict[str, str]) -> None:
    """A tool's named tables (markdown) on stdout, each under a `## name` heading."""
    for name, text in sections.items():
        print(f"## {name}\n\n{text}\n")


# every `python -m` entry point of the suite (besides `python run.py`)
TOOLS = ("analysis.tables", "analysis.plots", "analysis.report", "analysis.oracle", "analysis.fastmix_diagnosis",
         "baselines.regmix_replay",
         "fastmix.run.export", "fastmix.data.embedded", "fastmix.data.embedded.build",
         "fastmix.data.embedded.sft", "fastmix.data.embedded.texts")
# where a module's old command line went
MOVED = {"baselines.regmix": "baselines.regmix_replay", "fastmix.export": "fastmix.run.export",
         "fastmix.corpus": "fastmix.data.embedded", "fastmix.corpus.build": "fastmix.data.embedded.build",
         "fastmix.sft_corpus": "fastmix.data.embedded.sft"}


def refuse_non_tool(package: str) -> None:
    """Called by each package's __init__, which Python runs before `python -m
    <package>.<module>` runs the module: if that module is not a tool it would
    import and exit 0 having done nothing, so say where the tools are and exit 2."""
    argv = getattr(sys, "orig_argv", [])
    if "-m" not in argv[:-1]:
        return
    target = argv[argv.index("-m") + 1]
    if not target.startswith(package + ".") or target in TOOLS:
        return
    hint = (f"its command line is `python -m {MOVED[target]}`" if target in MOVED else
            "the tools are `python run.py` and " + ", ".join(f"`python -m {t}`" for t in TOOLS))
    print(f"error: {target} is not a tool (a library module does nothing when run as a program); "
          f"{hint}. See the README.", file=sys.stderr)
    raise SystemExit(2)
