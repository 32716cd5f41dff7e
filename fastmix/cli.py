"""The one wrapper of the `python -m` tools (analysis.tables/plots/report/oracle,
baselines.regmix_replay, fastmix.export): parse the arguments, run, and turn bad input
(a `UserError`) into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback."""
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
