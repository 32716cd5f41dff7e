"""Sweeps (`python run.py -m ...`): threads per job and the end-of-sweep summary.

Every launcher (basic, joblib, submitit_local, submitit_slurm) runs run.py's
task function once per job. A job never raises in a sweep: it writes
error.txt (the traceback), logs the traceback in its own log (Submitit's local
executor reports a failed job as completed, so its log is where the reason
shows) and returns. Each job also writes `status.json` with the sweep's id,
and `SweepSummary` (a Hydra callback, in the launching process) reads those
files when the sweep ends: what finished, what was skipped (DONE from an
earlier run) and what failed, plus any job that reported nothing (killed).
Files, not launcher return values, because they look the same whichever
launcher ran the job and on whichever node. Each finished or skipped job's line
gives its headline numbers from its result.json, and a job re-run because its
config changed says which keys changed.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fastmix import records
from fastmix.train import distributed

log = logging.getLogger("sweep")
SWEEP_ID = "FASTMIX_SWEEP_ID"  # env var: set by the launching process, inherited by every job
_failed: list[str] = []  # this process's last sweep: the failed jobs (run.py's exit code)


def job_threads(launcher: DictConfig | None) -> int | None:
    """Torch threads for one job of a sweep when the config leaves `threads` null:
    the launcher's CPUs per task (Submitit) or the cores shared among joblib's
    parallel jobs, so parallel jobs do not oversubscribe the cores."""
    if launcher is None:
        return None
    target = str(launcher.get("_target_", ""))
    if "Joblib" in target:
        cores = len(os.sched_getaffinity(0))
        n_jobs = launcher.get("n_jobs") or -1
        workers = cores if n_jobs < 0 else min(n_jobs, cores)
        return max(1, cores // workers)
    if "submitit" in target:
        return launcher.get("cpus_per_task") or None
    return None


def write_status(run_dir: Path, status: str, error: str | None = None, started: float | None = None,
                 note: str | None = None) -> None:
    """The job's outcome for the summary; only inside a sweep (the id is set).
    `note`: why a job with DONE was skipped or re-run (fastmix.records.check_done).
    `started`/`finished` are when the job did its work: a skipped job keeps the
    times of the run that did it, so a re-run's report still gives the sweep's
    real wall time (analysis.report.sweep_wall_hours)."""
    sweep_id = os.environ.get(SWEEP_ID)
    if not (sweep_id and distributed.is_main()):
        return
    path = Path(run_dir) / "status.json"
    times = {"started": started, "finished": time.time()}
    if status == "skipped":
        try:
            old = records.read_json(path)
            times = {k: old.get(k) for k in times}
        except (OSError, ValueError):
            times = {"started": None, "finished": None}
    records.write_json(path, {"sweep_id": sweep_id, "status": status, "error": error, "note": note,
                              "time": time.time(), **times})


def expected_jobs(config: DictConfig) -> int | None:
    """How many jobs the sweep's overrides (and `hydra.sweeper.params`) expand to."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        parsed = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
        return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
    except Exception:  # noqa: BLE001 -- a custom sweeper's params: no count, the summary still lists what reported
        return None


def summarize(sweep_dir: Path, sweep_id: str) -> dict[str, list[tuple[str, str | None]]]:
    """{status: [(job folder relative to the sweep, error or note)]} for the jobs of this sweep."""
    out: dict[str, list[tuple[str, str | None]]] = {"finished": [], "skipped": [], "failed": []}
    for path in sorted(Path(sweep_dir).rglob("status.json")):
        try:
            s = records.read_json(path)
        except (OSError, ValueError):
            continue
        if s.get("sweep_id") == sweep_id:
            out.setdefault(s["status"], []).append((str(path.parent.relative_to(sweep_dir)),
                                                    s.get("error") or s.get("note")))
    return out


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks.summary): tags the sweep's
    jobs with one id and logs what happened to them at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        os.environ[SWEEP_ID] = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        _failed.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        jobs = summarize(sweep_dir, os.environ.get(SWEEP_ID, ""))
        expected = expected_jobs(config)
        reported = sum(len(v) for v in jobs.values())
        lines = [f"sweep {sweep_dir}: " + ", ".join(f"{len(v)} {k}" for k, v in jobs.items())]
        for name, note in jobs["finished"]:
            why = f"re-run ({note})" if note else "finished"
            lines.append(f"  {why} {name}: {_headline(sweep_dir / name)}")
        for name, note in jobs["skipped"]:
            lines.append(f"  skipped  {name} (DONE from an earlier run, {note or 'same config'}): "
                         f"{_headline(sweep_dir / name)}")
        for name, err in jobs["failed"]:
            lines.append(f"  FAILED   {name}: {err} (traceback in {sweep_dir / name / 'error.txt'})")
        if expected is not None and reported < expected:
            lines.append(f"  {expected - reported} of {expected} jobs reported nothing (killed, out of memory "
                         f"or cancelled?): see their logs under {sweep_dir}")
        _failed[:] = [name for name, _ in jobs["failed"]] + ["?"] * max(0, (expected or 0) - reported)
        (log.error if _failed else log.info)("\n".join(lines))


def _headline(job_dir: Path) -> str:
    try:
        return records.headline(records.read_json(job_dir / "result.json"))
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable result.json"


def exit_code() -> int:
    """run.py exits with 1 after a sweep in which a job failed or vanished."""
    return 1 if _failed else 0
