"""Random and edge inputs for every public function and module (tests/bad_inputs.py), run in a child process: a crash
there fails this test with the child's output instead of ending the test run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")


def test_bad_inputs_in_a_child_process():
    here = Path(__file__).resolve().parent
    env = dict(os.environ)
    env.setdefault("EFFVIT_BAD_INPUT_EXAMPLES", "40")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "bad_inputs.py")],
                          capture_output=True, text=True, env=env, cwd=here.parent, timeout=1500)
    crashed = proc.returncode < 0 or proc.returncode not in (0, 1)
    assert proc.returncode == 0, (f"the child {'crashed' if crashed else 'failed'} (exit {proc.returncode}):\n"
                                  + proc.stdout[-8000:] + proc.stderr[-4000:])
