# Two entry points: `make demo` (sample episodes end to end) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
OPENPI_VENV ?= .venv-openpi
LEROBOT_VENV ?= .venv-lerobot
DOCTOR_VENV ?= .venv-doctor
export DAGSTER_HOME ?= $(CURDIR)/.dagster
export VLA_EPISODES_DIR ?= data/episodes
export VLA_STORE ?= data/store.zarr
export VLA_MODELS ?= data/models
# `dagster asset materialize` warns on every call that `dg launch` supersedes it (dg is not installed).
export PYTHONWARNINGS ?= ignore::FutureWarning:click.core
# Where these machines keep a CPU build of torch; elsewhere torch comes from PyPI.
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),/opt/wheels)
CPU_TORCH := $(firstword $(wildcard $(FIND_LINKS)/torch-*+cpu-*.whl))
UI_HOST ?= 127.0.0.1
UI_PORT ?= 3000
# `dagster asset materialize` finds the code location only through -m or DAGSTER_MODULE_NAME; exported,
# that variable would also reach the webserver of `dagster dev` and stop it, so it is never exported.
MATERIALIZE := $(BIN)/dagster asset materialize -m vla_pipeline.definitions
DEMO_EPISODES ?= 56  # enough for ~10 validation episodes, over 150 scored predictions
DEMO_START := $(shell date +%s)

.PHONY: install demo test bench ui clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q uv
	@$(if $(CPU_TORCH),$(BIN)/uv pip install -q --python $(PY) "$(CPU_TORCH)",)
	@$(BIN)/uv pip install -q --python $(PY) -e '.[dev]'
	@# After `source .venv/bin/activate`, Dagster commands typed from the repository root use
	@# .dagster as the instance and find the code location (.dagster/shell.sh says how).
	@sed -i '/DAGSTER_MODULE_NAME\|DAGSTER_HOME:-\$$VIRTUAL_ENV\|vla-pipeline/d' $(BIN)/activate
	@echo '. "$$VIRTUAL_ENV/../.dagster/shell.sh"  # vla-pipeline' >> $(BIN)/activate
	@# openpi's own client (it needs NumPy < 2, so it lives apart): tests drive `vla-pipeline serve` with it.
	@test -x $(OPENPI_VENV)/bin/python || $(BIN)/uv venv -q --python $(PY) $(OPENPI_VENV)
	@# (openpi-client imports typing_extensions without declaring it)
	@$(BIN)/uv pip install -q --python $(OPENPI_VENV)/bin/python 'openpi-client==0.1.2' typing_extensions
	@# LeRobot's own loader reads the LeRobotDataset export in tests; it lives apart: lerobot pins torch<2.11 and imports torchvision.
	@test -x $(LEROBOT_VENV)/bin/python || $(BIN)/uv venv -q --python $(PY) $(LEROBOT_VENV)
	@$(BIN)/uv pip install -q --python $(LEROBOT_VENV)/bin/python "$(or $(CPU_TORCH),torch==2.13.0)" \
	  'datasets==4.8.5' 'huggingface-hub==0.35.3' 'av==15.1.0' 'accelerate==1.16.0' 'packaging==25.0' \
	  'pandas==3.1.1' 'pillow==13.0.0'
	@$(BIN)/uv pip install -q --python $(LEROBOT_VENV)/bin/python --no-deps 'lerobot==0.4.4'
	@echo '$(CURDIR)/tests/lerobot_env' > "$$($(LEROBOT_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/vla_pipeline_lerobot_env.pth"
	@# lerobot-doctor, a checker the project did not write, which tests check the export with; a tool, so it lives apart.
	@test -x $(DOCTOR_VENV)/bin/python || $(BIN)/uv venv -q --python $(PY) $(DOCTOR_VENV)
	@$(BIN)/uv pip install -q --python $(DOCTOR_VENV)/bin/python 'lerobot-doctor==0.2.0'
	@touch $@

demo: install
	@$(BIN)/vla-pipeline sample-episodes $(VLA_EPISODES_DIR) -n $(DEMO_EPISODES) --seed 0
	@$(BIN)/vla-pipeline ingest $(VLA_EPISODES_DIR)
	@$(BIN)/vla-pipeline episodes | tail -n 1
	@# The CPU preset with its defaults: no config overrides, and the default promotion gate.
	@VLA_MODEL=cpu $(MATERIALIZE) -c .dagster/console.yaml \
	  --select 'train_val_split,lora_adapter,evaluation_metrics,closed_loop_metrics,robustness,registered_model'
	@# The version just registered, champion or not: the CPU preset does not pass the sight gate in
	@# BoxNav-v1 (docs/performance.md), and `model` shows the gate's decision and why.
	@echo "--- a fresh process looks the new version up in the registry and drives it over an episode file"
	@$(BIN)/vla-pipeline model --model-uri models:/mobile-vla/latest
	@$(BIN)/vla-pipeline predict --model-uri models:/mobile-vla/latest \
	  "$$(ls $(VLA_EPISODES_DIR)/*.h5 | head -n 1)" | head -n 3
	@echo "--- demo done in $$(( $$(date +%s) - $(DEMO_START) )) s: episodes in $(VLA_EPISODES_DIR), store $(VLA_STORE)," \
	  "models in $(VLA_MODELS), runs in $(DAGSTER_HOME) (make ui), MLflow in mlruns/"

test: install
	$(BIN)/pytest -q

bench: install
	$(PY) benchmarks/ingest.py

ui: install
	@env -u DAGSTER_MODULE_NAME $(BIN)/dagster dev -h $(UI_HOST) -p $(UI_PORT)

clean:
	rm -rf data .dagster/storage .dagster/history .dagster/schedules .dagster/logs
