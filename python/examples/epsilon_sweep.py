"""ε against RMSE in a notebook: the accountant, a sweep of simulations, a ledger.

    python epsilon_sweep.py [COORDINATOR_DB]
"""

import sys

import fedpref

# The accountant: ε of a schedule, and the σ that meets a target (as
# `fedpref-coordinator accountant … --json`).
spent = fedpref.epsilon(noise_multiplier=1.1, delta=1e-5, rounds=1000, sampling_rate=0.01)
print(f"σ = 1.1, q = 0.01, T = 1000: ε = {spent['epsilon']:.3f} at δ = {spent['delta']}")
sigma = fedpref.calibrate(target_epsilon=3.0, delta=1e-5, rounds=1000, sampling_rate=0.01)
print(f"ε ≤ 3 needs σ = {sigma['noise_multiplier']:.4f}")
local = fedpref.epsilon(noise_multiplier=4.0, delta=1e-6, rounds=20, mode="local")
print(f"local DP, σ = 4, 20 uploads by one device: ε = {local['epsilon']:.2f}")

# A sweep: the same seeded population trained at three privacy levels, plus the
# centralised no-privacy baseline (the numbers `fedpref-sim run` gives for the same seed).
base = {"users": 200, "items": 80, "rounds": 6, "cohort_size": 50, "factors": 4, "seed": 1}
baseline = fedpref.simulate(base, centralised=True)
print(f"centralised baseline: rmse {baseline.summary['rmse']:.4f}")
for target in (1.0, 4.0, 16.0):
    result = fedpref.simulate(base, privacy_mode="central", target_epsilon=target)
    s = result.summary
    print(f"target ε {target:>4}: σ = {result.settings['noise_multiplier']:.3f}, "
          f"ε = {s['epsilon']:.3f}, rmse {s['rmse']:.4f}")
metrics = result.metrics  # per round: a pandas DataFrame if pandas is installed
print(f"per-round metrics: {type(metrics).__name__} of {len(metrics)} rounds")

# A coordinator's ledger, read-only: every run, verified, with its entries.
if len(sys.argv) > 1:
    for run in fedpref.ledger(sys.argv[1]):
        totals = run.get("totals", {})
        print(f"run {run['run_id']}: {run['status']}, ledger ok = {run['ok']}, "
              f"{len(run['entries'])} entries, ε so far {totals.get('cumulative_epsilon')}")
