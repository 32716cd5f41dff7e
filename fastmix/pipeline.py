"""The stages of one job: search -> train the target -> evaluate -> record.

run.py composes the config and calls `run_job`; everything a stage needs is
built here from the config, so the stages read top to bottom.

Launched as several data-parallel processes (torchrun, Submitit tasks; see
fastmix.distributed), every rank runs every stage: each training (proxies and
target) is data-parallel through the one loop, and the evaluations are repeated
on every rank (same model, same numbers). Rank 0 alone writes the run folder's
files; a barrier follows a write that other ranks read next.
"""
from __future__ import annotations

import fcntl
import json
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from submitit.helpers import Checkpointable

from fastmix import distributed, records, schema
from fastmix.cost import Cost, CostMeter
from fastmix.data import Corpus, check_not_sealed, prepare_corpus, test_split_sealed
from fastmix.errors import UserError
from fastmix.evaluation import evaluate_suite, lm_eval_commands, load_tasks, suite_from_config
from fastmix.fanout import InProcess
from fastmix.logs import quiet_library_bars
from fastmix.models import build_model, save_with_tokenizer
from fastmix.objective import ValidationObjective
from fastmix.optimizer import SearchContext, SearchResult
from fastmix.sampling import MixtureSampler
from fastmix.train import Trainer, resolve_device, set_threads

log = logging.getLogger(__name__)


def new_model(corpus: Corpus, shape: DictConfig, seed: int):
    tok = corpus.tokenizer
    return build_model(OmegaConf.to_container(shape), corpus.vocab_size, tok.bos_token_id,
                       tok.eos_token_id, tok.pad_token_id, seed=seed)


def train_on_mixture(corpus: Corpus, run_cfg: DictConfig, weights: dict[str, float], out_dir: Path,
                     device: torch.device, meter: CostMeter, seed: int, weighted: bool = False,
                     hook=None, hook_every: int = 1, desc: str = "train", progress: bool = True,
                     init_from: Path | None = None, identity: str | None = None):
    """Train a fresh model of `run_cfg.model` on a mixture through the one loop.
    weighted=False: sources sampled by w. weighted=True: sampled uniformly, loss
    weighted by w (FastMix, DoReMi). `init_from`: start from a saved model's
    weights instead (DeMix's components continue one shared base). `identity`: the
    fingerprint a checkpoint must carry to be resumed (fastmix.train.Trainer). Returns
    (model, last metrics)."""
    model = new_model(corpus, run_cfg.model, seed)
    if init_from is not None:
        from transformers import AutoModelForCausalLM
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(init_from).state_dict())
    arrays = {s: corpus.tokens[s]["train"] for s in corpus.sources}
    masks = {s: corpus.mask(s, "train") for s in corpus.sources}
    # batch_size is per rank: every rank draws the global micro-batch and trains on its rows
    sampler = MixtureSampler(arrays, run_cfg.model.context, run_cfg.batch_size * distributed.world_size(), seed,
                             probs=None if weighted else weights,
                             loss_weights=weights if weighted else None, masks=masks)
    trainer = Trainer(model, sampler, run_cfg, device, meter, out_dir, hook=hook, hook_every=hook_every,
                      desc=desc, progress=progress, identity=identity)
    last = trainer.train()
    return model, last


def per_source_test_loss(model, corpus: Corpus, cfg_eval, device, meter, precision) -> dict[str, float]:
    """Each source's loss on its test split (answer tokens only for post-training
    sources): documents no search, proxy or objective read."""
    return {s: ValidationObjective(corpus, weights={s: 1.0}, max_tokens_per_source=cfg_eval.test_tokens_per_source,
                                   batch_size=cfg_eval.batch_size, split="test").loss(model, device, meter, precision)
            for s in corpus.sources}


@dataclass
class ProxyJob:
    index: int
    tag: str
    weights: dict[str, float]
    out_dir: str  # absolute: the unit may run in another process or on another node
    seed: int
    init_from: str | None = None  # a saved model to continue from (DeMix's components)
    keep_model: bool = False  # save the trained proxy to <out_dir>/model (MixMin, DeMix score them later)
    tokens: int | None = None  # this run's token budget, if not the proxy config's
    overrides: dict | None = None  # proxy-config keys replaced for this run (DeMix's components: lr, warmup)
    score_split: str = "val"  # the objective's split it is scored on (test: the oracle's grid of targets)


