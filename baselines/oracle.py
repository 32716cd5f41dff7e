"""The oracle: ground truth for a mixture search, by brute force (ours; no paper).

Every method's mixture is only as good as the target trained on it. The oracle
trains that target on every mixture of a grid over the simplex and keeps the
best, so a method's *regret* (its target's objective loss minus the oracle's,
analysis/oracle.py) says how far it landed from the best mixture it could have
found, beside what its search cost.

* Grid: every mixture of the K sources whose weights are multiples of 1/R,
  corners and edges included: C(R + K - 1, K - 1) mixtures (K = 3, R = 10: 66).
* Each grid mixture: a target of the job's `train` config (same model, token
  budget and schedule as every method's target) trained through the one loop
  at seed `grid_seed`, through the fan-out executor (in process, local
  workers, a SLURM array; resumable by record, like any proxy run), and
  scored on the job's objective on the *test* split, as every target is.
* Output: the best grid mixture. It and uniform are trained again at
  `noise_seeds` more seeds (grid_seed + 1, ...): their spread over seeds is the
  noise floor printed beside every regret. The whole landscape, the per-seed
  losses and the floor are in the trace and in `info["oracle"]`.
* Cost: every grid target and re-seeded run, charged to the search like any
  proxy run (proxy_runs counts them), so the oracle is an honest row of every
  table: what brute force costs.
* Shared grid (`grid_dir`): experiment=oracle puts it in the sweep's folder, so
  the oracle job of every seed, a re-run and a method added later reuse it.
  Units are locked while they run (fastmix.search.proxies.unit_lock) and each job
  walks the grid in an order drawn from its own seed, so two oracle jobs side
  by side split the grid instead of training it twice. A record there is
  reused only if it was made by the same setup (its fingerprint); one that was
  not is a stale measurement and is retrained and overwritten, with a warning,
  rather than kept beside a new one: the grid is one landscape per folder.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import OmegaConf

from fastmix.config import abspath
from fastmix.schema import rule
from fastmix.search.optimizer import SearchContext, SearchResult
from fastmix.search.proxies import ProxyJob


def simplex_grid(k: int, resolution: int) -> list[tuple[int, ...]]:
    """Every way to split `resolution` units over k sources (counts summing to R),
    in lexicographic order: the weights are counts / R."""
    # stars and bars: choose the k - 1 bar positions among R + k - 1 slots
    out = []
    for bars in itertools.combinations(range(resolution + k - 1), k - 1):
        edges = (-1, *bars, resolution + k - 1)
        out.append(tuple(edges[i + 1] - edges[i] - 1 for i in range(k)))
    return sorted(out, reverse=True)


@dataclass
class Oracle:
    name = "oracle"
    # the ground truth, not a search: it scores its grid of targets on the test split, so
    # the pipeline does not seal that split while it runs (fastmix.data.corpus.test_split_sealed)
    reads_test_split = True

    # conf/optimizer/oracle.yaml, whose values come from the top-level `oracle:` node
    resolution: int = rule(ge=1)  # R: weights in steps of 1/R
    grid_dir: Optional[str] = rule()
    grid_seed: int = rule(ge=0)
    noise_seeds: int = rule(ge=0)

    def grid_root(self, ctx: SearchContext) -> Path:
        """`grid_dir`: a folder; `sweep` = <the sweep's folder>/oracle_grid in a multirun
        (the job's own folder in a single run); null = the job's own folder."""
        if self.grid_dir == "sweep":
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                return abspath(HydraConfig.get().sweep.dir) / "oracle_grid"
            return ctx.out_dir / "oracle_grid"
        return abspath(self.grid_dir) if self.grid_dir else ctx.out_dir / "oracle_grid"

    def planned_proxy_runs(self, n_sources: int) -> int:
        return math.comb(self.resolution + n_sources - 1, n_sources - 1) + 2 * self.noise_seeds + 1

    def search(self, ctx: SearchContext) -> SearchResult:
        names, R = ctx.sources, self.resolution
        grid = simplex_grid(len(names), R)
        # every target of the grid is the job's target: its settings replace the proxy's
        target = OmegaConf.to_container(ctx.target, resolve=True)
        # a shared grid's folder is named by the data, objective and target it measures; each
        # record in it also keeps the fingerprint of its whole setup and is retrained if that
        # differs (fastmix.search.proxies.ProxyUnit)
        where = str(self.grid_root(ctx) / f"r{R}_{ctx.proxies.landscape_key()[:10]}")
        as_w = lambda counts: {n: c / R for n, c in zip(names, counts)}
        label = lambda counts: "-".join(map(str, counts))

        # a seeded walk order: oracle jobs of other seeds running beside this one start elsewhere
        order = (np.arange(len(grid)) if ctx.seed == self.grid_seed else
                 np.random.default_rng(ctx.seed).permutation(len(grid)))
        unit = lambda w, tag, seed, name: ProxyJob(w, tag, seed=seed, overrides=target, score="test",
                                                   where=where, name=name)
        done = ctx.proxies.run([unit(as_w(grid[i]), "grid", self.grid_seed, f"grid_{label(grid[i])}")
                                for i in order])
        loss = np.empty(len(grid))
        loss[order] = [float(r.objective) for r in done]
        best = int(np.nanargmin(loss))

        # the noise floor: the best grid mixture and uniform at more seeds
        extra = [self.grid_seed + j for j in range(1, self.noise_seeds + 1)]
        uniform = {n: 1.0 / len(names) for n in names}
        runs = [(as_w(grid[best]), s, f"best_{label(grid[best])}_seed{s}") for s in extra]
        runs += [(uniform, s, f"uniform_seed{s}") for s in [self.grid_seed, *extra]]
        again = ctx.proxies.run([unit(w, "noise", s, n) for w, s, n in runs])
        best_by_seed = {str(self.grid_seed): float(loss[best])}
        best_by_seed.update({str(s): float(r.objective) for (_, s, n), r in zip(runs, again) if n.startswith("best")})
        uniform_by_seed = {str(s): float(r.objective) for (_, s, n), r in zip(runs, again)
                           if n.startswith("uniform")}
        spread = [np.std(list(d.values()), ddof=1) for d in (best_by_seed, uniform_by_seed) if len(d) > 1]
        noise = float(np.mean(spread)) if spread else None

        landscape = [{"weights": as_w(c), "loss": float(v)} for c, v in zip(grid, loss)]
        trace = [{"kind": "grid", **row, "seed": self.grid_seed} for row in landscape]
        trace.append({"kind": "noise_floor", "best": as_w(grid[best]), "best_loss_by_seed": best_by_seed,
                      "uniform_loss_by_seed": uniform_by_seed, "noise_floor": noise})
        info = {"oracle": {"resolution": R, "sources": names, "grid_seed": self.grid_seed, "grid": landscape,
                           "best": as_w(grid[best]), "best_loss_by_seed": best_by_seed,
                           "uniform_loss_by_seed": uniform_by_seed, "noise_floor": noise,
                           "range": float(np.nanmax(loss) - np.nanmin(loss)), "grid_dir": str(where)}}
        return SearchResult(as_w(grid[best]), trace=trace, info=info)
