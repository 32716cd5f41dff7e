"""The one adapter from an in-memory model + tokenizer to lm-evaluation-harness.

A *suite* is a dict {task: {"metric": "acc", "num_fewshot": 0 | [0, ..., 5],
"yaml": path (local tasks only), "chance": 0.25 | None, ...}}: the manifest
`fastmix.eval.tasks.build_local_suite` returns for `eval=local`, or
`paper14_suite()` (standard lm-eval task names) for `eval=paper14`.
`evaluate_suite` runs it and returns lm-eval's results plus one score per task
and their mean.

How lm-eval is driven (lm-eval 0.4.13):
* the model is wrapped in `InMemoryLM`, a small `lm_eval.api.model.TemplateLM`
  subclass (docs/model_guide.md: implement `loglikelihood`,
  `loglikelihood_rolling`, `generate_until`; TemplateLM splits each request
  into context and continuation tokens). lm-eval's own
  `HFLM(pretrained=<model>, tokenizer=...)` accepts an in-memory model, but in
  0.4.13: HFLM ignores `device` for such a model, calls
  `model.eval()` on it and leaves it so; an empty context is prefixed with BOS,
  which our models never see in training; one warning line is logged per
  left-truncated request; and its default `logits_cache=True` mis-scores a
  request whose context + continuation tokens equal another request's with a
  different split (34 of 800 cont_math requests, off by up to 1.1 nats).
  InMemoryLM scores as HFLM's `_loglikelihood_tokens` does (left-truncate
  context + continuation to the model's context, sum the continuation's
  log-probs, greedy flag), with text tokenized as in training (no special
  tokens; EOS, which joins documents, before an empty context). A saved run
  (model/, whose tokenizer names EOS as BOS) re-scored by stock `lm_eval --model
  hf ... logits_cache=False` gives identical acc, acc_norm and acc_mutual_info
  (tests/test_rescore.py; the command is in the run's eval.json);
* tasks are loaded with `TaskManager(include_path=<suite folder>,
  include_defaults=False)` for local suites (the full index takes ~10 s) and
  `TaskManager()` for standard names, *before* any model work, so a missing
  dataset stops the job at once with a `UserError`;
* `lm_eval.evaluator.evaluate` is called rather than `simple_evaluate`, which
  would re-seed the global `random`/numpy/torch RNGs of the calling process
  and spend ~4 s per call collecting environment info (torch's collect_env,
  `git describe`); evaluate() needs neither, and we set the few-shot seed and
  shot count on each task ourselves, as simple_evaluate would.

A task given a list of shot counts (RegMix reports the mean of 0..5-shot) is
run once per count; its score is the mean over the counts.

FLOPs: 2 * flop_params(model) * tokens, where tokens counts every position of
every batch the model is run on (padding included): exactly what was computed.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window
from tqdm.auto import tqdm

from fastmix.errors import UserError
from fastmix.schema import eval_config
from fastmix.train.loop import autocast
from fastmix.train.models import flop_params

log = logging.getLogger(__name__)

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed (simple_evaluate)


# ------------------------------------------------------------------ suites ---
def paper14_suite(eval_cfg=None) -> dict:
    """The paper's 14 benchmarks as a suite: {task: {"num_fewshot", "metric"}},
    from `conf/eval/paper14.yaml` (or the given eval config). `eval.num_fewshot`,
    when set, overrides every task's shot counts."""
    from omegaconf import DictConfig, OmegaConf
    if eval_cfg is None:
        from fastmix.config import CONF_DIR
        eval_cfg = OmegaConf.load(CONF_DIR / "eval" / "paper14.yaml")
    cfg = (OmegaConf.to_container(eval_cfg, resolve=True) if isinstance(eval_cfg, DictConfig)
           else dict(eval_cfg))
    override, metrics = cfg.get("num_fewshot"), cfg.get("metrics") or {}
    suite = {}
    for task, shots in cfg["tasks"].items():
        shots = override if override is not None else shots
        suite[task] = {"num_fewshot": [int(s) for s in shots] if isinstance(shots, list) else int(shots),
                       "metric": metrics.get(task, "acc"), "chance": None}
    return suite


