# ringpilot: the two commands of the README are `make demo` and `make test`; both set up first.
#
# Setup creates .venv and installs torch *before* anything else, pinned, so that no dependency
# drags in a multi-GB CUDA build on a CPU machine. On a GPU machine pass TORCH_SPEC, e.g.
#   make demo TORCH_SPEC='torch==2.13.0' EXTRAS='dev,gpu'

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
EXTRAS      ?= dev
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.ringpilot-installed
RUN         ?= configs/tiny.yaml
DEMO_ARGS   ?=

export RAY_USAGE_STATS_ENABLED = 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0
export PYTHONUNBUFFERED = 1

.PHONY: setup demo test samples goldens clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

# A local Ray head on 127.0.0.1 (dashboard on :8265), the run submitted with `ray job submit
# --working-dir .`, its logs streamed, the head stopped again (also on failure, Ctrl-C, SIGTERM
# or SIGHUP). An interrupted run resumes from its last checkpoint; DEMO_ARGS=--fresh starts over.
demo: setup
	$(VENV)/bin/ringpilot validate $(RUN)
	$(PY) -m ringpilot.launch --run $(RUN) $(DEMO_ARGS)

test: setup
	$(PY) -m pytest

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
	$(VENV)/bin/ringpilot plan --run configs/llama3-8b-1m.yaml --out $(VENV)/goldens-plan > /dev/null
	cp $(VENV)/goldens-plan/report.md tests/golden/plan-llama3-8b-1m.report.md

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
