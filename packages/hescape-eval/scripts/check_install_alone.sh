#!/usr/bin/env bash
# CI proof that hescape-eval installs and passes its own tests alone: a fresh venv, no workspace,
# the extension built from source by pip's PEP 517 path (scikit-build-core; csrc/ reached through the
# package's csrc symlink). Usage: bash packages/hescape-eval/scripts/check_install_alone.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/../../.."  # repository root
venv="${1:-$(mktemp -d)/venv}"
uv venv --quiet --python 3.11 "$venv"
uv pip install --quiet --python "$venv" ./packages/hescape-eval pytest
"$venv/bin/python" -c "import hescape.eval as e; assert e.has_cpp_ext(), 'extension did not build'; print('backends:', e.available_backends())"
# The package's own pytest config (packages/hescape-eval/pyproject.toml) applies; -m 'not gpu' keeps it CPU-only.
"$venv/bin/python" -m pytest packages/hescape-eval/tests -q -p no:cacheprovider -m "not gpu"
