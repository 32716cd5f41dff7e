"""The stages of one job: search -> train the target -> evaluate -> record.

run.py composes the config and calls `run_job`; everything a stage needs is
built here from the config, so the stages read top to bottom.

Launched as several data-parallel processes (torchrun, Submitit tasks; see
fastmix.train.distributed), every rank runs every stage: each training (proxies and
target) is data-parallel through the one loop, and the evaluations are repeated
on every rank (same model, same numbers). Rank 0 alone writes the run folder's
files; a barrier follows a write that other ranks read next.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fastmix import records, schema
from fastmix.config import abspath
from fastmix.data.corpus import Corpus, prepare_corpus, test_split_sealed
from fastmix.errors import UserError
from fastmix.eval.harness import evaluate_suite, lm_eval_commands, load_tasks, suite_from_config
from fastmix.logs import quiet_library_bars
from fastmix.run.fanout import InProcess
from fastmix.search.objective import ValidationObjective
from fastmix.search.optimizer import MixtureOptimizer, RegroupsSources, SearchContext, SearchResult
from fastmix.search.proxies import ProxyRunner
from fastmix.train import distributed
from fastmix.train.cost import CostMeter
from fastmix.train.loop import resolve_device, set_threads, train_on_mixture
from fastmix.train.models import save_with_tokenizer

log = logging.getLogger(__name__)


def per_source_test_loss(model, corpus: Corpus, cfg_eval, device, meter, precision) -> dict[str, float]:
    """Each source's loss on its test split (answer tokens only for post-training
    sources): documents no search, proxy or objective read."""
    return {s: ValidationObjective(corpus, weights={s: 1.0}, max_tokens_per_source=cfg_eval.test_tokens_per_source,
                                   batch_size=cfg_eval.batch_size, split="test").loss(model, device, meter, precision)
            for s in corpus.sources}


def proxy_settings(cfg: DictConfig) -> dict:
    """The plain config pieces a proxy unit needs, wherever it runs: the proxy's run
    settings (it trains), the device, and the data and objective (it fingerprints
    them, and builds the objective in a worker); and the target's, which name the
    oracle's grid (ProxyRunner.landscape_key)."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in ("proxy", "data", "objective", "device", "train")}


def search_corpus(optimizer, corpus: Corpus, cfg: DictConfig, meter: CostMeter | None = None) -> Corpus:
    """The sources a method searches over and the target trains on: the data's
    own, unless the method regroups them first (CLIMB's clustering stage). The
    objective and the per-source validation losses stay on the original data.
    Given a meter, the method charges the regrouping's recorded cost to it (the
    same on a cache hit: every job that uses the clusters pays for them once)."""
    if not isinstance(optimizer, RegroupsSources):
        return corpus
    if meter is None:
        return optimizer.prepare_corpus(corpus, cfg.data)
    with meter.elsewhere():
        return optimizer.prepare_corpus(corpus, cfg.data, meter)


def build(node: DictConfig, group: str = "optimizer", **extra):
    """An object from a flat config group (`_target_`, `name`, its parameters), as
    optimizers and executors are, so a sweep overrides `optimizer.lr=...`; `name` is
    a label. Its values are checked first (fastmix.schema.check_params: a method's
    dataclass fields, an objective's or executor's `Params`; errors name `group.key`); the object's own bad-input message comes out as itself."""
    schema.check_params(node, group)
    # resolved here: `scale: ${scale}` points at the job config's root
    params = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"}
    try:
        built = instantiate(params, _convert_="all", **extra)
    except InstantiationException as e:  # Hydra wraps the method's own bad-input message
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise
    if group == "optimizer" and not isinstance(built, MixtureOptimizer):
        raise UserError(f"optimizer {params.get('_target_')} is not a mixture optimizer: it needs `name`, "
                        f"`search(ctx)` and `planned_proxy_runs(n)` (fastmix.search.optimizer.MixtureOptimizer).")
    return built