def suite_from_config(eval_cfg, corpus, split: str = "test") -> dict:
    """The suite an `eval` config asks for: local (generated from the corpus's
    `split`, cached: test for targets, val for a search), lm_eval (standard task
    names), or {} for loss-only."""
    eval_cfg = eval_config(eval_cfg)
    kind = eval_cfg.kind
    if kind == "local":
        from fastmix.config import abspath
        from fastmix.eval.tasks import build_local_suite
        tasks = eval_cfg.tasks
        suite = build_local_suite(corpus, abspath(eval_cfg.suite_dir), int(eval_cfg.n_per_task),
                                  int(eval_cfg.seed), list(tasks) if tasks else None, split=split)
        if eval_cfg.metric:  # one metric for every task instead of each task's own
            suite = {t: {**e, "metric": str(eval_cfg.metric)} for t, e in suite.items()}
        return suite
    if kind == "lm_eval":
        return paper14_suite(eval_cfg)
    if kind == "loss":
        return {}
    raise UserError(f"eval.kind '{kind}' is unknown: use local, lm_eval or loss.")


def _local_dirs(suite: dict) -> list[str]:
    """The folders of a suite's local task YAMLs (lm-eval's include_path)."""
    return sorted({str(Path(e["yaml"]).parent) for e in suite.values() if e.get("yaml")})


def lm_eval_commands(model_dir: Path, suite: dict, limit: int | None = None, batch_size: int = 16) -> dict:
    """How stock lm-eval re-scores a saved run with the same numbers: the local suite's
    task folder (`include_path`) and one `lm_eval` command per shot count (lm-eval takes
    one --num_fewshot per call; its default few-shot seed is the run's, 1234). fp32,
    EOS as the prefix (the saved tokenizer's BOS, fastmix.train.models.save_with_tokenizer)
    and no logits cache (HFLM's cache mis-scores a request whose tokens equal another's
    with a different context/continuation split: see the module doc), as the run scored."""
    import shlex
    dirs = _local_dirs(suite)
    by_shots: dict[int, list[str]] = {}
    for task, entry in suite.items():
        for shots in _shot_counts(entry):
            by_shots.setdefault(shots, []).append(task)
    cmds = []
    for shots, tasks in sorted(by_shots.items()):
        cmd = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32,logits_cache=False",
               "--tasks", ",".join(tasks), "--num_fewshot", str(shots), "--batch_size", str(batch_size)]
        cmd += [a for d in dirs for a in ("--include_path", d)]
        cmd += ["--limit", str(limit)] if limit else []
        cmds.append(" ".join(shlex.quote(c) for c in cmd))
    return {"tasks_dir": dirs[0] if len(dirs) == 1 else dirs or None, "lm_eval_commands": cmds}


# ------------------------------------------------------------- task loading ---
@functools.lru_cache(maxsize=1)
def default_task_manager():
    """lm-eval's index of its own tasks: built once per process (~10 s)."""
    from lm_eval.tasks import TaskManager
    return TaskManager()


def _task_manager(suite: dict):
    from lm_eval.tasks import TaskManager
    local_dirs = _local_dirs(suite)
    for e in suite.values():
        if e.get("yaml") and not Path(e["yaml"]).exists():
            raise UserError(f"eval suite task file {e['yaml']} is missing; delete its folder so "
                            f"the suite is generated again.")
    standard = any(not e.get("yaml") for e in suite.values())
    if standard and not local_dirs:
        return default_task_manager()
    return TaskManager(include_path=local_dirs or None, include_defaults=standard)


def _shot_counts(entry: dict) -> list[int]:
    shots = entry.get("num_fewshot", 0)
    return [int(s) for s in shots] if isinstance(shots, (list, tuple)) else [int(shots)]


