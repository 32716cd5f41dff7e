"""Config schemas: every value a job reads is checked before any work, against a
dataclass that says its type and what is allowed, so a bad value stops with one
line naming the key, the value and the rule (a `UserError`: exit 2, no DONE).

OmegaConf does the typing (`OmegaConf.structured` + merge converts "3" to 3 and
refuses "abc" for an int); the ranges and choices are field metadata checked
here. `check(cfg)` runs at the start of every job (fastmix.run.pipeline.run_job), so
in a sweep each job reports its own bad value. Covered: the top level (seed,
device, threads), the proxy and target training settings (one schema for
`proxy/` and `train/`), the data node (`DataSchema`: its kind, paths, caps,
splits and tokenizer), eval, and every objective's, optimizer's and executor's
parameters (`Params` beside each class, found by the node's `_target_` and
checked by `check_params`, which `fastmix.run.pipeline.build` also runs before it
builds one). A class checks in its constructor what ties several keys together
(top_k <= n_candidates).
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fastmix.errors import UserError
from fastmix.records import SKIP_DONE


def rule(*, ge=None, gt=None, le=None, lt=None, choices=None, check=None, default=MISSING, default_factory=None):
    """A field with its allowed values in the metadata (no default: required).
    `check`: (predicate, what is allowed) for a rule the bounds cannot say."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, check=check).items()
            if v is not None}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _betas_ok(b) -> bool:
    return len(b) == 2 and all(0 <= x < 1 for x in b)


BETAS = (_betas_ok, "two numbers in [0, 1)")  # Adam's betas, for the model and for FastMix's z


@dataclass
class ModelSchema:
    layers: int = rule(ge=1)
    hidden: int = rule(ge=1)
    ffn: int = rule(ge=1)
    heads: int = rule(ge=1)
    context: int = rule(ge=2)
    kv_heads: Any = None
    tie_embeddings: bool = False
    rope_theta: float = rule(gt=0, default=10000.0)


@dataclass
class RunSchema:
    """conf/proxy/*.yaml and conf/train/*.yaml: one model trained through the one loop."""
    name: str = "run"
    model: ModelSchema = field(default_factory=ModelSchema)
    tokens: int = rule(ge=1)
    batch_size: int = rule(ge=1)
    grad_accum: int = rule(ge=1, default=1)
    lr: float = rule(gt=0)
    warmup_steps: int = rule(ge=0, default=0)
    schedule: str = rule(choices=("constant", "cosine"), default="cosine")
    min_lr_ratio: float = rule(ge=0, le=1, default=0.1)
    weight_decay: float = rule(ge=0, default=0.0)
    betas: list[float] = rule(check=BETAS, default_factory=lambda: [0.9, 0.95])
    grad_clip: float = rule(gt=0, default=1.0)
    precision: str = rule(choices=("bf16", "fp32"), default="bf16")
    log_every: int = rule(ge=1, default=10)
    ckpt_every: int = rule(ge=1, default=50)
    keep_model: bool = False
    fused_loss: bool = True


@dataclass
class TokenizerSchema:
    kind: str = rule(choices=("bpe", "pretrained"), default="bpe")
    vocab_size: int = rule(ge=260, default=8192)  # 256 bytes + pad, bos, eos, unk
    train_bytes_per_source: int = rule(ge=1, default=2_000_000)
    path: Any = None


@dataclass
class EvalSchema:
    """conf/eval/*.yaml: one schema for the three kinds (a preset such as
    experiment=smoke sets n_per_task and limit whichever eval is chosen; a kind
    ignores the keys it does not use, and a misspelt key is still refused)."""
    name: str = "local"
    kind: str = rule(choices=("local", "lm_eval", "loss"), default="local")
    n_per_task: int = rule(ge=1, default=200)  # local
    tasks: Any = None  # local: names or globs; lm_eval: {task: shot counts}
    seed: int = rule(ge=0, default=0)  # local
    metric: Any = None  # local
    num_fewshot: Any = None  # lm_eval
    metrics: Any = None  # lm_eval
    batch_size: int = rule(ge=1, default=16)
    limit: Optional[int] = rule(ge=1, default=None)  # the first N items of each task (quick runs)
    suite_dir: str = "data/eval_suites"
    test_tokens_per_source: int = rule(ge=1, default=32768)


