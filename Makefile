# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

INSPECTOR := .tools/node_modules/.bin/mcp-inspector
# The MCP Inspector CLI: a client we did not write, driving our server in the tests (needs npm).
INSPECTOR_VERSION := 0.15.0

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deft-mine demo --output-dir deft_mine_demo

$(INSPECTOR):
	@if command -v npm >/dev/null; then \
	  mkdir -p .tools && cd .tools && npm install --silent --no-audit --no-fund \
	    @modelcontextprotocol/inspector@$(INSPECTOR_VERSION); \
	else echo "npm not found: the MCP Inspector tests will be skipped"; fi

test: $(STAMP) $(INSPECTOR)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_mining.py
	$(PY) benchmarks/bench_embedding.py
	$(PY) benchmarks/bench_store.py

clean:
	rm -rf $(VENV) .tools deft_mine_demo
