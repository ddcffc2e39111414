"""How the harness measures: wall clock (CPU) or CUDA events (GPU), warm-up, repeats until a time
budget, inputs rotated so caches do not flatter, peak memory, and this machine's peaks (memory copy,
sgemm) for the roofline ratios."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler (peak CPU memory) is chatty otherwise


@dataclass
class TimingPolicy:
    warmup: int = 3
    min_repeats: int = 10
    max_repeats: int = 1000
    budget_s: float = 1.0          # per implementation and case, after warm-up
    rotate_bytes: int = 64 << 20   # keep cycling input sets until they span at least this many bytes
    max_input_sets: int = 8
    cuda_graphs: bool = False      # GPU: time CUDA graph replays of each step (no launch overhead)


def default_policy(quick: bool = False) -> TimingPolicy:
    return TimingPolicy(budget_s=0.25, min_repeats=5, warmup=2) if quick else TimingPolicy()


def input_sets_needed(input_bytes: int, policy: TimingPolicy) -> int:
    if input_bytes <= 0:
        return 1
    return max(1, min(policy.max_input_sets, math.ceil(policy.rotate_bytes / input_bytes)))


def summarize(samples_s: list[float]) -> dict:
    us = sorted(s * 1e6 for s in samples_s)
    q = statistics.quantiles(us, n=10, method="inclusive") if len(us) >= 2 else [us[0]] * 9
    return {"median_us": statistics.median(us), "p10_us": q[0], "p90_us": q[8], "min_us": us[0],
            "repeats": len(us)}


def time_step(step: Callable[..., None], input_sets: list[tuple], device: str, policy: TimingPolicy) -> list[float]:
    """Seconds per call of step(*inputs), cycling through input_sets."""
    k = len(input_sets)
    for i in range(policy.warmup):
        step(*input_sets[i % k])
    if device == "cuda":
        return _time_cuda(step, input_sets, policy)
    samples: list[float] = []
    deadline = time.perf_counter() + policy.budget_s
    i = 0
    while len(samples) < policy.max_repeats and (len(samples) < policy.min_repeats or time.perf_counter() < deadline):
        inputs = input_sets[i % k]
        t0 = time.perf_counter()
        step(*inputs)
        samples.append(time.perf_counter() - t0)
        i += 1
    return samples


def time_interleaved(steps: dict[str, Callable[..., None]], input_sets: list[tuple], device: str,
                     policy: TimingPolicy, block_s: float = 0.05) -> dict[str, list[float]]:
    """Seconds per call of each step. On CPU the steps take turns in blocks of about `block_s` (the first
    call of each block, after the switch, is not kept), so a machine whose speed drifts during the run (a
    shared VM) slows all of them alike, while each block runs with warm caches as it would alone. On a
    GPU each step is timed in one batch of CUDA events."""
    if device == "cuda":
        return {name: time_step(step, input_sets, device, policy) for name, step in steps.items()}
    k = len(input_sets)
    names = list(steps)
    block = {}
    for name in names:
        t0 = time.perf_counter()
        for i in range(policy.warmup):
            steps[name](*input_sets[i % k])
        one = (time.perf_counter() - t0) / max(policy.warmup, 1)
        block[name] = max(2, min(policy.max_repeats, int(block_s / max(one, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + policy.budget_s * len(names)
    rounds = 0
    while True:
        for j in range(len(names)):
            name = names[(rounds + j) % len(names)]
            for i in range(block[name]):
                inputs = input_sets[i % k]
                t0 = time.perf_counter()
                steps[name](*inputs)
                if i:
                    samples[name].append(time.perf_counter() - t0)
        rounds += 1
        fewest = min(len(v) for v in samples.values())
        if fewest >= policy.max_repeats or (fewest >= policy.min_repeats and time.perf_counter() >= deadline):
            return samples


def graph_replays(step, input_sets) -> list[Callable[[], None]] | None:
    """One CUDA graph per input set, each replaying step on those inputs (what a CUDA-graphed model pays: no
    launch overhead), or None, with a warning, when step cannot be captured (a host sync, CPU work)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
            for inputs in input_sets:
                step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graphs = []
        for inputs in input_sets:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(*inputs)
            graphs.append(graph)
    except Exception as e:  # noqa: BLE001 - any capture failure: time it eagerly instead
        print(f"effvit-bench: CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); timed eagerly",
              file=sys.stderr)
        torch.cuda.synchronize()
        return None
    return [graph.replay for graph in graphs]


