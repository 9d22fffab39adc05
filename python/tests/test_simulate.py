"""fedpref.simulate against `fedpref-sim run --json` for the same seed: identical numbers."""

from __future__ import annotations

import csv
import json

import pytest

import fedpref
from conftest import program, run_json

CONFIG = {
    "users": 60,
    "items": 40,
    "rounds": 4,
    "cohort_size": 20,
    "factors": 4,
    "seed": 11,
    "privacy_mode": "central",
    "target_epsilon": 5.0,
    "clip_norm": 0.5,
}

# Measured, not determined by the seed.
MACHINE_KEYS = {"client_updates_per_s", "peak_rss_bytes"}


def cli_run(tmp_path):
    out = tmp_path / "out"
    args = [program("fedpref-sim"), "run", "--json", "--quiet", "--out", out]
    for key, value in CONFIG.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    summary = run_json(*args)
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return summary, metrics, rows


def test_the_same_seed_gives_the_command_lines_numbers(tmp_path):
    summary, metrics, rows = cli_run(tmp_path)
    result = fedpref.simulate(CONFIG)

    def seeded(s):
        return {k: v for k, v in s.items() if k not in MACHINE_KEYS}

    assert seeded(result.summary) == seeded(summary)
    assert result.summary["epsilon"] is not None and result.summary["epsilon"] <= 5.0
    assert result.records == metrics["rounds"]
    assert result.dataset == metrics["dataset"]
    assert {k: v for k, v in result.settings.items() if k != "out"} == {
        k: v for k, v in metrics["settings"].items() if k != "out"
    }
    # The flat rows are metrics.csv's, cell for cell (empty cell = None).
    assert len(result.rounds) == len(rows) == CONFIG["rounds"]
    for ours, theirs in zip(result.rounds, rows):
        assert list(ours) == list(theirs)
        for key, cell in theirs.items():
            value = ours[key]
            if cell == "":
                assert value is None, key
            elif key == "abandoned":
                assert value == (cell == "1")
            else:
                assert value == float(cell), (key, value, cell)


def test_metrics_are_a_dataframe_with_pandas_and_dicts_without():
    result = fedpref.simulate(CONFIG, rounds=2, eval_every=1)
    try:
        import pandas  # noqa: F401
    except ImportError:
        assert result.metrics == result.rounds
        return
    frame = result.metrics
    assert list(frame.index) == [1, 2]
    assert frame.loc[2, "rmse"] == result.rounds[1]["rmse"]


def test_the_trained_model_comes_back_as_arrays():
    import numpy

    result = fedpref.simulate(CONFIG, rounds=2)
    model = result.model
    assert model is not None
    assert isinstance(model["item_factors"], numpy.ndarray)
    assert model["item_factors"].dtype == numpy.float64
    assert model["item_factors"].shape == (CONFIG["items"], CONFIG["factors"])
    assert model["item_biases"].shape == (CONFIG["items"],)
    assert numpy.isfinite(model["item_factors"]).all()
    assert isinstance(model["global_offset"], float)
    # The same seed trains the same model; the centralised baseline returns none.
    again = fedpref.simulate(CONFIG, rounds=2).model
    assert (again["item_factors"] == model["item_factors"]).all()
    plain = {k: v for k, v in CONFIG.items()
             if k not in ("privacy_mode", "target_epsilon", "clip_norm")}
    assert fedpref.simulate(plain, rounds=2, centralised=True).model is None


def test_arrays_are_the_simulators_buffers_not_copies():
    # NumPy did not allocate these arrays: each one's memory belongs to the Rust buffer the
    # simulator filled (kept alive by the array's base object), so nothing was copied.
    result = fedpref.simulate(CONFIG, rounds=2)
    for array in [result.model["item_factors"], result.model["item_biases"],
                  *result.arrays.values()]:
        assert not array.flags.owndata
        assert array.base is not None
        assert array.flags.c_contiguous


def test_per_round_metrics_come_as_numpy_arrays_beside_the_rows():
    import numpy

    result = fedpref.simulate(CONFIG, rounds=3)
    arrays = result.arrays
    assert arrays["round"].dtype == numpy.int64
    assert list(arrays["round"]) == [1, 2, 3]
    assert arrays["rmse"].dtype == numpy.float64
    assert list(arrays["rmse"]) == [row["rmse"] for row in result.rounds]
    # Every numeric column of the rows is there, each one value per round.
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    assert set(arrays) <= set(result.rounds[0])
    assert {k for k in result.rounds[0]
            if all(number(r[k]) for r in result.rounds)} <= set(arrays)
    assert all(len(a) == 3 for a in arrays.values())


def test_keyword_settings_override_the_config_and_seeds_matter():
    a = fedpref.simulate(CONFIG, rounds=2)
    b = fedpref.simulate(CONFIG, rounds=2, seed=12)
    assert len(a.rounds) == 2
    assert a.records != b.records


def test_bad_configuration_raises_value_error_naming_the_key():
    with pytest.raises(ValueError, match="colour"):
        fedpref.simulate({"colour": "blue"})
    with pytest.raises(ValueError, match="rounds"):
        fedpref.simulate(rounds=0)
    with pytest.raises(ValueError, match="`seed`"):
        fedpref.simulate(seed=None)
    with pytest.raises(ValueError, match="centralised"):
        fedpref.simulate(centralised=True, privacy_mode="central", noise_multiplier=1.0)
