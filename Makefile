# The two commands of the README. Each sets up everything it needs on a fresh clone:
# a virtual environment in .venv with the pinned requirements, and (as root, where apt exists)
# the Debian packages that generate the HEAR-format test tasks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_STAMP := $(VENV)/.torch
APT_PACKAGES := espeak-ng fluidsynth fluid-soundfont-gm
# The real recordings of the built-in 'real' corpus and the drums task (benchmarks/study.py).
REAL_PACKAGES := asterisk-core-sounds-en-wav asterisk-core-sounds-es-wav asterisk-core-sounds-fr-wav \
  asterisk-core-sounds-it-wav asterisk-moh-opsound-wav colobot-common-sounds drascula-music \
  sound-theme-freedesktop hydrogen-drumkits
WORKDIR ?= workdirs/demo

.PHONY: setup demo deps-real test test-fast test-slow test-all

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v fluidsynth >/dev/null; then \
	  apt-get install -y -q $(APT_PACKAGES) >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q $(APT_PACKAGES) >/dev/null); \
	fi
	touch $(STAMP)

# The optional torch extra (requirements-torch.txt): the slow tier's parity runs against the
# original PyTorch code need it; `make test` stays torch-free.
$(TORCH_STAMP): $(STAMP) requirements-torch.txt
	$(PY) -m pip install --quiet -r requirements-torch.txt
	touch $(TORCH_STAMP)

setup: $(STAMP)

# Debian packages of real recordings (about 450 MB installed), for config.data.source='real'.
deps-real:
	apt-get install -y -q $(REAL_PACKAGES) >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q $(REAL_PACKAGES) >/dev/null)

demo: $(STAMP)
	$(PY) main.py --config=configs/demo.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The edit-test loop: unit and parity tests, no subprocess runs of main.py or the CLIs.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not integration" tests

test-slow: $(TORCH_STAMP)
	$(PY) -m pytest -q -m slow tests

test-all: $(TORCH_STAMP)
	$(PY) -m pytest -q -m "slow or not slow" tests
