"""The terminal shows what a person reads: this suite's INFO lines and everyone's
warnings (conf/hydra/job_logging/fastmix.yaml puts `SuiteInfo` on the console
handler; run.log keeps every logger's INFO)."""
from __future__ import annotations

import logging

# the suite's loggers: run.py ("run"), fastmix.run.sweep ("sweep"), the SLURM parts
# ("slurm"), every module's __name__ under fastmix/, baselines/, analysis/, and
# Hydra's own (which jobs a sweep launches)
SUITE = ("run", "sweep", "slurm", "fastmix", "baselines", "analysis", "hydra", "__main__")


class SuiteInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in SUITE


def quiet_library_bars() -> None:
    """Off: the datasets and transformers progress bars of bookkeeping steps that take
    well under a second ("Generating test split", "Writing model shards"), printed
    once per task or save; the suite's own bars follow `progress`."""
    try:
        import datasets
        datasets.disable_progress_bars()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
