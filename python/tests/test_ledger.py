"""fedpref.ledger on a store written by the coordinator's command line."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

import fedpref
from conftest import program, run_json


@pytest.fixture()
def store(tmp_path):
    coordinator = program("fedpref-coordinator")
    done = subprocess.run(
        [coordinator, "init", "--dir", tmp_path / "deploy"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    db = tmp_path / "coordinator.db"
    manifest = tmp_path / "deploy" / "manifest.toml"
    for run_id in ("first", "second"):
        run_json(coordinator, "run", "create", "--db", db, "--manifest", manifest, "--id", run_id, "--json")
    return db


def test_runs_entries_and_totals_agree_with_ledger_verify(store):
    before = hashlib.sha256(store.read_bytes()).hexdigest()
    runs = fedpref.ledger(store)
    assert [r["run_id"] for r in runs] == ["first", "second"]
    verified = run_json(program("fedpref-coordinator"), "ledger", "verify", "--db", store, "--json")
    by_id = {r["run_id"]: r for r in verified}
    for run in runs:
        assert run["ok"] is True
        assert run["totals"] == by_id[run["run_id"]]["totals"]
        entries = run["entries"]
        assert len(entries) == run["totals"]["entries"] >= 1
        assert [e["sequence"] for e in entries] == list(range(1, len(entries) + 1))
        assert entries[0]["event"]["kind"] == "run_created"
        assert all(e["run_id"] == run["run_id"] for e in entries)
        for earlier, later in zip(entries, entries[1:]):
            assert later["prev_hash"] == earlier["hash"]
        assert entries[-1]["hash"] == run["totals"]["head_hash"]
    # Read-only: the file is byte for byte what it was.
    assert hashlib.sha256(store.read_bytes()).hexdigest() == before


def test_a_missing_store_raises_value_error_and_a_foreign_file_fedpref_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        fedpref.ledger(tmp_path / "nope.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(fedpref.FedprefError):
        fedpref.ledger(junk)
