"""Run-folder files: written atomically, read back by analysis/.

A run folder holds mixture.json, search_trace.jsonl, metrics.jsonl, cost.json,
eval.json, result.json and, last, DONE (see DESIGN.md). Every file is written
to a temporary name in the same folder and renamed, so a killed job leaves
either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# the process umask (it cannot be read without setting it), for the permissions of
# files made by mkstemp, which are always 0600
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_file(path: Path, mode: str = "w"):
    """The one atomic writer: yield a file open on a temporary name in the same folder
    (.<name>.*.tmp, so loaders that glob *.jsonl or *.npz never pick it up); on
    success flush, fsync and rename it to `path`, on error remove it. Text, JSON,
    checkpoints (torch.save), corpus files and embedding shards all go through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as fh:
        fh.write(text)


@contextmanager
def building_dir(root: Path, marker: str):
    """Yield a temporary folder beside `root`; on success rename it to `root`.
    A concurrent job that built the same `root` first wins (its `marker` file
    exists), and the loser's copy is dropped. On error nothing is left behind."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def is_done(run_dir: Path) -> bool:
    return (Path(run_dir) / "DONE").exists()


# ---------------------------------------------------------------- what a job is
# Config keys that decide where a job's files go or how fast it runs, never its
# numbers: left out of the config that DONE records (and of proxy records'
# fingerprints), so changing them does not re-run finished work. Everything else
# counts, device and precision included: seed, data, objective, proxy, train,
# optimizer, eval. (Torch threads and proxy executors may reorder float sums in
# the last bits; that is run-to-run noise, not a different job.)
NOT_RESULT_KEYS = (
    "hydra",            # Hydra's own settings (launcher, folders, logging): not in the job's config
    "threads",          # torch threads per process: speed only
    "progress",         # progress bars
    "sweep_name",       # names the sweep's folder
    "skip_done",        # this rule's own switch
    "executor",         # where a search's proxy runs go (in process, workers, a SLURM array): same runs
    "data.cache_dir",   # the token cache is keyed by the sources' contents and settings, wherever it is
    "data.verify_cache",  # re-checks the cache's checksums: the same tokens
    "eval.suite_dir",   # the local suite's folder, keyed by what builds it
    "oracle.grid_dir", "optimizer.grid_dir",  # where the grid's records go: each is checked by its fingerprint
)
# nodes whose schema (fastmix.schema) fills defaults the YAML leaves out: those count too
_SCHEMA_NODES = {"proxy": "run_config", "train": "run_config", "data": "data_config", "eval": "eval_config"}


def job_config(cfg) -> dict:
    """The config that identifies a job (or a proxy record): resolved, with the
    schema's defaults filled in, without NOT_RESULT_KEYS, and with paths inside
    the checkout written from `<repo>` (a moved or second checkout is the same job).
    What else decides the numbers is left out on purpose, so the check stays as
    cheap as composing the config: the source files' contents (the token cache
    keys them; proxy records add that key) and the code (result.json's versions)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fastmix import schema
    from fastmix.config import REPO
    cfg = OmegaConf.create(cfg) if not OmegaConf.is_config(cfg) else cfg
    # without Hydra's node (the SLURM launcher composes it too): nothing of it decides the numbers
    plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    for key, fill in _SCHEMA_NODES.items():
        if isinstance(plain.get(key), dict):
            try:
                plain[key] = OmegaConf.to_container(getattr(schema, fill)(plain[key]), resolve=True)
            except OmegaConfBaseException:  # a bad value: the job stops on it (schema.check), no DONE
                pass
    _drop_not_result(plain)

    def rel(v):
        if isinstance(v, dict):
            return {k: rel(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rel(x) for x in v]
        return "<repo>" + v[len(str(REPO)):] if isinstance(v, str) and v.startswith(str(REPO)) else v
    return rel(plain)


def _drop_not_result(conf: dict) -> dict:
    for key in NOT_RESULT_KEYS:
        *parents, leaf = key.split(".")
        node = conf
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return conf


def fingerprint(conf: dict) -> str:
    """The one hash of what determines a result (a job's config, a proxy record's setup)."""
    import hashlib
    return hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict) or not d:
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(old: dict, new: dict, most: int = 4) -> str:
    """`train.lr 0.001 → 0.002, seed 0 → 1` (dotted keys, at most `most`, then how many more)."""
    a, b = _flat(old), _flat(new)
    def short(v) -> str:
        if v is _UNSET:
            return "(unset)"
        r = f"{v:.4g}" if isinstance(v, float) else json.dumps(v, default=str)
        return r if len(r) <= 40 else r[:37] + "..."
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, _UNSET) != b.get(k, _UNSET))
    out = ", ".join(f"{k} {short(a.get(k, _UNSET))} → {short(b.get(k, _UNSET))}" for k in keys[:most])
    return out + (f" and {len(keys) - most} more" if len(keys) > most else "")


_UNSET = object()


SKIP_DONE = ("same_config", "always")


