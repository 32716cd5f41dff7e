"""Fan-out of proxy runs: records, costs summed into the search stage, resuming an
interrupted search without re-training finished proxies, and the executors."""
import json
import logging
import math
import os

import pytest
import torch
from conftest import compose
from hydra.utils import instantiate

from fastmix.data.corpus import prepare_corpus
from fastmix.errors import UserError
from fastmix.run import pipeline
from fastmix.run.fanout import UnitsFailed
from fastmix.search import proxies
from fastmix.search.proxies import ProxyJob
from fastmix.train.cost import CostMeter


@pytest.fixture
def setup(tiny_corpus, cache_dir):
    def make(*extra):
        cfg = compose(["experiment=smoke", "data=folder", f"data.root={tiny_corpus}",
                       f"data.cache_dir={cache_dir}", "proxy.tokens=2048", *extra])
        corpus = prepare_corpus(cfg.data)
        objective = instantiate(cfg.objective, _partial_=True)(corpus=corpus)
        return cfg, corpus, objective
    return make


def run(cfg, corpus, objective, meter, where, ws, tag, **kw):
    """The proxies of a search in `where` (units under where/proxies/), as a method asks."""
    ctx = pipeline.search_context(cfg, corpus, objective, meter, torch.device("cpu"), where)
    return ctx.proxies.run([ProxyJob(w, tag, **kw) for w in ws])


def mixtures(sources, n):
    out = []
    for i in range(n):
        raw = [1.0 + ((i + 1) * (k + 2)) % 5 for k in range(len(sources))]
        out.append({s: v / sum(raw) for s, v in zip(sources, raw)})
    return out


def test_records_and_costs(setup, tmp_path):
    cfg, corpus, objective = setup()
    meter = CostMeter(torch.device("cpu"))
    with meter.stage("search"):
        recs = run(cfg, corpus, objective, meter, tmp_path, mixtures(corpus.sources, 3), "round1")
    assert [r.index for r in recs] == [0, 1, 2]
    for r, w in zip(recs, mixtures(corpus.sources, 3)):
        assert r.weights == pytest.approx(w) and math.isfinite(r.objective) and r.objective > 0
        saved = json.loads((tmp_path / "proxies" / f"round1_{r.index:04d}" / "record.json").read_text())
        assert saved == r.to_dict()
        assert not (tmp_path / "proxies" / f"round1_{r.index:04d}" / "checkpoint.pt").exists()
        # every objective group's loss from the same pass; the objective weights them
        assert set(r.losses) == set(objective.weights)
        assert r.objective == pytest.approx(sum(objective.weights[g] * v for g, v in r.losses.items()))
    search = meter.stages["search"]
    assert search.proxy_runs == 3
    assert search.flops == pytest.approx(sum(r.cost["flops"] for r in recs))
    assert search.tokens == sum(r.cost["tokens"] for r in recs)
    # the stage's wall time is the proxies' own time (plus a little bookkeeping), not twice it
    proxy_wall = sum(r.cost["wall_seconds"] for r in recs)
    assert proxy_wall <= search.wall_seconds <= proxy_wall + 1.0


