# Two commands for a new user: `make demo` and `make test`. Both build .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-integration test-e2e stack stack-down clean

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned requirements into $(VENV) (a few minutes the first time)"
	@$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt 2> $(VENV)/pip.log \
		|| { grep -v "is ignored" $(VENV)/pip.log; exit 1; }
	@$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt 2>> $(VENV)/pip.log \
		|| { grep -v "is ignored" $(VENV)/pip.log; exit 1; }
	@$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . 2>> $(VENV)/pip.log \
		|| { grep -v "is ignored" $(VENV)/pip.log; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# The browser tests drive Debian's chromium; install it when missing (needs root, as CI has).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@echo "installing Debian's chromium for the browser tests"
	@DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium > /dev/null \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium > /dev/null; }

# Two workers: the DAG-run and stack tests run one after another on one of them (they start
# servers and Airflow processes of their own), the unit tests on the other (tests/conftest.py).
test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -n 2 --dist loadgroup

test-unit: $(STAMP)
	$(PY) -m pytest -m "not integration and not e2e"

test-integration: $(STAMP)
	$(PY) -m pytest -m integration

test-e2e: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -m e2e

# The deployment column on this machine, without Docker: PostgreSQL, S3, MLflow server,
# Airflow api-server/scheduler/dag-processor/triggerer and the silo agents.
stack: $(STAMP)
	$(PY) -m devstack.localstack up

stack-down:
	$(PY) -m devstack.localstack down

clean:
	rm -rf .state
