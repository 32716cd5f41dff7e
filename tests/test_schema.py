"""Config values are checked before any work: one line naming the key, the value and
what is allowed, exit 2, no DONE (fastmix/schema.py)."""
import pytest
from conftest import compose, run_cli

from fastmix import schema
from fastmix.errors import UserError


@pytest.mark.parametrize("override, message", [
    (["train.batch_size=0"], "train.batch_size=0 is not allowed: must be >= 1"),
    (["train.model.context=0"], "train.model.context=0 is not allowed: must be >= 2"),
    (["train.lr=-1"], "train.lr=-1.0 is not allowed: must be > 0"),
    (["proxy.lr=nan"], "proxy.lr=nan is not allowed: must be a finite number"),
    (["seed=abc"], "seed='abc' is not allowed"),
    (["seed=-1"], "seed=-1 is not allowed: must be >= 0"),
    (["device=cuda:7"], "device='cuda:7' is not allowed"),
    (["device=tpu"], "device='tpu' is not allowed: auto, cpu, cuda or cuda:N"),
    (["threads=0"], "threads=0 is not allowed"),
    (["proxy.tokens=0", "train.tokens=0"], "proxy.tokens=0 is not allowed: must be >= 1"),
    (["data.tokenizer.vocab_size=3"], "data.tokenizer.vocab_size=3 is not allowed: must be >= 260"),
    (["train.schedule=linear"], "train.schedule='linear' is not allowed: use one of constant, cosine"),
    (["proxy.betas=[0.9]"], "proxy.betas=[0.9] is not allowed: two numbers in [0, 1)"),
    (["train.batch_size=abc"], "train.batch_size='abc' is not allowed"),
    (["train.precision=fp16"], "train.precision='fp16' is not allowed: use one of bf16, fp32"),
    (["eval.limit=0"], "eval.limit=0 is not allowed: must be >= 1 or null"),
    (["eval.batch_size=0"], "eval.batch_size=0 is not allowed: must be >= 1"),
    (["eval.kind=foo"], "eval.kind='foo' is not allowed: use one of local, lm_eval, loss"),
    (["executor=local", "executor.workers=0"], "executor.workers=0 is not allowed"),
    (["executor=slurm", "executor.cluster=pbs"], "executor.cluster='pbs' is not allowed: use one of slurm, local"),
    (["data.splits.val=1.5"], "data.splits.val=1.5 is not allowed: must be < 1"),
    (["data.max_bytes_per_source=-3"], "data.max_bytes_per_source=-3 is not allowed"),
    # each optimizer's parameters (Params beside its class), the unused scale presets too
    (["optimizer=regmix", "optimizer.paper.n_proxies=1"], "optimizer.paper.n_proxies=1 is not allowed: must be >= 2"),
    (["optimizer=climb", "optimizer.demo.rounds=[1,4]"], "optimizer.demo.rounds=[1, 4] is not allowed: proxies"),
    (["optimizer=demix", "optimizer.smoke.rank_check=1"], "optimizer.smoke.rank_check=1 is not allowed: 0 (off)"),
    (["optimizer=demix", "optimizer.cap_mode=x"], "optimizer.cap_mode='x' is not allowed"),
    (["optimizer=regmix", "optimizer.minimum=0.5"], "optimizer.minimum=0.5 is not allowed: must be < 0.5"),
    (["optimizer=climb", "+optimizer.temprature=0.5"], "optimizer.temprature=0.5 is not allowed: Key 'temprature'"),
    (["optimizer=fixed", "optimizer.weights=[0.5,0.5]"], "optimizer.weights=[0.5, 0.5] is not allowed"),
    (["optimizer=oracle", "oracle.resolution=0"], "optimizer.resolution=0 is not allowed: must be >= 1"),
    (["optimizer=fastmix", "optimizer._target_=fastmix.nothing.Here"], "optimizer._target_='fastmix.nothing.Here'"),
    (["executor=slurm", "executor.mem_gb=0"], "executor.mem_gb=0.0 is not allowed: must be > 0"),
    (["optimizer=fastmix", "~optimizer.lr"], "optimizer.lr is not set: give it a value"),
    (["data.kind=s3"], "data.kind='s3' is not allowed: use one of folder, files, hf"),
    (["+data.rooot=/x"], "data.rooot='/x' is not allowed: Key 'rooot'"),
    (["data=files"], "data.files is not set: give it a value"),
    (["data.sources=code"], "data.sources='code' is not allowed"),
    (["data.tokenizer.kind=sentencepiece"], "data.tokenizer.kind='sentencepiece' is not allowed"),
    (["objective=text"], "objective.path is not set: give it a value"),
    (["objective.weights=[1,2]"], "objective.weights=[1, 2] is not allowed"),
    (["objective=qa", "objective.max_pairs=0"], "objective.max_pairs=0 is not allowed: must be >= 1"),
    (["objective.batch_size=x"], "objective.batch_size='x' is not allowed"),
])
def test_bad_values_name_key_value_and_rule(override, message):
    with pytest.raises(UserError) as e:
        schema.check(compose(["experiment=smoke", *override]))
    assert message in str(e.value) and "\n" not in str(e.value)


