#!/usr/bin/env bash
# Install kmim into ./.venv (idempotent). Usage: bash scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch/torchvision pinned: these install from local wheels on the project machines; pyproject allows <= these.
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
.venv/bin/pip install -q --disable-pip-version-check -e ".${extra}"
