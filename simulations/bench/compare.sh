#!/usr/bin/env bash
# Runs the standard workload (../shared/bench/WORKLOAD.md) through `fedpref-sim bench` and the
# plain NumPy reference back to back on this machine, and prints one Markdown table row per
# fedpref run with the ratio to the NumPy run of the same workload made in this run.
#
# Usage: simulations/bench/compare.sh [CONFIG ...]
#   CONFIG is USERS:CLIENTS_PER_ROUND:ROUNDS:SIGMA, e.g. 1000:100:20:1 (the default set is
#   the standard workload at U = 10^3 and 10^4, σ = 1 and 0).
# Environment:
#   FEDPREF_SIM   the fedpref-sim binary      [target/release/fedpref-sim]
#   NUMPY_REF     the NumPy reference script  [../shared/bench/numpy_ref.py]
#   PYTHON        a Python with NumPy         [python3]
#   PATHS         noise paths to run          ["aggregate per-device"]
#   THREADS       thread counts to run        ["1 2"]
#   REPEAT        runs of the training loop per side, in one process each, the fastest
#                 kept: NumPy's and fedpref-sim bench's --repeat  [3; 1 when U ≥ 10^5]
#   OUT           where the JSON results go   [a new temporary directory]
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
sim=${FEDPREF_SIM:-$repo/target/release/fedpref-sim}
ref=${NUMPY_REF:-$repo/../shared/bench/numpy_ref.py}
python=${PYTHON:-python3}
paths=${PATHS:-aggregate per-device}
threads=${THREADS:-1 2}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"

[ -x "$sim" ] || { echo "compare.sh: $sim not found: cargo build --release -p fedpref-simulations" >&2; exit 2; }
[ -f "$ref" ] || { echo "compare.sh: the NumPy reference $ref not found (set NUMPY_REF)" >&2; exit 2; }
"$python" -c 'import numpy' 2>/dev/null || { echo "compare.sh: $python has no NumPy (set PYTHON)" >&2; exit 2; }

configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(1000:100:20:1 1000:100:20:0 10000:100:20:1 10000:100:20:0)

echo "| U | m × R | σ | path | threads | fedpref updates/s | NumPy updates/s (same run) | ratio | s / round | fedpref RMSE | NumPy RMSE | RMSE Δ | peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for c in "${configs[@]}"; do
  IFS=: read -r users m rounds sigma <<<"$c"
  repeat=${REPEAT:-$([ "$users" -ge 100000 ] && echo 1 || echo 3)}
  tag="u${users}_m${m}_r${rounds}_s${sigma}"
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    "$python" "$ref" --users "$users" --clients-per-round "$m" --rounds "$rounds" \
    --sigma "$sigma" --repeat "$repeat" --out "$out/numpy_$tag.json" >/dev/null
  for path in $paths; do
    for t in $threads; do
      # The fastest of $repeat runs of the training loop in one process, as NumPy's --repeat.
      "$sim" bench --users "$users" --clients-per-round "$m" --rounds "$rounds" \
        --noise-multiplier "$sigma" --noise-path "$path" --threads "$t" --repeat "$repeat" \
        --json >"$out/fedpref_${tag}_${path}_t$t.json"
      "$python" - "$out/numpy_$tag.json" "$out/fedpref_${tag}_${path}_t$t.json" <<'PY'
import json, sys
np_ = json.load(open(sys.argv[1]))
fp = json.load(open(sys.argv[2]))
ratio = fp["client_updates_per_s"] / np_["client_updates_per_s"]
d = (fp["rmse"] - np_["rmse_final"]) / np_["rmse_final"]
print(f"| {fp['users']:,} | {fp['clients_per_round']:,} × {fp['rounds']} | {fp['noise_multiplier']:g} "
      f"| {fp['noise_path']} | {fp['threads']} | {fp['client_updates_per_s']:,.0f} "
      f"| {np_['client_updates_per_s']:,.0f} | {ratio:,.1f}× "
      f"| {fp['rounds_wall_s'] / fp['rounds']:.3f} | {fp['rmse']:.5f} | {np_['rmse_final']:.5f} "
      f"| {100 * d:+.2f} % | {(fp['peak_rss_bytes'] or 0) / 2**20:,.0f} |")
PY
    done
  done
done
echo
echo "JSON results: $out"
