#!/usr/bin/env bash
# The one-call GPU check: on a machine with an NVIDIA GPU, build effvit for that GPU, run the test suite
# there (the CUDA and Triton kernels against the reference on the GPU), and time the benchmark suite
# forward and forward+backward. Results land in $OUT (the device tool's output folder) or in
# bench/results/<gpu>/: commit them.
#
#   bash bench/gpu_check.sh                 # uses python3 from PATH, which must have torch with CUDA
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#
# It installs nothing from the network: torch, triton, pytest and ninja must be there already.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

gpu=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -z "$gpu" ]; then
  echo "gpu_check: torch sees no CUDA GPU here ($PY)" >&2
  exit 2
fi
slug=$(echo "$gpu" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
dest=${OUT:-bench/results/$slug}
mkdir -p "$dest"
log() { echo "== $*" | tee -a "$dest/gpu_check.log"; }

log "gpu: $gpu; $($PY -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0])')"
start=$(date +%s)

# TORCH_CUDA_ARCH_LIST unset: setup.py builds for the GPU it sees
log "build"
if ! $PY -m pip install --no-build-isolation --no-deps --no-index -e . >>"$dest/gpu_check.log" 2>&1; then
  log "build FAILED (see the log)"; tail -40 "$dest/gpu_check.log"; exit 1
fi
$PY -m effvit.info >"$dest/info.txt" 2>&1
log "built in $(( $(date +%s) - start )) s"

log "tests on the GPU"
$PY -m pytest -q -p no:cacheprovider tests -m "not slow" -x --junitxml="$dest/tests.xml" 2>&1 | tail -40 | tee -a "$dest/gpu_check.log"
tests_rc=${PIPESTATUS[0]}
log "tests exit status $tests_rc after $(( $(date +%s) - start )) s"

log "benchmarks"
$PY -m effvit.bench --device cuda --backward --out "$dest" 2>&1 | tee "$dest/bench.txt" | tail -60
bench_rc=${PIPESTATUS[0]}
log "bench exit status $bench_rc after $(( $(date +%s) - start )) s"

echo "results in $dest: $(ls "$dest" | tr '\n' ' ')"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
