"""fastmix.run.export: each format parsed back the way its training stack reads it,
the sums, the --path mapping, and bad input (exit 2, one message, no file)."""
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastmix.config import REPO
from fastmix.run.export import main

WEIGHTS = {"web": 0.25, "code": 0.5, "books": 0.2500005}  # sums to 1 + 5e-7: inside the 1e-6 tolerance
PATHS = ["--path", "web=/data/web_text_document", "--path", "code=/data/code_text_document",
         "--path", "books=/data/books_text_document"]


def write_mixture(folder: Path, weights=None, **extra) -> Path:
    weights = WEIGHTS if weights is None else weights
    doc = {"weights": weights, "optimizer": "fastmix", "sources": sorted(weights), "info": {}, **extra}
    path = folder / "mixture.json"
    path.write_text(json.dumps(doc))
    return path


def blend_pairs(tokens: list[str]) -> dict[str, float]:
    """Megatron's blend list "w1 p1 w2 p2 ...": weights at even places, prefixes at odd ones."""
    assert len(tokens) % 2 == 0 and tokens
    return {tokens[i + 1]: float(tokens[i]) for i in range(0, len(tokens), 2)}


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_megatron_data_path_line(tmp_path, capsys):
    code, out, _ = run([write_mixture(tmp_path), "--format", "megatron", *PATHS, "--out", tmp_path / "a.txt"],
                       capsys)
    assert code == 0
    line = shlex.split(out)
    assert line[0] == "--data-path" and shlex.split((tmp_path / "a.txt").read_text()) == line
    blend = blend_pairs(line[1:])
    # the mixture's source order ("sources" is sorted), each mapped to its prefix
    assert list(blend) == ["/data/books_text_document", "/data/code_text_document", "/data/web_text_document"]
    assert abs(sum(blend.values()) - 1) < 1e-9
    total = sum(WEIGHTS.values())
    assert blend["/data/code_text_document"] == pytest.approx(0.5 / total, abs=1e-15)


def test_megatron_data_args_and_per_split_files(tmp_path, capsys):
    mix = write_mixture(tmp_path)
    code, out, _ = run([mix, "--format", "megatron", "--megatron-form", "data-args", *PATHS,
                        "--out", tmp_path / "data_args.txt"], capsys)
    assert code == 0 and out.strip() == f"--data-args-path {tmp_path / 'data_args.txt'}"
    blend = blend_pairs((tmp_path / "data_args.txt").read_text().split())  # Megatron reads f.read().split()
    assert abs(sum(blend.values()) - 1) < 1e-9

    code, out, _ = run([mix, "--format", "megatron", "--megatron-form", "per-split", *PATHS,
                        "--out", tmp_path / "splits.json"], capsys)
    assert code == 0 and out.startswith("--per-split-data-args-path ")
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert set(splits) == {"train", "valid", "test"} and splits["valid"] is None and splits["test"] is None
    assert blend_pairs(splits["train"]) == blend


def test_megatron_placeholders_and_zero_weight_dropped(tmp_path, capsys):
    mix = write_mixture(tmp_path, {"web": 0.4, "code": 0.6, "math": 0.0})
    code, out, err = run([mix, "--format", "megatron"], capsys)
    assert code == 0
    assert blend_pairs(shlex.split(out)[1:]) == {"code": 0.6, "web": 0.4}  # source names as prefixes
    assert "math" in err and "zero-weight" in err
    # a dropped source needs no --path
    code, out, _ = run([mix, "--format", "megatron", "--path", "web=/w", "--path", "code=/c"], capsys)
    assert code == 0 and blend_pairs(shlex.split(out)[1:]) == {"/c": 0.6, "/w": 0.4}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_olmo_source_mixture_list(tmp_path, capsys, suffix):
    mix = write_mixture(tmp_path, {"web": 0.3, "code": 0.7, "math": 0.0})
    out = tmp_path / f"olmo{suffix}"
    code, _, err = run([mix, "--format", "olmo", "--path", "web=/npy/web/*.npy", "--path", "code=/npy/code",
                        "--out", out], capsys)
    assert code == 0 and "math" in err
    text = out.read_text()
    doc = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    assert suffix == ".json" or text.startswith("# OLMo-core SourceMixtureList")
    assert list(doc) == ["sources"]  # SourceMixtureList has the one field
    sources = doc["sources"]
    assert [s["source_name"] for s in sources] == ["code", "web"]
    for s in sources:  # SourceMixtureConfig's fields (olmo_core/data/source_mixture.py)
        assert set(s) == {"source_name", "target_ratio", "paths", "max_repetition_ratio"}
        assert s["max_repetition_ratio"] == 1.0 and isinstance(s["paths"], list) and len(s["paths"]) == 1
    assert sources[1]["paths"] == ["/npy/web/*.npy"]
    assert sources[0]["target_ratio"] == 0.7 and abs(sum(s["target_ratio"] for s in sources) - 1) < 1e-9


