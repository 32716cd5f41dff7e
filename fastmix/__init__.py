"""FastMix Bench: find and compare data mixtures for language-model training."""
import os

# Nothing may be downloaded at run time: every Hugging Face library that this
# package imports must find what it needs locally or fail with a clear error.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"

from fastmix.cli import refuse_non_tool  # noqa: E402  `python -m fastmix.<not a tool>`: say so, exit 2

refuse_non_tool(__name__)
