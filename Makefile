# TRM: train a small GPT-2 from scratch on a CPU, then instruction-tune it and talk to it.
# Two set-up commands: `make quickstart` (environment + the whole pipeline on a bundled sample) and `make test`.

PYTHON        ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Optional wheel index for torch, e.g. the PyTorch CPU index on Linux to avoid a multi-GB CUDA build.
TORCH_INDEX   ?=
ARGS          ?=
MODEL         ?= outputs/phase2
PHASE1_MODEL  ?= outputs/phase1
INDEX         ?= cache/index.sqlite
CORPUS        ?=
# Training processes on this machine (torchrun; gloo on the CPU, nccl on GPUs). 1 = a plain python process.
NPROC         ?= 1
TRAIN         := $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --nproc_per_node $(NPROC),$(PY))

.PHONY: venv test test-all quickstart pretrain sft full-recipe eval generate chat serve index ask push export-gguf bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

test-all: venv
	$(PY) -m pytest -q -m ""

pretrain: venv
	$(TRAIN) run_clm.py recipes/phase1_pretraining.yaml $(if $(HOURS),--train_hours $(HOURS)) $(if $(SHAPE),--config_name $(SHAPE)) $(ARGS)

sft: venv
	$(TRAIN) run_sft.py recipes/phase2_instruction_tuning.yaml --model_name_or_path $(PHASE1_MODEL) $(if $(HOURS),--train_hours $(HOURS)) $(ARGS)

full-recipe: venv
	$(PY) run_full_recipe.py $(if $(SQUAD),--squad_file $(SQUAD)) $(if $(SQUAD_V2),--squad_v2_file $(SQUAD_V2)) \
		$(if $(BLIMP),--blimp $(BLIMP)) $(ARGS)

eval: venv
	$(PY) run_eval.py $(MODEL) $(if $(TEXT),--text_file $(TEXT)) $(if $(SQUAD),--squad_file $(SQUAD)) \
		$(if $(SQUAD_V2),--squad_v2_file $(SQUAD_V2)) $(if $(BLIMP),--blimp $(BLIMP)) $(if $(LIMIT),--limit $(LIMIT)) $(ARGS)

generate: venv
	$(PY) run_chat.py $(MODEL) --prompt "$(PROMPT)" $(ARGS)

chat: venv
	$(PY) run_chat.py $(MODEL) $(ARGS)

serve: venv
	$(PY) run_serve.py $(MODEL) $(ARGS)

index: venv
	$(PY) run_index.py --index $(INDEX) $(if $(CORPUS),--corpus $(CORPUS)) $(ARGS)

# The question reaches run_ask.py verbatim: neither make nor the shell expands $, `...` or quotes in it.
QUESTION_ARG = '$(subst ','\'',$(value QUESTION))'

ask: venv
	$(if $(value QUESTION),,@echo 'usage: make ask QUESTION="..." [MODEL=dir] [INDEX=file]'; exit 2)
	$(PY) run_ask.py $(MODEL) $(QUESTION_ARG) --index $(INDEX) $(ARGS)

push: venv
	@test -n "$(HUB_ID)" || (echo "usage: make push MODEL=DIR HUB_ID=user/name" && exit 2)
	$(PY) -m trm.sharing.hub $(MODEL) $(HUB_ID)

export-gguf: venv
	$(PY) -m trm.sharing.gguf_export $(MODEL) --outtype $(or $(QUANT),q8_0) $(ARGS)

bench: venv
	$(PY) benchmarks/train_throughput.py $(ARGS)

quickstart: venv
	rm -rf outputs/quickstart
	$(PY) run_clm.py recipes/quickstart_phase1.yaml
	$(PY) run_eval.py outputs/quickstart/phase1 --text_file data/samples/wiki_sample.jsonl.gz --limit 20
	$(PY) run_sft.py recipes/quickstart_phase2.yaml
	$(PY) run_eval.py outputs/quickstart/phase2 --squad_v2_file data/samples/squad_v2_sample.json --limit 20
	echo "What is the capital of France?" | $(PY) run_chat.py outputs/quickstart/phase2 --max_new_tokens 40
	$(PY) run_index.py --recipe recipes/quickstart_phase1.yaml --index outputs/quickstart/index.sqlite
	$(PY) run_ask.py outputs/quickstart/phase2 "When did the 1942 Alabama gubernatorial election take place?" \
		--index outputs/quickstart/index.sqlite

clean:
	rm -rf outputs cache
