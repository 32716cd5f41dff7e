"""FastMix Bench entry point: `python run.py [group=option ...] [-m for sweeps]`.

Composes the config (conf/), runs the job's stages (fastmix.pipeline), and
leaves a run folder that analysis/ reads. Bad input stops with one message and
a non-zero exit; a failed job writes error.txt and never DONE.
"""
import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from fastmix.config import register_resolvers
from fastmix.errors import UserError
from fastmix.records import is_done, write_text_atomic

register_resolvers()
log = logging.getLogger("run")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    from fastmix.pipeline import run_job  # heavy imports after Hydra parsed the command line

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if is_done(run_dir):
        log.info("skipped: %s has DONE", run_dir)
        return
    try:
        run_job(cfg, run_dir)
    except UserError as e:
        write_text_atomic(run_dir / "error.txt", f"error: {e}\n")
        if hc.mode == RunMode.MULTIRUN:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        write_text_atomic(run_dir / "error.txt", traceback.format_exc())
        raise
    log.info("done: %s", run_dir)


if __name__ == "__main__":
    main()
