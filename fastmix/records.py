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


def mark_done(run_dir: Path) -> None:
    write_text_atomic(Path(run_dir) / "DONE", "")


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