def test_interrupted_fanout_retrains_only_the_missing(setup, tmp_path, monkeypatch, caplog):
    cfg, corpus, objective = setup()
    trained, broken = [], [True]
    real = proxies.train_on_mixture

    def flaky(corpus, run_cfg, weights, out_dir, *a, **kw):
        trained.append(out_dir.name)
        if out_dir.name == "r_0002" and broken[0]:
            raise RuntimeError("node lost")
        return real(corpus, run_cfg, weights, out_dir, *a, **kw)
    monkeypatch.setattr(proxies, "train_on_mixture", flaky)
    ws = mixtures(corpus.sources, 4)

    meter = CostMeter(torch.device("cpu"))
    with meter.stage("search"):
        with pytest.raises(UnitsFailed, match="1 of 4 proxy runs failed"):
            run(cfg, corpus, objective, meter, tmp_path, ws, "r")
    assert sorted(trained) == ["r_0000", "r_0001", "r_0002", "r_0003"]  # the others still ran
    first = {p.parent.name: p.stat().st_mtime_ns for p in tmp_path.glob("proxies/r_*/record.json")}
    assert sorted(first) == ["r_0000", "r_0001", "r_0003"]

    trained.clear()
    broken[0] = False
    meter = CostMeter(torch.device("cpu"))
    with meter.stage("search"):
        recs = run(cfg, corpus, objective, meter, tmp_path, ws, "r")
    assert trained == ["r_0002"]
    assert all((tmp_path / "proxies" / n / "record.json").stat().st_mtime_ns == t for n, t in first.items())
    # the search still pays for all four, wherever and whenever they ran
    assert meter.stages["search"].proxy_runs == 4
    assert meter.stages["search"].flops == pytest.approx(sum(r.cost["flops"] for r in recs))

    # the same folders asked for other mixtures, or under another proxy config: retrained
    # (a warning names what changed), nothing silently reused; the same setup again: reused
    for over, changed in [((), "weights."), (("proxy.lr=0.01",), "proxy.lr 0.003 → 0.01")]:
        trained.clear()
        with meter.stage("again"), caplog.at_level(logging.WARNING, logger="fastmix.search.proxies"):
            again = run(setup(*over)[0], corpus, objective, meter, tmp_path, ws[1::-1], "r")
        assert trained == ["r_0000", "r_0001"] and changed in caplog.text, caplog.text
        assert [r.weights for r in again] == ws[1::-1]
    trained.clear()
    with meter.stage("reused"):
        run(setup("proxy.lr=0.01")[0], corpus, objective, meter, tmp_path, ws[1::-1], "r")
    assert trained == []


def test_local_processes_match_in_process(setup, tmp_path):
    """Worker processes (one thread each) give the same proxies as this process."""
    cfg, corpus, objective = setup("executor=local", "executor.workers=2")
    ws = mixtures(corpus.sources, 2)
    meter = CostMeter(torch.device("cpu"))
    with meter.stage("search"):
        here = run(setup()[0], corpus, objective, meter, tmp_path / "a", ws, "x")
        there = run(cfg, corpus, objective, meter, tmp_path / "b", ws, "x")
    assert [r.objective for r in there] == pytest.approx([r.objective for r in here], rel=1e-4)
    assert [r.losses for r in there] == [pytest.approx(r.losses, rel=1e-4) for r in here]
    assert meter.stages["search"].proxy_runs == 4
    # a 1-thread worker on a 2-core machine uses half of it: device-hours count that share
    share = 1 / len(os.sched_getaffinity(0))
    for r in there:
        assert r.cost["devices"] == pytest.approx(share)
        assert r.cost["device_hours"] == pytest.approx(r.cost["wall_seconds"] * share / 3600)


def test_executors_are_built_by_target_and_sbatch_is_checked(setup, tmp_path, monkeypatch):
    from fastmix.run.fanout import InProcess, LocalProcesses
    for name, cls in (("inprocess", InProcess), ("local", LocalProcesses)):
        cfg, _, _ = setup(f"executor={name}")
        assert type(pipeline.build(cfg.executor, "executor", folder=str(tmp_path))) is cls
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg, _, _ = setup("executor=slurm")
    with pytest.raises(UserError, match="sbatch"):
        pipeline.build(cfg.executor, "executor", folder=str(tmp_path))


