# The README's two commands: `make demo` and `make test`. Each does all set-up on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# where pip looks for torch: empty for pip's own configuration (this project's machines hold the CPU build of the
# pin locally); on a stock Linux machine PyPI's wheel is the CUDA build, so name PyTorch's CPU index:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo
TORCH_INDEX ?=
# exact versions of everything else (the ones the README's demo figures were measured with), as pip constraints;
# `make LOCK= demo` installs the newest versions pyproject.toml allows instead. Regenerate: make lock
LOCK ?= requirements/lock.txt
# the lock holds for the Python it was made with (wheels of a pinned release may not exist for another)
LOCK_PYTHON := $(if $(LOCK),$(shell sed -n 's/^# python: //p' $(LOCK)))
PIN := $(if $(LOCK),-c $(LOCK))

.PHONY: setup sysdeps demo test bench clean lock

# torch first and pinned: a bare `torch` requirement would pull a multi-gigabyte CUDA build.
# The demo needs only ponder's own dependencies; the tests add the extras (peft, reasoning-gym, ...).
$(VENV)/.base: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(if $(LOCK),@$(PY) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(v != "$(LOCK_PYTHON)" and \
	  "make: $(LOCK) pins versions for Python $(LOCK_PYTHON), $(VENV) has Python " + v + "; remove $(VENV), then " \
	  "make PYTHON=python$(LOCK_PYTHON) $(MAKECMDGOALS), or install unpinned: make LOCK= $(MAKECMDGOALS)")')
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install -q $(PIN) -e .
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install -q $(PIN) -e ".[dev]"
	touch $@

# rewrite the lock from the environment as it is (after e.g. `make clean; make LOCK= setup` for newer versions)
lock:
	$(PY) requirements/make_lock.py requirements/lock.txt

setup: $(VENV)/.installed

# bubblewrap isolates model-written code (ponder.sandbox).
sysdeps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get install -y -q bubblewrap >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null)); \
	  else sudo apt-get install -y -q bubblewrap >/dev/null; fi; }

# each demo run gets its own directory, so the command can be repeated as is
demo: $(VENV)/.base
	$(VENV)/bin/ponder train recipes/zero-tiny.yaml name=zero-tiny-$$(date +%Y%m%d-%H%M%S)

test: setup sysdeps
	$(PY) -m pytest -x -q --durations=15

clean:
	rm -rf $(VENV) runs
