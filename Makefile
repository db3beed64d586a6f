# Every target runs in the project's own virtual environment, .venv.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
ARGS ?=
PORT ?= 8080
TFSERVING_PORT ?= 8501
UI_PORT ?= 5000
# The store train.py uses (conf/tracking/mlflow.yaml): MLFLOW_TRACKING_URI, or the project's mlflow.db.
TRACKING_URI := $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)
# `make` alone lists the targets.
.DEFAULT_GOAL := help

.PHONY: help install install-all browser lock test train report compare evaluate robustness ui tracking-server register-best serve-best export-tfserving serve-best-tfserving export-tflite clean

help:  ## list the targets with what each does (the default)
	@echo "usage: make <target> [ARGS=\"...\"] [PORT=...] [UI_PORT=...]; start with make install"
	@awk 'BEGIN { FS = ":.*## " } /^[a-zA-Z0-9_-]+:.*## / { printf "  %-22s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

install: $(VENV)/.installed  ## create .venv and install the core for a CPU machine: train, track, register, serve

# Extras on top of the core (pyproject.toml): TensorFlow for this machine, and what the tests import.
TF_EXTRA ?= cpu
TEST_EXTRAS := dev,export,postgres,profile
LOCK_VENV := .venv-lock
# On a CPU the distribution `tensorflow`, which tensorflow-hub -> tf-keras requires, is this alias of tensorflow-cpu
# (see its pyproject.toml): one 1.27 GB TensorFlow instead of two. The gpu extra is the full tensorflow itself.
TF_ALIAS_DIR := packaging/tensorflow-cpu-alias
TF_ALIAS := $(if $(filter cpu,$(TF_EXTRA)),./$(TF_ALIAS_DIR))
# Which TensorFlow the venv holds, recorded in it: pip cannot swap the full wheel and the alias in place (replacing
# one by the other deletes files they share), so a venv made for another one is made afresh.
TF_LAYOUT := $(TF_EXTRA) tensorflow $(shell sed -n 's/^version = "\([^"]*\)".*/\1/p' $(TF_ALIAS_DIR)/pyproject.toml)

$(VENV)/.installed: pyproject.toml constraints.txt $(TF_ALIAS_DIR)/pyproject.toml
	@echo "==> [1/3] the virtual environment $(VENV), for $(TF_LAYOUT)"
	@if [ -d $(VENV) ] && [ "$$(cat $(VENV)/.tf-layout 2>/dev/null)" != "$(TF_LAYOUT)" ]; then \
		echo "==> $(VENV) was made for another TensorFlow: removing it"; rm -rf $(VENV); fi
	python3 -m venv $(VENV)
	@echo "==> [2/3] pip itself, at the version constraints.txt pins"
	$(PYTHON) -m pip install --progress-bar on -c constraints.txt --upgrade pip
	@echo "==> [3/3] the project and its core dependencies, extra $(TF_EXTRA) (about 2.4 GB, half of it TensorFlow)"
	$(PYTHON) -m pip install --progress-bar on -c constraints.txt $(TF_ALIAS) -e ".[$(TF_EXTRA)]"
	echo "$(TF_LAYOUT)" > $(VENV)/.tf-layout
	touch $@
	@echo "==> done: $(VENV) holds the core; make test adds the test tools, make install-all every extra"

$(VENV)/.installed-all: $(VENV)/.installed
	@echo "==> the extras $(TEST_EXTRAS) on top of the core: test tools, TFLite/OpenVINO, PostgreSQL, TensorBoard"
	$(PYTHON) -m pip install --progress-bar on -c constraints.txt $(TF_ALIAS) -e ".[$(TF_EXTRA),$(TEST_EXTRAS)]"
	touch $@

install-all: $(VENV)/.installed-all  ## install every extra for this machine on top of the core (what make test needs)

lock:  ## regenerate constraints.txt: every extra but gpu, resolved afresh from the registry in a throw-away venv
	rm -rf $(LOCK_VENV)
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install ./$(TF_ALIAS_DIR) -e ".[cpu,$(TEST_EXTRAS)]"
	{ sed -n '/^#/p' constraints.txt; \
		$(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable --exclude tensorflow; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

# Playwright (the dev extra) drives the system Chromium: its own browser download needs the internet.
browser:  ## the Chromium that tests/test_page.py drives: apt-get install chromium when root, else say how
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& { apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }; }; } \
		|| echo "==> no chromium: tests/test_page.py will skip; install it with sudo apt-get install -y chromium"