def test_keep_model_and_continue_from_it(setup, tmp_path):
    """MixMin/DeMix need the proxies themselves: keep_model saves each one, and
    init_from continues a saved model (with lr 0 the continued model is the base)."""
    from transformers import AutoModelForCausalLM
    cfg, corpus, objective = setup()
    meter = CostMeter(torch.device("cpu"))
    w = mixtures(corpus.sources, 1)
    with meter.stage("search"):
        (base,) = run(cfg, corpus, objective, meter, tmp_path, w, "base", keep_model=True)
        frozen, _, _ = setup("proxy.lr=0")
        (cont,) = run(frozen, corpus, objective, meter, tmp_path, w, "cont", init_from=base.model_dir,
                      keep_model=True, tokens=512)
    a = AutoModelForCausalLM.from_pretrained(base.model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(cont.model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cont.objective == pytest.approx(base.objective, rel=1e-5)
    assert cont.cost["tokens"] < base.cost["tokens"]  # the continuation's own, smaller budget


def test_preempted_proxy_task_is_requeued_and_resumes(setup, tmp_path):
    """A proxy task sent through Submitit (its local executor) and interrupted as SLURM
    does before a time limit (USR2): Submitit calls ProxyUnit.checkpoint, requeues the
    task, and the loop resumes from checkpoint.pt; the record equals an uncut run's."""
    import time

    import submitit
    cfg, corpus, objective = setup("proxy.tokens=400000", "proxy.ckpt_every=10")
    # a worker gets plain settings and the corpus's folder, as on a SLURM node
    unit = lambda: proxies.ProxyUnit(pipeline.proxy_settings(cfg), str(corpus.root), str(corpus.root), threads=1)
    w = mixtures(corpus.sources, 1)[0]
    ref = unit()(ProxyJob(w, "ref", seed=0, out_dir=str(tmp_path / "ref")))
    ex = submitit.AutoExecutor(folder=str(tmp_path / "submitit"), cluster="local")
    ex.update_parameters(timeout_min=10, cpus_per_task=1)
    out = tmp_path / "cut"
    job = ex.submit(unit(), ProxyJob(w, "cut", seed=0, out_dir=str(out)))
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (out / "checkpoint.pt").exists(), job.stderr()
    steps_before = len((out / "metrics.jsonl").read_text().splitlines())
    # the signal SLURM sends before the time limit, to the task (the child of Submitit's
    # local controller; LocalJob._interrupt signals the controller, which does not forward it)
    import signal
    ctl = job._process.pid
    (task,) = open(f"/proc/{ctl}/task/{ctl}/children").read().split()
    os.kill(int(task), signal.SIGUSR2)
    rec = job.result()
    log = (job.stdout() or "") + (job.stderr() or "")
    assert "checkpoint" in log.lower() and "requeu" in log.lower(), log[-3000:]
    assert steps_before > 0 and not (out / "checkpoint.pt").exists()
    assert rec["objective"] == ref["objective"] and rec["cost"]["tokens"] == ref["cost"]["tokens"]


def test_squeue_watcher_reads_states_as_submitit_does():
    """Where SLURM keeps no accounting, job states come from squeue: the command asks
    for every job Submitit waits on, array tasks one per line; the answer reads as
    sacct's would, and a live job's passing flag reads as running, not finished."""
    from fastmix.run.slurm import SqueueWatcher
    w = SqueueWatcher(delay_s=60)
    assert w._make_command() is None  # nothing to wait on
    for job in ("12_0", "12_1", "13"):
        w.register_job(job)
    cmd = w._make_command()
    assert cmd[:5] == ["squeue", "--states=all", "--array", "--noheader", "--format=%i|%T|%N"]
    assert cmd[5] == "--jobs" and set(cmd[6].split(",")) == {"12", "13"}
    info = w.read_info(b"12_0|COMPLETED|vm\n12_1|SIGNALING|vm\n13|PENDING|\n14_[2-3]|PENDING|\n")
    assert info["12_0"]["State"] == "COMPLETED" and info["13"]["State"] == "PENDING"
    assert info["12_1"]["State"] == "RUNNING" and info["14_3"]["State"] == "PENDING"
    w._info_dict.update(info)
    assert w.is_done("12_0", mode="cache") and not w.is_done("12_1", mode="cache")


def test_checkpoint_of_another_setup_is_not_resumed(tmp_path):
    """A checkpoint carries the fingerprint of what it trains (the job's, a proxy
    record's): a folder reused by another config starts afresh instead of resuming it."""
    from omegaconf import OmegaConf

    from fastmix.train.loop import Trainer
    from fastmix.train.models import build_model
    from fastmix.train.sampling import MixtureSampler
    src = {"a": (torch.arange(2000) % 17).numpy().astype("uint16")}
    cfg = OmegaConf.create(dict(tokens=8 * 8 * 32, batch_size=8, lr=3e-3, log_every=1, ckpt_every=2))

    def train(identity, stop_after=None):
        meter = CostMeter(torch.device("cpu"))
        t = Trainer(build_model({"layers": 1, "hidden": 16, "ffn": 32, "heads": 2, "context": 32}, 64, seed=0),
                    MixtureSampler(src, 32, 8, seed=0), cfg, torch.device("cpu"), meter, tmp_path,
                    progress=False, identity=identity)
        with meter.stage("train"):
            t.train(stop_after=stop_after)
        return t
    train("old", stop_after=4)
    steps = lambda: [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train("new", stop_after=2)
    assert steps() == [1, 2]  # from the start, and the old run's rows are gone
    t = train("new")
    assert steps() == list(range(1, 9)) and t.cost.tokens == 8 * 8 * 32  # resumed its own
