# The README's commands. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BROWSER := $(VENV)/.chromium

.PHONY: install demo test lint clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The gallery's browser test needs Debian's chromium; only the tests do.
$(BROWSER):
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	mkdir -p $(VENV) && touch $(BROWSER)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/wanbatch run jobs/demo.yaml --out runs/demo --simulate --speed 20

test: $(STAMP) $(BROWSER)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

lint: $(STAMP)
	$(BIN)/ruff check wanbatch tests

clean:
	rm -rf $(VENV) runs .pytest_cache
