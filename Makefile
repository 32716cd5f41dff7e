# Two commands on a fresh machine: `make run` and `make test`. Both do the same
# idempotent setup first (a .venv with pinned packages, the project installed
# editable, the embedded corpus built once).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CORPUS := data/embedded/manifest.json
SFT    := data/embedded_sft/manifest.json
TEXTS  := data/embedded_texts/manifest.json
ARGS   ?=

.PHONY: setup run test test-slurm corpus bench demo oracle oracle-landscape clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and alone: pinned, so pip never picks a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(CORPUS): $(STAMP) $(wildcard fastmix/data/embedded/*.py) fastmix/data/embedded/mathgen.py
	$(PY) -m fastmix.data.embedded --out data/embedded

$(SFT): $(CORPUS) fastmix/data/embedded/sft.py
	$(PY) -m fastmix.data.embedded.sft --embedded data/embedded --out data/embedded_sft

# external objective texts (package READMEs and licenses), none of the sources: the oracle
# suites' text objectives (conf/landscape/*.yaml)
$(TEXTS): $(STAMP) fastmix/data/embedded/texts.py
	$(PY) -m fastmix.data.embedded.texts --out data/embedded_texts

corpus: $(CORPUS) $(SFT) $(TEXTS)

setup: $(STAMP) $(CORPUS) $(SFT) $(TEXTS)

run: setup
	$(PY) run.py $(ARGS)

# one pytest-xdist worker per core, each pinned to its core (tests/conftest.py)
test: setup
	$(PY) -m pytest -q -n auto tests

# the SLURM path against a real single-node SLURM on this machine (root: it installs
# Debian's slurmctld/slurmd/munge and starts a private cluster under /tmp/fastmix-slurm,
# reached through SLURM_CONF; stopped at the end, also on failure, then checked to have
# touched nothing outside that folder; scripts/slurm.sh)
test-slurm: setup
	@if [ "$$(id -u)" != 0 ]; then echo "make test-slurm needs root (it installs and starts SLURM)" >&2; exit 2; fi
	bash scripts/slurm.sh test $(PY) -m pytest -q -m slurm tests/test_slurm.py

# every method x 3 seeds at CPU scale, then tables, plots and the README's results
demo: setup
	$(PY) run.py -m experiment=demo $(ARGS)

# the oracle suite: every method x 3 seeds x every objective of each shipped landscape, scored
# by its fit (no grid is trained: make oracle-landscape did that); the leaderboard, plots and
# the README's oracle section
oracle: setup
	$(PY) run.py -m experiment=oracle landscape=k3 $(ARGS)
	$(PY) run.py -m experiment=oracle landscape=k5 $(ARGS)

# train the two shipped landscapes (run once; their files ship in landscapes/): K = 3 over a
# 1/10 grid with the 4x-budget check, then K = 5 over a space-filling design
oracle-landscape: setup
	$(PY) run.py -m experiment=oracle_landscape landscape=k3 $(ARGS)
	$(PY) -m analysis.oracle --landscape landscapes/k3 --readme README.md
	$(PY) run.py -m experiment=oracle_landscape landscape=k5 $(ARGS)
	$(PY) -m analysis.oracle --landscape landscapes/k5 --readme README.md

bench: setup
	$(PY) bench/throughput.py

clean:
	rm -rf outputs/runs outputs/sweep data/cache