@dataclass
class DoneCheck:
    skip: bool
    why: str  # "same config" / "config changed: ..." / "" (no DONE)


def check_done(run_dir: Path, cfg) -> DoneCheck:
    """The one rule for a job folder that has DONE (run.py and the SLURM launcher):
    skip it if the config DONE records is this job's (or whatever it is, with
    `skip_done=always`), else re-run it. A DONE from an earlier version holds no
    config: its result.json's config is compared the same way (the config the job
    ran with, so re-running an unchanged sweep after an upgrade trains nothing); a
    folder with neither is re-run."""
    run_dir = Path(run_dir)
    if not (run_dir / "DONE").exists():
        return DoneCheck(False, "")
    policy = cfg.get("skip_done", "same_config")
    if policy not in SKIP_DONE:  # checked here too: it is read before the job's schema check
        from fastmix.errors import UserError
        raise UserError(f"skip_done={policy!r} is not allowed: use one of {', '.join(SKIP_DONE)}.")
    if policy == "always":
        return DoneCheck(True, "skip_done=always")
    new = job_config(cfg)
    try:
        old = _drop_not_result(read_json(run_dir / "DONE")["config"])
    except (OSError, ValueError, KeyError, TypeError):  # empty: an earlier version's DONE
        try:
            old = job_config(read_json(run_dir / "result.json")["config"])
        except (OSError, ValueError, KeyError, TypeError):
            return DoneCheck(False, "DONE records no config (an earlier version wrote it)")
    if fingerprint(old) == fingerprint(new):
        return DoneCheck(True, "same config")
    return DoneCheck(False, "config changed: " + config_changes(old, new))


# What a finished job leaves besides .hydra/, run.log and status.json: cleared before
# a changed config re-runs it, DONE first, so a re-run that fails leaves no stale row
# (analysis reads result.json). Checkpoints and proxy records under search/ stay:
# each is used only if it was made by the same setup (fastmix.train.loop, fastmix.run.pipeline).
RESULT_FILES = ("DONE", "result.json", "eval.json", "cost.json", "mixture.json", "search_trace.jsonl",
                "metrics.jsonl", "error.txt", "model")


def clear_results(run_dir: Path) -> None:
    for name in RESULT_FILES:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def mark_done(run_dir: Path, cfg) -> None:
    """DONE, written last: the job's config as `job_config` has it, and its hash."""
    conf = job_config(cfg)
    write_json(Path(run_dir) / "DONE", {"config_hash": fingerprint(conf), "config": conf})


def summary(result: dict, run_dir: Path) -> str:
    """The few lines a job ends with (run.py logs them): what it found and what it cost."""
    w = ", ".join(f"{k}={v:.3f}" for k, v in result["weights"].items())
    lines = [f"mixture ({result['optimizer']}): {w}", f"objective {result['objective'].get('name', '?')}: "
             + _loss(result)]
    scores = result.get("eval") or {}
    if scores and result.get("eval_average") is not None:
        best, worst = max(scores, key=scores.get), min(scores, key=scores.get)
        lines.append(f"suite {result.get('eval_suite')}: average {result['eval_average']:.3f} over {len(scores)} "
                     f"tasks (best {best} {scores[best]:.3f}, worst {worst} {scores[worst]:.3f})")
    else:
        lines.append(f"suite {result.get('eval_suite')}: no tasks scored")
    lines.append(f"cost: search {_cost(result['search_cost'])}; train {_cost(result['train_cost'])}")
    lines.append(f"run folder: {run_dir}")
    return "\n".join(lines)


def summary_of(run_dir: Path) -> str:
    """`summary` of a finished folder's result.json on new lines ("" if it cannot be read)."""
    try:
        return "\n" + summary(read_json(Path(run_dir) / "result.json"), run_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""


def _cost(c: dict) -> str:
    # device-hours once they are worth a decimal, else the wall seconds (a CPU job's are tiny)
    time_ = (f"{c['device_hours']:.2f} device-hours" if c["device_hours"] >= 0.05
             else f"{c['wall_seconds']:.0f} s")
    runs = f", {c['proxy_runs']} proxy runs" if c.get("proxy_runs") else ""
    return f"{time_} on {c['device']}, {c['flops']:.2g} FLOPs{runs}"


def headline(result: dict) -> str:
    """A sweep summary's number for one job: the objective's test loss and the suite's average."""
    avg = result.get("eval_average")
    loss = result["objective_loss"]
    head = "no target (scored by the fitted landscape)" if loss is None else f"objective loss {loss:.4f}"
    return head + (f", suite {avg:.3f}" if avg is not None else "")


def _loss(result: dict) -> str:
    loss = result["objective_loss"]
    return "no target (scored by the fitted landscape)" if loss is None else f"test loss {loss:.4f}"


def versions() -> dict:
    """Library versions that decide the numbers, stored in every result row."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("fastmix-bench", "torch", "transformers", "tokenizers", "lm_eval", "hydra-core", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
