# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both build .venv themselves (CPU torch first, so nothing pulls a CUDA build).
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-campaign bench bench-quick clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" || { echo "note: $(TORCH) (CPU build) is not available here; installing torch from the index"; $(PY) -m pip install -q "torch>=2.4"; }
	$(PY) -m pip install -q -e ".[test,executorch,explorer]"
	touch $@

# the demo's HTML report lays graphs out with Graphviz: installed where this machine allows it
demo: setup
	@command -v dot >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -q && apt-get install -y -q graphviz; } || \
		echo "note: Graphviz's dot is missing; the demo skips its HTML report (apt-get install graphviz)"
	$(VENV)/bin/graphopt demo

test: setup
	$(PY) -m pytest -n 2 -q

# one process, so pytest's summary can list the cases each property test drew, ran and fired on
CAMPAIGN_EXAMPLES ?= 2000
test-campaign: setup
	GRAPHOPT_HYPOTHESIS_PROFILE=campaign GRAPHOPT_HYPOTHESIS_EXAMPLES=$(CAMPAIGN_EXAMPLES) $(PY) -m pytest -p no:xdist -q tests/test_properties.py

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.run

bench-quick: setup
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache .hypothesis
