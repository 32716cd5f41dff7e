"""Data-parallel training (fastmix.train.distributed): two gloo ranks with batch_size B
each follow one process with batch_size 2B on real text, step for step; the
mixture hooks (FastMix's outer step, DoReMi's update) end with the same weights on
every rank and as in one process; cost counts the global tokens once and both
ranks' devices. Launched with torchrun, one torch thread per process.

The worker half of this file runs as a script (`__main__`), under torchrun or alone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = {"layers": 1, "hidden": 32, "ffn": 64, "heads": 2, "context": 32}
B, STEPS = 4, 20  # per-rank batch; the one-process run uses 2B


def train_cfg(batch_size: int, **over):
    from omegaconf import OmegaConf
    base = {"tokens": STEPS * 2 * B * TINY["context"], "batch_size": batch_size, "grad_accum": 1, "lr": 3e-3,
            "warmup_steps": 2, "schedule": "cosine", "min_lr_ratio": 0.1, "weight_decay": 0.1,
            "betas": [0.9, 0.95], "grad_clip": 1.0, "precision": "bf16", "log_every": 1, "ckpt_every": 5}
    return OmegaConf.create({**base, **over})


def worker(root: str, out: str) -> None:
    """Three short trainings through the one loop, written to `out`/<run>/ (the loop's
    own files) and `out`/result_rank<r>.json (this test's record of each rank)."""
    import numpy as np

    from baselines.doremi import DoReMiHook
    from fastmix.data.corpus import open_corpus
    from fastmix.fastmix import FastMixHook
    from fastmix.search.objective import ValidationObjective
    from fastmix.train import distributed
    from fastmix.train.cost import CostMeter
    from fastmix.train.loop import Trainer
    from fastmix.train.models import build_model
    from fastmix.train.sampling import MixtureSampler

    torch.set_num_threads(1)
    distributed.init()
    W, rank, cpu = distributed.world_size(), distributed.rank(), torch.device("cpu")
    bs = 2 * B // W  # per rank: the global micro-batch is 2B rows either way
    corpus = open_corpus(Path(root))
    names = corpus.sources[:3]
    arrays = {s: corpus.tokens[s]["train"] for s in names}
    # A loss mask on one source, so the ranks' loss normalisers differ (post-training data).
    masks = {names[0]: (np.random.default_rng(0).random(len(arrays[names[0]])) < 0.6).astype(np.float32)}
    new_model = lambda seed: build_model(TINY, corpus.vocab_size, seed=seed)
    res, outp = {}, Path(out)

    def run(tag, sampler, stop_after=None, **kw):
        meter = CostMeter(cpu)
        trainer = Trainer(new_model(0), sampler, train_cfg(bs), cpu, meter, outp / tag, progress=False, **kw)
        with meter.stage("train"):
            trainer.train(stop_after=stop_after)
        return meter.stages["train"].to_dict()

    # 1. a plain sampled mixture; the data-parallel run is killed after step 7 and resumed
    probs = dict(zip(names, (0.5, 0.3, 0.2)))
    plain = lambda: MixtureSampler(arrays, TINY["context"], bs * W, seed=3, probs=probs)
    if W > 1:
        run("plain", plain(), stop_after=7)
    res["plain_cost"] = run("plain", plain())

    # 2. FastMix: loss-weighted (masked rows too), outer step every 2 micro-batches
    objective = ValidationObjective(corpus, weights={names[1]: 1.0}, max_tokens_per_source=1024)
    hook = FastMixHook(names, objective, torch.zeros(3), 0.05, (0.9, 0.95), 0.0, "lm_head", 8, seed=0)
    weighted = MixtureSampler(arrays, TINY["context"], bs * W, seed=4, loss_weights={n: 1 / 3 for n in names},
                              masks=masks)
    res["fastmix_cost"] = run("fastmix", weighted, hook=hook, hook_every=2)
    res["fastmix_weights"] = hook.weights.tolist()

    # 3. DoReMi against an untrained reference: its update on every micro-batch
    ref = new_model(1).eval().requires_grad_(False)
    hook = DoReMiHook(names, ref, eta=5.0)
    weighted = MixtureSampler(arrays, TINY["context"], bs * W, seed=5, loss_weights={n: 1 / 3 for n in names},
                              masks=masks)
    res["doremi_cost"] = run("doremi", weighted, hook=hook)
    res["doremi_alpha"], res["doremi_average"] = hook.alpha.tolist(), hook.average.tolist()
    (outp / f"result_rank{rank}.json").write_text(json.dumps(res))


def _launch(root, out: Path, ranks: int) -> subprocess.Popen:
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [__file__, str(root), str(out)]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    cmd = [sys.executable, *launcher, *cmd]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(path: Path) -> list[dict]:
    return [json.loads(r) for r in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_corpus, cache_dir, tmp_path_factory):
    from conftest import compose

    from fastmix.data.corpus import prepare_corpus
    corpus = prepare_corpus(compose(["experiment=smoke", "data=folder", f"data.root={tiny_corpus}",
                                     f"data.cache_dir={cache_dir}"]).data)
    tmp = tmp_path_factory.mktemp("ddp")
    procs = {"ddp": _launch(corpus.root, tmp / "ddp", 2), "one": _launch(corpus.root, tmp / "one", 1)}
    for name, p in procs.items():
        log, _ = p.communicate(timeout=240)
        assert p.returncode == 0, f"{name} run failed:\n{log[-4000:]}"
    return tmp


def test_two_ranks_follow_one_process_with_the_global_batch(runs):
    ddp, one = _metrics(runs / "ddp" / "plain" / "metrics.jsonl"), _metrics(runs / "one" / "plain" / "metrics.jsonl")
    # one row per step (rank 1 wrote nothing; the resumed steps 6-7 are not duplicated)
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    assert one[-1]["loss"] < one[0]["loss"] - 0.2  # it learns
    for a, b in zip(ddp, one):
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["source_loss"].keys() == b["source_loss"].keys()
        for n in a["source_loss"]:
            assert a["source_loss"][n] == pytest.approx(b["source_loss"][n], rel=1e-5)


def test_weighted_masked_training_and_hooks_match(runs):
    r0, r1 = (json.loads((runs / "ddp" / f"result_rank{r}.json").read_text()) for r in (0, 1))
    one = json.loads((runs / "one" / "result_rank0.json").read_text())
    for key in ("fastmix_weights", "doremi_alpha", "doremi_average"):
        assert r0[key] == r1[key], key  # identical on every rank
        assert r0[key] == pytest.approx(one[key], abs=1e-6), key
    assert max(one["fastmix_weights"]) - min(one["fastmix_weights"]) > 1e-3  # the weights moved
    for run in ("fastmix", "doremi"):
        ddp = _metrics(runs / "ddp" / run / "metrics.jsonl")
        ref = _metrics(runs / "one" / run / "metrics.jsonl")
        assert [a["loss"] for a in ddp] == pytest.approx([b["loss"] for b in ref], rel=1e-5), run


def test_cost_counts_global_tokens_once_and_every_device(runs):
    r0 = json.loads((runs / "ddp" / "result_rank0.json").read_text())
    one = json.loads((runs / "one" / "result_rank0.json").read_text())
    for run in ("plain", "fastmix", "doremi"):
        a, b = r0[f"{run}_cost"], one[f"{run}_cost"]
        assert a["tokens"] == b["tokens"] and a["flops"] == b["flops"], run  # hooks' forwards included
        assert run != "plain" or a["tokens"] == STEPS * 2 * B * TINY["context"]
        assert a["devices"] == pytest.approx(2 * b["devices"]), run


def test_one_process_is_not_distributed():
    from fastmix.train import distributed
    assert not distributed.init() and distributed.world_size() == 1 and distributed.is_main()
    t = torch.ones(3)
    assert distributed.all_reduce_mean(t) is t
    distributed.barrier()


if __name__ == "__main__":
    worker(*sys.argv[1:3])
