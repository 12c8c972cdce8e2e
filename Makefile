# make demo  - set up .venv and run the whole pipeline on the built-in demo (batch size 8): real photographs
#              (scikit-image's), a random BEiT; MODEL=beit_base_patch16_384 (a variant) picks the model
# make test  - set up .venv and run the test suite (what CI runs)
# make bench - throughput/accuracy tables (long; not part of make test)

PYTHON3 ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BATCH_SIZE ?= 8
WORKDIR ?= work
MODEL ?=
PYTEST_ARGS ?=

.PHONY: venv test test-all demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: venv
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

demo: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" bash run_all.sh --batch_size $(BATCH_SIZE) --workdir $(WORKDIR) \
		$(if $(MODEL),--model $(MODEL))

bench: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) beit_bench.py --out bench_out

clean:
	rm -rf $(WORKDIR) bench_out .pytest_cache
