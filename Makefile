# The README's two commands: `make demo` and `make test`. Each does all set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# where pip looks for torch: empty for pip's own configuration (this project's machines hold the CPU build of the
# pin locally); on a stock Linux machine PyPI's wheel is the CUDA build, so name PyTorch's CPU index:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo
TORCH_INDEX ?=

.PHONY: setup sysdeps demo test bench clean

# torch first and pinned: a bare `torch` requirement would pull a multi-gigabyte CUDA build.
# The demo needs only ponder's own dependencies; the tests add the extras (peft, reasoning-gym, ...).
$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

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
