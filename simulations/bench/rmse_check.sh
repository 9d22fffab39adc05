#!/usr/bin/env bash
# Checks that fedpref's final RMSE on the standard workload (../shared/bench/WORKLOAD.md) is
# within a tolerance of the NumPy reference's, over several seeds. The two sides draw their
# data and initialisation from different random streams (NumPy's PCG64 cannot be reproduced
# in Rust), so one seed's RMSE differs by the seed-to-seed spread; the check compares the
# means over the seeds.
#
# Usage: simulations/bench/rmse_check.sh [CONFIG ...]
#   CONFIG is USERS:CLIENTS_PER_ROUND:ROUNDS:SIGMA [default: 1000:100:20:1 1000:100:20:0]
# Environment:
#   FEDPREF_SIM   the fedpref-sim binary      [target/release/fedpref-sim]
#   NUMPY_REF     the NumPy reference script  [../shared/bench/numpy_ref.py]
#   PYTHON        a Python with NumPy         [python3]
#   SEEDS         seeds to run                ["1 2 3 4 5"]
#   PATHS         noise paths to run          ["aggregate per-device"]
#   TOLERANCE     allowed |mean difference| / NumPy's mean, in %  [1]
# Exits 1 if any configuration and path is outside the tolerance.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
sim=${FEDPREF_SIM:-$repo/target/release/fedpref-sim}
ref=${NUMPY_REF:-$repo/../shared/bench/numpy_ref.py}
python=${PYTHON:-python3}
seeds=${SEEDS:-1 2 3 4 5}
paths=${PATHS:-aggregate per-device}
tolerance=${TOLERANCE:-1}
out=$(mktemp -d)

[ -x "$sim" ] || { echo "rmse_check.sh: $sim not found: cargo build --release -p fedpref-simulations" >&2; exit 2; }
[ -f "$ref" ] || { echo "rmse_check.sh: the NumPy reference $ref not found (set NUMPY_REF)" >&2; exit 2; }
"$python" -c 'import numpy' 2>/dev/null || { echo "rmse_check.sh: $python has no NumPy (set PYTHON)" >&2; exit 2; }

configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(1000:100:20:1 1000:100:20:0)

status=0
for c in "${configs[@]}"; do
  IFS=: read -r users m rounds sigma <<<"$c"
  for seed in $seeds; do
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
      "$python" "$ref" --users "$users" --clients-per-round "$m" --rounds "$rounds" \
      --sigma "$sigma" --seed "$seed" --out "$out/numpy_$seed.json" >/dev/null
    for path in $paths; do
      "$sim" bench --users "$users" --clients-per-round "$m" --rounds "$rounds" \
        --noise-multiplier "$sigma" --noise-path "$path" --seed "$seed" --json \
        >"$out/fedpref_${path}_$seed.json"
    done
  done
  "$python" - "$out" "$c" "$tolerance" "$seeds" $paths <<'PY' || status=1
import json, statistics, sys
out, config, tol, seeds, paths = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4].split(), sys.argv[5:]
np_ = [json.load(open(f"{out}/numpy_{s}.json"))["rmse_final"] for s in seeds]
m_np = statistics.mean(np_)
print(f"{config} (users:clients:rounds:sigma), seeds {' '.join(seeds)}")
print(f"  numpy      mean RMSE {m_np:.5f}  per seed {' '.join(f'{x:.5f}' for x in np_)}")
bad = False
for p in paths:
    fp = [json.load(open(f"{out}/fedpref_{p}_{s}.json"))["rmse"] for s in seeds]
    m = statistics.mean(fp)
    d = 100 * (m - m_np) / m_np
    ok = abs(d) <= tol
    bad |= not ok
    print(f"  {p:<10} mean RMSE {m:.5f}  per seed {' '.join(f'{x:.5f}' for x in fp)}  "
          f"difference {d:+.2f} % ({'within' if ok else 'OUTSIDE'} ±{tol:g} %)")
sys.exit(1 if bad else 0)
PY
done
exit $status
