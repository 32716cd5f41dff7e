"""The stages of one job: search -> train the target -> evaluate -> record.

run.py composes the config and calls `run_job`; everything a stage needs is
built here from the config, so the stages read top to bottom.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fastmix import records
from fastmix.cost import CostMeter
from fastmix.data import Corpus, prepare_corpus
from fastmix.evaluation import evaluate_suite, load_tasks, suite_from_config
from fastmix.models import build_model
from fastmix.optimizer import SearchContext, SearchResult
from fastmix.objective import ValidationObjective
from fastmix.sampling import MixtureSampler
from fastmix.train import Trainer, resolve_device, set_threads

log = logging.getLogger(__name__)


def new_model(corpus: Corpus, shape: DictConfig, seed: int):
    tok = corpus.tokenizer
    return build_model(OmegaConf.to_container(shape), corpus.vocab_size, tok.bos_token_id,
                       tok.eos_token_id, tok.pad_token_id, seed=seed)


def train_on_mixture(corpus: Corpus, run_cfg: DictConfig, weights: dict[str, float], out_dir: Path,
                     device: torch.device, meter: CostMeter, seed: int, weighted: bool = False,
                     hook=None, hook_every: int = 1, desc: str = "train", progress: bool = True):
    """Train a fresh model of `run_cfg.model` on a mixture through the one loop.
    weighted=False: sources sampled by w. weighted=True: sampled uniformly, loss
    weighted by w (FastMix, DoReMi). Returns (model, last metrics)."""
    model = new_model(corpus, run_cfg.model, seed)
    arrays = {s: corpus.tokens[s]["train"] for s in corpus.sources}
    masks = {s: corpus.mask(s, "train") for s in corpus.sources}
    sampler = MixtureSampler(arrays, run_cfg.model.context, run_cfg.batch_size, seed,
                             probs=None if weighted else weights,
                             loss_weights=weights if weighted else None, masks=masks)
    trainer = Trainer(model, sampler, run_cfg, device, meter, out_dir, hook=hook, hook_every=hook_every,
                      desc=desc, progress=progress)
    last = trainer.train()
    return model, last


def per_source_val_loss(model, corpus: Corpus, cfg_eval, device, meter, precision) -> dict[str, float]:
    """Each source's validation loss (answer tokens only for post-training sources)."""
    return {s: ValidationObjective(corpus, weights={s: 1.0}, max_tokens_per_source=cfg_eval.val_tokens_per_source,
                                   batch_size=cfg_eval.batch_size).loss(model, device, meter, precision)
            for s in corpus.sources}


def build_optimizer(opt_cfg: DictConfig):
    """`conf/optimizer/<name>.yaml` is flat (`_target_`, `name`, the method's
    parameters) so a sweep overrides `optimizer.lr=...`; `name` is a label."""
    params = {k: v for k, v in OmegaConf.to_container(opt_cfg).items() if k != "name"}
    return instantiate(params, _convert_="all")


def run_job(cfg: DictConfig, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    threads = set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    log.info("device %s, %d torch threads, run folder %s", device, threads, run_dir)

    corpus = prepare_corpus(cfg.data)
    objective = instantiate(cfg.objective, _partial_=True)(corpus=corpus)
    suite = suite_from_config(cfg.eval, corpus)
    if suite:
        load_tasks(suite)  # a task whose data is missing stops the job now, before any training
    optimizer = build_optimizer(cfg.optimizer)
    meter = CostMeter(device)

    # 1. search
    with meter.stage("search"):
        def train_proxy(weights, out_dir, seed=cfg.seed, **kw):
            meter.add_proxy_run()
            return train_on_mixture(corpus, cfg.proxy, weights, out_dir, device, meter, seed,
                                    progress=cfg.progress, **kw)
        ctx = SearchContext(corpus, objective, meter, cfg.seed, run_dir / "search", train_proxy, cfg)
        result: SearchResult = optimizer.search(ctx).validated(corpus.sources)
    log.info("mixture (%s): %s", cfg.optimizer.name,
             ", ".join(f"{k}={v:.3f}" for k, v in result.weights.items()))
    records.write_json(run_dir / "mixture.json", {"weights": result.weights, "optimizer": cfg.optimizer.name,
                                                  "sources": corpus.sources, "info": result.info})
    records.write_jsonl(run_dir / "search_trace.jsonl", result.trace)

    # 2. train the target model on the mixture (sources sampled by w)
    with meter.stage("train"):
        target, _ = train_on_mixture(corpus, cfg.train, result.weights, run_dir, device, meter,
                                     cfg.seed, desc="target", progress=cfg.progress)
        if cfg.train.keep_model:
            target.save_pretrained(run_dir / "model")
            corpus.tokenizer.save_pretrained(run_dir / "model")

    # 3. evaluate
    with meter.stage("eval"):
        val_loss = per_source_val_loss(target, corpus, cfg.eval, device, meter, cfg.train.precision)
        objective_loss = objective.loss(target, device, meter, cfg.train.precision)
        scores = (evaluate_suite(target, corpus.tokenizer, suite, device, cfg.eval.batch_size, cfg.eval.get("limit"),
                                 meter, cfg.train.precision) if suite else
                  {"scores": {}, "metrics": {}, "average": None, "results": {}})
    records.write_json(run_dir / "eval.json", {"suite": cfg.eval.name, **scores, "val_loss": val_loss,
                                               "objective_loss": objective_loss})

    # 4. record
    cost = meter.to_dict()
    records.write_json(run_dir / "cost.json", cost)
    result_row = {
        "optimizer": cfg.optimizer.name, "seed": cfg.seed, "data": cfg.data.name,
        "objective": objective.describe(), "proxy": cfg.proxy.name, "target": cfg.train.name,
        "weights": result.weights, "search_cost": cost["search"], "train_cost": cost["train"],
        "eval_cost": cost["eval"], "eval_suite": cfg.eval.name, "eval": scores["scores"],
        "eval_metrics": scores["metrics"], "eval_average": scores["average"],
        "val_loss": val_loss, "val_loss_average": sum(val_loss.values()) / len(val_loss),
        "objective_loss": objective_loss, "versions": records.versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    records.write_json(run_dir / "result.json", result_row)
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # the model is in model/; the rest is resume state
    records.mark_done(run_dir)
    return result_row
