"""Every config option composes, alone and under each experiment."""
from pathlib import Path

import pytest
from conftest import compose
from omegaconf import OmegaConf

from fastmix.config import CONF_DIR, REPO

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))]
REQUIRED = {("data", "folder"): ["data.root=/x"], ("data", "files"): ["data.files={a: /x}"],
            ("objective", "text"): ["objective.path=/x"], ("objective", "suite"): ["landscape=k3", "objective.pick=code"],
            ("experiment", "oracle"): ["landscape=k3", "objective.pick=code"],
            ("experiment", "fastmix_sensitivity"): ["landscape=k3", "objective.pick=code"],
            ("experiment", "oracle_smoke"): ["objective.pick=code"]}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    cfg = compose([f"{group}={option}", *REQUIRED.get((group, option), [])])
    # Resolving every interpolation catches typos in ${...} references.
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_groups_have_the_design_axes():
    assert {"data", "objective", "proxy", "optimizer", "train", "eval", "experiment"} <= set(GROUPS)


def test_every_optimizer_names_itself_and_a_target():
    for f in (CONF_DIR / "optimizer").glob("*.yaml"):
        cfg = OmegaConf.load(f)
        assert cfg.name == f.stem and cfg._target_.split(".")[0] in {"fastmix", "baselines"}, f


def test_default_data_is_the_embedded_corpus():
    cfg = compose([])
    assert cfg.data.name == "embedded" and Path(cfg.data.root).is_absolute()


EXPERIMENTS = sorted(f.stem for f in (CONF_DIR / "experiment").glob("*.yaml"))
OBJECTIVES = sorted(f.stem for f in (CONF_DIR / "objective").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_takes_its_keys_under_every_experiment(experiment, objective):
    """An experiment's preset (experiment=smoke caps objective.max_tokens_per_source)
    must be a keyword every objective class accepts, or the valid combination
    `experiment=smoke objective=text` stops with a TypeError."""
    import inspect

    from hydra.utils import get_object
    cfg = compose([f"experiment={experiment}", f"objective={objective}", "++objective.path=/x"])
    keys = set(cfg.objective) - {"_target_"} - ({"path"} if objective != "text" else set())
    built = get_object(cfg.objective._target_)  # a class, or objective=suite's factory
    params = inspect.signature(built.__init__ if isinstance(built, type) else built).parameters
    assert keys <= set(params), f"{cfg.objective._target_} does not take {sorted(keys - set(params))}"


def test_console_scripts_and_extras_are_installed():
    """pyproject's console scripts are the `python -m` tools (same exit codes), and
    `make setup` installs every optional extra (requirements.txt pins them all)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    import tomllib
    repo = Path(__file__).parents[1]
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    bin_dir = Path(sys.executable).parent
    for name, target in project["scripts"].items():
        assert (bin_dir / name).exists(), f"{name} is not installed; run make setup"
        module, func = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func))
    r = subprocess.run([str(bin_dir / "fastmix-tables"), str(repo / "no-such-sweep")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no-such-sweep" in r.stderr
    pinned = {re.split(r"[=<>\[ ]", line)[0].lower() for line in (repo / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    for extra, deps in project["optional-dependencies"].items():
        for dep in deps:
            assert re.split(r"[=<>\[ ]", dep)[0].lower() in pinned, f"extra {extra}: {dep} not in requirements.txt"


def test_modules_that_are_not_tools_say_where_the_tools_are():
    """`python -m baselines.regmix` (whose command line moved) and any other library
    module run as a program: one line naming the tool, exit 2; every listed tool
    is a module that runs something."""
    import importlib.util
    import subprocess
    import sys

    from fastmix.cli import TOOLS
    repo = Path(__file__).parents[1]
    for module, says in [("baselines.regmix", "python -m baselines.regmix_replay"),
                         ("fastmix.run.pipeline", "python -m analysis.tables"),
                         ("analysis.aggregate_nothing", "python run.py")]:
        r = subprocess.run([sys.executable, "-m", module, "--mixtures", "x"], cwd=repo, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for tool in TOOLS:
        spec = importlib.util.find_spec(tool)
        path = Path(spec.submodule_search_locations[0]) / "__main__.py" if spec.submodule_search_locations \
            else Path(spec.origin)
        assert 'if __name__ == "__main__"' in path.read_text() or path.name == "__main__.py", tool


def test_decisions_index_is_current():
    """docs/DECISIONS.md opens with one line per decision: the index matches the bullets."""
    import importlib.util
    path = Path(__file__).parents[1] / "scripts" / "decisions_index.py"
    spec = importlib.util.spec_from_file_location("decisions_index", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0
    assert "- [Data](#data): Documents are split by a hash of their text" in mod.DOC.read_text()


def test_imports_run_down_the_layers():
    """docs/DECISIONS.md, "Package layout": a module imports only from its own layer
    or those below it (the foundations at fastmix/*.py are layer 0)."""
    import ast
    layers = {"fastmix.data": 1, "fastmix.train": 2, "fastmix.eval": 3, "fastmix.search": 4,
              "fastmix.fastmix": 5, "baselines": 5, "fastmix.run": 6}

    def layer(mod: str) -> int:
        return next((v for k, v in sorted(layers.items(), key=lambda kv: -len(kv[0]))
                     if mod == k or mod.startswith(k + ".")), 0)
    up = []
    for path in sorted([*(REPO / "fastmix").rglob("*.py"), *(REPO / "baselines").rglob("*.py")]):
        mod = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"fastmix.{a.name}" for a in node.names if node.module == "fastmix"]
                up += [f"{mod} imports {n}" for n in names if layer(n) > layer(mod)]
    assert up == []
    assert layer("fastmix.run.pipeline") == 6 and layer("fastmix.schema") == 0  # the table is read as meant
