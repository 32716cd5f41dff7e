"""FastMix Bench entry point: `python run.py [group=option ...] [-m for sweeps]`.

Composes the config (conf/), runs the job's stages (fastmix.pipeline), and
leaves a run folder that analysis/ reads. Bad input stops with one message and
a non-zero exit; a failed job writes error.txt and never DONE. In a sweep a
failed job does not stop the others: fastmix.sweep summarises them at the end.
"""
import logging
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from fastmix import distributed, sweep
from fastmix.config import register_resolvers
from fastmix.errors import UserError
from fastmix.records import is_done, write_text_atomic

register_resolvers()
log = logging.getLogger("run")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> str:
    from fastmix.pipeline import run_job  # heavy imports after Hydra parsed the command line

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    if is_done(run_dir):
        log.info("skipped: %s has DONE", run_dir)
        sweep.write_status(run_dir, "skipped")
        return "skipped"
    if cfg.threads is None and multirun:
        cfg.threads = sweep.job_threads(hc.launcher)
    started = time.time()
    try:
        run_job(cfg, run_dir)
    except Exception as e:
        bad_input = isinstance(e, UserError)
        if distributed.is_main():  # under DDP every rank fails alike; one writes
            write_text_atomic(run_dir / "error.txt", f"error: {e}\n" if bad_input else traceback.format_exc())
        if not multirun:
            if bad_input:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
            raise
        log.error("job failed: %s", e if bad_input else traceback.format_exc())
        sweep.write_status(run_dir, "failed", f"{type(e).__name__}: {e}".splitlines()[0][:300], started)
        return "failed"
    sweep.write_status(run_dir, "finished", started=started)
    log.info("done: %s", run_dir)
    return "finished"


if __name__ == "__main__":
    main()
    sys.exit(sweep.exit_code())