def test_olmo_to_stdout_from_run_folder_and_result_json(tmp_path, capsys):
    write_mixture(tmp_path)
    code, out, _ = run([tmp_path, "--format", "olmo"], capsys)  # a run folder: reads its mixture.json
    assert code == 0 and {s["source_name"] for s in yaml.safe_load(out)["sources"]} == set(WEIGHTS)
    result = tmp_path / "result.json"  # a result row: "weights" but no "sources"
    result.write_text(json.dumps({"optimizer": "regmix", "weights": {"b": 0.5, "a": 0.5}, "eval": {}}))
    code, out, _ = run([result, "--format", "olmo"], capsys)
    assert code == 0 and [s["source_name"] for s in yaml.safe_load(out)["sources"]] == ["b", "a"]


def test_datasets_interleave_for_real(tmp_path, capsys):
    from datasets import Dataset, interleave_datasets
    mix = write_mixture(tmp_path, {"web": 0.2, "code": 0.8, "math": 0.0})
    out = tmp_path / "hf.json"
    code, _, _ = run([mix, "--format", "datasets", "--seed", "3", "--out", out], capsys)
    assert code == 0
    spec = json.loads(out.read_text())
    assert spec["sources"] == ["code", "math", "web"] and spec["paths"] == spec["sources"]
    assert spec["probabilities"] == [0.8, 0.0, 0.2] and spec["seed"] == 3
    assert spec["stopping_strategy"] == "first_exhausted" and len(spec["usage"].splitlines()) == 5
    parts = [Dataset.from_dict({"src": [name] * 2000, "i": list(range(2000))}) for name in spec["sources"]]
    mixed = interleave_datasets(parts, probabilities=spec["probabilities"], seed=spec["seed"],
                                stopping_strategy=spec["stopping_strategy"])
    src = mixed["src"]
    assert "math" not in src and src.count("code") == 2000  # code, the likeliest, runs out first
    assert src.count("web") / len(src) == pytest.approx(0.2, abs=0.03)

    # all_exhausted cannot exhaust a probability-0 source: it is dropped, and the rest interleave
    code, _, err = run([mix, "--format", "datasets", "--stopping-strategy", "all_exhausted", "--out", out], capsys)
    spec = json.loads(out.read_text())
    assert code == 0 and "math" in err and spec["sources"] == ["code", "web"]
    mixed = interleave_datasets([parts[0], parts[2]], probabilities=spec["probabilities"], seed=0,
                                stopping_strategy="all_exhausted")
    assert set(mixed["src"]) == {"code", "web"}


def test_datasets_usage_snippet_runs(tmp_path, capsys):
    """The snippet stored in the export, run as written on real JSON-lines files."""
    mix = write_mixture(tmp_path, {"web": 0.5, "code": 0.5})
    for name in ("web", "code"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} {i}"}) + "\n"
                                                       for i in range(50)))
    out = tmp_path / "hf.json"
    assert run([mix, "--format", "datasets", "--path", f"web={tmp_path / 'web.jsonl'}",
                "--path", f"code={tmp_path / 'code.jsonl'}", "--out", out], capsys)[0] == 0
    snippet = json.loads(out.read_text())["usage"] + "\nprint(sorted({t.split()[0] for t in mixed['text']}))\n"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", snippet], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['code', 'web']"


