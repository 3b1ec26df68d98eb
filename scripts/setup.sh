#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian packages (real data, Prometheus), a venv, the
# project and its pinned dependencies (constraints.txt is the lock).
set -euo pipefail
cd "$(dirname "$0")/.."

# The real demo data; Prometheus/promtool and docker-compose (v1, `config` only: no engine) for the deploy tests.
APT_PACKAGES=(dataset-fashion-mnist prometheus docker-compose)
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
    echo "setup: installing the project (torch==2.14.0, torchvision==0.29.2 and the rest, pinned)"
    .venv/bin/pip install -q -c constraints.txt -e '.[dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
