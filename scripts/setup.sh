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
# The report's browser test renders it in headless Chromium, from Debian's package (never a downloaded build).
if [ -n "$extra" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup.sh: not root, Chromium not installed (apt-get install chromium; or KMIM_SKIP_BROWSER=1)" >&2
  fi
fi
