"""What each mixture search costs, side by side, measured in one run on the same
data, proxy and objective (a benchmark that prints numbers, not a test).

    python bench/compare_methods.py [--methods fastmix regmix climb doremi mixmin demix] [--scale demo] [overrides...]

Every method searches at the given scale (`demo`: 2 CPU cores) through the one
training loop and the one cost meter (`fastmix.run.pipeline.run_search`, the same
call `run.py` makes); no target model is trained. The table shows proxy runs,
tokens, FLOPs, device-hours and each cost as a multiple of FastMix's.

Paper-scale extrapolation, from FLOPs: a method's measured FLOPs per proxy run,
divided by one plain proxy run's 6·N·D, is its overhead factor (FastMix's outer
steps, DoReMi's reference forwards, the objective scoring of each proxy). At
paper scale its FLOPs are (proxy runs at `scale=paper`) x factor x (6·N·D of
the paper proxy, regmix_1m on 1B tokens at vocab 50432). Extra arguments are
Hydra overrides for every method (e.g. `executor=local proxy.tokens=200000`).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastmix.config import register_resolvers

PAPER_VOCAB, PAPER_SOURCES = 50432, 17  # RegMix/FastMix: GPT-NeoX tokenizer, 17 Pile domains
PAPER_CLAIMS = {"regmix": "55x (550x in one abstract)", "climb": "5.5x (55x in one abstract)"}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fastmix.config import CONF_DIR
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def planned_proxy_runs(method: str, n_sources: int, overrides: list[str]) -> int:
    """Proxy runs the method plans at the paper's scale (from its YAML's paper preset)."""
    from fastmix.run.pipeline import build
    opt = build(compose([f"optimizer={method}", "scale=paper", *overrides]).optimizer)
    return opt.planned_proxy_runs(n_sources)


def proxy_run_flops(corpus, run_cfg) -> float:
    """6·N·D of one plain proxy run of `run_cfg` (tokens rounded up to whole steps)."""
    from fastmix.train.loop import new_model
    from fastmix.train.models import flop_params
    per_step = run_cfg.batch_size * run_cfg.grad_accum * run_cfg.model.context
    tokens = math.ceil(run_cfg.tokens / per_step) * per_step
    return 6.0 * flop_params(new_model(corpus, run_cfg.model, 0)) * tokens


def paper_proxy_flops() -> float:
    from fastmix.train.models import build_model, flop_params
    cfg = compose(["proxy=regmix_1m"]).proxy
    from omegaconf import OmegaConf
    model = build_model(OmegaConf.to_container(cfg.model), PAPER_VOCAB, 1, 2, 0)
    return 6.0 * flop_params(model) * cfg.tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["fastmix", "regmix", "climb", "doremi", "mixmin", "demix"])
    ap.add_argument("--scale", default="demo")
    ap.add_argument("--out", default=None, help="keep the search folders here (default: a temp dir)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    register_resolvers()
    import pandas as pd
    from hydra.utils import instantiate

    from fastmix.data.corpus import prepare_corpus
    from fastmix.run.pipeline import build, run_search
    from fastmix.train.cost import CostMeter
    from fastmix.train.loop import resolve_device, set_threads

    base = compose([f"scale={args.scale}", "progress=false", *args.overrides])
    threads, device = set_threads(base.threads), resolve_device(base.device)
    corpus = prepare_corpus(base.data)
    objective = instantiate(base.objective, _partial_=True)(corpus=corpus)
    one_proxy, paper_proxy = proxy_run_flops(corpus, base.proxy), paper_proxy_flops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for m in args.methods:
            cfg = compose([f"optimizer={m}", f"scale={args.scale}", "progress=false", *args.overrides])
            meter = CostMeter(device)
            _, result = run_search(cfg, build(cfg.optimizer), corpus, objective, meter, device,
                                   root / m)
            c = meter.stages["search"]
            factor = c.flops / max(1, c.proxy_runs) / one_proxy  # FLOPs per proxy run / one plain run
            paper_runs = planned_proxy_runs(m, PAPER_SOURCES, args.overrides)
            rows.append({"method": m, "proxy_runs": c.proxy_runs, "tokens": c.tokens, "flops": c.flops,
                         "device_hours": c.device_hours, "wall_s": c.wall_seconds,
                         "paper_proxy_runs": paper_runs, "paper_flops": paper_runs * factor * paper_proxy,
                         "weights": " ".join(f"{k}={v:.2f}" for k, v in result.weights.items())})
            print(f"{m}: {c.proxy_runs} proxy runs, {c.wall_seconds:.0f} s", flush=True)
    df = pd.DataFrame(rows).set_index("method")
    ref = "fastmix" if "fastmix" in df.index else df.index[0]
    for col, src in (("x_flops", "flops"), ("x_device_hours", "device_hours"), ("paper_x_flops", "paper_flops")):
        df[col] = df[src] / df.loc[ref, src]
    df["paper_claim"] = [PAPER_CLAIMS.get(m, "") for m in df.index]
    print(f"\ndevice {device}, {threads} threads, scale={args.scale}, proxy={base.proxy.name} "
          f"({one_proxy:.3g} FLOPs per plain proxy run), {len(corpus.sources)} sources; multiples of {ref}")
    cols = ["proxy_runs", "tokens", "flops", "device_hours", "x_flops", "x_device_hours",
            "paper_proxy_runs", "paper_flops", "paper_x_flops", "paper_claim"]
    with pd.option_context("display.width", 250, "display.max_colwidth", None,
                           "display.float_format", "{:.3g}".format):
        print(df[cols].to_string())
        print("\nmixtures:\n" + df["weights"].to_string())


if __name__ == "__main__":
    main()
