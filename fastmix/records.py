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


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
