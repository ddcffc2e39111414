#!/usr/bin/env bash
# The one-call GPU check: on a machine with an NVIDIA GPU, build effvit for that GPU, run the test suite
# there (the CUDA and Triton kernels against the reference on the GPU), and time the benchmark suite
# forward and forward+backward. Results land in $OUT (the device tool's output folder) or in
# bench/results/<gpu>/: commit them.
#
#   bash bench/gpu_check.sh                 # uses python3 from PATH, which must have torch with CUDA
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#
# It installs nothing and needs no network: torch (with CUDA), triton, pytest, setuptools and ninja must be
# there already; effvit is built in place and imported through PYTHONPATH.
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

missing=$($PY -c "
import importlib.util as u
print(' '.join(m for m in ('setuptools', 'ninja', 'pytest', 'triton') if u.find_spec(m) is None))")
[ -z "$missing" ] || log "missing Python packages: $missing (carry them as wheels; see the device tool's README)"

# Built in place (no pip, no network), for the GPU it sees: TORCH_CUDA_ARCH_LIST unset
log "build"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! EFFVIT_FORCE_CUDA=1 $PY setup.py build_ext --inplace >>"$dest/gpu_check.log" 2>&1; then
  log "CUDA build FAILED (see gpu_check.log); building the CPU kernels only, so the Triton kernels still get tested"
  tail -30 "$dest/gpu_check.log"
  EFFVIT_NO_CUDA=1 $PY setup.py build_ext --inplace >>"$dest/gpu_check.log" 2>&1 || { log "CPU build FAILED too"; exit 1; }
fi
$PY -m effvit.info >"$dest/info.txt" 2>&1
$PY -c "import effvit; from effvit import _extension as e; assert e.available() and e._C.has_cuda(), 'no CUDA kernels'" \
  || log "WARNING: the CUDA kernels are not loaded: only Triton and CPU are tested below"
log "built in $(( $(date +%s) - start )) s"

log "tests on the GPU"
$PY -m pytest -q -p no:cacheprovider tests -m "not slow" --junitxml="$dest/tests.xml" 2>&1 | tail -40 | tee -a "$dest/gpu_check.log"
tests_rc=${PIPESTATUS[0]}
log "tests exit status $tests_rc after $(( $(date +%s) - start )) s"

# One family a folder. The window suite is cut to the shapes that show most (its torch.compile and
# FlexAttention peers compile once per case, which dominates the time on a lent machine).
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-8}
bench_rc=0
log "benchmarks: shift"
$PY -m effvit.bench --device cuda --backward --family shift --out "$dest/shift" 2>&1 | tee "$dest/bench-shift.txt" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
log "benchmarks: window"
$PY -m effvit.bench --device cuda --backward --family window --batch 8 --shape 56x56x96 --shape 14x14x384 \
  --shape swin_t --out "$dest/window" 2>&1 | tee "$dest/bench-window.txt" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
log "benchmarks: hilo"
$PY -m effvit.bench --device cuda --backward --family hilo --batch 16 --shape 14x14x384 --shape 7x7x768 \
  --shape table --out "$dest/hilo" 2>&1 | tee "$dest/bench-hilo.txt" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
log "benchmarks: linear"
$PY -m effvit.bench --device cuda --backward --family linear --out "$dest/linear" 2>&1 | tee "$dest/bench-linear.txt" \
  | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
log "benchmarks: token_drop"
$PY -m effvit.bench --device cuda --backward --family token_drop --shape vit_s --shape vit_b --out "$dest/token_drop_ops" \
  2>&1 | tee "$dest/bench-token-drop-ops.txt" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
$PY -m effvit.bench --device cuda --family token_drop --batch 64 --shape vit_small_patch16_224 \
  --shape vit_base_patch16_224 --out "$dest/token_drop_model" 2>&1 | tee "$dest/bench-token-drop-model.txt" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
log "bench exit status $bench_rc after $(( $(date +%s) - start )) s"

echo "results in $dest: $(ls "$dest" | tr '\n' ' ')"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
