# onecard: one target per stage. Each stage skips itself when its output is up to date, and the file
# dependencies below make a later stage run whatever earlier stage is missing.
#
#   make run                 install, then download -> tokenize -> shard -> train -> evaluate
#   make test                install, then lint and run the test suite
#   make test-fast           the tests that need no DeepSpeed engine (under 2 minutes)
#   make train PRESET=gpt2-xl CONFIG=ds_configs/zero3_nvme.json STEPS=1000
#   make train INIT_FROM=openai-community/gpt2-xl TOKENIZER=gpt2 CONFIG=ds_configs/zero3_offload.json   fine-tune
#   make train INIT_FROM=Qwen/Qwen2.5-1.5B SOURCE=my-text.jsonl           continue a Qwen2.5 on your own text
#   make train MODEL=path/to/config.json TOKENIZER=path/to/tokenizer     a Llama/Qwen2/Mistral/GPT-2 from scratch
#   make tensorboard         serve data/runs on http://127.0.0.1:6006
#   make plan PRESET=gpt2-xl PLAN_ARGS='--gpu "RTX 4070 Ti" --host-ram-gib 64'   will it fit, how long

DATA      ?= data
SOURCE    ?= builtin
CORPUS    ?= $(shell python3 -c 'import sys; sys.path.insert(0, "."); from pipeline.stage import corpus_name; print(corpus_name(sys.argv[1]))' '$(SOURCE)')
TOKENIZER ?= $(if $(INIT_FROM),$(INIT_FROM),bpe:4096)
PRESET    ?= tiny
# released weights to start from (a hub id or a folder); the preset is then theirs
INIT_FROM ?=
# a model to train from scratch by its config.json (the file, its folder or a hub id) instead of a preset
MODEL     ?=
# the model's part of the run's name, as pipeline.train.model_name spells it
RUN_MODEL  = $(if $(INIT_FROM),from-$(notdir $(patsubst %/,%,$(INIT_FROM))),$(if $(MODEL),$(patsubst %.json,%,$(notdir $(patsubst %/config.json,%,$(patsubst %/,%,$(MODEL))))),$(PRESET)))
CONFIG    ?= ds_configs/zero3_offload.json
STEPS     ?= 300
# <corpus>-<preset>-<config>-<date the run started>: the newest such run, or today's (pipeline.stage.DataDir)
RUN       ?= $(shell python3 -c 'import sys; sys.path.insert(0, "."); from pipeline.stage import DataDir; print(DataDir(sys.argv[1]).default_run(*sys.argv[2:]))' '$(DATA)' '$(CORPUS)' '$(RUN_MODEL)' '$(CONFIG)')
DOWNLOAD_ARGS ?=
TRAIN_ARGS ?=
# a free port for the launcher's rendezvous (its default, 29500, is taken by any other run on this machine)
MASTER_PORT ?= $(shell python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
EVAL_ARGS ?=
PLAN_ARGS ?=
PORT      ?= 6006

# Use the active virtualenv if there is one, otherwise create ./.venv.
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
# The venv's tools first: DeepSpeed JIT-builds its ops with whatever `ninja` is on PATH, and a different
# ninja than last time rebuilds them all.
export PATH := $(abspath $(VENV))/bin:$(PATH)
PACKAGES := $(VENV)/.onecard-packages
INSTALLED := $(VENV)/.onecard-installed
TEST_INSTALLED := $(VENV)/.onecard-test-installed
export ONECARD_DATA := $(DATA)

RAW    := $(DATA)/raw/$(CORPUS)/manifest.json
TOKENS := $(DATA)/tokens/$(CORPUS)/manifest.json
SHARDS := $(DATA)/shards/$(CORPUS)/manifest.json
CKPT   := $(DATA)/checkpoints/$(RUN)/manifest.json

.PHONY: install run download tokenize shard verify train evaluate test test-fast lint tensorboard clean-run plan

install: $(INSTALLED)

# install_project(TARGET): `pip install -e TARGET` into the venv, through uv where it works. Compiled to bytecode
# there and then, as pip does: where PYTHONDONTWRITEBYTECODE is set, every process would compile what it imports.
install_project = $(VENV)/bin/uv pip install --python $(PY) --compile-bytecode -e "$(1)" || $(PY) -m pip install -e "$(1)"

# torch first, pinned, through pip, so that it takes the build meant for this machine (a local CPU wheel where
# pip's configuration lists one) instead of whatever the dependency range would pull. The rest through uv: it
# installs the hundred-odd other packages, compiled, in under a minute where pip took 2.5 (docs/TESTING.md). uv does
# not read pip's configuration (a private index in pip.conf, say), so where it fails, pip installs instead.
$(PACKAGES): pyproject.toml
	sh launch/system_deps.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -q "uv>=0.5,<1" || echo "uv could not be installed: pip installs the packages" >&2
	$(call install_project,.)
	touch $@

# DeepSpeed's ops (CPU Adam, async I/O) are built here, once, rather than in the first training run.
$(INSTALLED): $(PACKAGES)
	$(PY) launch/build_ops.py
	touch $@

# What only the tests need (pytest, ruff, EleutherAI's lm-evaluation-harness), on top of the packages.
$(TEST_INSTALLED): $(PACKAGES)
	$(call install_project,.[dev])
	touch $@

DOWNLOAD = $(PY) -m pipeline.download --source $(SOURCE) --corpus $(CORPUS) $(DOWNLOAD_ARGS)
TOKENIZE = $(PY) -m pipeline.tokenize --corpus $(CORPUS) --tokenizer $(TOKENIZER)
SHARD    = $(PY) -m pipeline.shard --corpus $(CORPUS)
TRAIN    = $(VENV)/bin/deepspeed --master_port $(MASTER_PORT) --log_level warning launch/train.py --deepspeed $(CONFIG) --corpus $(CORPUS) \
           $(if $(INIT_FROM),--init-from $(INIT_FROM),$(if $(MODEL),--model $(MODEL),--preset $(PRESET))) \
           --run $(RUN) --max-steps $(STEPS) $(TRAIN_ARGS)

run: download tokenize shard train evaluate

# The phony stage targets always call their stage (which skips itself when up to date); the manifest
# targets run a stage only when its output is missing, so `make train` builds whatever is not there yet.
download: $(INSTALLED)
	$(DOWNLOAD)
$(RAW): | $(INSTALLED)
	$(DOWNLOAD)

tokenize: $(RAW)
	$(TOKENIZE)
$(TOKENS): $(RAW)
	$(TOKENIZE)

shard: $(TOKENS)
	$(SHARD)
$(SHARDS): $(TOKENS)
	$(SHARD)

verify: $(SHARDS)
	$(SHARD) --verify

train: $(SHARDS)
	$(TRAIN)
$(CKPT): $(SHARDS)
	$(TRAIN)

evaluate: $(CKPT)
	$(PY) -m pipeline.evaluate --run $(RUN) $(EVAL_ARGS)

# Two workers, a test file each at a time (its module fixtures made once): most of a test's time is spent
# starting processes and waiting on them, so two overlap well even on 2 cores.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile

# The op builds (minutes of compiling) and the test tools' download run side by side.
test:
	$(MAKE) -j2 $(INSTALLED) $(TEST_INSTALLED)
	sh launch/system_deps.sh $(PY)
	$(PY) -m ruff check .
	$(PYTEST) --durations=25

# The tests that need no DeepSpeed engine and no whole-pipeline run: feedback in under 2 minutes while working.
test-fast: $(TEST_INSTALLED)
	$(PY) -m ruff check .
	$(PYTEST) -m "not slow"

lint: $(TEST_INSTALLED)
	$(PY) -m ruff check .

plan: $(INSTALLED)
	$(PY) -m pipeline.plan $(if $(MODEL),--model $(MODEL),--preset $(PRESET)) $(PLAN_ARGS)

tensorboard: $(INSTALLED)
	$(VENV)/bin/tensorboard --logdir $(DATA)/runs --host 127.0.0.1 --port $(PORT)

# The run's NVMe swap goes first, wherever its --nvme-path put it (its merged config says where).
clean-run: $(INSTALLED)
	$(PY) -c 'import sys; from pipeline.nvme import remove_run_swap; remove_run_swap(sys.argv[1])' '$(DATA)/checkpoints/$(RUN)'
	rm -rf $(DATA)/checkpoints/$(RUN) $(DATA)/runs/$(RUN) $(DATA)/eval/$(RUN) $(DATA)/export/$(RUN)
