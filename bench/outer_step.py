"""One FastMix outer step, timed and profiled, in units of one plain training
micro-batch (a benchmark that prints numbers, not a test).

    python bench/outer_step.py [--proxy regmix_1m] [--repeats 3] [overrides...]

Three things at the proxy shape of the config (fp32 on CPU, bf16 autocast on CUDA):
one plain micro-batch (forward + backward through the fused head), the outer step
by autograd (`fastmix.fastmix.hypergradient`: the objective batch's and the
micro-batch's logits in full, one backward to the head per source), and the fused
outer step the hook runs (`head_hypergradient`). Then torch.profiler's top
operators of each outer step, so the cost can be read, not guessed. The
relative difference of the two hypergradients is printed too.

Measured 2026-12-03, 2 threads, `--proxy regmix_1m proxy.model.context=512
proxy.batch_size=8 data.tokenizer.vocab_size=50432`: see the README (FastMix's
outer step).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastmix.config import register_resolvers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proxy", default="regmix_1m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=8, help="profiler rows per path")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    register_resolvers()
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from torch.profiler import ProfilerActivity, profile

    from fastmix.config import CONF_DIR
    from fastmix.data.corpus import prepare_corpus
    from fastmix.fastmix import head_hypergradient, hypergradient
    from fastmix.run.pipeline import build
    from fastmix.train.cost import CostMeter
    from fastmix.train.loop import StepInfo, Trainer, new_model, resolve_device, set_threads
    from fastmix.train.sampling import MixtureSampler

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"proxy={args.proxy}", "optimizer=fastmix", "progress=false",
                                           *args.overrides])
    threads, device = set_threads(cfg.threads), resolve_device(cfg.device)
    corpus = prepare_corpus(cfg.data)
    objective = instantiate(cfg.objective, _partial_=True)(corpus=corpus)
    p = cfg.proxy
    model = new_model(corpus, p.model, 0).to(device)
    train = {s: corpus.tokens[s]["train"] for s in corpus.sources}
    sampler = MixtureSampler(train, p.model.context, p.batch_size, seed=0)
    trainer = Trainer(model, sampler, p, device, CostMeter(device), Path("/tmp/outer_step_bench"), progress=False)
    batch = sampler.next_batch()
    vb = objective.fixed_batch(build(cfg.optimizer).rows_per_group(p), p.model.context)
    head = [model.get_output_embeddings().weight]
    K, lr = len(corpus.sources), 1e-3
    info = StepInfo(0, 1, batch)

    def plain():
        loss, _ = trainer.micro_batch_loss(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    paths = {"plain micro-batch": plain,
             "outer step, autograd": lambda: hypergradient(model, head, vb, info, K, lr, device, p.precision),
             "outer step, fused": lambda: head_hypergradient(model, vb, info, K, lr, device, p.precision)}
    times = {}
    for name, fn in paths.items():
        fn()  # warm up (buffers, allocator)
        t = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name] = (time.perf_counter() - t) / args.repeats
    print(f"device {device}, {threads} threads, proxy {dict(p.model)}, vocab {corpus.tokenizer.vocab_size}, "
          f"micro-batch {p.batch_size} x {p.model.context}, objective batch {vb.input_ids.shape[0]} rows, {K} sources")
    for name, t in times.items():
        print(f"{name:22s} {t:8.3f} s  = {t / times['plain micro-batch']:5.2f} plain micro-batches")
    ref = hypergradient(model, head, vb, info, K, lr, device, p.precision)[0]
    new = head_hypergradient(model, vb, info, K, lr, device, p.precision)[0]
    print(f"hypergradient, fused vs autograd: max relative difference "
          f"{float((new - ref).abs().max() / ref.abs().max()):.2e}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in ("outer step, autograd", "outer step, fused"):
        with profile(activities=activities) as prof:
            paths[name]()
        print(f"\n{name}: top operators by self time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
