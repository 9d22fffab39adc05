"""The Python example in docs/app-developers.md runs as shown."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from test_ledger import store  # noqa: F401  (the fixture)

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "epsilon_sweep.py"


def test_the_epsilon_sweep_example_runs(store):  # noqa: F811
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), str(store)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "ε ≤ 3 needs σ = " in out
    assert out.count("target ε") == 3
    assert "centralised baseline: rmse" in out
    assert "run first: active, ledger ok = True" in out