@dataclass
class MethodParams:
    """What every objective's, optimizer's and executor's node holds
    (conf/objective/, conf/optimizer/, conf/executor/): the class to build and its
    label. A method is a dataclass whose fields are its other keys; an objective or
    executor declares `Params`, this plus its own keys. Either way the fields hold
    types and allowed values, no defaults (the YAML holds the published values,
    each with its source)."""
    _target_: str = rule()
    name: str = rule()


@dataclass
class SplitsSchema:
    val: float = rule(gt=0, lt=1, default=0.05)
    test: float = rule(gt=0, lt=1, default=0.05)


@dataclass
class DataSchema:
    """conf/data/*.yaml: where the sources are (by `kind`), and how they are capped,
    split and tokenized. One schema for the three kinds: each reads its own keys
    (folder: root; files: files, under root; hf: datasets) and the rest are shared."""
    kind: str = rule(choices=("folder", "files", "hf"))
    cache_dir: str = rule()
    name: str = "data"
    root: Optional[str] = None  # folder: one subfolder per source; files: relative paths are under it
    files: Any = None  # files: {source: a path or a list of paths}
    datasets: Any = None  # hf: {source: load_dataset arguments + text_field}
    sources: Optional[list[str]] = None  # null = every source found
    text_field: str = "text"  # the text's field in .jsonl/.parquet rows
    max_bytes_per_source: Optional[int] = rule(ge=1, default=None)  # whole documents up to this
    splits: SplitsSchema = field(default_factory=SplitsSchema)
    tokenizer: TokenizerSchema = field(default_factory=TokenizerSchema)
    verify_cache: bool = False  # compare every cache file's checksum on load (sizes are always compared)
    on_bad_file: str = rule(choices=("skip", "error"), default="skip")  # a .txt/.jsonl file that is not text


@dataclass
class TopSchema:
    seed: int = rule(ge=0, default=0)
    threads: Optional[int] = rule(ge=1, default=None)  # null = every core this process may use
    device: str = "auto"
    # a folder with DONE: skipped if DONE records the same config (same_config), or whatever it
    # records (always: the behaviour before configs were recorded); fastmix.records.check_done
    skip_done: str = rule(choices=SKIP_DONE, default="same_config")
    proxy_dir: Optional[str] = rule(choices=(None, "sweep"), default=None)  # fastmix.run.pipeline.proxy_folder


def run_config(cfg) -> DictConfig:
    """A proxy/ or train/ node with every default filled from `RunSchema`: the one
    place the training loop's defaults live (no `cfg.get(key, default)` in the loop)."""
    return OmegaConf.merge(OmegaConf.structured(RunSchema), cfg)


def data_config(cfg) -> DictConfig:
    """A data node with `DataSchema`'s defaults for the keys a kind leaves out."""
    return OmegaConf.merge(OmegaConf.structured(DataSchema), cfg)


def eval_config(cfg) -> DictConfig:
    """An eval node with `EvalSchema`'s defaults for the keys a kind leaves out."""
    return OmegaConf.merge(OmegaConf.structured(EvalSchema), cfg)


def _fail(key: str, value, allowed: str) -> UserError:
    return UserError(f"{key}={value!r} is not allowed: {allowed}.")