def proxy_folder(cfg: DictConfig, out_dir: Path) -> tuple[Path, dict | None]:
    """(where a search's proxy units go, what they are scored on). `proxy_dir=sweep` in a
    multirun: <sweep>/proxies/<optimizer>_seed<seed>, shared by the sweep's jobs of every
    objective, each unit scored on every source's and registered text's val windows (the
    objective's count of them) so any weighting of them is read off its record; else the
    job's own search/proxies/, scored on the job's objective."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    if cfg.get("proxy_dir") != "sweep" or not (HydraConfig.initialized()
                                              and HydraConfig.get().mode == RunMode.MULTIRUN):
        return out_dir / "proxies", None
    texts = {n: str(p) for n, p in ((cfg.get("oracle") or {}).get("texts") or {}).items()}
    scoring = {"_target_": "fastmix.search.objective.LandscapeObjective", "texts": texts,
               "max_tokens_per_source": cfg.objective.max_tokens_per_source,
               "test_tokens_per_source": cfg.eval.test_tokens_per_source, "batch_size": cfg.objective.batch_size}
    # against the command's directory, not the job folder Hydra switched to (a relative
    # sweep dir would otherwise put each job's "shared" proxies inside that job)
    root = abspath(HydraConfig.get().sweep.dir) / "proxies" / f"{cfg.optimizer.name}_seed{cfg.seed}"
    return root, scoring


def search_context(cfg: DictConfig, sources: Corpus, objective, meter: CostMeter, device, out_dir: Path,
                   identity: str | None = None, objective_root: Path | None = None) -> SearchContext:
    """The context a method searches in, built from the job's config: the only place
    a method's view of the config is made (it gets typed settings, not the config)."""
    # Data-parallel ranks train each proxy together, one after the other: fanning out
    # from every rank would run each proxy W times (and the workers would inherit the
    # launcher's variables).
    executor = (build(cfg.executor, "executor", folder=str(out_dir / "proxies" / "submitit"))
                if distributed.world_size() == 1 else InProcess())
    proxy = schema.run_config(cfg.proxy)
    folder, scoring = proxy_folder(cfg, out_dir)
    runner = ProxyRunner(sources, objective, meter, device, proxy, proxy_settings(cfg), executor,
                         folder, cfg.seed, cfg.progress, identity, objective_root=objective_root, scoring=scoring)
    return SearchContext(sources, objective, meter, cfg.seed, out_dir, runner, device, proxy,
                         schema.run_config(cfg.train), schema.eval_config(cfg.eval))


def run_search(cfg: DictConfig, optimizer, corpus: Corpus, objective, meter: CostMeter, device,
               out_dir: Path, identity: str | None = None) -> tuple[Corpus, SearchResult]:
    """The search stage: (the sources searched over, the validated result). Every
    proxy is paid for through `meter`'s search stage, in process or fanned out."""
    with meter.stage("search"):
        sources = search_corpus(optimizer, corpus, cfg, meter)  # = corpus unless the method regroups it
        ctx = search_context(cfg, sources, objective, meter, device, out_dir, identity, corpus.root)
        # the method may not read the test split (fastmix.data: the seal; the oracle is exempt)
        sealed = nullcontext() if getattr(optimizer, "reads_test_split", False) else test_split_sealed(
            f"optimizer={getattr(optimizer, 'name', type(optimizer).__name__)}")
        with sealed:
            result = optimizer.search(ctx)
        return sources, result.validated(sources.sources)


def _start(cfg: DictConfig, run_dir: Path) -> torch.device:
    """Check the config, set threads, ranks, device and seed; log where the job runs."""
    schema.check(cfg)  # a bad value stops here, before any work
    threads = set_threads(cfg.threads)
    quiet_library_bars()
    distributed.init()  # before the device (cuda:LOCAL_RANK) and the meter (devices x ranks)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    log.info("device %s, %d torch threads, rank %d of %d, run folder %s", device, threads,
             distributed.rank(), distributed.world_size(), run_dir)
    return device


def _inputs(cfg: DictConfig):
    """(corpus, objective, the eval settings, the eval suite): everything the job reads,
    built and checked before any training, so missing text or task data stops it now."""
    # Rank 0 builds (or finds) the token cache first; the others then read it instead
    # of each training the same tokenizer.
    if not distributed.is_main():
        distributed.barrier()
    corpus = prepare_corpus(cfg.data)
    if distributed.is_main():
        distributed.barrier()
    objective = instantiate(cfg.objective, _partial_=True)(corpus=corpus)
    objective.held_out().rows(cfg.train.model.context)  # the target's objective_loss needs test text
    ev = schema.eval_config(cfg.eval)  # the eval kind's keys with their defaults
    suite = suite_from_config(ev, corpus)
    if suite:
        load_tasks(suite)  # a task whose data is missing stops the job here
    return corpus, objective, ev, suite


def _evaluate(cfg: DictConfig, target, corpus: Corpus, objective, ev, suite: dict, device, meter: CostMeter,
              run_dir: Path) -> dict:
    """Every score of the target, on the test split (the search read the val split only)."""
    precision = cfg.train.precision
    val_loss = per_source_test_loss(target, corpus, ev, device, meter, precision)
    objective_loss = objective.held_out().loss(target, device, meter, precision)
    scores = (evaluate_suite(target, corpus.tokenizer, suite, device, ev.batch_size, ev.limit, meter, precision)
              if suite else {"scores": {}, "metrics": {}, "average": None, "results": {}})
    # re-scoring the saved model/ with stock lm-eval: the task folder and the commands
    rescore = (lm_eval_commands(run_dir / "model", suite, ev.limit, ev.batch_size)
               if suite and cfg.train.keep_model else {})
    return {"val_loss": val_loss, "objective_loss": objective_loss, "scores": scores, "rescore": rescore}


