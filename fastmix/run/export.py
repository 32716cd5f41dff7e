"""Write a found mixture in the forms training stacks read.

    python -m fastmix.run.export RUN/mixture.json --format megatron|olmo|datasets \
        [--out PATH] [--path SOURCE=PREFIX ...]

The input is a run folder (its mixture.json is read), a mixture.json or a
result.json: any JSON object with "weights" {source: weight}. Each format was
checked against the upstream source:

megatron  Megatron-LM's blend list "w1 prefix1 w2 prefix2 ...", a prefix being
          the tokenized .bin/.idx path without its extension. It is parsed by
          get_blend_from_list (megatron/core/datasets/utils.py), which expects an
          even-length list of weight/prefix pairs. --megatron-form picks the carrier:
          data-path  the `--data-path w1 p1 ...` argument line, shell-quoted (nargs='*',
                     megatron/training/arguments.py). Megatron also needs --split.
          data-args  the same list as a plain-text file for `--data-args-path FILE`,
                     read as f.read().split() by get_blend_and_blend_per_split
                     (megatron/training/utils.py); so prefixes must have no whitespace.
          per-split  JSON {"train": [w1, p1, ...], "valid": null, "test": null} for
                     `--per-split-data-args-path FILE` (same function; a null split is
                     not built, megatron/core/datasets/blended_megatron_dataset_config.py).
olmo      OLMo-core's SourceMixtureList, {"sources": [{source_name, target_ratio, paths,
          max_repetition_ratio}]}, as YAML (JSON if --out ends in .json). It is what
          SourceMixtureList.from_yaml / Config.from_file reads and what
          SourceMixtureDatasetConfig(source_list=..., requested_tokens=..., global_batch_size=...)
          takes (src/olmo_core/data/source_mixture.py, OLMo-core v2.3.0 through 3.0.0; the same
          layout as src/olmo_core/data/source_mixtures/*.yaml). Before v2.3.0 the list was
          SourceMixtureDatasetConfig.source_configs, with the same per-source fields.
datasets  JSON for Hugging Face datasets.interleave_datasets(datasets, probabilities=[...],
          seed=..., stopping_strategy=...) (src/datasets/combine.py): the source order, the
          matching paths and probabilities, the seed, the strategy and a usage snippet.

Weights are renormalised and written with repr() (round-trip exact), so they sum to
1 far within 1e-9. Zero-weight sources are dropped for megatron and olmo (a note
goes to stderr); datasets keeps them unless stopping_strategy is all_exhausted,
which datasets (5.2) rejects for probability 0. Bad input raises UserError: main() prints
one line and returns 2, and nothing is written.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from fastmix.cli import run_tool
from fastmix.errors import UserError
from fastmix.records import write_text_atomic

FORMATS = ("megatron", "olmo", "datasets")
MEGATRON_FORMS = ("data-path", "data-args", "per-split")
STRATEGIES = ("first_exhausted", "all_exhausted", "all_exhausted_without_replacement")
USAGE = """import json
from datasets import interleave_datasets, load_dataset
mix = json.load(open("{out}"))  # one dataset per entry of mix["sources"], in that order
parts = [load_dataset("json", data_files=p, split="train") for p in mix["paths"]]
mixed = interleave_datasets(parts, probabilities=mix["probabilities"], seed=mix["seed"], stopping_strategy=mix["stopping_strategy"])"""


def load_weights(path: Path) -> dict[str, float]:
    """The validated weights, in the file's "sources" order when it has one."""
    path = Path(path)
    if path.is_dir():
        path = path / "mixture.json"
    if not path.is_file():
        raise UserError(f"no such file: {path}; pass a run folder, its mixture.json or a result.json.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); pass a mixture.json or a result.json.") from None
    weights = data.get("weights") if isinstance(data, dict) else None
    if not isinstance(weights, dict) or not weights:
        raise UserError(f"{path} has no \"weights\" object; pass a run's mixture.json or result.json.")
    sources = data.get("sources") or list(weights)
    if set(sources) != set(weights):
        raise UserError(f"{path}: \"weights\" names {sorted(weights)} but \"sources\" is {sorted(sources)}; "
                        "make them name the same sources.")
    for k, v in weights.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"{path}: weight of '{k}' is {v!r}, not a number; weights must be numbers >= 0.")
        if not math.isfinite(v) or v < 0:
            raise UserError(f"{path}: weight of '{k}' is {v}; weights must be finite numbers >= 0.")
    total = math.fsum(weights.values())
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"{path}: weights sum to {total:.9g}, not 1 (tolerance 1e-6); "
                        f"rescale them (divide each by {total:.9g}).")
    return {k: weights[k] / total for k in sources}


