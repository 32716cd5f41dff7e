"""run.py end to end on a tiny real corpus: the smoke experiment, a sweep, and bad input."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import compose, run_cli

RESULT_KEYS = {"optimizer", "seed", "data", "objective", "weights", "search_cost", "train_cost", "eval",
               "eval_average", "val_loss", "objective_loss", "versions", "eval_split"}
COST_KEYS = {"wall_seconds", "device", "devices", "device_hours", "flops", "tokens", "proxy_runs",
             "peak_memory_bytes"}


def no_done_anywhere(root: Path) -> bool:
    return not list(root.rglob("DONE")) and not list(root.rglob("result.json"))


def test_smoke_end_to_end(smoke_args, tiny_corpus, tmp_path):
    r = run_cli(smoke_args + ["optimizer=natural"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list((tmp_path / "outputs" / "runs").iterdir())
    for f in ("mixture.json", "search_trace.jsonl", "metrics.jsonl", "cost.json", "eval.json",
              "result.json", "DONE", ".hydra/config.yaml", "model/config.json"):
        assert (run / f).exists(), f
    assert not (run / "checkpoint.pt").exists()
    res = json.loads((run / "result.json").read_text())
    assert RESULT_KEYS <= set(res)
    sources = sorted(p.name for p in tiny_corpus.iterdir())
    assert sorted(res["weights"]) == sources and math.isclose(sum(res["weights"].values()), 1.0)
    assert COST_KEYS <= set(res["train_cost"]) and res["train_cost"]["flops"] > 0
    assert res["search_cost"]["proxy_runs"] == 0 and res["search_cost"]["flops"] == 0
    assert all(math.isfinite(v) and v > 0 for v in res["val_loss"].values())
    cost = json.loads((run / "cost.json").read_text())
    assert set(cost) == {"search", "train", "eval"}
    # The target model loads with plain transformers from the run folder.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert model.config.vocab_size == len(tok) and tok.eos_token_id is not None
    # Every score of the target is read on the test split, which the search never reads.
    from fastmix.data.corpus import prepare_corpus
    from fastmix.search.objective import ValidationObjective
    corpus = prepare_corpus(compose(smoke_args).data)
    searched = ValidationObjective(corpus, max_tokens_per_source=1024)
    assert res["eval_split"] == "test" and searched.split == "val"
    assert math.isclose(res["objective_loss"], searched.held_out().loss(model, "cpu"), rel_tol=1e-5)
    assert not math.isclose(res["objective_loss"], searched.loss(model, "cpu"), rel_tol=1e-3)
    s = sources[0]
    test_rows = ValidationObjective(corpus, weights={s: 1}, max_tokens_per_source=1024).held_out().rows(64)[s][0]
    assert torch.equal(test_rows[0], torch.from_numpy(corpus.tokens[s]["test"][:65].astype("int64")))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] > metrics[0]["step"] and set(metrics[-1]["source_loss"]) <= set(sources)
    # The terminal: the suite's lines and a closing summary; lm-eval's INFO lines only in run.log.
    log = (run / "run.log").read_text()
    assert "Building contexts for" in log and "Building contexts" not in r.stdout + r.stderr
    summary = r.stdout[r.stdout.index("[run][INFO] - done"):].splitlines()[1:]
    best = max(res["eval"], key=res["eval"].get)
    assert summary[0].startswith("mixture (natural): ") and f"test loss {res['objective_loss']:.4f}" in summary[1]
    assert f"average {res['eval_average']:.3f}" in summary[2] and f"best {best} " in summary[2]
    assert summary[3].startswith("cost: search ") and "FLOPs" in summary[3] and summary[4] == f"run folder: {run}"


# Sweeps (launchers, re-runs that skip, failures, the summary) are in test_sweep.py.


def bad_weights(sources, kind):
    w = {s: 1 / len(sources) for s in sources}
    if kind == "negative":
        w[sources[0]], w[sources[1]] = -0.1, w[sources[1]] + 0.1 + 1 / len(sources)
    elif kind == "nan":
        w[sources[0]] = float("nan")
    elif kind == "sum":
        w[sources[0]] += 0.5
    elif kind == "unknown":
        w["klingon"] = w.pop(sources[0])
    body = ", ".join(f"{k}: {v}" for k, v in w.items())
    return ["optimizer=fixed", f"optimizer.weights={{{body}}}"]


@pytest.mark.parametrize("case,message", [
    ("missing_root", "is not a directory"),
    ("unknown_optimizer", "optimizer/bogus"),
    ("config_typo", "proxy.lrr"),
    ("unknown_source", "unknown source"),
    ("negative", "< 0"),
    ("nan", "nan"),
    ("sum", "sum to"),
    ("unknown", "klingon"),
    ("no_weights", "needs optimizer.weights"),
    ("unknown_scale", "use one of"),
    ("too_few_proxies", "n_proxies"),
    ("unknown_executor", "executor/bogus"),
    ("short_test_split", "gives no test-split rows"),
])
def test_bad_input_stops_cleanly(case, message, smoke_args, tiny_corpus, tmp_path):
    sources = sorted(p.name for p in tiny_corpus.iterdir())
    extra = {
        "missing_root": [f"data.root={tmp_path / 'nope'}"],
        "unknown_optimizer": ["optimizer=bogus"],
        "config_typo": ["proxy.lrr=0.1"],
        "unknown_source": [f"data.sources=[{sources[0]},klingon]"],
        "no_weights": ["optimizer=fixed"],
        "unknown_scale": ["optimizer=regmix", "scale=huge"],
        "too_few_proxies": ["optimizer=regmix", "optimizer.smoke.n_proxies=1"],
        "unknown_executor": ["optimizer=regmix", "executor=bogus"],
        # the target is scored on the objective's test rows: too little test text stops the job first
        "short_test_split": ["train.model.context=60000"],
    }.get(case) or bad_weights(sources, case)
    if case in CLI_CASES:
        r = run_cli(smoke_args + extra, cwd=tmp_path)
        assert r.returncode != 0
        assert message in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr  # one message, not a stack trace
    else:  # the job itself raises UserError, which run.py prints as one line (the CLI cases show it)
        from fastmix.errors import UserError
        from fastmix.run.pipeline import run_job
        with pytest.raises(UserError) as e:
            run_job(compose(smoke_args + extra), tmp_path / "run")
        assert message in str(e.value)
    assert no_done_anywhere(tmp_path)


# Through the command line: errors Hydra raises while composing, and one the job
# raises (exit code, one line on stderr); the others call the job in-process, which
# saves a process start (~8 s of imports) per case.
CLI_CASES = {"missing_root", "unknown_optimizer", "config_typo", "unknown_executor"}


@pytest.mark.parametrize("method,runs", [("regmix", 4), ("climb", 3 + 2 + 2)])
def test_many_proxy_methods_end_to_end(smoke_args, tmp_path, method, runs):
    """RegMix and CLIMB at smoke scale: every proxy is traced with its mixture,
    objective and cost, and the search pays exactly the sum of its proxies."""
    r = run_cli(smoke_args + [f"optimizer={method}", "eval=loss"], cwd=tmp_path)  # lm-eval: tested once above
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list((tmp_path / "outputs" / "runs").iterdir())
    res = json.loads((run / "result.json").read_text())
    assert math.isclose(sum(res["weights"].values()), 1.0, abs_tol=1e-6)
    proxies = [json.loads(x) for x in (run / "search_trace.jsonl").read_text().splitlines()
               if json.loads(x).get("kind") == "proxy"]
    assert len(proxies) == runs == res["search_cost"]["proxy_runs"]
    assert all(math.isfinite(p["objective"]) and set(p["weights"]) == set(res["weights"]) for p in proxies)
    assert res["search_cost"]["flops"] == pytest.approx(sum(p["cost"]["flops"] for p in proxies))
    assert len(list((run / "search" / "proxies").glob("*/record.json"))) == runs


def test_done_is_skipped_only_for_the_same_config(smoke_args, tmp_path):
    """DONE records the job's config: the same config (or a change of a key that
    cannot change the numbers) skips, a changed one re-runs and names the key,
    `skip_done=always` skips whatever DONE records; an earlier version's empty DONE
    is judged by its result.json's config, and without one it is re-run."""
    from omegaconf import OmegaConf

    from fastmix.errors import UserError
    from fastmix.records import check_done, mark_done
    cfg = compose(smoke_args)
    mark_done(tmp_path, cfg)
    assert check_done(tmp_path, cfg).skip
    assert check_done(tmp_path, compose(smoke_args + ["threads=1", "progress=true", "executor=local"])).skip
    # the SLURM launcher checks the config it composes, Hydra's node included: the same rule
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fastmix.config import REPO
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        assert check_done(tmp_path, hydra_compose("config", smoke_args, return_hydra_config=True)).skip
    changed = check_done(tmp_path, compose(smoke_args + ["train.lr=0.003", "seed=4"]))
    assert not changed.skip and changed.why == "config changed: seed 0 → 4, train.lr 0.002 → 0.003"
    assert check_done(tmp_path, compose(smoke_args + ["train.lr=0.003", "skip_done=always"])).skip
    with pytest.raises(UserError, match="skip_done='never'"):
        check_done(tmp_path, compose(smoke_args + ["skip_done=never"]))
    (tmp_path / "DONE").write_text("")  # an earlier version's
    assert not check_done(tmp_path, cfg).skip
    (tmp_path / "result.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg, resolve=True)}))
    assert check_done(tmp_path, cfg).skip
    assert "proxy.tokens" in check_done(tmp_path, compose(smoke_args + ["proxy.tokens=999"])).why
