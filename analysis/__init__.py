"""Reads run folders under outputs/ and turns them into tables and plots:
`python -m analysis.tables|plots|report|oracle <sweep>` (see the README). Imports
flow one way: analysis reads what the runs wrote, nothing in fastmix/ or
baselines/ imports it.
"""

from fastmix.cli import refuse_non_tool  # noqa: E402  `python -m analysis.<not a tool>`: say so, exit 2

refuse_non_tool(__name__)