def parse_paths(items: list[str], sources: list[str]) -> dict[str, str]:
    """SOURCE=PREFIX pairs; with none given, each source's name is its placeholder."""
    mapping: dict[str, str] = {}
    for item in items:
        name, sep, prefix = item.partition("=")
        if not sep or not name or not prefix:
            raise UserError(f"--path {item!r} is not SOURCE=PREFIX; write e.g. --path web=/data/web_text_document.")
        if name not in sources:
            raise UserError(f"--path names the unknown source '{name}'; the mixture's sources are {sources}.")
        if name in mapping:
            raise UserError(f"--path gives source '{name}' twice; give each source once.")
        mapping[name] = prefix
    return mapping


def kept(weights: dict[str, float], drop_zero: bool) -> dict[str, float]:
    """Renormalised weights, less the zero ones when `drop_zero` (with a note on stderr)."""
    zero = [k for k, w in weights.items() if w == 0]
    if drop_zero and zero:
        print(f"note: dropped zero-weight sources {zero} (they would contribute no data).", file=sys.stderr)
        weights = {k: w for k, w in weights.items() if w > 0}
    total = math.fsum(weights.values())
    return {k: w / total for k, w in weights.items()}


def resolve(weights: dict[str, float], mapping: dict[str, str]) -> dict[str, str]:
    missing = [k for k in weights if k not in mapping]
    if mapping and missing:
        raise UserError(f"--path maps some sources but not {missing}; add --path SOURCE=PREFIX for each.")
    return {k: mapping.get(k, k) for k in weights}


def megatron(weights: dict[str, float], paths: dict[str, str], form: str, out: Path | None) -> tuple[str, str]:
    """(file text, line for stdout when the text goes to a file)."""
    for k, p in paths.items():
        if any(c.isspace() for c in p) or p.endswith((".bin", ".idx")):
            raise UserError(f"Megatron prefix {p!r} of source '{k}' must have no whitespace and no .bin/.idx "
                            "extension; give --path SOURCE=/path/to/prefix_text_document.")
    pairs = [s for k, w in weights.items() for s in (repr(w), paths[k])]
    if form == "data-path":
        line = "--data-path " + " ".join(shlex.quote(s) for s in pairs)
        return line + "\n", line
    if form == "data-args":
        return " ".join(pairs) + "\n", f"--data-args-path {shlex.quote(str(out))}"
    text = json.dumps({"train": pairs, "valid": None, "test": None}, indent=2) + "\n"
    return text, f"--per-split-data-args-path {shlex.quote(str(out))}"


def olmo(weights: dict[str, float], paths: dict[str, str], as_json: bool) -> str:
    import yaml
    doc = {"sources": [{"source_name": k, "target_ratio": w, "paths": [paths[k]], "max_repetition_ratio": 1.0}
                       for k, w in weights.items()]}
    if as_json:
        return json.dumps(doc, indent=2) + "\n"
    return ("# OLMo-core SourceMixtureList (src/olmo_core/data/source_mixture.py, v2.3.0+): load with\n"
            "# SourceMixtureList.from_yaml(path), pass as SourceMixtureDatasetConfig(source_list=...).\n"
            + yaml.safe_dump(doc, sort_keys=False))


def hf_datasets(weights: dict[str, float], paths: dict[str, str], seed: int, strategy: str, out) -> dict:
    return {"sources": list(weights), "paths": [paths[k] for k in weights],
            "probabilities": list(weights.values()), "seed": seed, "stopping_strategy": strategy,
            "usage": USAGE.format(out=out or "mixture_datasets.json")}


def export(args: argparse.Namespace) -> None:
    weights = load_weights(args.mixture)
    mapping = parse_paths(args.path, list(weights))
    drop = args.format != "datasets" or args.stopping_strategy == "all_exhausted"
    weights = kept(weights, drop)
    paths = resolve(weights, mapping)
    out = args.out
    if out is not None and out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file path.")
    if args.format == "megatron":
        text, line = megatron(weights, paths, args.megatron_form, out)
        if out is not None:
            write_text_atomic(out, text)
        print(line if out is not None else text.rstrip("\n"))
        return
    if args.format == "olmo":
        text = olmo(weights, paths, as_json=out is not None and out.suffix == ".json")
    else:
        text = json.dumps(hf_datasets(weights, paths, args.seed, args.stopping_strategy, out), indent=2) + "\n"
    if out is None:
        print(text, end="")
    else:
        write_text_atomic(out, text)
        print(f"wrote {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmix.run.export", description=__doc__.split("\n")[0])
    p.add_argument("mixture", type=Path, help="run folder, mixture.json or result.json")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", type=Path, help="write here (atomically) instead of stdout")
    p.add_argument("--path", action="append", default=[], metavar="SOURCE=PREFIX",
                   help="real data prefix/path of a source (repeat; all kept sources, or none)")
    p.add_argument("--megatron-form", choices=MEGATRON_FORMS, default="data-path")
    p.add_argument("--seed", type=int, default=0, help="datasets: interleave seed")
    p.add_argument("--stopping-strategy", choices=STRATEGIES, default="first_exhausted")
    return run_tool(p, export, argv)


if __name__ == "__main__":
    sys.exit(main())
