# Conveniences over scripts/; the README's Quick start uses the scripts directly.
.PHONY: setup test unit demo bench lint format clean deb

setup:
	bash scripts/setup.sh

test:
	bash scripts/test.sh

unit: setup
	.venv/bin/python -m pytest -q tests/unit

demo:
	bash scripts/demo.sh

# Every benchmark, one table, bench/results.json; about 40 minutes at most (root; see bench/README.md).
bench: setup
	.venv/bin/python -m bench

lint: setup
	.venv/bin/ruff check egressd netns_fixtures tests bench
	.venv/bin/ruff format --check egressd netns_fixtures tests bench

format: setup
	.venv/bin/ruff format egressd netns_fixtures tests bench
	.venv/bin/ruff check --fix egressd netns_fixtures tests bench

# dist/egressd_<version>_<arch>.deb (root; see scripts/build-deb.sh).
deb:
	bash scripts/build-deb.sh

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache .ruff_cache
