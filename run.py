"""FastMix Bench entry point: `python run.py [group=option ...] [-m for sweeps]`.

Composes the config (conf/), runs the job's stages (fastmix.run.pipeline), and
leaves a run folder that analysis/ reads. Bad input stops with one message and
a non-zero exit; a failed job writes error.txt and never DONE. A folder with DONE
is skipped if DONE records the same config, else re-run (fastmix.records.check_done);
every job ends with a few lines on what it found and cost. In a sweep a
failed job does not stop the others: fastmix.run.sweep summarises them at the end.
"""
import logging
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from fastmix import records
from fastmix.config import register_resolvers
from fastmix.errors import UserError
from fastmix.records import write_text_atomic
from fastmix.run import sweep
from fastmix.train import distributed

register_resolvers()
log = logging.getLogger("run")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> str:
    from fastmix.run.pipeline import run_job  # heavy imports after Hydra parsed the command line

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    if cfg.threads is None and multirun:
        cfg.threads = sweep.job_threads(hc.launcher)
    started = time.time()
    try:
        done = records.check_done(run_dir, cfg)  # DONE of the same config (fastmix.records: the rule)
        if done.skip:
            log.info("skipped: %s has DONE (%s)%s", run_dir, done.why, records.summary_of(run_dir))
            sweep.write_status(run_dir, "skipped", note=done.why)
            return "skipped"
        if done.why:
            log.info("re-run: %s has DONE, %s", run_dir, done.why)
            if distributed.is_main():
                records.clear_results(run_dir)  # DONE first: a failed re-run leaves no stale row
        row = run_job(cfg, run_dir)
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
    sweep.write_status(run_dir, "finished", started=started, note=done.why or None)
    if distributed.is_main():
        log.info("done\n%s", records.summary(row, run_dir))
    return "finished"


if __name__ == "__main__":
    main()
    sys.exit(sweep.exit_code())
