# Every install goes through constraints.txt so torch stays the 2.13.0 CPU build.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_ID ?= demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

# 3 simulated hospitals, bundled PneumoniaMNIST, Dirichlet label skew, DP-SGD at ε ≤ 10 each, SecAgg+ on.
# Each demo gets fresh simulated hospitals (state/RUN_ID): reusing a state folder keeps composing its ε.
demo: install
	$(VENV)/bin/fedsynth simulate --run-id $(RUN_ID) --state-dir state/$(RUN_ID) --out runs

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs state .pytest_cache
