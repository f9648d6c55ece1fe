# Two commands matter: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test demo clean

setup: $(STAMP)

# Idempotent: re-runs only when the pins change.
$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade "pip==25.3" "setuptools==80.9.0" "wheel==0.45.1"
	$(VENV)/bin/python -m pip install --quiet -e '.[torch,test]'
	touch $(STAMP)

test: setup
	$(VENV)/bin/python -m pytest -q

demo: setup
	$(VENV)/bin/peel-jax demo --out demo_out --overwrite

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
