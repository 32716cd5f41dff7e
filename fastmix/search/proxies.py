"""Proxy runs: the one way a method trains proxies, and what it gets back.

A method asks `ctx.proxies` (a `ProxyRunner`) for proxies in one of two ways:

* `run(jobs)`: each `ProxyJob` (a mixture by source name, its tokens, seed, a
  model to continue from, what to keep and which split to score) becomes one
  resumable unit (`ProxyUnit`) through the configured executor (in process,
  worker processes, a SLURM array), and comes back as a `ProxyRecord`: the
  objective's loss, every objective group's loss, the cost. A finished unit's
  record is reused when everything that determines it matches.
* `train(weights, out_dir, ...)`: one proxy in this process through the one
  loop, with a hook (FastMix's and DoReMi's online updates).

Both charge the search stage of the job's meter. A worker process or SLURM task
gets the searched corpus's folder (the token cache, or CLIMB's clusters) and the
objective's, never the optimizer to rebuild.
"""
from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from submitit.helpers import Checkpointable

from fastmix import records
from fastmix.data.corpus import Corpus, check_not_sealed, open_corpus, test_split_sealed
from fastmix.errors import UserError
from fastmix.train import distributed
from fastmix.train.cost import Cost, CostMeter
from fastmix.train.loop import resolve_device, set_threads, train_on_mixture

log = logging.getLogger(__name__)


@dataclass
class ProxyJob:
    """One proxy a method asks for. The runner fills `index`, `out_dir` and a
    missing `seed` (the job's) before it runs."""
    weights: Mapping[str, float]  # source name -> weight
    tag: str  # names the units: <tag>_<index> under the search's proxies/ folder
    seed: int | None = None
    tokens: int | None = None  # this run's token budget, if not the proxy config's
    init_from: str | None = None  # a saved model to continue from (DeMix's components)
    keep_model: bool = False  # save the trained proxy to <out_dir>/model (MixMin, DeMix score them later)
    overrides: dict | None = None  # proxy-config keys replaced for this run (DeMix's components; the oracle's target)
    score: str = "val"  # the objective's split it is scored on (test: the oracle's grid of targets)
    objective: dict | None = None  # an objective config to score on instead of the search's (the oracle's landscape)
    where: str | None = None  # another folder for the unit (shared between jobs: the oracle's grid)
    name: str | None = None  # the unit's folder name (default <tag>_<index>)
    index: int = 0
    out_dir: str = ""  # absolute: the unit may run in another process or on another node