def check_fields(schema_cls, node: DictConfig, prefix: str) -> None:
    """Types by OmegaConf, then each field's rule, recursively."""
    def name(k) -> str:
        return f"{prefix}.{k}" if prefix else str(k)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema_cls), node)
    except OmegaConfBaseException as e:
        full = getattr(e, "full_key", None) or _bad_key(schema_cls, node)
        value = OmegaConf.select(node, str(full)) if full else None
        raise UserError(f"{name(full) if full else prefix}={value!r} is not allowed: "
                        f"{str(e).splitlines()[0]}.") from None
    hints = typing.get_type_hints(schema_cls)
    for f in fields(schema_cls):
        key = name(f.name)
        # `???` in the node as well: a merge keeps the schema's default over it
        if OmegaConf.is_missing(typed, f.name) or (f.name in node.keys() and OmegaConf.is_missing(node, f.name)):
            raise UserError(f"{key} is not set: give it a value (`{key}=...`).")
        value = typed[f.name]
        if is_dataclass(hints[f.name]):
            check_fields(hints[f.name], typed[f.name], key)
            continue
        m = f.metadata
        if "choices" in m and value not in m["choices"]:
            raise _fail(key, value, f"use one of {', '.join(m['choices'])}")
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(key, value, "must be a finite number")
        nullable = type(None) in typing.get_args(hints[f.name])
        for op, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if op in m and value is not None and not OPS[op](value, m[op]):
                raise _fail(key, value, f"must be {word} {m[op]}" + (" or null" if nullable else ""))
        if "check" in m and value is not None:
            plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            if not m["check"][0](plain):
                raise _fail(key, plain, m["check"][1])


def _bad_key(schema_cls, node: DictConfig) -> str | None:
    """The key whose value the schema refuses, for OmegaConf errors that name none
    (a list given for a mapping)."""
    for k in node:
        try:
            OmegaConf.merge(OmegaConf.structured(schema_cls), {k: node[k]})
        except OmegaConfBaseException:
            return str(k)
    return None


OPS = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def check_device(name: str) -> None:
    import torch
    if name in ("auto", "cpu"):
        return
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise _fail("device", name, "auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise _fail("device", name, "this machine has no CUDA device; use device=auto or device=cpu")
        if dev.index is not None and dev.index >= n:
            raise _fail("device", name, f"this machine has {n} CUDA device(s): cuda:0..cuda:{n - 1}")
    elif dev.type != "cpu":
        raise _fail("device", name, "auto, cpu, cuda or cuda:N")


def check(cfg: DictConfig) -> None:
    """Every covered value of a composed job config; raises `UserError` on the first bad one."""
    check_fields(TopSchema, OmegaConf.create({k: cfg.get(k) for k in ("seed", "threads", "device", "skip_done", "proxy_dir")
                                               if k in cfg}), "")
    check_device(str(cfg.device))
    for group in ("proxy", "train"):
        check_fields(RunSchema, cfg[group], group)
    check_fields(DataSchema, cfg.data, "data")
    check_fields(EvalSchema, cfg.eval, "eval")
    check_params(cfg.objective, "objective")
    check_params(cfg.optimizer, "optimizer")
    check_params(cfg.executor, "executor")


def check_params(node: DictConfig, prefix: str) -> type:
    """The class a `_target_` node builds (an objective, an optimizer, an
    executor), after its values are checked against the class's `Params`."""
    from hydra.utils import get_object
    try:
        plain = OmegaConf.create(OmegaConf.to_container(node, resolve=True))  # `${scale}` points at the root
    except OmegaConfBaseException as e:
        raise UserError(f"{prefix}: {str(e).splitlines()[0]}.") from None
    target = plain.get("_target_")
    try:
        cls = get_object(str(target))  # a class, or a factory with `Params` (objective=suite)
    except Exception:  # noqa: BLE001 -- Hydra raises ImportError or ValueError, worded for developers
        raise _fail(f"{prefix}._target_", target, "a class that can be imported (module.Class)") from None
    if hasattr(cls, "Params"):  # an objective or executor: its Params dataclass lists its keys
        check_fields(cls.Params, plain, prefix)
    elif is_dataclass(cls):  # a method: a dataclass whose fields are its parameters
        check_fields(MethodParams, OmegaConf.create({k: plain.get(k) for k in ("_target_", "name")}), prefix)
        check_fields(cls, OmegaConf.create({k: v for k, v in plain.items() if k not in ("_target_", "name")}),
                     prefix)
        if hasattr(cls, "check_config"):  # keys its fields leave untyped (RegMix's presets, say)
            cls.check_config(plain, prefix)
    else:
        raise _fail(f"{prefix}._target_", target, "a class with a `Params` dataclass, or a dataclass method "
                                                  "whose fields are its parameters")
    return cls


def positive_int(key: str, value, allowed: str = "an integer >= 1") -> None:
    """The check of a count a schema cannot type (null allowed there, or a class's argument)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(key, value, allowed)