def _is_offline_error(err: Exception) -> bool:
    """datasets/huggingface_hub raise ConnectionError (an OSError) naming
    OfflineModeIsEnabled when HF_DATASETS_OFFLINE=1 and the data is not cached."""
    return isinstance(err, ConnectionError) or "offline" in f"{type(err).__name__}: {err}".lower()


def _data_error(failed: list[tuple[str, Exception]]) -> UserError:
    offline = [(t, e) for t, e in failed if _is_offline_error(e)]
    if len(offline) < len(failed):  # a real loading problem: show it whole
        task, err = next((t, e) for t, e in failed if not _is_offline_error(e))
        return UserError(f"eval task '{task}' could not be loaded by lm-eval: "
                         f"{type(err).__name__}: {str(err)[:500]}")
    names = [t for t, _ in offline]
    reason = str(offline[0][1]).splitlines()[0][:200]
    return UserError(
        f"eval task '{names[0]}'{f' (and {len(names) - 1} more: {names[1:]})' if len(names) > 1 else ''} "
        f"needs its dataset downloaded: it is not in the local Hugging Face cache and nothing can be "
        f"downloaded here ({reason}). Download once on a machine with network, with "
        f"HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0: python -c \"from lm_eval.tasks import TaskManager; "
        f"TaskManager().load({names})\", then copy ~/.cache/huggingface here; or use eval=local.")


def load_tasks(suite: dict) -> dict[int, dict]:
    """{shot count: lm-eval task dict} for every task of the suite, each Task
    set to that shot count. Fails with one UserError naming every task whose
    data cannot be loaded, before any model work."""
    if not suite:
        raise UserError("the eval suite is empty: nothing to evaluate.")
    tm = _task_manager(suite)
    unknown = [t for t in suite if t not in tm.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {unknown}: check the names against "
                        f"`lm-eval ls tasks` (lm_eval {_lm_eval_version()}).")
    runs: dict[int, dict] = {}
    failed: list[tuple[str, Exception]] = []
    for task, entry in suite.items():
        for shots in _shot_counts(entry):
            try:
                loaded = tm.load([task])  # downloads (or reads the cache of) the task's dataset
            except Exception as e:  # lm-eval/datasets raise many types here
                failed.append((task, e))
                break
            run = runs.setdefault(shots, {"tasks": {}, "groups": {}, "group_map": {}})
            for name, t in loaded["tasks"].items():
                if t.get_config("output_type") == "generate_until":
                    raise UserError(f"eval task '{name}' is generative (generate_until); the in-memory "
                                    f"adapter scores loglikelihood and multiple-choice tasks only.")
                t.set_config(key="num_fewshot", value=shots)
                t.set_fewshot_seed(seed=FEWSHOT_SEED)
                run["tasks"][name] = t
            run["groups"].update(loaded.get("groups", {}))
            run["group_map"].update(loaded.get("group_map", {}))
    if failed:
        raise _data_error(failed)
    return runs


def _lm_eval_version() -> str:
    from importlib.metadata import version
    return version("lm_eval")


