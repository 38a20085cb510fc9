# The front door. Every target creates (once) and reuses the virtual environment in .venv,
# so a fresh clone needs nothing but Python 3.11 and make.
PYTHON_FOR_VENV ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check
# What is installed, in layers: the runtime (make demo), the test runner (make check), and the
# whole development stack (make test, make lint: trackers, archive back ends, local stores, ruff).
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-testing
DEVELOPMENT := $(VENV)/.installed-development
DATA := data/pendulum/train/trajectories.npy
PYTEST_ARGS ?=
# Independent tests run on every core; the Slurm tests stay together on one (they share a cluster).
PARALLEL ?= -n auto --dist loadgroup

.PHONY: help install install-dev install-archive install-trackers install-search data demo test test-quick check \
	lint format bench clean docker-build

help:
	@echo "make demo        install the runtime, make the example data, train sample_runconfig.yaml with logging"
	@echo "make test        install everything and run every test, in parallel"
	@echo "make test-quick  the tests without the slow tier (torchrun, Slurm, object stores, kill matrices)"
	@echo "make check       after editing your model: your config trains, resumes exactly, merges (CONFIG=my.yaml)"
	@echo "make lint        ruff check and ruff format --check"
	@echo "make format      ruff format and ruff check --fix"
	@echo "make bench       run the benchmarks (benchmarks/README.md)"
	@echo "make data        simulate the example pendulum data into data/pendulum"
	@echo "make install-trackers / install-archive / install-search   the optional extras"

$(RUNTIME): requirements.txt
	test -d $(VENV) || $(PYTHON_FOR_VENV) -m venv $(VENV)
	$(PIP) -r requirements.txt
	touch $@

$(TESTING): $(RUNTIME) requirements-test.txt
	$(PIP) -r requirements-test.txt
	touch $@

$(DEVELOPMENT): $(TESTING) requirements-dev.txt requirements-trackers.txt requirements-archive.txt requirements-s3-server.txt requirements-search.txt
	$(PIP) -r requirements-dev.txt
	touch $@

install: $(RUNTIME)
install-dev: $(DEVELOPMENT)

# The optional extras, each on top of the runtime.
install-trackers: $(RUNTIME)
	$(PIP) -r requirements-trackers.txt
install-archive: $(RUNTIME)
	$(PIP) -r requirements-archive.txt
install-search: $(RUNTIME)
	$(PIP) -r requirements-search.txt

$(DATA): $(RUNTIME) data/generate_pendulum.py
	$(PYTHON) data/generate_pendulum.py --out data/pendulum

data: $(DATA)

demo: $(RUNTIME) $(DATA)
	$(PYTHON) run.py sample_runconfig.yaml

# pytest's exit code 5 means "no tests collected": not a failure of the code under test.
test: $(DEVELOPMENT) $(DATA)
	$(PYTHON) -m pytest $(PARALLEL) $(PYTEST_ARGS); status=$$?; [ $$status -eq 5 ] && status=0; exit $$status

test-quick: $(DEVELOPMENT) $(DATA)
	$(PYTHON) -m pytest $(PARALLEL) -m "not slow" $(PYTEST_ARGS); status=$$?; [ $$status -eq 5 ] && status=0; exit $$status

# The quick tier, after you edit your model or dataset: CONFIG=my_config.yaml checks yours,
# with the data its data_directory names.
CONFIG ?= sample_runconfig.yaml
check: $(TESTING) $(DATA)
	CHECK_CONFIG=$(CONFIG) $(PYTHON) -m pytest $(PARALLEL) -m check $(PYTEST_ARGS); status=$$?; [ $$status -eq 5 ] && status=0; exit $$status

lint: $(DEVELOPMENT)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(DEVELOPMENT)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The benchmarks run in their own environment: the same requirements plus Lightning, for its column,
# and the trackers, for theirs.
BENCH_VENV := .venv-bench
# The benchmarks of the trackers and of the archive need them, and the local S3 server.
BENCH_REQUIREMENTS := requirements.txt benchmarks/requirements-lightning.txt requirements-trackers.txt \
	requirements-archive.txt requirements-s3-server.txt
$(BENCH_VENV)/.installed: $(BENCH_REQUIREMENTS)
	test -d $(BENCH_VENV) || $(PYTHON_FOR_VENV) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r benchmarks/requirements-lightning.txt \
		-r requirements-trackers.txt -r requirements-archive.txt -r requirements-s3-server.txt
	touch $@

bench: $(BENCH_VENV)/.installed $(DATA)
	$(BENCH_VENV)/bin/python benchmarks/run_all.py

# An image of the current commit, refusing a dirty tree (the image has no .git: see Dockerfile).
docker-build:
	@test -z "$$(git status --porcelain --ignore-submodules=none)" || { echo "commit your changes first"; exit 3; }
	docker build --build-arg GIT_COMMIT=$$(git rev-parse HEAD) -t pytorch-template:$$(git rev-parse --short HEAD) .

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .ruff_cache
