# selfheal: two commands on a fresh machine.
#   make demo   set up, then serve the digits CNN with TorchServe, drift it, watch it heal
#   make test   set up, then run unit and integration tests (what .ci/run calls)
#   make test-quick   the core alone (no servers), for the edit-test loop
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PLUGIN := build/plugins/selfheal-feedback.jar

# Python writes the bytecode of what it imports into the venv (and __pycache__, ignored by git)
# even where PYTHONDONTWRITEBYTECODE is set, as on the machines this was measured on: without
# it every process compiles the torch modules it imports again (`import torch` 6.7 CPU-s
# against 2.9), and `make test` starts a few hundred processes. Compiling the whole venv at
# install time instead cost 130 CPU-s, most of it for packages never imported.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: setup demo test test-unit test-quick clean

$(STAMP): pyproject.toml constraints.txt scripts/setup_venv.sh
	@command -v java >/dev/null || { echo "TorchServe needs Java 17: install a JRE (e.g. apt-get install openjdk-17-jre-headless)"; exit 1; }
	bash scripts/setup_venv.sh $(PYTHON) $(VENV)
	touch $@

# The feedback endpoint plugin, compiled with javac against the SDK inside the torchserve wheel.
$(PLUGIN): $(STAMP) $(wildcard plugins/feedback/src/org/selfheal/*.java) plugins/build.sh
	bash plugins/build.sh $(BIN)/python build/plugins

setup: $(STAMP) $(PLUGIN)

demo: setup
	$(BIN)/python scripts/train_demo.py --out build/model
	$(BIN)/python scripts/demo.py

# Two processes, a file's tests in one of them (its module fixtures are built once): a test
# spends most of its time waiting on servers it starts, and one process kept 2 cores 55% busy.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/core selfheal_core

# The core without servers, databases, benchmarks or the four end-to-end scenarios marked slow
# (20-45 s each, 40% of the core's time; `make test` runs them), in the processes `make test` uses.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/core selfheal_core -m "not slow" \
	  -k "not postgres and not pg_"

clean:
	rm -rf $(VENV) build demo_out model_store/*.mar model_store/snapshots/*/

.PHONY: archive
archive: $(STAMP)
	$(BIN)/python scripts/train_demo.py --out build/model
	$(BIN)/selfheal archive --name digits --model-file selfheal_bench/models.py --weights build/model/digits_cnn.pt \
	  --reference build/model/reference.pt --config model-config.yaml --export-path model_store

.PHONY: docker-test
docker-test: setup
	bash scripts/docker_test.sh
