# tpaserve developer entry points.
#   make test   create .venv, install tpaserve[test,ray] (and, as root, the Debian tools the tests
#               drive: prometheus, chromium), run the CPU test suite
#   make serve  create .venv, install, serve the bundled demo model on 127.0.0.1:8000
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# On a machine without an NVIDIA driver take the CPU wheel of torch (this workplace keeps
# torch 2.13.0+cpu in pip's find-links); with a driver, the regular CUDA build from the index.
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu),gpu)
TORCH_SPEC ?= torch
else
TORCH_SPEC ?= torch==2.13.0
endif
PYTEST_ARGS ?=
# test files run in parallel workers (pytest-xdist, whole files per worker); 0: one process
PYTEST_WORKERS ?= 2
# guidellm, the load tool tests/api/test_load_tools.py drives, needs transformers 5 and its
# own pins: a venv of its own, with the same torch. Best effort (the leading -): if it
# cannot be built, that test skips and says why; .ok marks a complete install.
GUIDELLM_VENV := .venv-guidellm
GUIDELLM_SPEC := guidellm==0.8.1 transformers==5.24.0 datasets==5.2.0
# lm-eval, which tests/api/test_lm_eval_family.py runs unchanged (local-completions) against a
# server per model family: its own venv too (datasets, evaluate, scikit-learn, ...; the [api]
# extra needs no torch: it tokenizes through the server's /tokenize). Best effort, as above.
LMEVAL_VENV := .venv-lmeval
LMEVAL_SPEC := lm_eval[api]==0.4.13

.PHONY: test test-gpu serve install system-deps clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,ray]"
	$(BIN)/python scripts/check_install.py
	touch $@

install: $(BIN)/.installed

system-deps:
	bash scripts/install_system_deps.sh

$(GUIDELLM_VENV)/.ok:
	-(test -x $(GUIDELLM_VENV)/bin/python || $(PYTHON) -m venv $(GUIDELLM_VENV)) && \
	  $(GUIDELLM_VENV)/bin/pip install -q "$(TORCH_SPEC)" && \
	  $(GUIDELLM_VENV)/bin/pip install -q $(GUIDELLM_SPEC) && touch $@

$(LMEVAL_VENV)/.ok:
	-(test -x $(LMEVAL_VENV)/bin/python || $(PYTHON) -m venv $(LMEVAL_VENV)) && \
	  $(LMEVAL_VENV)/bin/pip install -q "$(LMEVAL_SPEC)" && touch $@

# TRITON_INTERPRET=1: Triton kernels run on the CPU interpreter (no GPU here).
test: $(BIN)/.installed system-deps $(GUIDELLM_VENV)/.ok $(LMEVAL_VENV)/.ok
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu and not slow" \
	  -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-gpu: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m gpu $(PYTEST_ARGS)

serve: $(BIN)/.installed
	$(BIN)/tpaserve --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) $(GUIDELLM_VENV) $(LMEVAL_VENV) build *.egg-info