@contextmanager
def unit_lock(out: Path):
    """Hold an exclusive lock on a unit's folder while it runs: two jobs that share a
    folder (the oracle's grid, trained by every seed's oracle job of a sweep) never
    train the same unit twice; the second waits, then finds the record. flock works
    on local disks and on most cluster file systems (NFSv4, Lustre with flock)."""
    if distributed.world_size() > 1:  # data-parallel ranks run the unit together
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ProxyUnit(Checkpointable):
    """One proxy run as a resumable unit: train a proxy on `weights` through the one
    loop, score it on the objective, write `record.json` (mixture, objective,
    cost) and drop the checkpoint. A finished unit returns its record without
    training. Picklable (the job config travels as a plain dict), so it runs the
    same in this process, in a worker process or as a SLURM array task. A Submitit
    `Checkpointable`: a task that times out or is preempted is requeued with the
    same job, and the loop resumes from the unit's checkpoint.pt (the default
    `checkpoint` method resubmits `self(job)`: the state that matters is on disk).

    A record is reused only if it was made by the same setup: `setup` lists what
    decides its numbers and the record keeps its fingerprint. Any other record in
    the folder (another config, an earlier version's record without one) is
    retrained and overwritten, with a warning naming what changed, in the job's own
    folder and in a shared one alike (the oracle's grid, `where=`): a shared record
    that no longer matches is a stale measurement, the one thing a reused grid must
    not keep; the unit lock keeps two jobs from training it at once. `corpus`: the
    searched sources' cache key (their contents, tokenizer and splits; for CLIMB's
    clusters also the clustering)."""

    def __init__(self, cfg: dict, threads: int | None = None, corpus: str | None = None):
        self.cfg, self.threads, self.corpus = cfg, threads, corpus
        self._loaded = None  # (corpus, objective), built on first use in the process that runs it

    def __getstate__(self):
        return {"cfg": self.cfg, "threads": self.threads, "corpus": self.corpus, "_loaded": None}

    def setup(self, cfg: DictConfig, job: ProxyJob) -> dict:
        """Everything that determines a unit's record, normalised as a job's config is."""
        base = None  # the record `init_from` comes from: a retrained base invalidates what continued it
        if job.init_from and (Path(job.init_from).parent / "record.json").exists():
            base = json.loads((Path(job.init_from).parent / "record.json").read_text()).get("fingerprint")
        return records.job_config({
            "proxy": cfg.proxy, "data": cfg.data, "objective": cfg.objective, "device": cfg.device,
            "seed": job.seed, "tokens": job.tokens, "weights": job.weights, "score_split": job.score_split,
            "init_from": job.init_from, "base": base, "corpus": self.corpus})

    def _load(self):
        if self._loaded is None:
            cfg = OmegaConf.create(self.cfg)
            corpus = prepare_corpus(cfg.data)  # the token cache: no work after the parent built it
            objective = instantiate(cfg.objective, _partial_=True)(corpus=corpus)
            self._loaded = search_corpus(build(cfg.optimizer), corpus, cfg), objective
        return self._loaded

    def __call__(self, job: ProxyJob) -> dict:
        with unit_lock(Path(job.out_dir)):
            return self._run(job, Path(job.out_dir))

    def _run(self, job: ProxyJob, out: Path) -> dict:
        record_path = out / "record.json"
        cfg = OmegaConf.create(self.cfg)
        if job.tokens is not None:
            cfg.proxy.tokens = job.tokens
        if job.overrides:
            cfg.proxy = OmegaConf.merge(cfg.proxy, job.overrides)
        setup = self.setup(cfg, job)
        key = records.fingerprint(setup)
        if record_path.exists():
            record = json.loads(record_path.read_text())
            if record.get("fingerprint") == key:
                return record
            why = (records.config_changes(record["setup"], setup) if "setup" in record
                   else "no fingerprint: an earlier version made it")
            log.warning("%s: retraining, its record was made by another setup (%s)", out, why)
        if self.threads:
            set_threads(self.threads)
        corpus, objective = self._load()
        device = resolve_device(cfg.device)
        meter = CostMeter(device)
        # a search's proxy reads train and val only, in a worker too; a test-split score is
        # the oracle's grid (checked in the searching process when it was asked for)
        sealed = nullcontext() if job.score_split == "test" else test_split_sealed(f"proxy {job.tag}/{job.index}")
        with sealed, meter.stage("proxy"):
            meter.add_proxy_run()
            model, _ = train_on_mixture(corpus, cfg.proxy, job.weights, out, device, meter, job.seed,
                                        desc=f"proxy {job.tag}/{job.index}", progress=False,
                                        init_from=Path(job.init_from) if job.init_from else None,
                                        identity=key)
            scored = objective.held_out() if job.score_split == "test" else objective
            value = scored.loss(model, device, meter, cfg.proxy.precision)
        record = {"index": job.index, "tag": job.tag, "weights": job.weights, "objective": value,
                  "split": job.score_split, "cost": meter.stages["proxy"].to_dict(), "seed": job.seed,
                  "dir": str(out), "fingerprint": key, "setup": setup}
        if job.keep_model:
            record["model_dir"] = str(out / "model")
        if job.overrides:
            record["overrides"] = dict(job.overrides)
        if distributed.is_main():
            if job.keep_model:
                model.save_pretrained(out / "model")  # before the record: a record means the model is there
            records.write_json(record_path, record)
            (out / "checkpoint.pt").unlink(missing_ok=True)  # a paper-scale proxy checkpoint is ~300 MB
        distributed.barrier()  # every rank sees the record (and model) before its next `exists` check
        return record


