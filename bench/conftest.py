"""pytest-benchmark suite over the harness's cases (the same definitions as effvit-bench).

    pytest bench --benchmark-json=out.json          # or: make bench-pytest
    pytest bench --benchmark-compare                # against the last saved run
"""
