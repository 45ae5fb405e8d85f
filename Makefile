# Two commands matter: `make demo` (the main job) and `make test` (what CI runs).
# Both install what they need first: a virtualenv with the project, then redis-server,
# PostgreSQL 15, the Tansu broker and s3rver (deploy/install-local-deps.sh).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml deploy/install-local-deps.sh
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,local]'
	PYTHON=$(PY) bash deploy/install-local-deps.sh
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/mesh demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) bench/targets.py --make

clean:
	-$(VENV)/bin/mesh dev down
	rm -rf $(VENV) .mesh .local
