# Two commands on a fresh machine: `make run` (install + the main job) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch installed first keeps pip from pulling several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
ROUNDS ?= 20

.PHONY: install run run-headless test bench bench-quick policy clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,bench,chain]"
	touch $@

install: $(VENV)/.installed

# The main job: a local swarm of 4 agents on the embedded policy, watched in the terminal UI.
run: install
	$(VENV)/bin/p2pswarm demo

run-headless: install
	$(VENV)/bin/p2pswarm run --headless --rounds $(ROUNDS)

test: install
	$(PY) -m pytest -q

# Every benchmark, results into bench/results/ (see bench/README.md). `make bench-quick`: minutes, not an hour.
bench: install
	$(PY) bench/round_time.py
	$(PY) bench/trainer_speed.py
	$(PY) bench/swarm_exchange.py
	$(PY) bench/chaos.py
	$(PY) bench/sim_gossip.py
	$(PY) bench/sapo.py
	$(PY) bench/hetero.py
	$(PY) bench/learning.py

bench-quick: install
	$(PY) bench/round_time.py
	$(PY) bench/trainer_speed.py --quick
	$(PY) bench/swarm_exchange.py --quick
	$(PY) bench/chaos.py --quick
	$(PY) bench/sim_gossip.py --quick
	$(PY) bench/sapo.py --quick
	$(PY) bench/hetero.py --quick
	$(PY) bench/learning.py --rounds 100

policy: install
	$(PY) scripts/build_default_policy.py

clean:
	rm -rf $(VENV) runs .pytest_cache
