"""A saved target scores the same under stock lm-eval (its own `hf` model, from the
command line) as in the run: every metric of every task, from the command the run
records in eval.json."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

TASKS = ["cont_math", "cloze_drama"]


def test_stock_lm_eval_gives_the_runs_numbers(smoke_args, tmp_path):
    r = run_cli([*smoke_args, "optimizer=uniform", f"eval.tasks=[{','.join(TASKS)}]", "hydra.run.dir=run"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    ev = json.loads((run / "eval.json").read_text())
    result = json.loads((run / "result.json").read_text())
    assert Path(ev["tasks_dir"]).is_dir() and result["tasks_dir"] == ev["tasks_dir"]
    (cmd,) = ev["lm_eval_commands"]
    assert cmd == result["lm_eval_commands"][0] and f"pretrained={run / 'model'}" in cmd
    args = shlex.split(cmd)
    assert args[0] == "lm_eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "lm_eval_out"
    p = subprocess.run([sys.executable, "-m", "lm_eval", *args[1:], "--output_path", str(out)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (res_file,) = out.rglob("results_*.json")
    stock = json.loads(res_file.read_text())["results"]
    ours = ev["results"]["0-shot"]["results"]
    compared = 0
    for task in TASKS:
        for metric in ("acc", "acc_norm", "acc_mutual_info"):
            key = f"{metric},none"
            if key in ours[task]:
                assert stock[task][key] == pytest.approx(ours[task][key], abs=1e-9), (task, metric)
                compared += 1
        assert stock[task][f"{ev['metrics'][task]},none"] == pytest.approx(ev["scores"][task])
    assert compared >= 5
