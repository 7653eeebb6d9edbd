#!/usr/bin/env bash
# Proof that a package installs from its folder into a fresh venv (no workspace) and passes its own tests.
# Usage: bash .ci/install_alone.sh PACKAGE [SIBLING ...]
#   bash .ci/install_alone.sh hescape-eval
#   bash .ci/install_alone.sh hescape-train hescape-data hescape-models hescape-eval   (siblings from their folders)
# Uses `uv pip install` (pip's resolver semantics; the uv cache keeps torch local).
# HESCAPE_NO_COMPILER=1 installs hescape-eval as a user without a C++ compiler would (CXX points nowhere):
# the install must succeed without the extension and the tests must pass on the torch fallback.
set -euo pipefail
pkg="$1"; shift
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
uv venv --quiet --python 3.11 "$venv"
paths=()
for p in "$@" "$pkg"; do paths+=("./packages/$p"); done
if [ -n "${HESCAPE_NO_COMPILER:-}" ]; then
  CXX=/nonexistent/c++ uv pip install --quiet --python "$venv" --refresh-package hescape-eval "${paths[@]}" pytest
  "$venv/bin/python" -c "import hescape.eval as e, sys; sys.exit('extension unexpectedly built' if e.has_cpp_ext() else 0)"
else
  uv pip install --quiet --python "$venv" "${paths[@]}" pytest
fi
cd "packages/$pkg"  # the package's own pytest configuration applies
"$venv/bin/python" -m pytest tests -q -p no:cacheprovider -m "not gpu"