# ---------------------------------------------------------------- running ---
@register_model("fastmix")
class InMemoryLM(TemplateLM):
    """lm-eval's model interface over an in-memory causal LM (see the module doc).
    Registered as `fastmix` in lm-eval's model registry: once this module is imported,
    `lm_eval.evaluator.simple_evaluate(model="fastmix", model_args="pretrained=RUN/model")`
    scores a saved run's model exactly as the run did."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> InMemoryLM:
        """`pretrained=<a run's model/ folder>[,device=cpu][,batch_size=16][,precision=fp32]`."""
        import os

        from lm_eval.utils import simple_parse_args_string
        from transformers import AutoModelForCausalLM, AutoTokenizer
        args = {**simple_parse_args_string(arg_string),
                **{k: v for k, v in (additional_config or {}).items() if v is not None}}
        path = args.get("pretrained")
        if not path or not Path(path).is_dir():
            raise UserError(f"model_args pretrained={path}: give a run's model/ folder (it holds the saved "
                            f"model and tokenizer).")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        device = torch.device(args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = AutoModelForCausalLM.from_pretrained(path).to(device)
        bs = args.get("batch_size")
        return cls(model, AutoTokenizer.from_pretrained(path), device,
                   int(bs) if bs not in (None, "auto") else 16, args.get("precision", "bf16"))

    def __init__(self, model, tokenizer, device: torch.device, batch_size: int, precision: str):
        super().__init__()
        self.model, self.tokenizer, self._device = model, tokenizer, device
        self.batch_size, self.precision = batch_size, precision
        self.max_length = int(model.config.max_position_embeddings)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.tokens = 0  # positions run through the model, padding included
        self.truncated = 0  # requests left-truncated to fit max_length
        self._encoded: dict[str, list[int]] = {}

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.eos_token_id  # EOS separates documents in training

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        # cached: TemplateLM encodes each context once per choice
        if string not in self._encoded:
            self._encoded[string] = self.tokenizer.encode(string, add_special_tokens=False)
        return list(self._encoded[string])

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log P(cont | ctx), cont is the greedy output) per (ctx, cont) pair, as
        HFLM._loglikelihood_tokens: the model sees (ctx + cont)[-(max_length+1):][:-1].
        Rows are left-padded (masked, positions from 0) so every continuation ends at
        the last position and the LM head runs on the last few positions only
        (`logits_to_keep`), the bulk of the cost for small models."""
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for b in tqdm(range(0, len(order), self.batch_size), desc="eval batches", disable=None, leave=False):
            idx = order[b:b + self.batch_size]
            inps, conts = [], []
            for i in idx:
                ctx, cont = pairs[i]
                # HFLM asserts here; a model with a tiny context scores the part it can see
                cont = cont[:self.max_length]
                seq = (ctx + cont)[-(self.max_length + 1):]
                self.truncated += len(ctx) + len(cont) > self.max_length + 1
                inps.append(seq[:-1])
                conts.append(cont)
            width, keep = max(map(len, inps)), max(map(len, conts))
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            target = torch.zeros((len(idx), keep), dtype=torch.long)
            scored = torch.zeros((len(idx), keep), dtype=torch.bool)
            for r, (x, c) in enumerate(zip(inps, conts)):
                ids[r, width - len(x):] = torch.tensor(x)
                mask[r, width - len(x):] = 1
                target[r, keep - len(c):] = torch.tensor(c)
                scored[r, keep - len(c):] = True
            self.tokens += ids.numel()
            with autocast(self._device, self.precision):
                logits = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                                    position_ids=(mask.cumsum(1) - 1).clamp_min(0).to(self._device),
                                    logits_to_keep=keep).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            token_ll = logp.gather(2, target[..., None])[..., 0].masked_fill(~scored, 0.0)
            greedy = ((logp.argmax(-1) == target) | ~scored).all(1)
            for r, i in enumerate(idx):
                out[i] = (float(token_ll[r].sum()), bool(greedy[r]))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # One batched tokenizer call for the strings TemplateLM will encode one by
        # one (context, context + continuation, continuation): 5x faster.
        strings = {s for r in requests for s in (r.args[0], r.args[0] + r.args[1], r.args[1])}
        todo = [s for s in strings if s and s not in self._encoded]
        if todo:
            ids = self.tokenizer(todo, add_special_tokens=False)["input_ids"]
            self._encoded.update(zip(todo, ids))
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return self._score([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity tasks: every token scored once, windows of max_length (lm-eval's
        get_rolling_token_windows, as HFLM)."""
        results = []
        for req in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length, 1)]
            results.append(sum(ll for ll, _ in self._score(windows)))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise UserError("generative (generate_until) eval tasks are not supported by the in-memory "
                        "adapter; use loglikelihood / multiple-choice tasks.")


def _json_safe(obj):
    return json.loads(json.dumps(obj, default=handle_non_serializable))


def _score(results: dict, task: str, metric: str) -> float:
    row = results["results"].get(task, {})
    key = f"{metric},none"
    if key not in row:
        have = sorted(k.split(",")[0] for k in row if not k.endswith("_stderr,none") and "," in k)
        raise UserError(f"eval task '{task}' reports no metric '{metric}' (it has {have}); "
                        f"fix the task's metric in the eval config.")
    return float(row[key])


def evaluate_suite(model, tokenizer, suite: dict, device, batch_size: int = 16, limit: int | None = None,
                   meter=None, precision: str = "bf16", bootstrap_iters: int = 1000) -> dict:
    """Score an in-memory causal LM on a suite with lm-eval.

    Returns {"results": {"<n>-shot": lm-eval's results dict (JSON-safe)},
    "scores": {task: primary metric, averaged over shot counts}, "metrics":
    {task: metric name}, "average": mean of scores, "stderr": {task: stderr
    (single shot count) or None}, "examples": {task: n scored}, "chance":
    {task: chance level or None}, "tokens": forward tokens, "truncated":
    requests left-truncated to fit the model's context}.
    `limit`: at most this many examples per task (lm-eval's `limit`: the first
    ones of each task file, which the suite builder has shuffled).
    `precision`: bf16 autocast on CUDA (fp32 on CPU), as in training.
    Forward FLOPs are charged to the open stage of `meter`, if given.
    """
    from lm_eval import evaluator

    runs = load_tasks(suite)  # data problems stop here, before the model is touched

    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    lm = InMemoryLM(model, tokenizer, device, int(batch_size), precision)
    all_results, per_shot = {}, {t: [] for t in suite}
    try:
        for shots, task_dict in sorted(runs.items()):
            res = _json_safe(evaluator.evaluate(lm=lm, task_dict=task_dict, limit=limit,
                                                log_samples=False, bootstrap_iters=bootstrap_iters))
            all_results[f"{shots}-shot"] = res
            for task, entry in suite.items():
                if shots in _shot_counts(entry):
                    per_shot[task].append(_score(res, task, entry.get("metric", "acc")))
    finally:
        model.train(was_training)

    if meter is not None:
        meter.add_forward(flop_params(model), lm.tokens)
    if lm.truncated:
        log.info("eval: %d requests were longer than the model's context (%d tokens) and were "
                 "left-truncated, as lm-eval's HFLM does", lm.truncated, lm.max_length)

    return _summary(suite, all_results, per_shot, lm)


def _summary(suite: dict, all_results: dict, per_shot: dict, lm) -> dict:
    """evaluate_suite's return value from lm-eval's results of every shot count."""
    scores = {t: sum(v) / len(v) for t, v in per_shot.items()}
    last = {t: all_results[f"{_shot_counts(e)[-1]}-shot"]["results"][t] for t, e in suite.items()}

    def stderr(t):
        v = last[t].get(f"{suite[t].get('metric', 'acc')}_stderr,none")
        return float(v) if len(_shot_counts(suite[t])) == 1 and isinstance(v, (int, float)) else None

    n_samples = {t: all_results[f"{_shot_counts(e)[-1]}-shot"].get("n-samples", {}).get(t, {})
                 for t, e in suite.items()}
    return {
        "results": all_results,
        "scores": scores,
        "metrics": {t: e.get("metric", "acc") for t, e in suite.items()},
        "average": sum(scores.values()) / len(scores),
        "stderr": {t: stderr(t) for t in suite},
        "examples": {t: int(n_samples[t].get("effective", 0)) for t in suite},
        "chance": {t: e.get("chance") for t, e in suite.items()},
        "tokens": lm.tokens,
        "truncated": lm.truncated,
    }

