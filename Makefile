# `make test` and `make demo` work on a fresh machine: they create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pair to install first (override for your platform, e.g. TORCH_SPEC="torch torchvision")
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_WORKERS ?= 2
DEMO_OUT ?= demo-out

.PHONY: test demo setup browser clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# headless Chromium for the report rendering test (Debian's package; apt via sudo when not root)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

test: setup browser
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) tests

# the toy world's trained models ship in toyworld/weights; a checkout without them (deleted) trains them first
demo: setup
	test -f toyworld/weights/models.json || $(BIN)/vit-decompose toyworld train
	$(BIN)/vit-decompose demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .hypothesis
