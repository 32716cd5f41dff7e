"""The SLURM launcher that skips finished jobs before submitting (Hydra finds launchers here)."""
from fastmix.cli import (
    refuse_non_tool,  # `python -m hydra_plugins.fastmix_launcher.<not a tool>`: say so, exit 2
)

refuse_non_tool(__name__)
