# ringpilot: the two commands of the README are `make demo` and `make test`; both set up first.
#
# Setup creates .venv and installs torch *before* anything else, pinned, so that no dependency
# drags in a multi-GB CUDA build on a CPU machine. On a Linux GPU machine the same pin takes
# PyPI's torch wheel, which is the CUDA build:
#   make gpu-smoke                           # first: the GPU path's checks, one JSON line
#   make demo RUN=configs/tiny-gpu.yaml      # the tiny default on one GPU, bf16 layers
# and, optionally, `make flash-attn` (a faster CUDA kernel than torch's own, built with nvcc).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
EXTRAS      ?= dev
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.ringpilot-installed
SETUP_LOG   := $(VENV)/setup.log
PIP_FLAGS   ?=
RUN         ?= configs/tiny.yaml
DEMO_ARGS   ?=
TEST_WORKERS ?= 0
# The default run calibrates this machine first (configs/clusters/local-cpu.yaml: two CPU workers
# on loopback), so its summary shows predicted against measured step time; other runs, or
# CALIBRATE=, skip it.
CALIBRATE   ?= $(if $(filter configs/tiny.yaml,$(RUN)),configs/clusters/local-cpu.yaml,)

export RAY_USAGE_STATS_ENABLED = 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0
export PYTHONUNBUFFERED = 1

.PHONY: setup demo test samples goldens flash-attn gpu-smoke clean

# $(call quietly,COMMAND): run COMMAND with its output appended to $(SETUP_LOG); on failure show
# the log's tail and stop.
quietly = $(1) >> $(SETUP_LOG) 2>&1 || { tail -n 30 $(SETUP_LOG); \
	echo "setup: failed: $(1) (whole log: $(SETUP_LOG))"; exit 1; }

setup: $(STAMP)

# Setup prints what a person needs; pip's and setuptools' own output goes to $(SETUP_LOG) and is
# shown (its tail) only when a step fails. PIP_FLAGS: extra pip options (tests use --no-deps).
$(STAMP): pyproject.toml Makefile
	@echo "setup: $(VENV) (a venv of $(PYTHON)); pip's output in $(SETUP_LOG)"
	@$(PYTHON) -m venv $(VENV)
	@: > $(SETUP_LOG)
	@$(call quietly,$(PY) -m pip install --upgrade pip)
	@echo "setup: $(TORCH_SPEC) first, pinned, so that nothing pulls another torch build"
	@$(call quietly,$(PY) -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)")
	@echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	@echo "setup: ringpilot (editable) with the [$(EXTRAS)] extra"
	@$(call quietly,$(PY) -m pip install $(PIP_FLAGS) -c $(VENV)/torch-constraint.txt -e ".[$(EXTRAS)]")
	@touch $(STAMP)
	@echo "setup: done; $(VENV)/bin/ringpilot and $(PY) are ready"

# A local Ray head on 127.0.0.1 (dashboard on :8265), the run submitted with `ray job submit
# --working-dir .`, its logs streamed, the head stopped again (also on failure, Ctrl-C, SIGTERM
# or SIGHUP). An interrupted run resumes from its last checkpoint; DEMO_ARGS=--fresh starts over.
demo: setup
	$(VENV)/bin/ringpilot validate $(RUN)
	$(PY) -m ringpilot.launch --run $(RUN) $(if $(CALIBRATE),--calibrate $(CALIBRATE),) $(DEMO_ARGS)

# One process by default. TEST_WORKERS=2: two pytest-xdist workers, the tests that start Ray or
# time the machine in turn on one (the xdist_group `front`, tests/conftest.py), everything else on
# the other at nice 18; 33 min instead of 47 here, but two tests fail that way (docs/training.md).
test: setup
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

# Regenerate the CRD from the pydantic models and manifests/samples/ from configs/ (tests fail
# when they drift apart).
samples: setup
	$(VENV)/bin/ringpilot manifests crd > manifests/base/crd/stagedtrainings.ringpilot.io.yaml
	$(VENV)/bin/ringpilot manifests render --run configs/tiny.yaml > manifests/samples/staged-training.tiny.yaml
	$(VENV)/bin/ringpilot manifests render --run configs/llama3-8b-1m.yaml --ray-cluster l40s \
		--node-selector nvidia.com/gpu.product=NVIDIA-L40S > manifests/samples/staged-training.llama3-8b-1m.yaml
	$(VENV)/bin/ringpilot manifests raycluster --run configs/llama3-8b-1m.yaml --name l40s \
		--storage-claim ringpilot-runs --node-selector nvidia.com/gpu.product=NVIDIA-L40S \
		> manifests/samples/ray-cluster.l40s.yaml

# Regenerate tests/golden/ (what `ringpilot validate` and `ringpilot plan` print for configs/)
# after a deliberate change of those outputs; tests/spec/test_golden_outputs.py compares them.
goldens: setup
	for f in configs/*.yaml; do \
		$(VENV)/bin/ringpilot validate $$f > tests/golden/validate-$$(basename $$f .yaml).txt; done
	for f in configs/clusters/*.yaml; do $(VENV)/bin/ringpilot validate --cluster $$f \
		> tests/golden/validate-cluster-$$(basename $$f .yaml).txt; done
	for r in llama3-8b-1m llama3-70b-1m qwen2.5-7b-1m; do $(VENV)/bin/ringpilot plan --run configs/$$r.yaml \
		--out $(VENV)/goldens-plan > /dev/null && \
		cp $(VENV)/goldens-plan/report.md tests/golden/plan-$$r.report.md || exit 1; done

# flash-attn is optional (ring attention on CUDA uses torch's own flash kernel without it). Its
# setup.py imports torch, so it builds without pip's build isolation, against the venv's pinned
# torch, with nvcc and CUDA_HOME; PyPI has no wheel for recent torch versions.
flash-attn: setup
	$(PY) -m pip install $(PIP_FLAGS) -c $(VENV)/torch-constraint.txt --no-build-isolation \
		"flash-attn>=2.7"

# The first thing to run on a GPU machine: one JSON line (benchmarks/gpu_smoke.py says what).
gpu-smoke: setup
	$(PY) benchmarks/gpu_smoke.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
