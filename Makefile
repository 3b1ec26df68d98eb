# The two commands of the README. Both do their own set-up (scripts/setup.sh).
.PHONY: serve test lint setup

setup:
	./scripts/setup.sh

serve: setup
	.venv/bin/dyce-offline build
	.venv/bin/dyce-serve

test: setup
	.venv/bin/ruff check dyce offline service tests bench deploy
	.venv/bin/pytest -q

lint: setup
	.venv/bin/ruff check dyce offline service tests bench deploy
	.venv/bin/ruff format --check dyce offline service tests bench deploy