def _time_cuda(step, input_sets, policy: TimingPolicy) -> list[float]:
    k = len(input_sets)
    calls = graph_replays(step, input_sets) if policy.cuda_graphs else None
    if calls is None:
        calls = [lambda inputs=inputs: step(*inputs) for inputs in input_sets]
    torch.cuda.synchronize()
    # estimate the cost of one call to size the batch of timed calls
    t0 = time.perf_counter()
    calls[0]()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    n = int(min(policy.max_repeats, max(policy.min_repeats, policy.budget_s / one)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        calls[i % k]()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def peak_memory_bytes(step: Callable[..., None], inputs: tuple, device: str) -> int | None:
    """Bytes allocated at the peak of one call beyond what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(*inputs)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    # CPU: the profiler's allocation and free events, in time order
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step(*inputs)
    except Exception:  # pragma: no cover - profiler unavailable in this build
        return None
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return int(peak)


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the process's stderr (file descriptor 2): the profiler's C++ side prints a line on every
    start and stop (KINETO_LOG_LEVEL does not reach those), which would bury the benchmark's output."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# ---- this machine's peaks ------------------------------------------------------------------------------

def measure_peaks(device: str, quick: bool = False) -> dict:
    """Memory-copy bandwidth (bytes read + written per second) and sgemm FLOP/s, measured here."""
    n_bytes = (64 if quick else 256) << 20
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = _best_of(lambda: dst.copy_(src), device, 5 if quick else 10)
    n = 1024 if quick else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32 if device == "cuda" else None
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # sgemm: true fp32
    try:
        mm = _best_of(lambda: torch.mm(a, b), device, 3 if quick else 5)
    finally:
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return {"copy_gbps": 2 * n_bytes / copy / 1e9, "copy_bytes": 2 * n_bytes,
            "sgemm_gflops": 2 * n ** 3 / mm / 1e9, "sgemm_n": n}


def _best_of(fn, device: str, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- the C allocator ---------------------------------------------------------------------------------

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_retained = False
# what replaces or tunes the C allocator from outside the process (LD_PRELOAD; glibc's tunables)
PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
GLIBC_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")


def retain_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse instead of returning it to the OS, for the rest of the process.

    By default (what a user's process has) glibc serves each allocation above its mmap threshold (128 KiB, raised
    as large blocks are freed, up to 32 MiB) with fresh pages and returns them when freed, so every such output
    pays first-touch page faults (several microseconds each in a VM), for eager and fused code alike. Kept, the
    cases time the kernels' own work; jemalloc or tcmalloc, which PyTorch's CPU performance guide recommends,
    behave like this too.
    Returns False where it cannot be done (not glibc)."""
    global _retained
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_MAX, 0) == 1
    ok = mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    _retained = _retained or ok
    return ok


def freed_memory_retained() -> bool:
    """Whether retain_freed_memory() took effect in this process (it cannot be undone)."""
    return _retained


def cpu_allocator() -> str:
    """The C allocator this process's CPU tensors get, in words: the system's, one preloaded in its place, or
    glibc's tuned by environment variables or by retain_freed_memory()."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in PRELOADED_ALLOCATORS:
        if name in preload:
            return f"{name} (LD_PRELOAD)"
    tuned = [v for v in GLIBC_MALLOC_ENV if v in os.environ]
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        tuned.append("GLIBC_TUNABLES")
    if _retained:
        return "glibc keeping freed memory (--keep-freed-memory)"
    if tuned:
        return f"glibc tuned by {', '.join(tuned)}"
    return "system (glibc)" if platform.libc_ver()[0] == "glibc" else "system"
