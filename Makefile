# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv once (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.speechlm-eval-installed
TORCH_PIN := torch==2.13.0
DEMO_OUT ?= runs/demo
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo)

.PHONY: setup espeak demo test bench clean

setup: $(STAMP) espeak

# torch is installed first, pinned: the CPU wheel on our machines; unpinned, pip would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

espeak:
	@command -v espeak-ng >/dev/null || $(SUDO) apt-get install -y espeak-ng \
	  || ($(SUDO) apt-get update && $(SUDO) apt-get install -y espeak-ng)

demo: setup
	$(VENV)/bin/speechlm-eval gap --out $(DEMO_OUT) --overwrite

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_gap.py
	$(PY) benchmarks/bench_served.py

clean:
	rm -rf $(VENV) runs
