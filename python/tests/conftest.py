"""Shared fixtures: where the repository and the command-line programs are.

The tests compare the package with the command lines built from the same sources:
``fedpref-coordinator`` and ``fedpref-sim`` are looked for in ``$FEDPREF_BIN_DIR``, else in
``$CARGO_TARGET_DIR/debug``, else in ``target/debug`` of the repository.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _bin_dir() -> pathlib.Path:
    if os.environ.get("FEDPREF_BIN_DIR"):
        return pathlib.Path(os.environ["FEDPREF_BIN_DIR"])
    target = os.environ.get("CARGO_TARGET_DIR")
    return (pathlib.Path(target) if target else REPO / "target") / "debug"


def program(name: str) -> pathlib.Path:
    path = _bin_dir() / name
    if not path.is_file():
        pytest.fail(
            f"{path} does not exist: build it first (cargo build -p ...) or set FEDPREF_BIN_DIR"
        )
    return path


def run_json(*args: str) -> object:
    """Runs a command line and parses its standard output as JSON."""
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.fixture(scope="session")
def vectors() -> list:
    """The accountant's public reference vectors, from the privacy crate's test data
    (provenance: privacy/tests/data/PROVENANCE.md)."""
    path = REPO / "privacy" / "tests" / "data" / "rdp_vectors.json"
    return json.loads(path.read_text())["vectors"]
