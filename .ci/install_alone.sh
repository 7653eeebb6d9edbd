#!/usr/bin/env bash
# Proof that a package installs from its folder into a fresh venv (no workspace) and passes its own tests.
# Usage: bash .ci/install_alone.sh PACKAGE [SIBLING ...]
#   bash .ci/install_alone.sh hescape-eval
#   bash .ci/install_alone.sh hescape-train hescape-data hescape-models hescape-eval   (siblings from their folders)
# Uses `uv pip install` (pip's resolver semantics; the uv cache keeps torch local).
set -euo pipefail
pkg="$1"; shift
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
uv venv --quiet --python 3.11 "$venv"
paths=()
for p in "$@" "$pkg"; do paths+=("./packages/$p"); done
uv pip install --quiet --python "$venv" "${paths[@]}" pytest
cd "packages/$pkg"  # the package's own pytest configuration applies
"$venv/bin/python" -m pytest tests -q -p no:cacheprovider -m "not gpu"
