#!/usr/bin/env bash
# The GPU check of the kernels issue, as one prepared script (target: < 9.5 minutes on one H200).
# Runs on a CUDA machine with no network, from the repository root, with its own python3/torch:
#   OUT=/some/dir bash benchmarks/gpu/run.sh
# 1. open_clip (the loss reference) from carried wheels in .whl/ when the machine lacks it;
# 2. gpu_recall.py: builds hescape.eval._C with HESCAPE_CUDA=ON, runs the gpu recall tests, N = 100k, 1M;
# 3. gpu_loss.py: the gpu loss tests (real Triton compile) and B = 4096, 16384, 65536 vs open_clip.
# Each step writes JSON under $OUT; copy the printed summary into benchmarks/RESULTS.md with date and hardware.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
for p in data models train eval; do PYTHONPATH="$PWD/packages/hescape-$p/src${PYTHONPATH:+:$PYTHONPATH}"; done
export PYTHONPATH
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$OUT/env.txt" 2>&1 || true
rc=0
timeout 360 "$PY" benchmarks/gpu/gpu_recall.py 2>&1 | tee "$OUT/gpu_recall.log" || rc=1
timeout 200 "$PY" benchmarks/gpu/gpu_loss.py 2>&1 | tee "$OUT/gpu_loss.log" || rc=1
echo "gpu check finished, rc=$rc; results under $OUT"
exit $rc