test: install-all browser  ## the whole test suite, after installing the extras and the browser it needs
	@echo "==> running the test suite"
	$(PYTHON) -m pytest

train: install  ## one training job; e.g. make train ARGS="backbone=mobilenet_v2_100_224 lr=3e-4"
	$(PYTHON) train.py $(ARGS)

report: install  ## tables and figures of one experiment's runs into experiments/$(EXPERIMENT)/results; e.g. EXPERIMENT=lr_batch_grid
	@test -n "$(EXPERIMENT)" || { echo "error: say which experiment: make report EXPERIMENT=<name>, e.g. EXPERIMENT=backbone_comparison" >&2; exit 2; }
	$(PYTHON) scripts/report.py $(EXPERIMENT) $(ARGS)

compare: install  ## two runs on the same test images, paired; e.g. RUNS="<run id A> <run id B>" ARGS=--json
	@test -n "$(RUNS)" || { echo "error: say which runs: make compare RUNS=\"<run id A> <run id B>\"" >&2; exit 2; }
	$(PYTHON) scripts/compare.py $(RUNS) $(ARGS)

evaluate: install  ## a model on a labelled folder <FOLDER>/<class name>/*; e.g. MODEL=models:/flowers@champion FOLDER=photos
	@test -n "$(FOLDER)" || { echo "error: say which photos: make evaluate FOLDER=<folder>/<class name>/*.jpg [MODEL=<model uri>]" >&2; exit 2; }
	$(PYTHON) scripts/evaluate.py --folder $(FOLDER) $(if $(MODEL),--model-uri $(MODEL)) $(ARGS)

robustness: install  ## a model under the shifts of photos from elsewhere; e.g. MODEL=runs:/<run id>/model [FOLDER=photos]
	$(PYTHON) scripts/robustness.py $(if $(MODEL),--model-uri $(MODEL)) $(if $(FOLDER),--folder $(FOLDER)) $(ARGS)

ui: install  ## the MLflow UI for the runs, sweeps and registry on http://127.0.0.1:$(UI_PORT)
	-@$(PYTHON) scripts/ui_links.py "$(TRACKING_URI)" http://127.0.0.1:$(UI_PORT)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/mlflow ui --backend-store-uri "$(TRACKING_URI)" --host 127.0.0.1 --port $(UI_PORT)

tracking-server: install  ## a team MLflow server, HOST:MLFLOW_PORT (127.0.0.1:5001): runs in PostgreSQL, artifacts in ARTIFACTS_DIR
	$(PYTHON) scripts/tracking_server.py $(ARGS)

register-best: install  ## register the best run as models:/flowers@champion; e.g. ARGS="--sweep <parent run id>"
	$(PYTHON) scripts/register_best.py $(ARGS)

serve-best: install  ## serve models:/flowers@champion with MLflow's scoring server on 127.0.0.1:$(PORT); RUNTIME=openvino|tflite|tflite_int8_dynamic|tflite_float16
	$(PYTHON) scripts/serve_best.py serve.port=$(PORT) $(if $(RUNTIME),serve.runtime=$(RUNTIME)) $(ARGS)

export-tfserving: install  ## the champion's SavedModel in TF Serving's layout: outputs/tfserving/flowers/<version>
	$(PYTHON) scripts/export_tfserving.py $(ARGS)

serve-best-tfserving: export-tfserving  ## the champion in a tensorflow/serving container on 127.0.0.1:$(TFSERVING_PORT)
	docker build -f docker/tfserving.Dockerfile -t flowers-tfserving outputs/tfserving
	docker run --rm -p 127.0.0.1:$(TFSERVING_PORT):8501 flowers-tfserving

export-tflite: install  ## the champion as float16 and int8 TFLite models, checked on test: outputs/tflite/flowers-v<version>
	$(PYTHON) scripts/export_tflite.py $(ARGS)

clean:  ## remove run outputs (not the MLflow store)
	rm -rf outputs .pytest_cache
