"""Shared fixtures: a tiny real-text corpus cut from the embedded corpus (which
`make test` builds first), and helpers to run the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmix.config import REPO, register_resolvers

register_resolvers()
EMBEDDED = REPO / "data" / "embedded"

# `make test` runs the tests in one pytest-xdist worker per core: each worker is
# pinned to its own core, so it and the jobs it starts (which take every core
# their process may use) do not oversubscribe the CPU
if os.environ.get("PYTEST_XDIST_WORKER") and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {_cores[int(os.environ["PYTEST_XDIST_WORKER"].lstrip("gw")) % len(_cores)]})


def cut_corpus(dst: Path, sources: list[str] | None = None, docs: int = 40, max_bytes: int = 40_000) -> Path:
    """A few whole documents of each embedded source, as one .jsonl per source."""
    if not (EMBEDDED / "manifest.json").exists():
        pytest.fail("the embedded corpus is missing: run `make corpus` (make test does it first)")
    for src in sorted(p for p in EMBEDDED.iterdir() if p.is_dir()):
        if sources and src.name not in sources:
            continue
        out, size = [], 0
        with open(src / "docs.jsonl") as fh:
            for line in fh:
                text = json.loads(line)["text"][:4000]
                out.append(json.dumps({"text": text}))
                size += len(text)
                if len(out) >= docs or size >= max_bytes:
                    break
        (dst / src.name).mkdir(parents=True, exist_ok=True)
        (dst / src.name / "docs.jsonl").write_text("\n".join(out) + "\n")
    return dst


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return cut_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in `cwd` (so outputs/ lands in a temp dir)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def smoke_args(tiny_corpus, cache_dir) -> list[str]:
    return ["experiment=smoke", "data=folder", f"data.root={tiny_corpus}", f"data.cache_dir={cache_dir}"]


def compose(overrides: list[str]):
    """The job config as run.py would see it (without Hydra's runtime keys)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def method(name: str, **params):
    """A method built as a job builds it, from conf/optimizer/<name>.yaml with `params`
    replacing its keys (so every value is checked by the method's dataclass fields)."""
    from omegaconf import open_dict

    from fastmix.run.pipeline import build
    node = compose([f"optimizer={name}"]).optimizer
    with open_dict(node):  # a misspelt key gets in, for build to refuse it
        for key, value in params.items():
            node[key] = value
    return build(node)


# ---------------------------------------------------------------- a search context of known answers
class ScriptedProxies:
    """`ctx.proxies` whose proxies are not trained: a job's record comes from
    `score(job) -> (objective, model_dir or None)`, so a method's search can be checked
    against a known optimum in milliseconds. It resolves jobs as the real runner does
    (fastmix.search.proxies.ProxyRunner.resolve) and keeps them, one list per call, in `calls`."""

    def __init__(self, score, folder: Path, seed: int):
        from fastmix.search.proxies import ProxyRunner
        self.score, self.folder, self.seed, self.calls = score, Path(folder), seed, []
        self.scoring = None  # not shared (proxy_dir=null)
        self.resolve = lambda jobs: ProxyRunner.resolve(self, jobs)

    def run(self, jobs):
        from fastmix.search.proxies import ProxyRecord
        jobs = self.resolve(jobs)
        self.calls.append(jobs)
        out = []
        for j in jobs:
            value, model_dir = self.score(j)
            out.append(ProxyRecord(j.index, j.tag, dict(j.weights), value, j.score, {}, j.seed, j.out_dir, "",
                                   {}, model_dir=model_dir, overrides=j.overrides))
        return out

    def train(self, *a, **kw):
        raise AssertionError("a scripted search trains no proxy in process")


def scripted_context(share: dict, objective, tmp_path: Path, score, seed: int = 0, proxy: dict | None = None,
                     eval: dict | None = None):
    """A real SearchContext over sources with the given token shares (a Corpus of
    empty token arrays of those sizes), the given objective and ScriptedProxies."""
    import numpy as np
    import torch

    from fastmix.data.corpus import Corpus
    from fastmix.schema import eval_config, run_config
    from fastmix.search.optimizer import SearchContext
    from fastmix.train.cost import CostMeter
    corpus = Corpus(tmp_path / "corpus", None, {s: {"train": np.zeros(int(round(v * 100_000)))} for s, v in share.items()},
                    {s: {} for s in share}, {})
    device = torch.device("cpu")
    return SearchContext(corpus, objective, CostMeter(device), seed, tmp_path, ScriptedProxies(score, tmp_path, seed),
                         device, run_config(proxy or {}), run_config({}), eval_config(eval or {"kind": "loss"}))
