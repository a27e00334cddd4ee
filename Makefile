# The two commands a newcomer needs: `make demo` and `make test`.
# `make setup` installs only; `make bench` runs the benchmarks.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned so that setup takes the CPU wheel that lies on these machines; elsewhere pip
# fetches the same release from the package index. Override with `make TORCH_SPEC=torch==X setup`.
TORCH_SPEC ?= torch==2.13.0
PIP    := $(BIN)/python -m pip --disable-pip-version-check
DISTS  := $(patsubst %/pyproject.toml,%,$(wildcard core/pyproject.toml backends/*/pyproject.toml plugins/*/pyproject.toml))
STAMP  := $(VENV)/.ckptio-installed
EXTRA_SETUP := $(wildcard tests/servers/setup.mk)

.PHONY: setup demo test lint typecheck unit bench clean

setup: $(STAMP)

$(STAMP): Makefile requirements-dev.txt $(addsuffix /pyproject.toml,$(DISTS)) $(EXTRA_SETUP)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-build-isolation $(addprefix -e ./,$(DISTS))
	@$(MAKE) --no-print-directory servers-setup
	@touch $@

# Optional extra setup steps (emulator binaries) are defined by tests/servers/setup.mk.
ifneq ($(EXTRA_SETUP),)
include $(EXTRA_SETUP)
else
servers-setup:
	@true
endif

demo: setup
	$(BIN)/ckptio demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check core backends plugins tests benchmarks examples
	$(BIN)/lint-imports --no-cache

SRC_PKGS := $(patsubst %/__init__.py,%,$(wildcard $(addsuffix /src/*/__init__.py,$(DISTS))))
empty :=
space := $(empty) $(empty)

typecheck: setup
	MYPYPATH=$(subst $(space),:,$(addsuffix /src,$(DISTS))) $(BIN)/mypy $(SRC_PKGS)

unit: setup
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench: setup
	$(BIN)/python benchmarks/run_all.py; rc=$$?; $(BIN)/python benchmarks/chart.py; exit $$rc

clean:
	rm -rf $(VENV) .tools
