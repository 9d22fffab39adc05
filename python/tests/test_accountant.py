"""The accountant against the public reference vectors and against the command line."""

from __future__ import annotations

import math

import pytest

import fedpref
from conftest import program, run_json


def rel_close(got, want, rel):
    if want is None:  # +∞ is written as null in the vectors and in the JSON output
        return got is None
    return got is not None and abs(got - want) <= rel * abs(want)


def test_epsilon_matches_the_exact_rdp_reference(vectors):
    cases = [v for v in vectors if v["kind"] == "epsilon"]
    assert len(cases) > 100
    failures = []
    for v in cases:
        got = fedpref.epsilon(
            noise_multiplier=v["effective_noise_multiplier"],
            delta=v["delta"],
            rounds=v["T"],
            sampling_rate=v["q"],
            mode="central",
            accountant="rdp",
        )
        if not rel_close(got["epsilon"], v["epsilon_exact_rdp"], 1e-6):
            failures.append((v["id"], got["epsilon"], v["epsilon_exact_rdp"]))
        pld = v.get("epsilon_pld")
        if pld is not None and got["epsilon"] < pld * (1 - 1e-6):
            failures.append((v["id"], got["epsilon"], f"below PLD {pld}"))
    assert not failures, failures[:10]


def test_local_mode_matches_the_replace_one_reference(vectors):
    cases = [v for v in vectors if v["kind"] == "epsilon_replace_one"]
    assert cases
    for v in cases:
        got = fedpref.epsilon(
            v["noise_multiplier"], v["delta"], v["T"], mode="local", accountant="rdp"
        )
        assert rel_close(got["epsilon"], v["epsilon"], 1e-6), (v["id"], got)
        assert got["order"] == v["optimal_order"], (v["id"], got)
        assert got["mode"] == "local"


def test_delta_matches_the_exact_rdp_reference(vectors):
    cases = [v for v in vectors if v["kind"] == "delta"]
    assert cases
    for v in cases:
        got = fedpref.delta(
            v["effective_noise_multiplier"], v["epsilon_target"], v["T"], v["q"], accountant="rdp"
        )["delta"]
        want = v["delta_exact_rdp"]
        assert rel_close(got, want, 1e-6) or abs(math.log(got) - math.log(want)) <= 1e-8, (
            v["id"],
            got,
            want,
        )


def test_calibrate_matches_the_exact_rdp_reference_and_meets_the_target(vectors):
    cases = [v for v in vectors if v["kind"] == "calibrate_sigma"]
    assert cases
    for v in cases:
        got = fedpref.calibrate(
            v["target_epsilon"], v["delta"], v["T"], v["q"], accountant="rdp"
        )
        want = v["noise_multiplier_exact_rdp"]
        assert abs(got["noise_multiplier"] - want) <= 1e-6 * want, (v["id"], got, want)
        assert got["epsilon"] <= v["target_epsilon"] * (1 + 1e-9), (v["id"], got)


def test_the_default_pld_accountant_matches_its_reference_and_names_itself(vectors):
    cases = [
        v
        for v in vectors
        if v["kind"] == "epsilon" and v.get("epsilon_pld") is not None and v["T"] <= 100
    ]
    assert len(cases) > 20
    for v in cases:
        got = fedpref.epsilon(
            v["effective_noise_multiplier"], v["delta"], v["T"], v["q"]
        )
        assert got["accountant"] == "pld" and got["order"] is None, got
        assert rel_close(got["epsilon"], v["epsilon_pld"], 2e-3), (v["id"], got)
        assert got["epsilon"] <= v["epsilon"], (v["id"], got)
    with pytest.raises(ValueError, match="^accountant \"prv\""):
        fedpref.epsilon(1.0, 1e-5, 10, accountant="prv")


@pytest.mark.parametrize(
    "command,call",
    [
        (
            ["epsilon", "--noise-multiplier", "1.1", "--sampling-rate", "0.01", "--rounds", "1000", "--delta", "1e-5"],
            lambda: fedpref.epsilon(1.1, 1e-5, 1000, 0.01),
        ),
        (
            ["epsilon", "--noise-multiplier", "3", "--rounds", "20", "--delta", "1e-6", "--mode", "local"],
            lambda: fedpref.epsilon(3.0, 1e-6, 20, mode="local"),
        ),
        (
            ["delta", "--noise-multiplier", "0.8", "--sampling-rate", "0.1", "--rounds", "100", "--epsilon", "8"],
            lambda: fedpref.delta(0.8, 8.0, 100, 0.1),
        ),
        (
            ["calibrate", "--target-epsilon", "3", "--sampling-rate", "0.01", "--rounds", "500", "--delta", "1e-5", "--mode", "distributed"],
            lambda: fedpref.calibrate(3.0, 1e-5, 500, 0.01, mode="distributed"),
        ),
        (
            ["epsilon", "--noise-multiplier", "1.1", "--sampling-rate", "0.01", "--rounds", "1000", "--delta", "1e-5", "--accountant", "rdp"],
            lambda: fedpref.epsilon(1.1, 1e-5, 1000, 0.01, accountant="rdp"),
        ),
    ],
)
def test_same_object_as_the_command_line(command, call):
    cli = run_json(program("fedpref-coordinator"), "accountant", *command, "--json")
    assert call() == cli


def test_bad_arguments_raise_value_error_naming_them():
    with pytest.raises(ValueError, match="^sampling_rate 0.5 cannot be used with mode \"local\""):
        fedpref.epsilon(1.0, 1e-5, 10, sampling_rate=0.5, mode="local")
    with pytest.raises(ValueError, match="^noise_multiplier -1"):
        fedpref.epsilon(-1.0, 1e-5, 10)
    with pytest.raises(ValueError, match="^delta 0"):
        fedpref.calibrate(1.0, 0.0, 10)
    with pytest.raises(ValueError, match="^rounds"):
        fedpref.delta(1.0, 1.0, 0)
    with pytest.raises(ValueError, match="^rounds 2.5"):
        fedpref.delta(1.0, 1.0, 2.5)
    with pytest.raises(ValueError, match="^mode \"none\""):
        fedpref.epsilon(1.0, 1e-5, 10, mode="none")
