#!/usr/bin/env bash
# The one-call GPU check: on a machine with an NVIDIA GPU, build effvit for that GPU, run the tests that use the
# GPU (the CUDA and Triton kernels against the reference there, CUDA graphs, the patched timm models), and time
# one telling shape of each family forward and forward+backward. Results land in bench/results/<gpu>/, or, with
# $OUT set (the device tool's output folder, which brings back only a few files), as $OUT/gpu_check_results.tgz
# next to $OUT/gpu_check.log: unpack under bench/results/<gpu>/ and commit them.
#
#   bash bench/gpu_check.sh                    # build, tests, quick benchmarks: 6-10 minutes on an H100 host
#   bash bench/gpu_check.sh build bench-full   # build, then the families' whole GPU suites (much longer)
#   bash bench/gpu_check.sh build tests        # any of: build tests bench bench-full
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#
# It installs nothing and needs no network: torch (with CUDA), triton, pytest, setuptools and ninja must be
# there already (pytest-xdist and timm are used when present); effvit is built in place and imported through
# PYTHONPATH. Each part runs under a time cap, so one slow part cannot eat a lent machine's whole slot.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
parts=" ${*:-build tests bench} "
want() { [[ "$parts" == *" $1 "* ]]; }

gpu=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -z "$gpu" ]; then
  echo "gpu_check: torch sees no CUDA GPU here ($PY)" >&2
  exit 2
fi
slug=$(echo "$gpu" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
if [ -n "${OUT:-}" ]; then
  dest=$(mktemp -d)
  # on every exit, failed builds included: the results packed for the device tool, and the log beside them
  trap 'tar czf "$OUT/gpu_check_results.tgz" -C "$dest" . ; cp "$dest/gpu_check.log" "$OUT/" 2>/dev/null' EXIT
else
  dest=bench/results/$slug
fi
mkdir -p "$dest"
log() { echo "== $*" | tee -a "$dest/gpu_check.log"; }

log "gpu: $gpu; $($PY -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0])')"
start=$(date +%s)

missing=$($PY -c "
import importlib.util as u
print(' '.join(m for m in ('setuptools', 'ninja', 'pytest', 'triton') if u.find_spec(m) is None))")
[ -z "$missing" ] || log "missing Python packages: $missing (carry them as wheels; see the device tool's README)"

# Built in place (no pip, no network), for the GPU it sees: TORCH_CUDA_ARCH_LIST unset
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if want build; then
  log "build"
  if ! EFFVIT_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout 400 $PY setup.py build_ext --inplace \
      >>"$dest/gpu_check.log" 2>&1; then
    log "CUDA build FAILED (see gpu_check.log); building the CPU kernels only, so the Triton kernels still get tested"
    tail -30 "$dest/gpu_check.log"
    EFFVIT_NO_CUDA=1 $PY setup.py build_ext --inplace >>"$dest/gpu_check.log" 2>&1 || { log "CPU build FAILED too"; exit 1; }
  fi
  log "built in $(( $(date +%s) - start )) s"
fi
$PY -m effvit.info >"$dest/info.txt" 2>&1
$PY -c "import effvit; from effvit import _extension as e; assert e.available() and e._C.has_cuda(), 'no CUDA kernels'" \
  || log "WARNING: the CUDA kernels are not loaded: only Triton and CPU are tested below"

tests_rc=0
if want tests; then
  # the tests whose names say they use the GPU backends, and the patched timm models (which run on the GPU
  # here); the CPU-only tests are CI's. With pytest-xdist, one worker per two cores.
  xdist=$($PY -c "import importlib.util as u, os; print('-n %d' % max(2, os.cpu_count() // 2) if u.find_spec('xdist') else '')" 2>/dev/null)
  log "tests on the GPU ${xdist:+($xdist)}"
  timeout 300 $PY -m pytest -q -p no:cacheprovider tests -m "not slow" $xdist \
    -k "cuda or triton or gpu or patched or timm or keep_rate or guided" --junitxml="$dest/tests.xml" 2>&1 \
    | tail -40 | tee -a "$dest/gpu_check.log"
  tests_rc=${PIPESTATUS[0]}
  log "tests exit status $tests_rc after $(( $(date +%s) - start )) s"
fi

# One family a folder. The quick part times one telling shape a family with short budgets (the torch.compile and
# FlexAttention peers compile once per case, which dominates the time on a lent machine); bench-full runs the
# families' whole suites.
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-8}
bench_rc=0
bench() {  # name, time cap in seconds, effvit-bench arguments
  local name=$1 cap=$2; shift 2
  log "benchmarks: $name"
  timeout "$cap" $PY -m effvit.bench --device cuda --out "$dest/$name" "$@" 2>&1 | tee "$dest/bench-$name.txt" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || { bench_rc=1; log "bench $name failed or ran past ${cap} s"; }
}
if want bench; then
  quick=(--budget 0.3 --no-memory)
  bench window 90 "${quick[@]}" --backward --family window --op core --batch 8 --shape 56x56x96
  bench linear 70 "${quick[@]}" --backward --family linear --shape N3136 --shape N50176
  bench hilo 45 "${quick[@]}" --backward --family hilo --op layer --batch 16 --shape 14x14x384
  bench token_drop_model 60 "${quick[@]}" --family token_drop --batch 64 --shape vit_small_patch16_224
  bench shift 30 "${quick[@]}" --family shift --shape 56x56x96 --batch 8
fi
if want bench-full; then
  bench shift 600 --backward --family shift
  bench window 600 --backward --family window --batch 8
  bench hilo 600 --backward --family hilo --batch 16
  bench linear 600 --backward --family linear
  bench token_drop_ops 600 --backward --family token_drop --shape vit_s --shape vit_b
  bench token_drop_model 600 --family token_drop --batch 64 --shape vit_small_patch16_224 --shape vit_base_patch16_224
fi
log "bench exit status $bench_rc after $(( $(date +%s) - start )) s"

echo "results in ${OUT:+$OUT/gpu_check_results.tgz, from }$dest: $(ls "$dest" | tr '\n' ' ')"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
