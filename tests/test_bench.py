"""The benchmark harness itself: listing, a tiny run's files, comparisons, bad arguments."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import effvit.bench
from effvit.bench import cli, plot, report

TINY = ["--family", "shift", "--shape", "7x7x768", "--batch", "1", "--budget", "0.02", "--no-memory"]


def _bench(*args) -> subprocess.CompletedProcess:
    """effvit-bench's main() in this process, with its exit status, stdout and stderr as a subprocess would
    give them: a subprocess pays for importing torch again (~20 s on a slow 2-core VM), which for this file's
    twenty calls was minutes of the suite. test_tiny_run_writes_json_csv_markdown runs the real command."""
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["effvit-bench", *args], code, stdout.getvalue(), stderr.getvalue())


def _bench_process(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "effvit.bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_list_shows_cases_and_skips():
    out = _bench("--list", "--family", "shift", "--shape", "7x7x768", "--batch", "2", "--backward")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "shift/shift B2 C768 H7 W7 n_div12 float32" in text
    assert "shift/shift_group_norm" in text and "fwd+bwd" in text
    for impl in ("eager", "compile"):
        assert f"run   {impl}" in text
    assert "skip  effvit:cuda" in text or "run   effvit:cuda" in text
    assert "4 cases" in text


def test_bare_run_is_the_tour_and_all_is_every_suite():
    tour = _bench("--list")
    assert tour.returncode == 0, tour.stderr
    keys = [line.split(" float32")[0] for line in tour.stdout.splitlines() if "/" in line and not line.startswith(" ")]
    assert sorted(keys) == sorted([
        "hilo/layer B1 H14 W14 C384 heads12 ws2 alpha0.9", "hilo/lofi B1 N196 M49 heads10 head_dim32",
        "linear/core B1 N3136 heads8 D32", "shift/shift B1 C96 H56 W56 n_div12",
        "shift/shift_group_norm B1 C96 H56 W56 n_div12", "token_drop/drop B1 N197 C384 heads6 keep138",
        "token_drop/drop B64 N197 C384 heads6 keep138", "token_drop/model B8 modelvit_small_patch16_224 img224",
        "window/core B1 H56 W56 C96 heads3 ws7 shift0", "window/core B1 H56 W56 C96 heads3 ws7 shift3",
        "window/attn B1 H56 W56 C96 heads3 ws7 shift0", "window/attn B1 H56 W56 C96 heads3 ws7 shift3",
        "window/model B1 modelswin_t img224"])
    everything = _bench("--list", "--all")
    assert everything.returncode == 0, everything.stderr
    count = lambda out: int(out.stdout.split(" cases, ")[0].rsplit("\n", 1)[-1])  # noqa: E731
    assert count(tour) == 13 and count(everything) > 40
    # choosing anything leaves the tour: a family alone is its whole suite
    window = _bench("--list", "--family", "window")
    assert "window/core B8 H28 W28 C192" in window.stdout and "hilo/" not in window.stdout


@pytest.mark.slow
def test_tiny_run_writes_json_csv_markdown(tmp_path):
    out = _bench_process(*TINY, "--out", str(tmp_path), "--no-peers")
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    for key in ("settings", "machine", "peaks", "records", "command"):
        assert key in data
    assert data["machine"]["torch"] and data["machine"]["cpu"]
    ran = [r for r in data["records"] if r["status"] == "ok"]
    assert ran, data["records"]
    for r in ran:
        assert r["median_us"] > 0 and r["p10_us"] <= r["median_us"] <= r["p90_us"]
        assert len(r["samples_us"]) == r["repeats"] >= 1
        assert r["gbps"] > 0
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["records"]) and "median_us" in rows[0]
    md = (tmp_path / "bench.md").read_text()
    assert "| op |" in md and "effvit-bench" in md


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    out = _bench(*TINY, "--out", str(tmp_path), "--plot")
    assert out.returncode == 0, out.stderr
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["latency-shift.png", "roofline.png", "speedup-shift.png"], pngs
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same from the recorded JSON, into another folder
    assert plot.main([str(tmp_path / "bench.json"), "--out", str(tmp_path / "replot")]) == 0
    assert sorted(p.name for p in (tmp_path / "replot").glob("*.png")) == pngs


def test_python_api_returns_records():
    result = effvit.bench.run(["shift"], ops=["shift"], shapes=["7x7x768"], batches=[1], peers=False,
                              measure_peaks=False, memory=False,
                              policy=effvit.bench.timing.TimingPolicy(budget_s=0.01, min_repeats=2, warmup=1))
    records = result["records"]
    assert records and all("median_us" in r and "impl" in r for r in records)
    assert any(r["status"] == "ok" for r in records)


def test_compare_flags_a_regression(tmp_path, capsys):
    rec = {"key": "shift/shift x", "impl": "effvit:cpu", "status": "ok", "median_us": 10.0}
    old = {"records": [rec]}
    new = {"records": [dict(rec, median_us=13.0)]}
    rows = report.compare(new, old)
    assert rows[0]["ratio"] == pytest.approx(1.3)
    assert report.print_comparison(rows, 20.0)
    assert not report.print_comparison(rows, 40.0)
    # through the command line: a run compared with a faked faster old run exits 1
    out_dir = tmp_path / "run"
    first = _bench(*TINY, "--no-peers", "--op", "shift", "--out", str(out_dir))
    assert first.returncode == 0, first.stderr
    data = json.loads((out_dir / "bench.json").read_text())
    for r in data["records"]:
        if r["status"] == "ok":
            r["median_us"] = 1e-3  # pretend the old run took a nanosecond: any real run is slower
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(data))
    second = _bench(*TINY, "--no-peers", "--op", "shift", "--compare", str(old_path), "--fail-if-regression", "10")
    assert second.returncode == 1, second.stdout + second.stderr
    assert "REGRESSION" in second.stdout


@pytest.mark.parametrize("args,words", [
    (["--family", "nope"], "unknown family"),
    (["--backend", "tpu"], "invalid choice"),
    (["--dtype", "int8"], "invalid choice"),
    (["--shape", "1x1x1"], "unknown shape"),
    (["--batch", "0"], "--batch"),
    (["--fail-if-regression", "5"], "needs --compare"),
    (["--compare", "/nonexistent.json"], "no such file"),
    (["--plot"], "--plot needs --out"),
    (["--device", "cpu", "--cuda-graphs"], "--cuda-graphs times GPU cases"),
])
def test_bad_arguments_exit_2(args, words):
    out = _bench(*args)
    assert out.returncode == 2
    assert words in out.stderr and "Traceback" not in out.stderr


def test_cuda_without_gpu_exits_2():
    import torch
    if torch.cuda.is_available():
        pytest.skip("there is a GPU")
    out = _bench("--device", "cuda")
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr


def test_shapes_of_several_families():
    """--shape names may come from different --family suites: each family runs its own."""
    out = _bench("--list", "--family", "shift", "--family", "linear", "--shape", "7x7x768", "--shape", "N196",
                 "--batch", "1")
    assert out.returncode == 0, out.stderr
    assert "shift/shift B1 C768 H7 W7" in out.stdout and "linear/core B1 N196" in out.stdout


def test_window_suite_lists_peers():
    out = _bench("--list", "--family", "window", "--shape", "7x7x768", "--batch", "1")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "window/core B1 H7 W7 C768 heads24 ws7 shift0 float32" in text
    assert text.count("window/core B1 H7 W7") == 1, "shift 3 on a map of one window is the shift-0 case"
    for impl in ("eager", "timm-sdpa", "compile"):
        assert f"run   {impl}" in text
    assert "skip  flex" in text or "run   flex" in text


def test_window_core_tiny_run():
    result = effvit.bench.run(["window"], ops=["core", "attn"], shapes=["7x7x768"], batches=[1], peers=True,
                              measure_peaks=False, memory=False, backward=True,
                              policy=effvit.bench.timing.TimingPolicy(budget_s=0.01, min_repeats=2, warmup=1))
    ok = {(r["op"], r["impl"], r["direction"]) for r in result["records"] if r["status"] == "ok"}
    try:
        import timm  # noqa: F401  (the attention-path peers are timm's blocks)
        ops = ("core", "attn")
    except ImportError:
        ops = ("core",)
    for op in ops:  # the compile peers are compiled when built, not when listed: they must still run
        for impl in ("effvit:cpu", "eager", "timm-sdpa", "compile"):
            assert (op, impl, "fwd+bwd") in ok, (op, impl, sorted(ok))


def test_hilo_suite_lists_the_paper_table():
    out = _bench("--list", "--family", "hilo", "--shape", "table", "--batch", "2")
    assert out.returncode == 0, out.stderr
    assert "hilo/table B2 H14 W14 C768 heads12 ws2 alpha0.9 float32" in out.stdout
    for impl in ("eager", "sra", "local-window", "mhsa"):
        assert f"run   {impl}" in out.stdout


def test_hilo_linear_token_drop_tiny_runs():
    policy = effvit.bench.timing.TimingPolicy(budget_s=0.01, min_repeats=2, warmup=1)
    for family, ops, shapes, peers in (("hilo", ["layer", "lofi"], ["14x14x384"], ("eager", "compile")),
                                       ("linear", ["core"], ["N196"], ("eager", "sdpa-softmax", "compile")),
                                       ("token_drop", ["drop"], ["vit_s"], ("eager", "compile"))):
        result = effvit.bench.run([family], ops=ops, shapes=shapes, batches=[1], peers=True, measure_peaks=False,
                                  memory=False, backward=True, policy=policy)
        ok = {(r["op"], r["impl"], r["direction"]) for r in result["records"] if r["status"] == "ok"}
        for op in ops:
            for impl in ("effvit:cpu",) + peers:
                assert (op, impl, "fwd+bwd") in ok, (family, op, impl, sorted(ok))


def test_recorded_command_names_the_cpu_isa_it_ran_under(monkeypatch):
    """A run under EFFVIT_CPU_ISA measures another kernel variant: the recorded command says so, so it can be rerun."""
    monkeypatch.delenv("EFFVIT_CPU_ISA", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert report.command_line(["--family", "window"]) == "effvit-bench --family window"
    monkeypatch.setenv("EFFVIT_CPU_ISA", "avx2")
    assert report.command_line(["--family", "window"]) == "EFFVIT_CPU_ISA=avx2 effvit-bench --family window"


def test_compile_peer_compiles_every_case_past_dynamos_recompile_limit(monkeypatch):
    """A suite compiles one peer function per case; dynamo runs a code object eagerly past recompile_limit (8)
    entries, so each case's compile must get a frame of its own."""
    import torch._dynamo.testing

    from effvit.bench import cases

    counter = torch._dynamo.testing.CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(cases.torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter, **kw))

    def peer(x, k=2):
        return torch.relu(x) * k

    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", None) or config.cache_size_limit  # the older name (torch 2.6)
    n_cases = limit + 4
    for n in range(1, n_cases + 1):
        x = torch.randn(n, 3)
        assert torch.equal(cases.compiled(peer)(x, k=3), peer(x, k=3))
    assert counter.frame_count == n_cases
    module = torch.nn.Sequential(torch.nn.ReLU())   # a module peer (as the HiLo layer's) compiles too
    assert torch.equal(cases.compiled(module)(x), module(x)) and counter.frame_count == n_cases + 1
