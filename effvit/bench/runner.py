"""Runs benchmark cases and returns their results as data."""

from __future__ import annotations

import dataclasses
import time
import traceback
from datetime import datetime, timezone
from typing import Callable, Iterable

import torch

from effvit.bench import cases as cases_mod
from effvit.bench import machine, report, timing
from effvit.bench.cases import Case, SuiteOptions

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# A bare `effvit-bench` (and `make bench`): one telling shape per family at batch 1 (token dropping also at
# batch 64, and one whole model each for the window and token-drop families), every op and peer. The families'
# whole suites (`--all`, or `--family NAME`) take 30-60 minutes on a 2-core CPU with a cold torch.compile cache.
TOUR: dict[str, dict] = {
    "shift": {"shapes": ("56x56x96",), "batches": (1,)},
    "window": {"shapes": ("56x56x96", "swin_t"), "batches": (1,)},
    "hilo": {"shapes": ("14x14x384",), "batches": (1,)},
    "linear": {"shapes": ("N3136",), "batches": (1,)},
    "token_drop": {"shapes": ("vit_s", "vit_small_patch16_224"), "batches": None},
}


def collect_cases(families: Iterable[str] | None, opts: SuiteOptions, ops: Iterable[str] | None = None,
                  tour: bool = False) -> list[Case]:
    """The cases asked for; tour: each family's TOUR shapes and batches instead of its whole suite."""
    suites = cases_mod.suites()
    chosen = list(families) if families else list(suites)
    out = []
    for fam in chosen:
        fam_opts = opts
        if tour and fam in TOUR:
            fam_opts = dataclasses.replace(opts, shapes=TOUR[fam]["shapes"], batches=TOUR[fam]["batches"])
        elif opts.shapes:  # shapes may name several families' cases: each suite gets its own (or is left out)
            own = tuple(s for s in opts.shapes if s in cases_mod.shapes(fam))
            if not own:
                continue
            fam_opts = dataclasses.replace(opts, shapes=own)
        for case in suites[fam](fam_opts):
            if ops and case.op not in ops:
                continue
            out.append(case)
    return out


