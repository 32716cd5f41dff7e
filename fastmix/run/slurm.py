"""SLURM through Submitit: job states where SLURM keeps no accounting. (The sweep
launcher, `hydra/launcher=slurm`, is hydra_plugins/fastmix_launcher: Hydra finds
launchers only in the hydra_plugins package.)

Submitit polls `sacct` for job states. Where SLURM keeps no accounting
(`AccountingStorageType=accounting_storage/none`, common on small clusters and
on the single-node SLURM of `make test-slurm`) every poll fails and prints
sacct's error and Submitit's "Bypassing sacct error" warning, and Submitit
learns a job's state only from its result file. There `watch_with_squeue()`
makes the watcher ask `squeue`, which knows every job SLURM still holds
(finished ones for MinJobAge seconds): the output shows the sweep, and a task
that died without a result is seen as failed instead of waited for forever.
"""
from __future__ import annotations

import functools
import logging
import shutil
import subprocess

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger("slurm")


@functools.cache
def accounting_off() -> bool:
    """True when this cluster's SLURM stores no accounting (sacct cannot answer)."""
    if shutil.which("scontrol") is None:
        return False
    try:
        r = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.split("=", 1)[0].strip() == "AccountingStorageType" and "accounting_storage/none" in line
               for line in r.stdout.splitlines())


# SLURM's job states after which a job never runs again (squeue --help, JOB STATE CODES)
_FINAL = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"}
# the states Submitit's InfoWatcher.is_done reads as not finished
_SUBMITIT_LIVE = {"READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED"}


class SqueueWatcher(SlurmInfoWatcher):
    """Submitit's watcher, asking squeue (every state, array tasks one per line) and
    reading its answer in sacct's --parsable2 layout, as the parent class does."""

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()  # sacct -o ... --parsable2 -j ID -j ID ..., or None
        if command is None:
            return None
        ids = command[command.index("-j") + 1::2]
        return ["squeue", "--states=all", "--array", "--noheader", "--format=%i|%T|%N", "--jobs", ",".join(ids)]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        if not isinstance(string, str):
            string = string.decode()
        info = super().read_info("JobID|State|NodeList\n" + string)
        for stats in info.values():
            # squeue prints a live job's passing flag (SIGNALING while USR2 goes out,
            # CONFIGURING, STAGE_OUT, ...) as its state; Submitit reads any state it does
            # not list as live as finished, so these read as RUNNING
            if stats["State"] not in _FINAL and stats["State"] not in _SUBMITIT_LIVE:
                stats["State"] = "RUNNING"
        return info


def watch_with_squeue() -> None:
    """Where accounting is off, Submitit's SLURM jobs read their states from squeue
    (one watcher per process, shared by every SlurmJob; idempotent)."""
    if isinstance(SlurmJob.watcher, SqueueWatcher) or not accounting_off():
        return
    SlurmJob.watcher = SqueueWatcher(delay_s=SlurmJob.watcher._delay_s)
    log.info("SLURM keeps no accounting here: job states come from squeue instead of sacct")
