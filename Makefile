# The two commands a newcomer needs: `make demo` and `make test`. Both bootstrap .venv on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Where the real ISIC example drops live (tests skip the real-data checks visibly when absent).
export LESION_DATA_DIR ?= $(abspath ../shared/data)
# Pretrained backbone for the demo profile, found by path when present.
export LESION_WEIGHTS_DIR ?= $(abspath ../shared/weights)
DATA ?=
PYTEST_ARGS ?=

.PHONY: airflow-stop venv demo airflow test test-unit test-deps screenshots bench lock clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock requirements-test.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'pip==26.3'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-test.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

# isic-challenge-scoring needs pandas < 3: a small venv of its own for the metric cross-check.
$(VENV)-isic/.installed: tests/isic-scoring.lock
	@test -x $(VENV)-isic/bin/python || $(PYTHON) -m venv $(VENV)-isic
	$(VENV)-isic/bin/python -m pip install --quiet --disable-pip-version-check 'pip==26.3'
	$(VENV)-isic/bin/python -m pip install --quiet --disable-pip-version-check -r tests/isic-scoring.lock
	@touch $@

# Runs the main job through Airflow (the three DAGs, dag.test) on the embedded defaults
# (SQLite + a local store under LESION_HOME, default ~/.lesion).
demo: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/lesion demo $(if $(DATA),--data "$(DATA)")

# A real Airflow 3 (standalone) on 127.0.0.1:8080 with the project's DAGs; Ctrl-C stops it.
airflow: venv
	bash tools/airflow_standalone.sh

# Stops `make airflow` from another shell: one SIGINT to its supervisor (what Ctrl-C does). Started in the
# background (`make airflow &`), make ignores SIGINT, as the shell started it, and passes none on: use this.
airflow-stop:
	@bash -c 'source tools/airflow_env.sh && pidfile="$$AIRFLOW_HOME/lesion-airflow.pid" && \
	  if [ -s "$$pidfile" ] && kill -INT "$$(cat "$$pidfile")" 2>/dev/null; then echo "make airflow-stop: SIGINT sent to $$(cat "$$pidfile")"; \
	  else echo "make airflow-stop: no make airflow running for AIRFLOW_HOME=$$AIRFLOW_HOME" >&2; exit 1; fi'

# Installs the system packages the suite needs (PostgreSQL) when missing, then runs every test.
# The suite starts its own throwaway PostgreSQL cluster and S3 server (rclone serve s3).
test: venv $(VENV)-isic/.installed test-deps
	LESION_ISIC_SCORING_VENV="$(abspath $(VENV)-isic)" PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast tier while you work: no database or S3 server, no Airflow run, no network (tests/unit/conftest.py).
test-unit: venv $(VENV)-isic/.installed
	LESION_ISIC_SCORING_VENV="$(abspath $(VENV)-isic)" PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest tests/unit -m unit $(PYTEST_ARGS)

test-deps:
	@bash tests/ensure_system_deps.sh

# Regenerates the README's review UI screenshots (docs/screenshots/*.jpg) from a small real ISIC 2017 drop,
# through a live Airflow and Chromium (tests/live/test_screenshots.py). Needs the real data.
screenshots: venv test-deps
	@test -d "$(LESION_DATA_DIR)/isic2017-mel-nv" || { echo "no $(LESION_DATA_DIR)/isic2017-mel-nv: set LESION_DATA_DIR"; exit 1; }
	LESION_SCREENSHOT_DIR="$(abspath docs/screenshots)" PATH="$(abspath $(BIN)):$$PATH" \
		$(BIN)/python -m pytest tests/live/test_screenshots.py -q -x $(PYTEST_ARGS)

bench: venv
	$(BIN)/python bench/ingest_throughput.py
	$(BIN)/python bench/review_queue.py
	$(BIN)/python bench/neardup_grouping.py

# Regenerates both locks from the current venv (after changing pyproject.toml and reinstalling).
lock:
	$(BIN)/python -m pip freeze --exclude-editable | $(BIN)/python tools/split_lock.py

clean:
	rm -rf $(VENV) .pytest_cache
