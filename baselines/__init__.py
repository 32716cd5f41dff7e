"""Reimplemented mixture-search methods, one file each, behind fastmix.search.optimizer's protocol."""

from fastmix.cli import refuse_non_tool  # noqa: E402  `python -m baselines.<not a tool>`: say so, exit 2

refuse_non_tool(__name__)