EXPERIMENTS = ["smoke", "demo", "oracle", "oracle_smoke", "oracle_landscape", "paper_pretrain", "paper_posttrain",
               "posttrain_demo"]
# what a sweep sets per job (the landscape, the suite objective's name)
JOB_KEYS = {"oracle": ["landscape=k3", "objective.pick=code_drama"], "oracle_smoke": ["objective.pick=equal"],
            "oracle_landscape": ["landscape=k5"]}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("group", [[], ["eval=loss"], ["eval=paper14"], ["eval=local"], ["executor=local"],
                                   ["executor=slurm"], ["proxy=regmix_1m"], ["train=regmix_1b"]])
def test_shipped_configs_pass(experiment, group):
    """Every experiment with every eval and executor: a preset's keys are allowed
    whichever option is chosen."""
    schema.check(compose([f"experiment={experiment}", *JOB_KEYS.get(experiment, []), *group]))


@pytest.mark.parametrize("optimizer", ["fastmix", "regmix", "climb", "doremi", "mixmin", "demix", "natural",
                                       "uniform", "fixed", "oracle"])
@pytest.mark.parametrize("scale", ["smoke", "demo", "paper"])
def test_every_optimizer_yaml_matches_its_params(optimizer, scale):
    """Every key of conf/optimizer/<name>.yaml is declared by the class's Params and
    every declared key is set, at every scale; the YAML then builds, into an object of
    the method protocol (fastmix.search.optimizer.MixtureOptimizer)."""
    from fastmix.run.pipeline import build
    from fastmix.search.optimizer import MixtureOptimizer, RegroupsSources
    cfg = compose([f"optimizer={optimizer}", f"scale={scale}"])
    built = build(cfg.optimizer)
    assert schema.check_params(cfg.optimizer, "optimizer").__name__ == type(built).__name__
    assert isinstance(built, MixtureOptimizer) and built.planned_proxy_runs(3) >= 0
    assert isinstance(built, RegroupsSources) == (optimizer == "climb")


def test_an_object_that_is_not_a_method_is_refused():
    from fastmix.run.pipeline import build
    cfg = compose(["optimizer=uniform"])
    cfg.optimizer._target_ = "fastmix.run.fanout.InProcess"
    with pytest.raises(UserError, match="is not a mixture optimizer: it needs"):
        build(cfg.optimizer)


def test_bad_value_stops_the_job_with_exit_2(smoke_args, tmp_path):
    r = run_cli([*smoke_args, "train.batch_size=0", "hydra.run.dir=out"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "error: train.batch_size=0 is not allowed: must be >= 1."
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "DONE").exists()
    assert not (tmp_path / "out" / "result.json").exists()
