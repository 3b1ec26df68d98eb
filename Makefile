# The two commands of the README. Both do their own set-up (scripts/setup.sh).
.PHONY: serve test lint setup

setup:
	./scripts/setup.sh

# Without DYCE_ADMIN_TOKEN the server starts in insecure dev mode and logs a one-run admin token.
serve: setup
	.venv/bin/dyce-offline build
	DYCE_INSECURE_DEV=$${DYCE_INSECURE_DEV:-$$([ -n "$$DYCE_ADMIN_TOKEN" ] && echo 0 || echo 1)} .venv/bin/dyce-serve

test: setup
	.venv/bin/ruff check dyce offline service tests bench deploy
	.venv/bin/pytest -q

lint: setup
	.venv/bin/ruff check dyce offline service tests bench deploy
	.venv/bin/ruff format --check dyce offline service tests bench deploy
