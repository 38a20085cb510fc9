# The front door. Every target creates (once) and reuses the virtual environment in .venv,
# so a fresh clone needs nothing but Python 3.11 and make.
PYTHON_FOR_VENV ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DATA := data/pendulum/train/trajectories.npy
PYTEST_ARGS ?=

.PHONY: help install install-archive data demo test check lint format bench clean docker-build

help:
	@echo "make demo    install, make the example data, train sample_runconfig.yaml with logging"
	@echo "make test    install and run the tests"
	@echo "make check   the quick tier (under 2 minutes): your config trains, resumes exactly, merges"
	@echo "make lint    ruff check and ruff format --check"
	@echo "make format  ruff format and ruff check --fix"
	@echo "make bench   run the benchmarks (benchmarks/README.md)"
	@echo "make data    simulate the example pendulum data into data/pendulum"
	@echo "make install-archive  add the S3 and GCS back ends for archiving runs (s3fs, gcsfs)"

$(INSTALLED): requirements.txt requirements-dev.txt requirements-trackers.txt requirements-archive.txt requirements-s3-server.txt
	test -d $(VENV) || $(PYTHON_FOR_VENV) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

install: $(INSTALLED)

# The object-store back ends of the archive (README, "Archiving runs to object storage"); make test has them.
install-archive:
	test -d $(VENV) || $(PYTHON_FOR_VENV) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-archive.txt

$(DATA): $(INSTALLED) data/generate_pendulum.py
	$(PYTHON) data/generate_pendulum.py --out data/pendulum

data: $(DATA)

demo: $(INSTALLED) $(DATA)
	$(PYTHON) run.py sample_runconfig.yaml

# pytest's exit code 5 means "no tests collected": not a failure of the code under test.
test: $(INSTALLED) $(DATA)
	$(PYTHON) -m pytest $(PYTEST_ARGS); status=$$?; [ $$status -eq 5 ] && status=0; exit $$status

# The quick tier, after you edit your model or dataset: CONFIG=my_config.yaml checks yours.
CONFIG ?= sample_runconfig.yaml
check: $(INSTALLED) $(DATA)
	CHECK_CONFIG=$(CONFIG) $(PYTHON) -m pytest -m check $(PYTEST_ARGS); status=$$?; [ $$status -eq 5 ] && status=0; exit $$status

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
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