@dataclass
class ProxyRecord:
    """What a proxy run measured (its record.json, and a row of the search trace)."""
    index: int
    tag: str
    weights: dict[str, float]
    objective: float  # the objective's loss on `split`
    split: str
    cost: dict  # fastmix.train.cost.Cost.to_dict()
    seed: int
    dir: str
    fingerprint: str
    setup: dict  # what determines the record (fingerprinted)
    losses: dict[str, float] = field(default_factory=dict)  # each objective group's mean loss on `split`
    model_dir: str | None = None
    overrides: dict | None = None

    def to_dict(self) -> dict:
        """The record as record.json and the trace have it (unset optional keys left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("model_dir", "overrides")}

    @classmethod
    def from_dict(cls, d: dict) -> ProxyRecord:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__ if k in d})


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
    """One proxy run as a resumable unit: train a proxy on the job's mixture through
    the one loop, score it on the objective, write `record.json` and drop the
    checkpoint. A finished unit returns its record without training. Picklable
    (plain settings and folder paths), so it runs the same in this process, in a
    worker process or as a SLURM array task. A Submitit `Checkpointable`: a task
    that times out or is preempted is requeued with the same job, and the loop
    resumes from the unit's checkpoint.pt (the default `checkpoint` resubmits
    `self(job)`: the state that matters is on disk).

    A record is reused only if it was made by the same setup: `setup` lists what
    decides its numbers and the record keeps its fingerprint. Any other record in
    the folder (another config, an earlier version's record without one) is
    retrained and overwritten, with a warning naming what changed, in the job's own
    folder and in a shared one alike (the oracle's grid): a shared record that no
    longer matches is a stale measurement, the one thing a reused grid must not
    keep; the unit lock keeps two jobs from training it at once.

    `settings`: the plain config pieces a proxy needs (proxy, data, objective,
    device; data and objective are fingerprinted, not read); `corpus_root`: the
    searched sources' folder (its name is their cache key: contents, tokenizer,
    splits, and for CLIMB's clusters the clustering); `objective_root`: the folder
    of the data the objective reads (the original sources)."""

    def __init__(self, settings: dict, corpus_root: str, objective_root: str, threads: int | None = None):
        self.settings, self.threads = settings, threads
        self.corpus_root, self.objective_root = str(corpus_root), str(objective_root)
        self._loaded = None  # (corpus, objective), built on first use in the process that runs it
        self._scorers: dict[str, object] = {}  # a job's own objective (ProxyJob.objective), by its fingerprint

    def __getstate__(self):
        return {**self.__dict__, "_loaded": None, "_scorers": {}}

    def setup(self, proxy: dict, job: ProxyJob) -> dict:
        """Everything that determines a unit's record, normalised as a job's config is."""
        base = None  # the record `init_from` comes from: a retrained base invalidates what continued it
        if job.init_from and (Path(job.init_from).parent / "record.json").exists():
            base = json.loads((Path(job.init_from).parent / "record.json").read_text()).get("fingerprint")
        s = self.settings
        return records.job_config({
            "proxy": proxy, "data": s["data"], "objective": job.objective or s["objective"], "device": s["device"],
            "seed": job.seed, "tokens": job.tokens, "weights": dict(job.weights), "score_split": job.score,
            "init_from": job.init_from, "base": base, "corpus": Path(self.corpus_root).name})

    def _load(self) -> tuple[Corpus, object]:
        if self._loaded is None:  # a worker: the folders the parent built
            corpus = open_corpus(Path(self.corpus_root))
            data = corpus if self.objective_root == self.corpus_root else open_corpus(
                Path(self.objective_root), tokenizer=corpus.tokenizer)
            objective = instantiate(OmegaConf.create(self.settings["objective"]), _partial_=True)(corpus=data)
            self._loaded = corpus, objective
        return self._loaded

    def _objective(self, job: ProxyJob):
        """The objective a job is scored on: the search's, or the job's own, built once per process."""
        corpus, objective = self._load()
        if not job.objective:
            return objective
        key = records.fingerprint(job.objective)
        if key not in self._scorers:
            data = corpus if self.objective_root == self.corpus_root else open_corpus(
                Path(self.objective_root), tokenizer=corpus.tokenizer)
            self._scorers[key] = instantiate(OmegaConf.create(job.objective), _partial_=True)(corpus=data)
        return self._scorers[key]

    def __call__(self, job: ProxyJob) -> dict:
        with unit_lock(Path(job.out_dir)):
            return self._run(job, Path(job.out_dir)).to_dict()

    def _run(self, job: ProxyJob, out: Path) -> ProxyRecord:
        proxy = OmegaConf.create(self.settings["proxy"])
        if job.tokens is not None:
            proxy.tokens = job.tokens
        if job.overrides:
            proxy = OmegaConf.merge(proxy, job.overrides)
        setup = self.setup(proxy, job)
        key = records.fingerprint(setup)
        record_path = out / "record.json"
        if record_path.exists():
            old = json.loads(record_path.read_text())
            if old.get("fingerprint") == key:
                return ProxyRecord.from_dict(old)
            why = (records.config_changes(old["setup"], setup) if "setup" in old
                   else "no fingerprint: an earlier version made it")
            log.warning("%s: retraining, its record was made by another setup (%s)", out, why)
        if self.threads:
            set_threads(self.threads)
        corpus, objective = self._load()[0], self._objective(job)
        device = resolve_device(self.settings["device"])
        meter = CostMeter(device)
        # a search's proxy reads train and val only, in a worker too; a test-split score is
        # the oracle's grid (checked in the searching process when it was asked for)
        sealed = nullcontext() if job.score == "test" else test_split_sealed(f"proxy {job.tag}/{job.index}")
        with sealed, meter.stage("proxy"):
            meter.add_proxy_run()
            model, _ = train_on_mixture(corpus, proxy, job.weights, out, device, meter, job.seed,
                                        desc=f"proxy {job.tag}/{job.index}", progress=False,
                                        init_from=Path(job.init_from) if job.init_from else None,
                                        identity=key)
            scored = objective.held_out() if job.score == "test" else objective
            value, losses = scored.losses(model, device, meter, proxy.precision)
        record = ProxyRecord(job.index, job.tag, dict(job.weights), value, job.score,
                             meter.stages["proxy"].to_dict(), job.seed, str(out), key, setup, losses,
                             str(out / "model") if job.keep_model else None,
                             dict(job.overrides) if job.overrides else None)
        if distributed.is_main():
            if job.keep_model:
                model.save_pretrained(out / "model")  # before the record: a record means the model is there
            records.write_json(record_path, record.to_dict())
            (out / "checkpoint.pt").unlink(missing_ok=True)  # a paper-scale proxy checkpoint is ~300 MB
        distributed.barrier()  # every rank sees the record (and model) before its next `exists` check
        return record


class ProxyRunner:
    """`ctx.proxies`: a search's proxies, through the one loop and the one meter.

    `proxy`: the proxy's run settings (schema-checked); `settings`: the plain config
    pieces a unit needs (fastmix.run.pipeline.proxy_settings); `executor`: where units run
    (fastmix.run.fanout); `folder`: the search's proxies/ folder."""

    def __init__(self, corpus: Corpus, objective, meter: CostMeter, device: torch.device, proxy, settings: dict,
                 executor, folder: Path, seed: int, progress: bool = True, identity: str | None = None,
                 objective_root: Path | None = None, scoring: dict | None = None):
        self.corpus, self.objective, self.meter, self.device = corpus, objective, meter, device
        self.proxy, self.executor, self.folder, self.seed = proxy, executor, Path(folder), seed
        self.progress, self.identity = progress, identity
        # shared proxies (proxy_dir=sweep): every unit is scored on every source's and registered
        # text's val windows (`scoring`, a LandscapeObjective config), not on the search's
        # objective, so jobs of other objectives reuse it; the objective is read off its losses
        self.scoring = scoring
        self._columns = self._objective_columns() if scoring else None
        self.unit = ProxyUnit(settings, str(corpus.root), str(objective_root or corpus.root),
                              getattr(executor, "threads", None))
        if executor.name == "inprocess":
            self.unit._loaded = corpus, objective  # already in memory

    def landscape_key(self, scored_on: dict) -> str:
        """The fingerprint of what a grid of targets measures: the data, the target's
        settings and what each target is scored on (`scored_on`: the landscape objective's
        config, every source and registered text), not the search's objective: a sweep for
        another objective reuses the grid (the oracle names its shared grid's folder by it)."""
        s = self.unit.settings
        return records.fingerprint(records.job_config({"data": s["data"], "train": s["train"],
                                                       "scored_on": scored_on}))

    def _objective_columns(self) -> dict[str, str]:
        """The search objective's groups as the shared scoring's groups: a source is
        itself; a text objective is the registered text with the same content."""
        from fastmix.search.objective import TextFileObjective, file_identity
        texts = {file_identity(Path(p)): n for n, p in (self.scoring.get("texts") or {}).items()}
        out = {}
        for g in self.objective.weights:
            if g in self.objective.corpus.sources:  # the original sources (CLIMB searches clusters)
                out[g] = g
            elif isinstance(self.objective, TextFileObjective) and self.objective.identity() in texts:
                out[g] = texts[self.objective.identity()]
            else:
                raise UserError(f"proxy_dir=sweep shares proxies across objectives, so each is scored on the "
                                f"sources and registered texts (oracle.texts); objective group '{g}' is neither: "
                                f"register its text in oracle.texts, or set proxy_dir=null.")
        return out

    def run(self, jobs: list[ProxyJob]) -> list[ProxyRecord]:
        """One unit per job, in order; each record's cost (finished earlier or just now,
        here or elsewhere) is charged to the open stage: a reused record costs what it
        cost, so a method's search cost is its standalone cost, wherever it was paid."""
        if not jobs:
            return []
        resolved = self.resolve(jobs)
        log.info("%s: %d proxy runs (%s executor)", jobs[0].tag, len(jobs), self.executor.name)
        with self.meter.elsewhere():
            done = [ProxyRecord.from_dict(r) for r in self.executor.map(self.unit, resolved)]
        for r in done:
            self.meter.add(Cost.from_dict(r.cost))
        if self._columns is not None:  # shared: this search's objective, read off every group's loss
            for r, j in zip(done, resolved):
                if j.objective is self.scoring:  # r.losses: every source's and text's, as recorded
                    r.objective = sum(self.objective.weights[g] * r.losses[c] for g, c in self._columns.items())
        return done

    def resolve(self, jobs: list[ProxyJob]) -> list[ProxyJob]:
        """The jobs as units run them: index, seed (the job's if unset), plain float
        weights and an absolute folder. A test-split score is refused during a search."""
        if any(j.score == "test" for j in jobs):
            check_not_sealed("its proxies' scores on the test split")  # only the oracle, which is not sealed
        out = []
        for i, j in enumerate(jobs):
            weights = {k: float(v) for k, v in j.weights.items()}
            name = j.name or f"{j.tag}_{i:04d}"
            if self.scoring and j.score == "val" and j.objective is None:
                # shared: scored on every group, and named by its mixture too, so another
                # objective's search that asks for other mixtures (CLIMB's later rounds) does
                # not overwrite this one
                j = replace(j, objective=self.scoring)
                name = j.name or f"{j.tag}_{i:04d}_{records.fingerprint(weights)[:8]}"
            out.append(replace(j, index=i, seed=self.seed if j.seed is None else int(j.seed), weights=weights,
                               out_dir=str((Path(j.where) if j.where else self.folder) / name)))
        return out

    def train(self, weights: Mapping[str, float], out_dir: Path, *, weighted: bool = False, hook=None,
              hook_every: int = 1, desc: str = "proxy"):
        """One proxy in this process through the one loop: (model, last metrics).
        weighted=False: sources sampled by w; True: sampled uniformly, loss weighted by w."""
        self.meter.add_proxy_run()
        return train_on_mixture(self.corpus, self.proxy, dict(weights), out_dir, self.device, self.meter, self.seed,
                                weighted=weighted, hook=hook, hook_every=hook_every, desc=desc,
                                progress=self.progress, identity=self.identity)