def proxy_runner(cfg: DictConfig, corpus: Corpus, objective, meter: CostMeter, folder: Path):
    """`ctx.run_proxies(weights_list, tag)`: one proxy per mixture through the executor
    in `cfg.executor`; returns their records in order and charges their costs
    (finished earlier or just now, here or elsewhere) to the open stage."""
    # Data-parallel ranks train each proxy together, one after the other: fanning out
    # from every rank would run each proxy W times (and the workers would inherit the
    # launcher's variables).
    executor = build(cfg.executor, "executor", folder=str(folder / "submitit")) if distributed.world_size() == 1 else InProcess()
    unit = ProxyUnit(OmegaConf.to_container(cfg, resolve=True), getattr(executor, "threads", None),
                     Path(str(corpus.root)).name)
    if executor.name == "inprocess":
        unit._loaded = corpus, objective  # already in memory

    def run_proxies(weights_list: list[dict[str, float]], tag: str, init_from: str | Path | None = None,
                    keep_model: bool = False, tokens: int | None = None,
                    overrides: dict | None = None, seeds: list[int] | None = None,
                    where: str | Path | None = None, score_split: str = "val",
                    names: list[str] | None = None) -> list[dict]:
        """`seeds`: one per mixture (default: the job's); `where`: another folder for the
        units (shared between jobs, e.g. the oracle's grid); `score_split`: what they are
        scored on; `names`: the units' folder names (default <tag>_<index>)."""
        if score_split == "test":
            check_not_sealed("its proxies' scores on the test split")  # only the oracle, which is not sealed
        base = Path(where) if where is not None else folder
        names = names or [f"{tag}_{i:04d}" for i in range(len(weights_list))]
        jobs = [ProxyJob(i, tag, {k: float(v) for k, v in w.items()}, str(base / names[i]),
                         cfg.seed if seeds is None else int(seeds[i]), None if init_from is None else str(init_from),
                         keep_model, tokens, overrides, score_split)
                for i, w in enumerate(weights_list)]
        log.info("%s: %d proxy runs (%s executor)", tag, len(jobs), executor.name)
        with meter.elsewhere():
            results = executor.map(unit, jobs)
        for r in results:
            meter.add(Cost.from_dict(r["cost"]))
        return results
    return run_proxies


def search_corpus(optimizer, corpus: Corpus, cfg: DictConfig, meter: CostMeter | None = None) -> Corpus:
    """The sources a method searches over and the target trains on: the data's
    own, unless the method regroups them first (CLIMB's clustering stage). The
    objective and the per-source validation losses stay on the original data.
    Given a meter, the method charges the regrouping's recorded cost to it (the
    same on a cache hit: every job that uses the clusters pays for them once)."""
    prepare = getattr(optimizer, "prepare_corpus", None)
    if prepare is None:
        return corpus
    if meter is None:
        return prepare(corpus, cfg)
    with meter.elsewhere():
        return prepare(corpus, cfg, meter)


def build(node: DictConfig, group: str = "optimizer", **extra):
    """An object from a flat config group (`_target_`, `name`, its parameters), as
    optimizers and executors are, so a sweep overrides `optimizer.lr=...`; `name` is
    a label. Its values are checked against the class's `Params` first (errors name
    `group.key`); the object's own bad-input message comes out as itself."""
    schema.check_params(node, group)
    # resolved here: `scale: ${scale}` points at the job config's root
    params = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"}
    try:
        return instantiate(params, _convert_="all", **extra)
    except InstantiationException as e:  # Hydra wraps the method's own bad-input message
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def run_search(cfg: DictConfig, optimizer, corpus: Corpus, objective, meter: CostMeter, device,
               out_dir: Path, identity: str | None = None) -> tuple[Corpus, SearchResult]:
    """The search stage: (the sources searched over, the validated result). Every
    proxy is paid for through `meter`'s search stage, in process or fanned out."""
    with meter.stage("search"):
        sources = search_corpus(optimizer, corpus, cfg, meter)  # = corpus unless the method regroups it

        def train_proxy(weights, out_dir, seed=cfg.seed, **kw):
            meter.add_proxy_run()
            return train_on_mixture(sources, cfg.proxy, weights, out_dir, device, meter, seed,
                                    progress=cfg.progress, identity=identity, **kw)
        run_proxies = proxy_runner(cfg, sources, objective, meter, out_dir / "proxies")
        ctx = SearchContext(sources, objective, meter, cfg.seed, out_dir, train_proxy, cfg,
                            run_proxies=run_proxies)
        # the method may not read the test split (fastmix.data: the seal; the oracle is exempt)
        sealed = nullcontext() if getattr(optimizer, "reads_test_split", False) else test_split_sealed(
            f"optimizer={getattr(optimizer, 'name', type(optimizer).__name__)}")
        with sealed:
            result = optimizer.search(ctx)
        return sources, result.validated(sources.sources)


