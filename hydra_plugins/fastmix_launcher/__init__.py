

from fastmix.cli import refuse_non_tool  # noqa: E402  `python -m hydra_plugins.fastmix_launcher.<not a tool>`: say so, exit 2

refuse_non_tool(__name__)