def run(families: Iterable[str] | None = None, *, ops: Iterable[str] | None = None,
        backends: Iterable[str] | None = None, dtypes: Iterable[str] = ("float32",),
        shapes: Iterable[str] | None = None, batches: Iterable[int] | None = None, device: str = "cpu",
        backward: bool = False, forward: bool = True, quick: bool = False, threads: int | None = None,
        peers: bool = True, policy: timing.TimingPolicy | None = None, measure_peaks: bool = True,
        retain_freed_memory: bool = False, memory: bool = True, tour: bool = False,
        progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Times every case and implementation asked for (tour: each family's TOUR cases, as a bare effvit-bench).

    The process's own allocator serves the CPU cases, as in a user's program; retain_freed_memory makes glibc keep
    freed memory for reuse instead (for the rest of the process: see timing.retain_freed_memory).

    Returns {"settings", "machine", "peaks", "records"}; "records" is a list of flat dicts (one per
    case and implementation, skipped ones included), ready for pandas.DataFrame.
    """
    if threads:
        torch.set_num_threads(threads)
    if retain_freed_memory and device == "cpu":
        timing.retain_freed_memory()
    policy = policy or timing.default_policy(quick)
    directions = tuple(d for d, on in (("fwd", forward), ("fwd+bwd", backward)) if on)
    opts = SuiteOptions(device=device, dtypes=tuple(DTYPES[d] for d in dtypes),
                        batches=tuple(batches) if batches else None, shapes=tuple(shapes) if shapes else None,
                        directions=directions, backends=tuple(backends) if backends else None, peers=peers,
                        quick=quick)
    started = datetime.now(timezone.utc)
    all_cases = collect_cases(families, opts, ops, tour)
    peaks = timing.measure_peaks(device, quick) if measure_peaks else {}
    records: list[dict] = []
    total = sum(len(c.impls) for c in all_cases)
    done = 0
    for case in all_cases:
        case_records = []
        n_sets = timing.input_sets_needed(case.input_bytes, policy)
        input_sets = [case.make_inputs() for _ in range(n_sets)]
        steps, first_call, failed = {}, {}, {}
        for name, builder in case.impls.items():  # build (compile) and call once each
            if progress:
                progress(done, total, f"{name}: {report.case_label(_record(case, name), ('direction',))}")
            try:
                step = builder()
                t0 = time.perf_counter()
                step(*input_sets[0])
                if case.device == "cuda":
                    torch.cuda.synchronize()
                first_call[name] = time.perf_counter() - t0
                steps[name] = step
            except Exception as e:  # one implementation failing must not stop the run
                failed[name] = e
            done += 1
        try:
            samples = timing.time_interleaved(steps, input_sets, case.device, policy) if steps else {}
        except Exception as e:
            failed.update({name: e for name in steps})
            samples, steps = {}, {}
        for name in case.impls:
            if name in failed:
                e = failed[name]
                case_records.append(_record(case, name, status="error", reason=f"{type(e).__name__}: {e}",
                                            traceback="".join(traceback.format_exception(e, limit=3))))
                continue
            peak = timing.peak_memory_bytes(steps[name], input_sets[0], case.device) if memory else None
            case_records.append(_timed_record(case, name, samples[name], first_call[name], peak, peaks))
        for name, reason in case.skipped.items():
            case_records.append(_record(case, name, status="skipped", reason=reason))
        _add_ratios(case_records)
        records += case_records
        del input_sets
    if progress:
        progress(total, total, "done")
    settings = {
        "families": list(families) if families else sorted(cases_mod.suites()), "ops": list(ops) if ops else None,
        "backends": list(backends) if backends else None, "dtypes": list(dtypes),
        "shapes": list(shapes) if shapes else None, "batches": list(batches) if batches else None,
        "device": device, "directions": list(directions), "quick": quick, "tour": tour, "peers": peers,
        "threads": torch.get_num_threads(), "retain_freed_memory": timing.freed_memory_retained(),
        "allocator": timing.cpu_allocator(),
        "policy": policy.__dict__, "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return {"settings": settings, "machine": machine.describe(device), "peaks": peaks, "records": records}


def _record(case: Case, impl: str, **fields) -> dict:
    rec = {
        "key": case.key, "family": case.family, "op": case.op, "shape": case.shape,
        **{f"param_{k}": v for k, v in case.params.items()},
        "dtype": str(case.dtype).replace("torch.", ""), "device": case.device, "direction": case.direction,
        "impl": impl, "kind": _kind(case, impl), "title": case.title,
        "bytes": case.bytes, "flops": case.flops, "status": "ok", "reason": None,
        "median_us": None, "p10_us": None, "p90_us": None, "min_us": None, "repeats": 0, "samples_us": [],
        "first_call_s": None, "peak_memory_bytes": None, "gbps": None, "frac_copy_peak": None,
        "gflops": None, "frac_sgemm_peak": None, "items_per_s": None, "vs_eager": None, "vs_compile": None,
        "vs_floor": None,
    }
    rec.update(fields)
    return rec


def _kind(case: Case, impl: str) -> str:
    """"effvit" (a kernel backend), "floor" (a bound such as a plain copy), "peer" (the same computation by other
    code) or "design" (another computation, shown for context)."""
    if ":" in impl:
        return impl.split(":")[0]
    return "design" if impl in case.other_designs else "peer"


def _timed_record(case: Case, name: str, samples: list[float], first: float, peak: int | None, peaks: dict) -> dict:
    stats = timing.summarize(samples)
    seconds = stats["median_us"] / 1e6
    rec = _record(case, name, **stats, samples_us=[round(s * 1e6, 3) for s in samples], first_call_s=first,
                  peak_memory_bytes=peak)
    rec["items_per_s"] = case.params.get("B", 1) / seconds  # images (samples) per second
    if case.bytes:
        rec["gbps"] = case.bytes / seconds / 1e9
        if peaks.get("copy_gbps"):
            rec["frac_copy_peak"] = rec["gbps"] / peaks["copy_gbps"]
    if case.flops:
        rec["gflops"] = case.flops / seconds / 1e9
        if peaks.get("sgemm_gflops"):
            rec["frac_sgemm_peak"] = rec["gflops"] / peaks["sgemm_gflops"]
    return rec


def _add_ratios(records: list[dict]) -> None:
    """Speed-ups against the peers of the same case (> 1: faster than the peer), and the floor's time over each
    one's (1: as fast as the floor, e.g. a plain copy of the input)."""
    by_impl = {r["impl"]: r for r in records if r["status"] == "ok"}
    floors = [r["median_us"] for r in by_impl.values() if r["kind"] == "floor"]
    for rec in records:
        if rec["status"] != "ok":
            continue
        for peer, field in (("eager", "vs_eager"), ("compile", "vs_compile")):
            if peer in by_impl:
                rec[field] = by_impl[peer]["median_us"] / rec["median_us"]
        if floors and rec["kind"] != "floor":
            rec["vs_floor"] = min(floors) / rec["median_us"]
