"""The SLURM path against a real single-node SLURM (`make test-slurm` brings one up
with scripts/slurm.sh). Skipped when no `sinfo` answers, so `make test` runs
without a cluster."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slurm


def _cluster_answers() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and any(s.strip().startswith("idle") or s.strip() in ("mixed", "allocated")
                                     for s in r.stdout.splitlines())


if not _cluster_answers():
    pytest.skip("no SLURM answers here (make test-slurm starts one)", allow_module_level=True)

# one CPU per job, no GPU: the test node is this machine
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]
EXECUTOR = ["executor=slurm", "executor.partition=debug", "executor.gpus_per_unit=0", "executor.cpus_per_unit=1",
            "executor.mem_gb=2", "executor.timeout_min=10"]


def _job_ids(folder: Path) -> set[str]:
    return {p.name.split("_")[0] for p in folder.rglob("*_submitted.pkl")}


def test_sweep_through_slurm_and_a_rerun_trains_nothing(smoke_args, tmp_path):
    args = ["-m", "optimizer=uniform,natural", *smoke_args, "eval=loss", *LAUNCHER, "hydra.sweep.dir=sweep"]
    r = run_cli(args, cwd=tmp_path, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "2 finished, 0 skipped, 0 failed" in out
    jobs = [p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and "optimizer=" in p.name]
    assert len(jobs) == 2 and all((j / "DONE").exists() for j in jobs)
    # no accounting on this cluster: squeue answers, and sacct's errors stay out of the output
    assert "Bypassing sacct error" not in out and "accounting storage is disabled" not in out, out[-3000:]
    stamps = {j: (j / "result.json").stat().st_mtime_ns for j in jobs}
    submitted = _job_ids(tmp_path / "sweep")
    r = run_cli(args, cwd=tmp_path, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "0 finished, 2 skipped, 0 failed" in out, out[-3000:]
    assert _job_ids(tmp_path / "sweep") == submitted  # the re-run submitted nothing
    assert all(json.loads((j / "status.json").read_text())["status"] == "skipped" for j in jobs)
    assert stamps == {j: (j / "result.json").stat().st_mtime_ns for j in jobs}


def test_regmix_proxies_as_a_slurm_array_match_in_process(smoke_args, tmp_path):
    base = [*smoke_args, "optimizer=regmix", "eval=loss", "train.tokens=2000"]
    r = run_cli([*base, "hydra.run.dir=inproc"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli([*base, *EXECUTOR, "hydra.run.dir=slurm"], cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("inproc", "slurm"))
    assert a["weights"] == pytest.approx(b["weights"], rel=1e-9)
    assert a["search_cost"]["proxy_runs"] == b["search_cost"]["proxy_runs"] > 1
    assert _job_ids(tmp_path / "slurm" / "search" / "proxies" / "submitit")  # they went through sbatch


def _wait_for(folder: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> Path:
    end = time.time() + timeout
    while True:
        found = sorted(folder.glob(pattern)) if folder.exists() else []
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {pattern} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.time() > end:
            raise AssertionError(f"no {pattern} under {folder} in {timeout:.0f} s")
        time.sleep(0.2)


def _preempt(job_id: str) -> subprocess.Popen:
    """What SLURM does before a time limit (Submitit asks for --signal=USR2@...):
    USR2 to the job's steps; Submitit checkpoints and requeues. Not waited for: once
    the step running Python has requeued the job, scancel keeps retrying the other
    steps ("Job can not be altered now, try again later") for about 90 s. The
    requeue count below is the check that the signal arrived."""
    return subprocess.Popen(["scancel", "--signal=USR2", job_id], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _job(job_id: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    return dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)


def _restarts(job_id: str) -> int:
    return int(_job(job_id).get("Restarts", 0))


def _release_requeued(job_id: str, scancel: subprocess.Popen) -> None:
    """SLURM holds a requeued job for two minutes (BeginTime = requeue + 121 s, seen
    with 22.05); start it now, as the node is free. scancel is stopped first: still
    retrying, it would send USR2 to the new run too, which then fails."""
    j = _job(job_id)
    if int(j.get("Restarts", 0)) >= 1 and j.get("JobState") == "PENDING" and j.get("Reason") == "BeginTime":
        scancel.kill()
        scancel.wait()
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)


def _run_preempted(args: list[str], cwd: Path, watch: Path, pattern: str, task: str) -> tuple[str, Path]:
    """Start `run.py ARGS`, wait for `pattern` (a checkpoint) under `watch`, preempt
    the SLURM job that wrote it (`task`: "" for a plain job, "_0" for array task 0),
    and wait for the run to end. Returns (the job id, the checkpoint's folder)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "run.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ckpt = _wait_for(watch, pattern, proc)
        (job,) = _job_ids(watch)
        scancel = _preempt(job + task)
        end = time.time() + 600
        while proc.poll() is None and time.time() < end:
            _release_requeued(job + task, scancel)
            time.sleep(0.5)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
        if "scancel" in locals():
            scancel.kill()
            scancel.wait()
    assert proc.returncode == 0, out[-3000:]
    assert _restarts(job + task) >= 1, f"job {job + task} was not requeued"
    return job + task, ckpt.parent


def test_preempted_sweep_job_resumes_with_the_same_numbers(smoke_args, tmp_path):
    long = [*smoke_args, "optimizer=uniform", "eval=loss", "train.tokens=100000", "train.ckpt_every=10"]
    r = run_cli([*long, "hydra.run.dir=ref"], cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _, job = _run_preempted(["-m", *long, *LAUNCHER, "hydra.sweep.dir=sweep"], tmp_path, tmp_path / "sweep",
                            "*optimizer=uniform*/checkpoint.pt", "")
    ref = json.loads((tmp_path / "ref" / "result.json").read_text())
    got = json.loads((job / "result.json").read_text())
    assert got["objective_loss"] == ref["objective_loss"] and got["val_loss"] == ref["val_loss"]
    metrics = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == sorted({m["step"] for m in metrics})  # resumed, no step twice


def test_preempted_proxy_task_resumes(smoke_args, tmp_path):
    long = [*smoke_args, "optimizer=regmix", "eval=loss", "train.tokens=2000", "proxy.tokens=200000",
            "proxy.ckpt_every=10"]
    r = run_cli([*long, "hydra.run.dir=ref"], cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    proxies = tmp_path / "cut" / "search" / "proxies"
    _run_preempted([*long, *EXECUTOR, "executor.array_parallelism=1", "hydra.run.dir=cut"], tmp_path, proxies,
                   "regmix_0000/checkpoint.pt", "_0")
    ref = json.loads((tmp_path / "ref" / "result.json").read_text())
    got = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert got["weights"] == pytest.approx(ref["weights"], rel=1e-9)
    a = json.loads((tmp_path / "ref" / "search" / "proxies" / "regmix_0000" / "record.json").read_text())
    b = json.loads((proxies / "regmix_0000" / "record.json").read_text())
    assert a["objective"] == b["objective"]


def test_a_failing_array_task_does_not_stop_the_others(smoke_args, tmp_path):
    """optimizer=fixed without weights fails at once; uniform finishes; the summary says so."""
    args = ["-m", "optimizer=uniform,fixed", *smoke_args, "eval=loss", *LAUNCHER, "hydra.sweep.dir=sweep"]
    r = run_cli(args, cwd=tmp_path, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "1 finished, 0 skipped, 1 failed" in out and "optimizer.weights" in out
    (ok,) = [p for p in (tmp_path / "sweep").iterdir() if "optimizer=uniform" in p.name]
    assert (ok / "DONE").exists()
