"""The one cost meter every method pays through.

FLOP rule (write-down of DESIGN.md's): training a model on D tokens costs
6*N*D, a forward-only pass (evaluation, scoring) 2*N*D, where N is every
parameter except the input-embedding table (the LM head counts; see
`fastmix.train.models.flop_params`). Attention's T^2 term is left out, as in the
RegMix and Chinchilla accounting, so costs stay comparable with the papers.
device_hours = sum over the work of seconds x devices / 3600, where `devices`
is the number of GPUs, or on CPU the share of the machine's cores the process
used (torch threads / cores). So two 1-thread proxies side by side on a 2-core
machine pay what one 2-thread proxy pays in the same time, and a search's
device-hours do not depend on the executor that ran its proxies.
Data-parallel training (fastmix.train.distributed) over W ranks: `devices` is W x one
rank's, so device-hours are wall time x all devices; each rank's meter charges
the FLOPs and tokens of the global batch (all ranks' tokens), and rank 0's
meter is the one written, so the work is counted once, not W times.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch

from fastmix.train import distributed


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


@dataclass
class Cost:
    wall_seconds: float = 0.0
    device: str = "cpu"
    devices: float = 1.0  # GPUs; on CPU the share of the cores used (see the module docstring)
    flops: float = 0.0
    tokens: int = 0
    proxy_runs: int = 0
    peak_memory_bytes: int = 0
    device_hours: float = 0.0  # summed as work is charged: seconds x devices / 3600

    def add_train(self, n_params: int, tokens: int) -> None:
        """The 6ND rule for a training step (forward + backward), charged here only."""
        self.flops += 6.0 * n_params * tokens
        self.tokens += tokens

    def add_time(self, seconds: float, devices: float) -> None:
        self.wall_seconds += seconds
        self.device_hours += seconds * devices / 3600

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.wall_seconds + other.wall_seconds, self.device or other.device,
                    max(self.devices, other.devices), self.flops + other.flops,
                    self.tokens + other.tokens, self.proxy_runs + other.proxy_runs,
                    max(self.peak_memory_bytes, other.peak_memory_bytes),
                    self.device_hours + other.device_hours)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Cost:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def devices_in_use(device: torch.device) -> float:
    """1 per GPU; on CPU, the share of this process's cores that torch uses; times
    the data-parallel world size (call `distributed.init()` before building a meter)."""
    per_rank = 1.0 if device.type != "cpu" else min(1.0, torch.get_num_threads() / len(os.sched_getaffinity(0)))
    return per_rank * distributed.world_size()


def peak_memory_bytes(device: torch.device) -> int:
    """GPU: peak allocated by torch on that device. CPU: the process's peak
    resident set (ru_maxrss), which covers the whole process, not one stage."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class CostMeter:
    """Accumulates a `Cost` per stage (search, train, eval). Work is charged to
    the stage that is open; wall time is the time the stage was open."""

    def __init__(self, device: torch.device, devices: float | None = None):
        self.device = device
        self.devices = devices_in_use(device) if devices is None else devices  # set threads first
        self.stages: dict[str, Cost] = {}
        self._open: str | None = None
        self.device_name = device_name(device)

    @contextmanager
    def stage(self, name: str):
        if self._open is not None:
            raise RuntimeError(f"stage '{name}' opened inside stage '{self._open}'")
        self.stages.setdefault(name, Cost(device=self.device_name, devices=self.devices))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._open, start = name, time.perf_counter()
        try:
            yield self.stages[name]
        finally:
            c = self.stages[name]
            c.add_time(time.perf_counter() - start, self.devices)
            c.peak_memory_bytes = max(c.peak_memory_bytes, peak_memory_bytes(self.device))
            self._open = None

    @contextmanager
    def elsewhere(self):
        """Wall time inside this block is not the open stage's own: the work is done
        elsewhere (proxy runs in other processes or on SLURM) and charged with
        `add` from its records, so waiting for it must not count twice."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._current().add_time(-(time.perf_counter() - start), self.devices)

    def _current(self) -> Cost:
        if self._open is None:
            raise RuntimeError("cost charged outside a stage: open one with `with meter.stage(...)`")
        return self.stages[self._open]

    def add_train(self, n_params: int, tokens: int) -> None:
        self._current().add_train(n_params, tokens)

    def add_forward(self, n_params: int, tokens: int) -> None:
        c = self._current()
        c.flops += 2.0 * n_params * tokens
        c.tokens += tokens

    def add_proxy_run(self, n: int = 1) -> None:
        self._current().proxy_runs += n

    def add(self, cost: Cost) -> None:
        """Charge work done elsewhere (a resumed run's earlier part, a proxy run in
        another process) to the open stage, wall time included."""
        c = self._current()
        merged = c + cost
        for f in fields(Cost):
            setattr(c, f.name, getattr(merged, f.name))

    def to_dict(self) -> dict:
        return {name: c.to_dict() for name, c in self.stages.items()}
