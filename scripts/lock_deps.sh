#!/usr/bin/env bash
# Rewrite constraints.txt from the project venv: the exact versions `make test` / `make demo` install
# and CI tests with. Run after changing a dependency and re-running the suite:
#     make venv && scripts/lock_deps.sh && make test
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
{
  echo "# Exact versions the project is tested with (scripts/lock_deps.sh writes this file from .venv)."
  echo "# The Makefile installs with -c constraints.txt; setup.cfg keeps ranges for users."
  "$VENV/bin/python" -m pip freeze --exclude-editable 2>/dev/null \
    | grep -v '^#' | grep -v '^-e ' | grep -iv '^dpsnr==' \
    | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pinned packages"
