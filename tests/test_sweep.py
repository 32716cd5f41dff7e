"""Sweeps through Hydra launchers, the end-of-sweep summary, the tables, plots
and notebooks built from run folders, and the paper experiments' configs."""
import json
import math
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose, run_cli

from fastmix.config import REPO

SWEEP = ["-m", "hydra/launcher=joblib", "optimizer=uniform,fastmix,fixed", "eval=loss"]


@pytest.fixture(scope="module")
def joblib_sweep(tiny_corpus, cache_dir, tmp_path_factory):
    """A joblib sweep of two jobs that finish and one that fails (optimizer=fixed
    without weights), run twice: (folder, first run, second run)."""
    cwd = tmp_path_factory.mktemp("sweep")
    args = SWEEP + ["experiment=smoke", "data=folder", f"data.root={tiny_corpus}", f"data.cache_dir={cache_dir}"]
    first = run_cli(args, cwd=cwd)
    folder = cwd / "outputs" / "sweep" / "smoke"
    stamps = {p.parent.name: p.stat().st_mtime for p in folder.glob("*/result.json")}
    times = {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/status.json")}
    second = run_cli(args, cwd=cwd)
    return folder, first, second, (stamps, times)


def job(folder: Path, name: str) -> Path:
    (path,) = [p for p in folder.iterdir() if p.is_dir() and f"optimizer={name}" in p.name]
    return path


def test_sweep_finishes_the_others_and_reports_the_failure(joblib_sweep):
    folder, first, _, _ = joblib_sweep
    out = first.stdout + first.stderr
    assert first.returncode == 1, out[-3000:]  # a failed job fails the sweep, at the end
    assert "2 finished, 0 skipped, 1 failed" in out
    assert "FAILED" in out and "optimizer=fixed needs optimizer.weights" in out
    for name in ("uniform", "fastmix"):
        assert (job(folder, name) / "DONE").exists()
    bad = job(folder, "fixed")
    assert not (bad / "DONE").exists() and not (bad / "result.json").exists()
    assert "optimizer.weights" in (bad / "error.txt").read_text()
    assert json.loads((bad / "status.json").read_text())["status"] == "failed"
    assert "job failed" in (bad / "run.log").read_text()  # the reason is in the job's own log too
    # Joblib ran the jobs in parallel with one torch thread each on 2 cores.
    log = (job(folder, "uniform") / "run.log").read_text()
    assert "1 torch threads" in log
    assert re.search(r"target step \d+/\d+ loss \d", log), log[-2000:]  # the loop's loss lines, no progress bar


def test_rerun_skips_finished_jobs(joblib_sweep):
    folder, first, second, (stamps, times) = joblib_sweep
    out = second.stdout + second.stderr
    assert second.returncode == 1 and "0 finished, 2 skipped, 1 failed" in out, out[-3000:]
    # each job's line in the closing summary has its headline number, from its result.json
    for name in stamps:
        loss = json.loads((folder / name / "result.json").read_text())["objective_loss"]
        assert f"  finished {name}: objective loss {loss:.4f}" in first.stdout + first.stderr
        assert f"  skipped  {name} (DONE from an earlier run, same config): objective loss {loss:.4f}" in out
    assert stamps == {p.parent.name: p.stat().st_mtime for p in folder.glob("*/result.json")}
    assert len(stamps) == 2
    # a skipped job keeps the times of the run that did its work: the report's wall time
    from analysis.report import sweep_wall_hours
    for name in stamps:
        now = json.loads((folder / name / "status.json").read_text())
        assert now["status"] == "skipped" and times[name]["status"] == "finished"
        assert (now["started"], now["finished"]) == (times[name]["started"], times[name]["finished"])
        assert now["started"] < now["finished"]
    now = [json.loads(p.read_text()) for p in folder.glob("*/status.json")]
    span = max(t["finished"] for t in now) - min(t["started"] for t in now)
    assert sweep_wall_hours(folder) == pytest.approx(span / 3600)
    assert min(t["started"] for t in now) == min(t["started"] for t in times.values())  # the first run's start


def test_table_of_the_sweep(joblib_sweep):
    from analysis.tables import load_results, results_table, summarize, write_tables
    folder = joblib_sweep[0]
    df = load_results(folder)
    assert sorted(df["method"]) == ["fastmix", "uniform"]
    s = summarize(df)
    assert s.loc["fastmix", "x_fastmix"] == 1.0 and s.loc["fastmix", "proxy_runs"] == 1
    assert s.loc["uniform", "search_flops"] == 0
    table = results_table(df)
    assert "Avg loss" in table.columns and table.loc["fastmix", "x FastMix"] == "1"
    write_tables(folder)
    for f in ("results.md", "results.csv", "results.tex", "mixtures.md", "mixtures.csv", "mixtures.tex"):
        assert (folder / "tables" / f).stat().st_size > 0


def test_plots_and_notebooks(joblib_sweep, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    from analysis.plots import write_plots
    folder = joblib_sweep[0]
    written = write_plots(folder, tmp_path)
    assert {p.stem for p in written} == {"cost_vs_objective", "cost_vs_quality", "mixtures", "val_loss",
                                        "fastmix_weights"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
    os.environ["FASTMIX_SWEEP"] = str(folder)  # the kernel inherits it
    try:
        for path in sorted((REPO / "analysis").glob("*.ipynb")):
            nb = nbformat.read(path, as_version=4)
            NotebookClient(nb, timeout=120, kernel_name="python3",
                           resources={"metadata": {"path": str(REPO / "analysis")}}).execute()
            outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
            assert not [o for o in outputs if o.output_type == "error"], (path.name, outputs)
            # the figures show in the notebook (plots.py keeps the kernel's inline backend)
            assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2, path.name
    finally:
        del os.environ["FASTMIX_SWEEP"]


def test_changed_config_reruns(joblib_sweep, tiny_corpus, cache_dir):
    """The sweep again with a key changed that does not name the folder (device): the
    job re-runs, says which key changed, and the summary says so (skip_done=always:
    tests/test_run.py, in process). Last of the tests
    on `joblib_sweep`, as it changes the folder."""
    folder = joblib_sweep[0]
    name = job(folder, "uniform").name
    before = (folder / name / "result.json").stat().st_mtime
    r = run_cli(["-m", "hydra/launcher=joblib", "optimizer=uniform", "eval=loss", "device=cpu", "experiment=smoke",
                 "data=folder", f"data.root={tiny_corpus}", f"data.cache_dir={cache_dir}"], cwd=folder.parent.parent.parent)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "1 finished, 0 skipped, 0 failed" in out, out[-3000:]
    assert f'  re-run (config changed: device "auto" → "cpu") {name}: objective loss' in out
    assert (folder / name / "result.json").stat().st_mtime > before
    assert 'config changed: device "auto" → "cpu"' in (folder / name / "run.log").read_text()
    assert json.loads((folder / name / "DONE").read_text())["config"]["device"] == "cpu"


def fake_slurm(bin_dir: Path, capture: Path) -> None:
    """`sbatch` that keeps the script it was given and refuses it (so the sweep
    stops at once), and an `srun` so Submitit believes it is on a cluster."""
    bin_dir.mkdir()
    scripts = {"sbatch": f'#!/bin/sh\ncp "$1" {capture}\necho "fake sbatch: refused" >&2\nexit 1\n',
               "srun": "#!/bin/sh\nexit 0\n"}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)


def test_slurm_launcher_writes_the_sbatch_script(smoke_args, tmp_path):
    capture = tmp_path / "submitted.sh"
    fake_slurm(tmp_path / "bin", capture)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    args = ["-m", "optimizer=uniform,natural", "seed=0,1", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=90", "hydra.launcher.array_parallelism=3",
            "hydra.launcher.setup=[module load cuda]", *smoke_args]
    r = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode != 0 and "fake sbatch: refused" in r.stdout + r.stderr
    script = capture.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --array=0-3%3",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB",
                 "#SBATCH --signal=USR2@", "#SBATCH --open-mode=append", "module load cuda"):
        assert line in script, line
    assert "submitit.core._submit" in script and "srun" in script


def test_job_threads_share_the_cores():
    from omegaconf import OmegaConf

    from fastmix.run.sweep import job_threads
    cores = len(os.sched_getaffinity(0))
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert job_threads(OmegaConf.create({"_target_": joblib, "n_jobs": -1})) == 1
    assert job_threads(OmegaConf.create({"_target_": joblib, "n_jobs": 1})) == cores
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert job_threads(OmegaConf.create({"_target_": slurm, "cpus_per_task": 8})) == 8
    assert job_threads(None) is None


@pytest.mark.parametrize("name", ["demo", "paper_pretrain", "paper_posttrain"])
def test_experiments_compose(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.sweep_name == name
    if name.startswith("paper"):
        assert cfg.scale == "paper" and cfg.proxy.name == "regmix_1m" and cfg.train.name == "regmix_1b"
        assert cfg.train.model.layers == 22 and cfg.proxy.tokens == 1001 * 512 * 2048  # the reference run
    if name == "paper_pretrain":
        assert cfg.data.name == "pile_regmix" and len(cfg.data.files) == 17 and cfg.eval.name == "paper14"
        assert dict(cfg.objective.weights) == {"pile_cc": 1.0}


def test_paper_experiment_stops_before_downloading(tmp_path):
    r = run_cli(["experiment=paper_pretrain"], cwd=tmp_path)
    assert r.returncode == 2 and "data.root is not set" in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.rglob("DONE"))


@pytest.mark.parametrize("overrides, message", [
    (["experiment=paper_pretrain", "data.root=/nonexistent"], "fix data.files.arxiv"),
    (["experiment=paper_pretrain", f"data.root={REPO}"], "fix data.files.arxiv"),
    (["experiment=paper_posttrain"], "data.root is not set"),
    (["experiment=paper_posttrain", f"data.root={REPO / 'data' / 'embedded'}"], "data.tokenizer.path is not set"),
])
def test_paper_experiment_data_errors(overrides, message):
    from fastmix.data.corpus import prepare_corpus
    from fastmix.errors import UserError
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        prepare_corpus(compose(overrides).data)


# ---------------------------------------------------------------- hand-made records

def write_result(root: Path, method: str, seed: int, scores: dict, hours: float, device: str = "cuda:NVIDIA H100",
                 runs: int = 1, objective: float = 1.5, info: dict | None = None) -> None:
    d = root / f"{method}_{seed}"
    d.mkdir(parents=True)
    cost = {"wall_seconds": hours * 3600, "device": device, "devices": 1, "device_hours": hours,
            "flops": hours * 1e15, "tokens": 1, "proxy_runs": runs, "peak_memory_bytes": 0}
    (d / "result.json").write_text(json.dumps({
        "optimizer": method, "seed": seed, "eval_suite": "x", "search_cost": cost, "eval": scores,
        "eval_average": sum(scores.values()) / len(scores), "val_loss": {"a": 1.0, "b_c": 2.0},
        "val_loss_average": 1.5, "objective_loss": objective, "weights": {"a": 0.25, "b_c": 0.75},
        "eval_split": "test", "search_info": info or {}}))


def test_table_numbers_by_hand(tmp_path):
    from analysis.tables import main, results_table, summarize
    write_result(tmp_path, "fastmix", 0, {"t1": 0.50, "t2": 0.60, "t3": 0.40}, 1.0, objective=2.0)
    write_result(tmp_path, "fastmix", 1, {"t1": 0.70, "t2": 0.60, "t3": 0.40}, 3.0, objective=2.0)
    write_result(tmp_path, "regmix", 0, {"t1": 0.55, "t2": 0.65, "t3": 0.40}, 100.0, runs=512, objective=1.0)
    from analysis.tables import load_results
    df = load_results(tmp_path)
    s = summarize(df)
    assert math.isclose(s.loc["fastmix", "score:t1"], 60.0)
    assert math.isclose(s.loc["fastmix", "score:t1 std"], math.sqrt(200.0))  # (50, 70): sample std 14.14
    assert math.isclose(s.loc["fastmix", "average"], (60 + 60 + 40) / 3)
    assert math.isclose(s.loc["regmix", "average"], (55 + 65 + 40) / 3)
    # best: t1 fastmix (60 > 55), t2 regmix (65 > 60), t3 tied (both count)
    assert s.loc["fastmix", "best_on"] == 2 and s.loc["regmix", "best_on"] == 2
    assert math.isclose(s.loc["regmix", "x_fastmix"], 100.0 / 2.0)  # fastmix mean hours = 2
    assert list(s.index) == ["regmix", "fastmix"]  # the headline, the objective's test loss: best first
    t = results_table(df)
    assert t.loc["regmix", "Objective loss (test)"] == "≈ 1.000"  # the best is within noise of itself
    assert t.loc["fastmix", "Objective loss (test)"] == "2.000 ± 0.000"  # shares 1 seed with it: not marked
    assert t.loc["fastmix", "t1"] == "60.0 ± 14.1" and t.loc["regmix", "t1"] == "55.0"
    assert "Search GPU-hours" in t.columns and t.loc["regmix", "#Best"] == "2/3"
    assert main([str(tmp_path), "--paper", "pretrain"]) == 0
    tex = (tmp_path / "tables" / "results.tex").read_text()
    assert r"\#Best" in tex and r"$\pm$" in tex
    assert "b\\_c" in (tmp_path / "tables" / "mixtures.tex").read_text()
    assert "720" in (tmp_path / "tables" / "reported.md").read_text()  # RegMix's reported GPU-hours
    assert "Avg loss" in (tmp_path / "tables" / "val_loss.md").read_text()  # the losses' own table


def test_within_noise_by_hand(tmp_path):
    """Paired by seed against the best (a): b's differences 0.05, 0.02, 0.10 have
    mean 0.0567 and a 95% half-width t_{0.975,2} x sd / sqrt(3) = 4.303 x 0.0404 /
    1.732 = 0.100, so b is within noise; c is 0.5 worse on every seed, so not.
    A failed proxy check is flagged."""
    from analysis.tables import load_results, results_table, within_noise
    for seed, (a, b, c) in enumerate([(1.0, 1.05, 1.5), (1.1, 1.12, 1.6), (1.2, 1.30, 1.7)]):
        write_result(tmp_path, "a", seed, {"t": 0.5}, 1.0, objective=a)
        write_result(tmp_path, "b", seed, {"t": 0.5}, 1.0, objective=b)
        write_result(tmp_path, "c", seed, {"t": 0.5}, 1.0, objective=c,
                     info={"proxy_check": {"spearman": 0.1, "passed": seed != 1}})
    df = load_results(tmp_path)
    assert within_noise(df).to_dict() == {"a": True, "b": True, "c": False}
    t = results_table(df)
    assert list(t.index) == ["a", "b", "c"]
    assert t.loc["b", "Objective loss (test)"].startswith("≈ 1.157")
    assert t.loc["c", "Proxy check"] == "ρ=0.10 FAILED" and t.loc["a", "Proxy check"] == "-"


def test_table_says_device_hours_off_gpu(tmp_path):
    from analysis.tables import load_results, results_table
    write_result(tmp_path, "fastmix", 0, {"t1": 0.5}, 1.0, device="cpu")
    assert "Search device-hours" in results_table(load_results(tmp_path)).columns


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "no result.json"),
])
def test_table_bad_input(make, message, tmp_path, capsys):
    from analysis.tables import main
    assert main([str(make(tmp_path))]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "tables").exists()


def test_table_unknown_paper_setting(tmp_path, capsys):
    from analysis.tables import main
    write_result(tmp_path, "fastmix", 0, {"t1": 0.5}, 1.0)
    assert main([str(tmp_path), "--paper", "pretrian"]) == 2
    assert "unknown --paper 'pretrian'" in capsys.readouterr().err


def test_table_names_a_bad_result_and_goes_on(tmp_path, capsys):
    """A truncated result.json is named in one warning and left out; the table is
    made from the rest. With nothing readable: one line, exit 2, no traceback."""
    from analysis.tables import main
    write_result(tmp_path, "fastmix", 0, {"t1": 0.5}, 1.0)
    write_result(tmp_path, "uniform", 0, {"t1": 0.4}, 1.0)
    bad = next(tmp_path.rglob("result.json"))
    bad.write_text(bad.read_text()[:40])
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert f"skipping {bad}" in out.err and "Traceback" not in out.err
    (good,) = [p for p in tmp_path.rglob("result.json") if p != bad]
    good.write_text("{}")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 result.json" in err and "Traceback" not in err
