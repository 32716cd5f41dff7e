"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): Hydra's submitit_slurm
launcher, except that a job whose folder already has DONE of the same config
(fastmix.records.check_done, the rule run.py applies) is not submitted. A
re-run of a finished sweep then submits nothing, and a re-run of a half-finished
one only what is left (on a busy cluster every submitted job waits in the queue,
only to find DONE). Where SLURM keeps no accounting, job states come from squeue
(fastmix.run.slurm). Hydra imports every module under hydra_plugins at start-up, so
this one imports the suite only when it launches.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict

# the module, not its class: Hydra registers every launcher class a plugin module holds
try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as hydra_submitit
except ImportError:  # the `cluster` extra is absent: a plain class below, so Hydra's plugin scan stays
    hydra_submitit = None  # quiet; hydra/launcher=slurm then stops at its `submitit_slurm` default

log = logging.getLogger("slurm")


class SlurmLauncher(hydra_submitit.SlurmLauncher if hydra_submitit else object):
    """Jobs with DONE of the same config are reported as skipped without being
    submitted; the rest go as one array, as Hydra's launcher sends them (a job whose
    config changed clears its old results itself, as run.py does in any launcher)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from fastmix.run import sweep
        from fastmix.run.slurm import watch_with_squeue

        watch_with_squeue()
        jobs = [self._job_dir(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)]
        if jobs[0] is None:  # the folder depends on the job's number: submit all, each checks DONE itself
            return super().launch(job_overrides, initial_job_idx)
        dirs = [d for d, _ in jobs]
        todo = []
        for i, (d, done) in enumerate(jobs):
            if done.skip:
                log.info("skipped: %s has DONE, %s (not submitted)", d, done.why)
                sweep.write_status(d, "skipped", note=done.why)
            else:
                if done.why:
                    log.info("re-run: %s has DONE, %s", d, done.why)
                todo.append(i)
        returns: list[JobReturn | None] = [None] * len(dirs)
        if todo:
            # numbering by position is fine: the folders do not depend on it (checked above)
            for i, r in zip(todo, super().launch([job_overrides[i] for i in todo], initial_job_idx)):
                returns[i] = r
        for i, d in enumerate(dirs):
            if returns[i] is None:
                returns[i] = JobReturn(overrides=list(job_overrides[i]), working_dir=str(d), task_name="run",
                                       status=JobStatus.COMPLETED, _return_value="skipped")
        return returns

    def _job_dir(self, overrides: list[str], num: int):
        """(The job's folder, resolved here as Hydra's run_job resolves it in the job,
        and what its DONE says for the job's composed config); None when the folder
        depends on the job's number or id (a re-run numbers jobs anew)."""
        from fastmix import records
        from fastmix.errors import UserError
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]  # as written
        if any(k in str(subdir) for k in ("hydra.job.num", "hydra.job.id")):
            return None
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        hc = HydraConfig.instance()
        old = hc.cfg
        hc.set_config(cfg)
        try:
            folder = Path(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir)).absolute()
            try:
                return folder, records.check_done(folder, cfg)
            except UserError:  # a bad skip_done: submitted, and the job reports it in one line
                return folder, records.DoneCheck(False, "")
        finally:
            hc.cfg = old
