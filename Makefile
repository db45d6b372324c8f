# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Tools the e2e tests drive our server with (needs npm; without it those tests are skipped):
# the MCP Inspector CLI, a client we did not write, and the official MCP conformance suite. Both
# need Node >= 22, so a Node 22 comes along from npm (node-linux-<arch>) whatever node is here.
INSPECTOR_VERSION := 2.12.0
CONFORMANCE_VERSION := 0.1.16
NODE_PACKAGE := node-linux-$(if $(filter aarch64 arm64,$(shell uname -m)),arm64,x64)@22
NODE_TOOLS := .tools/.node-tools-$(INSPECTOR_VERSION)-$(CONFORMANCE_VERSION)
# Python tools for the install tests (pipx, uv) and the MCP registry's server.json schema (shipped
# in the skillsaw wheel, read from the wheel itself), kept out of the venv: .tools/.
PY_TOOLS_SPEC := pipx==1.18.4 uv==0.13.9
SCHEMA_SPEC := skillsaw==0.22.0
PY_TOOLS := .tools/.python-tools

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deft-mine demo --output-dir deft_mine_demo

$(NODE_TOOLS):
	@if command -v npm >/dev/null; then \
	  mkdir -p .tools && cd .tools && npm install --silent --no-audit --no-fund $(NODE_PACKAGE) \
	    @modelcontextprotocol/inspector@$(INSPECTOR_VERSION) \
	    @modelcontextprotocol/conformance@$(CONFORMANCE_VERSION) && touch $(CURDIR)/$(NODE_TOOLS); \
	else echo "npm not found: the MCP Inspector and conformance tests will be skipped"; fi

$(PY_TOOLS): $(STAMP)
	@mkdir -p .tools
	$(PY) -m pip install --quiet --upgrade --target .tools/python $(PY_TOOLS_SPEC)
	$(PY) -m pip download --quiet --no-deps --dest .tools/wheels $(SCHEMA_SPEC)
	touch $(PY_TOOLS)

test: $(STAMP) $(NODE_TOOLS) $(PY_TOOLS)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_mining.py
	$(PY) benchmarks/bench_unique.py
	$(PY) benchmarks/bench_embedding.py
	$(PY) benchmarks/bench_text.py
	$(PY) benchmarks/bench_store.py

clean:
	rm -rf $(VENV) .tools deft_mine_demo
