#!/usr/bin/env bash
# Proof that one package installs alone from its folder into a fresh venv and passes its own tests.
# Usage: bash .ci/install_alone.sh hescape-eval   (uv pip install, the uv cache keeps torch local)
set -euo pipefail
pkg="$1"
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
uv venv --quiet --python 3.11 "$venv"
uv pip install --quiet --python "$venv" "./packages/$pkg" pytest
cd "packages/$pkg"  # the package's own pytest configuration applies
"$venv/bin/python" -m pytest tests -q -p no:cacheprovider -m "not gpu"
