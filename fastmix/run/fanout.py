"""Fan-out: run many independent units (proxy trainings) through an executor set
in config (`conf/executor/`): in this process, in local worker processes, or as
a Submitit job array on SLURM.

A unit is a picklable callable applied to one job; it writes its own record and
returns it, so a re-run of an interrupted search finds the finished units'
records and re-runs only the rest (see `fastmix.search.proxies.ProxyUnit`). Every
executor runs all jobs it can before reporting failures, so one bad unit does
not throw away the others' work.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from fastmix.errors import UserError
from fastmix.schema import MethodParams, rule

log = logging.getLogger(__name__)


class UnitsFailed(RuntimeError):
    """Some units raised; the message lists each one with its error."""


def _gather(results: Iterable[Callable[[], Any]], total: int, where: Callable[[int], str] = lambda i: "") -> list:
    """Every unit's result in order (`results` yields one getter per unit, called in
    turn), running them all before reporting failures: bad input (a config or a
    folder to fix) is raised as itself, anything else as one UnitsFailed listing
    each failed unit (with `where(i)`, e.g. its log file)."""
    out, failures = [], []
    # n of N proxy runs done; shown on a terminal only (disable=None), so sweep logs stay clean
    for i, get in enumerate(tqdm(results, total=total, desc="proxy runs", unit="run", disable=None, leave=False)):
        try:
            out.append(get())
        except Exception as e:  # reported with the others below
            log.exception("proxy run %d failed%s", i, where(i))
            failures.append((i, e))
            out.append(None)
    for _, e in failures:
        if isinstance(e, UserError):
            raise e
    if failures:
        lines = "\n".join(f"  unit {i}: {type(e).__name__}: {e}{where(i)}" for i, e in failures)
        raise UnitsFailed(f"{len(failures)} of {total} proxy runs failed (the others are recorded; "
                          f"re-running the job retries only the failed ones):\n{lines}")
    return out


class InProcess:
    """One unit after the other in this process (the default: no start-up cost,
    and the corpus already in memory is reused)."""
    name = "inprocess"
    Params = MethodParams  # nothing to set

    def __init__(self, folder: str | None = None):  # folder: Submitit's log folder, unused here
        pass

    def map(self, fn: Callable, jobs: Sequence) -> list:
        return _gather((partial(fn, job) for job in jobs), len(jobs))  # lazily: one after the other


class LocalProcesses:
    """Worker processes on this machine, `threads_per_unit` torch threads each
    (one on CPU: the proxies are too small to use two cores well, and
    oversubscribed threads make CPU training many times slower)."""
    name = "local"

    @dataclass
    class Params(MethodParams):
        workers: Optional[int] = rule(ge=1)
        threads_per_unit: int = rule(ge=1)

    def __init__(self, workers: int | None = None, threads_per_unit: int = 1, folder: str | None = None):
        cores = len(os.sched_getaffinity(0))
        self.threads = max(1, int(threads_per_unit))
        self.workers = int(workers or max(1, cores // self.threads))
        if self.workers < 1:
            raise UserError(f"executor.workers must be >= 1, got {workers}.")

    def map(self, fn: Callable, jobs: Sequence) -> list:
        # spawn, not fork: the parent holds torch threads and open memmaps
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=ctx) as pool:
            futures = [pool.submit(fn, job) for job in jobs]
            return _gather([f.result for f in futures], len(jobs))


class Submitit:
    """A Submitit job array (`cluster: slurm`), or Submitit's local executor
    (`cluster: local`, for trying a cluster setup on one machine). Each proxy is
    one array task; the array's parallelism, partition, GPUs and time limit come
    from config. A requeued or re-submitted task finds its record or checkpoint
    and continues from there."""
    name = "submitit"

    @dataclass
    class Params(MethodParams):
        cluster: str = rule(choices=("slurm", "local"))
        partition: Optional[str] = rule()
        gpus_per_unit: int = rule(ge=0)
        cpus_per_unit: int = rule(ge=1)
        mem_gb: float = rule(gt=0)
        timeout_min: int = rule(ge=1)
        array_parallelism: int = rule(ge=1)
        additional: Any = rule()  # sbatch options as a mapping
        setup: Any = rule()  # shell lines

    def __init__(self, folder: str | Path, cluster: str | None = "slurm", partition: str | None = None,
                 gpus_per_unit: int = 1, cpus_per_unit: int = 4, mem_gb: float = 16, timeout_min: int = 60,
                 array_parallelism: int = 64, additional: dict | None = None, setup: list[str] | None = None):
        import submitit
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise UserError("executor=slurm needs SLURM's `sbatch` on PATH; on one machine use "
                            "executor=local, or executor=slurm executor.cluster=local.")
        if cluster == "slurm":
            from fastmix.run.slurm import watch_with_squeue
            watch_with_squeue()
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        params: dict[str, Any] = {"timeout_min": int(timeout_min), "cpus_per_task": int(cpus_per_unit),
                                  "mem_gb": mem_gb, "tasks_per_node": 1, "nodes": 1}
        if cluster == "slurm":
            params.update(slurm_array_parallelism=int(array_parallelism), gpus_per_node=int(gpus_per_unit),
                          slurm_additional_parameters=dict(additional or {}), slurm_setup=list(setup or []))
            if partition:
                params["slurm_partition"] = partition
        elif gpus_per_unit:
            params["gpus_per_node"] = int(gpus_per_unit)
        self.executor.update_parameters(**params)
        self.threads = int(cpus_per_unit)

    def map(self, fn: Callable, jobs: Sequence) -> list:
        submitted = self.executor.map_array(fn, list(jobs))
        log.info("submitted %d proxy runs as %s", len(submitted),
                 submitted[0].job_id.split("_")[0] if submitted else "-")
        # submitit re-raises a task's error from result(); its log file says more
        return _gather([j.result for j in submitted], len(jobs), lambda i: f" (logs: {submitted[i].paths.stderr})")
