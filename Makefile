# The two commands of the README. Each sets up what it needs on a fresh clone: a virtual
# environment in .venv with the pinned requirements. The tests also need the Debian packages that
# synthesise speech and music (`deps`); the demo installs nothing outside .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_STAMP := $(VENV)/.torch
APT_PACKAGES := espeak-ng fluidsynth fluid-soundfont-gm
SOUNDFONT := /usr/share/sounds/sf2/FluidR3_GM.sf2
# The real recordings of the built-in 'real' corpus, the drums task and the packaged tasks
# (environmental sounds, language and speaker: audiomaepp/evaluation/packaged_tasks.py), all for
# benchmarks/study.py.
REAL_PACKAGES := asterisk-core-sounds-en-wav asterisk-core-sounds-es-wav asterisk-core-sounds-fr-wav \
  asterisk-core-sounds-it-wav asterisk-moh-opsound-wav colobot-common-sounds drascula-music \
  sound-theme-freedesktop hydrogen-drumkits \
  tuxpaint-stamps-default scratch minetest-data lincity-ng-data fillets-ng-data-cs \
  fillets-ng-data-nl asterisk-prompt-es-co asterisk-prompt-fr-armelle asterisk-core-sounds-ru-wav
WORKDIR ?= workdirs/demo

.PHONY: setup demo deps deps-real test test-fast test-slow test-all

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The optional torch extra (requirements-torch.txt): the parity checks against the original
# PyTorch code need it, so every test target installs it (the package itself never does).
$(TORCH_STAMP): $(STAMP) requirements-torch.txt
	$(PY) -m pip install --quiet -r requirements-torch.txt
	touch $(TORCH_STAMP)

setup: $(STAMP)

# espeak-ng and FluidSynth, for the rich corpus, the HEAR-format test tasks and the study: nothing
# happens when they are present; otherwise apt-get installs them (root only).
deps:
	@if command -v espeak-ng >/dev/null && command -v fluidsynth >/dev/null && [ -f $(SOUNDFONT) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q $(APT_PACKAGES) >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q $(APT_PACKAGES) >/dev/null); \
	else echo "error: the tests need $(APT_PACKAGES): install them (sudo apt-get install -y $(APT_PACKAGES)) and run make again" >&2; exit 1; fi

# Debian packages of real recordings (about 900 MB installed), for config.data.source='real'
# and the evaluation tasks on real recordings (benchmarks/study.py). Without recommends: the
# recordings, not the games that would play them.
deps-real:
	apt-get install -y -q --no-install-recommends $(REAL_PACKAGES) >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(REAL_PACKAGES) >/dev/null)

demo: $(STAMP)
	$(PY) main.py --config=configs/demo.py --workdir=$(WORKDIR)

# -rs: every skip with its reason; with CI=true a skip not in tests/allowed_skips.txt fails.
test: $(TORCH_STAMP) deps
	$(PY) -m pytest -q -rs --durations=20 tests

# The edit-test loop (about 4.5 minutes on 2 cores): unit and parity tests; subprocess runs of
# main.py or the CLIs, multi-variant compiles and the original PyTorch code are 'integration'.
test-fast: $(STAMP) deps
	$(PY) -m pytest -q -rs -m "not slow and not integration" tests

test-slow: $(TORCH_STAMP) deps
	$(PY) -m pytest -q -rs -m slow tests

test-all: $(TORCH_STAMP) deps
	$(PY) -m pytest -q -rs -m "slow or not slow" tests