def run_job(cfg: DictConfig, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    schema.check(cfg)  # a bad value stops here, before any work
    # what DONE will record; a checkpoint in this folder is resumed only if saved under it
    identity = records.fingerprint(records.job_config(cfg))
    threads = set_threads(cfg.threads)
    quiet_library_bars()
    distributed.init()  # before the device (cuda:LOCAL_RANK) and the meter (devices x ranks)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    log.info("device %s, %d torch threads, rank %d of %d, run folder %s", device, threads,
             distributed.rank(), distributed.world_size(), run_dir)

    # Rank 0 builds (or finds) the token cache first; the others then read it instead
    # of each training the same tokenizer.
    if not distributed.is_main():
        distributed.barrier()
    corpus = prepare_corpus(cfg.data)
    if distributed.is_main():
        distributed.barrier()
    objective = instantiate(cfg.objective, _partial_=True)(corpus=corpus)
    scored = objective.held_out()  # the target's objective_loss, on the test split
    scored.rows(cfg.train.model.context)  # too little test text stops the job now, before any training
    ev = schema.eval_config(cfg.eval)  # the eval kind's keys with their defaults
    suite = suite_from_config(ev, corpus)
    if suite:
        load_tasks(suite)  # a task whose data is missing stops the job now, before any training
    optimizer = build(cfg.optimizer)
    meter = CostMeter(device)

    # 1. search
    sources, result = run_search(cfg, optimizer, corpus, objective, meter, device, run_dir / "search", identity)
    log.info("mixture (%s): %s", cfg.optimizer.name,
             ", ".join(f"{k}={v:.3f}" for k, v in result.weights.items()))
    if distributed.is_main():
        records.write_json(run_dir / "mixture.json", {"weights": result.weights, "optimizer": cfg.optimizer.name,
                                                      "sources": sources.sources, "info": result.info})
        records.write_jsonl(run_dir / "search_trace.jsonl", result.trace)

    # 2. train the target model on the mixture (sources sampled by w)
    with meter.stage("train"):
        target, _ = train_on_mixture(sources, cfg.train, result.weights, run_dir, device, meter,
                                     cfg.seed, desc="target", progress=cfg.progress, identity=identity)
        if cfg.train.keep_model and distributed.is_main():
            save_with_tokenizer(target, corpus.tokenizer, run_dir / "model")

    # 3. evaluate
    with meter.stage("eval"):
        # every score of the target on the test split; the search read the val split only
        val_loss = per_source_test_loss(target, corpus, ev, device, meter, cfg.train.precision)
        objective_loss = scored.loss(target, device, meter, cfg.train.precision)
        scores = (evaluate_suite(target, corpus.tokenizer, suite, device, ev.batch_size, ev.limit,
                                 meter, cfg.train.precision) if suite else
                  {"scores": {}, "metrics": {}, "average": None, "results": {}})
        # re-scoring the saved model/ with stock lm-eval: the task folder and the commands
        rescore = (lm_eval_commands(run_dir / "model", suite, ev.limit, ev.batch_size)
                   if suite and cfg.train.keep_model else {})

    # 4. record (rank 0: the same numbers on every rank)
    cost = meter.to_dict()
    result_row = {
        "optimizer": cfg.optimizer.name, "seed": cfg.seed, "data": cfg.data.name,
        "objective": objective.describe(), "proxy": cfg.proxy.name, "target": cfg.train.name,
        "weights": result.weights, "search_cost": cost["search"], "train_cost": cost["train"],
        "eval_cost": cost["eval"], "eval_suite": cfg.eval.name, "eval": scores["scores"],
        "eval_metrics": scores["metrics"], "eval_average": scores["average"], **rescore,
        "eval_split": "test", "val_loss": val_loss, "val_loss_average": sum(val_loss.values()) / len(val_loss),
        "objective_loss": objective_loss, "search_info": result.info, "versions": records.versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if distributed.is_main():
        records.write_json(run_dir / "eval.json", {"suite": cfg.eval.name, **rescore, **scores, "eval_split": "test",
                                                   "val_loss": val_loss, "objective_loss": objective_loss})
        records.write_json(run_dir / "cost.json", cost)
        records.write_json(run_dir / "result.json", result_row)
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # the model is in model/; the rest is resume state
        records.mark_done(run_dir, cfg)
    distributed.barrier()  # no rank reports the job done before DONE is written
    return result_row
