# puller: the everyday commands. Each one installs what it needs first.
PY := .venv/bin/python

.PHONY: setup demo test lint bench clean

setup:
	@scripts/bootstrap.sh

# Start a local registry, seed a multi-layer image, pull it twice, inspect with skopeo.
demo: setup
	@$(PY) scripts/demo.py

# The whole test suite, against a real distribution registry started by the tests.
test: setup
	@$(PY) -m pytest -q -p no:cacheprovider

# Style and likely bugs (ruff: pyflakes, pycodestyle, bugbear), as configured in pyproject.toml.
lint: setup
	@$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install -q --disable-pip-version-check 'ruff>=0.4'
	@$(PY) -m ruff check puller tests benchmarks

bench: setup
	@$(PY) benchmarks/run.py

clean:
	rm -rf .demo benchmarks/.work .pytest_cache
