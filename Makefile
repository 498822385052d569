# Everything a newcomer needs: `make run` and `make test` set up the virtualenv, the cluster binaries
# (built from Go modules, cached under ~/.cache/pythontask) and the local cluster themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCAL_KUBECONFIG := $(CURDIR)/.local/kubeconfig
PYTEST_ARGS ?=
# e.g. make run RUN_ARGS="--shards 2" (in two shells: two replicas, one shard each)
RUN_ARGS ?=
# The operator image for `make docker-build` / `make deploy` on a cluster named by KUBECONFIG.
IMG ?=
CONTAINER_TOOL ?= docker

.PHONY: venv binaries cluster cluster-down run test unit lint fmt bench fuzz soak clean image docker-build deploy undeploy chart helm

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

binaries:
	hack/build-cluster-binaries.sh >/dev/null

cluster: binaries
	hack/cluster.sh up

cluster-down:
	hack/cluster.sh down

# The operator image, built with buildah from the Dockerfile (no Docker daemon, no registry) on the local
# base image, and imported into the local cluster's real node; prints its reference.
image: cluster
	hack/operator-image.sh build

# For kind or any cluster: docker (or CONTAINER_TOOL=podman) builds IMG from the Dockerfile.
docker-build:
	@test -n "$(IMG)" || { echo "usage: make docker-build IMG=name:tag" >&2; exit 2; }
	$(CONTAINER_TOOL) build -t "$(IMG)" "$$(hack/operator-image.sh context)"

# The operator in the cluster, as its ServiceAccount. No KUBECONFIG: the local cluster, with the image
# built here (make image). KUBECONFIG set: that cluster, with IMG (make deploy IMG=name:tag).
deploy: binaries
	IMG="$(IMG)" hack/deploy.sh apply

# Removes the operator (namespace and RBAC); the CRD stays, and with it every PythonTask.
undeploy: binaries
	hack/deploy.sh delete

# The Helm chart's templates (charts/pythontask-operator), generated from manifests/: edit those, then this.
chart: venv binaries
	$(PY) hack/make-chart.py

# helm, built from its Go module (cached under ~/.cache/pythontask): lints the chart, checks it is what
# `make chart` writes, and prints helm's path.
helm: venv binaries
	@helm=$$(hack/build-helm.sh | tail -n1) && $$helm lint --strict charts/pythontask-operator && \
	  $(PY) hack/make-chart.py --check && echo "$$helm"

KUBECTL = "$$(hack/build-cluster-binaries.sh | tail -n1)/kubectl"

# With no KUBECONFIG: bring up the local cluster, install the CRD, run the operator in the foreground.
# With KUBECONFIG: the same against that cluster.
run: venv
	@if [ -z "$$KUBECONFIG" ]; then $(MAKE) --no-print-directory cluster; export KUBECONFIG=$(LOCAL_KUBECONFIG); fi; \
	  $(KUBECTL) apply --server-side -k crds/ && \
	  $(KUBECTL) apply --server-side -f manifests/namespace.yaml && \
	  $(KUBECTL) wait --for=condition=Established --timeout=60s crd/pythontasks.pythontask.dev && \
	  echo "operator starting; in another shell: export KUBECONFIG=$$KUBECONFIG" && \
	  exec $(PY) -m pythontask --all-namespaces $(RUN_ARGS)

lint: venv
	$(VENV)/bin/ruff check operator tests bench hack
	$(VENV)/bin/ruff format --check operator tests bench hack
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile

fmt: venv
	$(VENV)/bin/ruff format operator tests bench hack
	$(VENV)/bin/ruff check --fix operator tests bench hack

unit: venv
	$(PY) -m pytest -m "not cluster" $(PYTEST_ARGS)

# Lint, unit tests, and the tests on the local cluster (started on demand, reused when running).
test: lint binaries
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks on the local cluster: a Markdown table on stdout, JSON in bench/results/. QUICK=1: small sizes.
bench: venv binaries
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) bench/run.py $(if $(QUICK),--quick,)

# The live fuzz at full size: 2,000 PythonTasks generated from the CRD's schema (and mutated past it)
# against the operator on the local cluster; `make test` runs a smaller one. Prints what happened.
FUZZ_TASKS ?= 2000
fuzz: venv binaries
	PYTHONTASK_FUZZ_TASKS=$(FUZZ_TASKS) $(PY) -m pytest tests/cluster/test_live_fuzz.py -s $(PYTEST_ARGS)

# Many tasks on the real node under chaos (operator SIGKILLs, apiserver restarts, pod deletions, container
# kills): no attempt runs twice, no completed result is lost. JSON in bench/results/. QUICK=1: small.
soak: venv binaries
	$(PY) bench/soak.py $(if $(QUICK),--quick,)

clean: cluster-down
	rm -rf .local $(VENV)