def _record(cfg: DictConfig, run_dir: Path, objective, result: SearchResult, meter: CostMeter, found: dict,
            corpus: Corpus) -> dict:
    """result.json's row; rank 0 writes eval.json, cost.json, result.json and, last, DONE."""
    cost, scores, rescore, val_loss = meter.to_dict(), found["scores"], found["rescore"], found["val_loss"]
    row = {
        "optimizer": cfg.optimizer.name, "seed": cfg.seed, "data": cfg.data.name,
        "corpus": corpus.root.name,  # the token cache's key: the sources' contents, tokenizer and splits
        "objective": objective.describe(), "proxy": cfg.proxy.name, "target": cfg.train.name,
        "weights": result.weights, "search_cost": cost["search"], "train_cost": cost["train"],
        "eval_cost": cost["eval"], "eval_suite": cfg.eval.name, "eval": scores["scores"],
        "eval_metrics": scores["metrics"], "eval_average": scores["average"], **rescore,
        "eval_split": "test", "val_loss": val_loss,
        "val_loss_average": sum(val_loss.values()) / len(val_loss) if val_loss else None,
        "scored_by": "trained target" if val_loss else "fitted landscape",
        "objective_loss": found["objective_loss"], "search_info": result.info, "versions": records.versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if distributed.is_main():
        records.write_json(run_dir / "eval.json", {"suite": cfg.eval.name, **rescore, **scores, "eval_split": "test",
                                                   "val_loss": val_loss, "objective_loss": found["objective_loss"]})
        records.write_json(run_dir / "cost.json", cost)
        records.write_json(run_dir / "result.json", row)
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # the model is in model/; the rest is resume state
        records.mark_done(run_dir, cfg)
    distributed.barrier()  # no rank reports the job done before DONE is written
    return row


def trains_target(cfg: DictConfig) -> bool:
    """Whether this job trains its target: always, unless `oracle.targets=fitted` (the
    oracle suite's method jobs, scored by the fitted landscape), where only the
    `oracle.verify` jobs ("<optimizer>/<seed>/<objective name>") do."""
    oracle = cfg.get("oracle") or {}
    if oracle.get("targets", "all") not in ("all", "fitted"):
        raise UserError(f"oracle.targets={oracle.get('targets')!r} is unknown: use all (every job trains its "
                        f"target) or fitted (the fitted landscape scores them; oracle.verify still train).")
    if oracle.get("targets", "all") == "all":
        return True
    return f"{cfg.optimizer.name}/{cfg.seed}/{cfg.objective.get('pick', cfg.objective.name)}" in set(oracle.get("verify") or [])


def run_job(cfg: DictConfig, run_dir: Path) -> dict:
    """One job: search -> train the target -> evaluate -> record; returns result.json's row."""
    run_dir = Path(run_dir)
    device = _start(cfg, run_dir)
    # what DONE will record; a checkpoint in this folder is resumed only if saved under it
    identity = records.fingerprint(records.job_config(cfg))
    corpus, objective, ev, suite = _inputs(cfg)
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

    if not trains_target(cfg):  # experiment=oracle: the fitted landscape scores this mixture
        log.info("no target: this job's mixture is scored by the fitted landscape (oracle.targets=fitted)")
        empty = {"val_loss": {}, "objective_loss": None, "rescore": {},
                 "scores": {"scores": {}, "metrics": {}, "average": None, "results": {}}}
        for stage in ("train", "eval"):  # charged nothing: cost.json keeps its three stages
            with meter.stage(stage):
                pass
        return _record(cfg, run_dir, objective, result, meter, empty, corpus)

    # 2. train the target model on the mixture (sources sampled by w)
    with meter.stage("train"):
        target, _ = train_on_mixture(sources, cfg.train, result.weights, run_dir, device, meter,
                                     cfg.seed, desc="target", progress=cfg.progress, identity=identity)
        if cfg.train.keep_model and distributed.is_main():
            save_with_tokenizer(target, corpus.tokenizer, run_dir / "model")

    # 3. evaluate, 4. record (rank 0 writes: the same numbers on every rank)
    with meter.stage("eval"):
        found = _evaluate(cfg, target, corpus, objective, ev, suite, device, meter, run_dir)
    return _record(cfg, run_dir, objective, result, meter, found, corpus)
