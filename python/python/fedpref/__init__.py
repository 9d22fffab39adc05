"""fedpref for notebooks: the privacy accountant (PLD by default, or RDP), the simulator and the ledger reader.

Everything runs in-process in the Rust code the command lines use, so the numbers are the
command lines' numbers::

    import fedpref

    fedpref.epsilon(noise_multiplier=1.1, delta=1e-5, rounds=100, sampling_rate=0.01)
    result = fedpref.simulate({"rounds": 20, "privacy_mode": "central", "target_epsilon": 3.0})
    result.metrics          # a pandas DataFrame when pandas is installed, else a list of dicts
    fedpref.ledger("coordinator.db")

Bad arguments raise ``ValueError`` naming the argument or key; other failures (an
unreadable store, a failed run) raise :class:`FedprefError`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Union

from . import _native
from ._native import FedprefError

__all__ = [
    "FedprefError",
    "SimulationResult",
    "calibrate",
    "delta",
    "epsilon",
    "ledger",
    "simulate",
]

_MODES = ("local", "central", "distributed")


def epsilon(
    noise_multiplier: float,
    delta: float,
    rounds: int,
    sampling_rate: float = 1.0,
    mode: str = "central",
    accountant: str = "pld",
) -> Dict[str, Any]:
    """ε after ``rounds`` releases of the (Poisson-subsampled) Gaussian mechanism, at δ.

    ``mode`` is ``"central"`` or ``"distributed"`` (add/remove-one neighbours, sensitivity C,
    amplified by sampling at rate q) or ``"local"`` (replace-one neighbours, sensitivity 2C,
    so σ/2 is accounted; rounds are the device's own uploads and q must be 1). Returns the
    object of ``fedpref-coordinator accountant epsilon --json``: ``epsilon`` (None for +∞),
    ``delta``, ``order`` (None for PLD), ``noise_multiplier``, ``sampling_rate``, ``rounds``,
    ``mode``, ``audience``, ``accountant``. ``accountant`` is ``"pld"`` (privacy loss
    distributions: tight, the default) or ``"rdp"`` (Rényi DP).
    """
    return json.loads(
        _native.epsilon(
            float(noise_multiplier), float(delta), _rounds(rounds), float(sampling_rate),
            mode,
            accountant,
        )
    )


def delta(
    noise_multiplier: float,
    epsilon: float,
    rounds: int,
    sampling_rate: float = 1.0,
    mode: str = "central",
    accountant: str = "pld",
) -> Dict[str, Any]:
    """δ after ``rounds`` releases, at ε (as ``accountant delta --json``)."""
    return json.loads(
        _native.delta(
            float(noise_multiplier), float(epsilon), _rounds(rounds), float(sampling_rate),
            mode,
            accountant,
        )
    )


def calibrate(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling_rate: float = 1.0,
    mode: str = "central",
    accountant: str = "pld",
) -> Dict[str, Any]:
    """The smallest noise multiplier σ keeping ``rounds`` releases within (ε, δ).

    σ is the ``noise_multiplier`` key of the result (as ``accountant calibrate --json``).
    """
    return json.loads(
        _native.calibrate(
            float(target_epsilon), float(delta), _rounds(rounds), float(sampling_rate),
            mode,
            accountant,
        )
    )


def _rounds(rounds: Any) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, int):
        raise ValueError(f"rounds {rounds!r}: must be a whole number ≥ 1")
    if rounds < 1:
        raise ValueError("rounds: the number of rounds must be at least 1")
    return rounds


class SimulationResult:
    """The outcome of :func:`simulate`.

    Attributes:
        summary: the object ``fedpref-sim run --json`` prints (final metrics, ε, δ, seed,
            speed and memory figures).
        rounds: one dict per round with the columns of ``metrics.csv`` (None for an empty
            cell).
        records: the per-round records of ``metrics.json`` (nested, as written there).
        dataset: the data set's name, size and cohorts.
        settings: the resolved settings (σ included when calibrated).
        alerts: the guardrail alerts the run raised (as ``alerts.json``), if any.
        model: the trained shared model of an in-process federated run, or None (the
            centralised baseline, ``transport="grpc"``): ``item_factors`` (a NumPy array,
            items × factors), ``item_biases`` (items) and ``global_offset`` (a float).
        arrays: the per-round metrics as NumPy arrays, one per numeric column of
            :attr:`rounds` (``round`` and counts as int64, the rest float64 with NaN for an
            empty cell), each as long as the run has rounds.

    The model's and the metrics' arrays are the buffers the simulator filled, handed to
    NumPy without a copy.
    """

    def __init__(self, document: Dict[str, Any], arrays: Dict[str, Any]):
        self.summary: Dict[str, Any] = document["summary"]
        self.rounds: List[Dict[str, Any]] = document["rounds"]
        self.records: List[Dict[str, Any]] = document["records"]
        self.dataset: Dict[str, Any] = document["dataset"]
        self.settings: Dict[str, Any] = document["settings"]
        self.alerts: List[Dict[str, Any]] = document.get("alerts") or []
        self.model: Dict[str, Any] | None = arrays["model"]
        self.arrays: Dict[str, Any] = arrays["columns"]

    @property
    def metrics(self) -> Union["pandas.DataFrame", List[Dict[str, Any]]]:  # noqa: F821
        """The per-round metrics: a pandas DataFrame indexed by round when pandas is
        installed, else the list of dicts of :attr:`rounds`."""
        try:
            import pandas
        except ImportError:
            return self.rounds
        return pandas.DataFrame(self.rounds).set_index("round")

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"SimulationResult(rounds={s.get('rounds')}, rmse={s.get('rmse')}, "
            f"epsilon={s.get('epsilon')}, seed={s.get('seed')})"
        )


def simulate(config: Dict[str, Any] | None = None, **settings: Any) -> SimulationResult:
    """Runs a federated simulation in-process, as ``fedpref-sim run`` would.

    ``config`` (and/or keyword arguments, which win) holds the keys of
    ``fedpref-sim run --config FILE``: ``rounds``, ``cohort_size`` or ``sampling_rate``,
    ``privacy_mode``, ``noise_multiplier`` or ``target_epsilon``, ``delta``, ``clip_norm``,
    ``server_optimizer``, ``seed``, ``factors``, ``local_epochs``, ``learning_rate``,
    ``eval_every``, ``users``, ``items``, ``dataset``, ``path``, ``transport``; and
    ``centralised=True`` for the no-privacy baseline. Defaults are the command line's. No
    file is left on disk. The run goes through the command line's own code path, so the
    same seed gives the same numbers as ``fedpref-sim run``.
    """
    merged: Dict[str, Any] = dict(config or {})
    merged.update(settings)
    for key, value in list(merged.items()):
        if isinstance(value, os.PathLike):
            merged[key] = os.fspath(value)
    try:
        text = json.dumps(merged, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config: {e}") from None
    document, arrays = _native.simulate(text)
    return SimulationResult(json.loads(document), arrays)


def ledger(db_path: Union[str, "os.PathLike[str]"]) -> List[Dict[str, Any]]:
    """Every run's privacy ledger in a coordinator's SQLite store, opened read-only.

    One dict per run: ``run_id``, ``status``, ``rounds_committed``, ``published_version``,
    ``ok`` with ``totals`` (as ``fedpref-coordinator ledger verify --json``) or the failing
    ``sequence`` and ``problem``, and ``entries`` (each entry's canonical body, with its
    ``hash`` and ``prev_hash``).
    """
    return json.loads(_native.ledger(os.fspath(db_path)))