def test_missing_file_exits_2_via_cli(tmp_path):
    out = tmp_path / "out.txt"
    proc = subprocess.run([sys.executable, "-m", "fastmix.run.export", str(tmp_path / "nope" / "mixture.json"),
                           "--format", "megatron", "--out", str(out)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: no such file:") and "nope" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not tmp_path.joinpath("out.txt").exists()


BAD = [
    ({"optimizer": "x"}, [], 'no "weights"'),
    ({"weights": {"web": float("nan"), "code": 1.0}}, [], "weight of 'web' is nan"),
    ({"weights": {"web": -0.1, "code": 1.1}}, [], "weight of 'web' is -0.1"),
    ({"weights": {"web": "0.5", "code": 0.5}}, [], "not a number"),
    ({"weights": {"web": 0.5, "code": 0.4}}, [], "sum to 0.9"),
    ({"weights": {"web": 0.5, "code": 0.5000011}}, [], "not 1"),
    ({"weights": {"web": 0.5, "code": 0.5}, "sources": ["web", "math"]}, [], '"sources"'),
    ({"weights": {"web": 0.5, "code": 0.5}}, ["--path", "math=/m"], "unknown source 'math'"),
    ({"weights": {"web": 0.5, "code": 0.5}}, ["--path", "web"], "not SOURCE=PREFIX"),
    ({"weights": {"web": 0.5, "code": 0.5}}, ["--path", "web=/w"], "not ['code']"),
    ({"weights": {"web": 0.5, "code": 0.5}}, ["--path", "web=/w", "--path", "web=/v"], "twice"),
    ({"weights": {"web": 0.5, "code": 0.5}}, ["--path", "web=/w.bin", "--path", "code=/c"], "extension"),
    ({"weights": {"web": 0.5, "code": 0.5}}, ["--path", "web=/my data", "--path", "code=/c"], "whitespace"),
]


@pytest.mark.parametrize("doc,extra,message", BAD)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, doc, extra, message):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(doc))
    code, out, err = run([src, "--format", "megatron", *extra, "--out", tmp_path / "out.txt"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json"]  # no output, no temporary file


def test_not_json_and_out_is_a_folder(tmp_path, capsys):
    src = tmp_path / "in.json"
    src.write_text("{weights: ")
    code, _, err = run([src, "--format", "olmo"], capsys)
    assert code == 2 and "not valid JSON" in err
    mix = write_mixture(tmp_path)
    code, _, err = run([mix, "--format", "olmo", "--out", tmp_path], capsys)
    assert code == 2 and "is a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json", "mixture.json"]


def test_unknown_format_exits_2(tmp_path, capsys):
    mix = write_mixture(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([str(mix), "--format", "nemo", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--format" in err and "megatron" in err and not (tmp_path / "x").exists()


def test_sums_to_one_for_awkward_weights(tmp_path, capsys):
    raw = [1 / 3, 1 / 7, 1 / 11, 1 / 13]
    weights = {f"s{i}": w / math.fsum(raw) for i, w in enumerate(raw)}
    mix = write_mixture(tmp_path, weights)
    _, out, _ = run([mix, "--format", "megatron"], capsys)
    assert abs(sum(blend_pairs(shlex.split(out)[1:]).values()) - 1) < 1e-9
    _, out, _ = run([mix, "--format", "olmo"], capsys)
    assert abs(sum(s["target_ratio"] for s in yaml.safe_load(out)["sources"]) - 1) < 1e-9
    _, out, _ = run([mix, "--format", "datasets"], capsys)
    assert abs(sum(json.loads(out)["probabilities"]) - 1) < 1e-9
