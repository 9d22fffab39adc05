"""Reference values for fedpref's tree-aggregation sensitivity.

(1) brute force: every participation pattern S of a run, Σ over nodes |S ∩ node|², nodes
    enumerated from the definition (dyadic blocks inside each tree; completed trees padded
    to a power of two with empty leaves);
(2) the `tf_privacy` fields were added by running TensorFlow Privacy's
    `_max_tree_sensitivity_square_sum` on the same single-tree cases (see tree_sensitivity.md);
    that code is not reproduced here, and this script writes only the brute-force fields.
"""
import itertools, json, sys

def trees(rounds, restart_every, completion):
    if restart_every is None:
        return [(rounds, rounds)]
    out, left = [], rounds
    while left > 0:
        real = min(left, restart_every)
        leaves = 1 << (real - 1).bit_length() if (completion and real == restart_every) else real
        out.append((real, leaves)); left -= real
    return out

def nodes(rounds, restart_every, completion):
    """Each node as the set of real rounds (0-based, global) it covers."""
    out, start = [], 0
    for real, leaves in trees(rounds, restart_every, completion):
        size = 1
        while size <= leaves:
            for j in range(leaves // size):
                lo, hi = j * size, (j + 1) * size
                # a dyadic block is a node if it lies inside the tree's leaves, and the
                # tree is split into its largest power-of-two prefix and the rest.
                if fits(lo, hi, leaves):
                    cover = [start + r for r in range(lo, min(hi, real))]
                    out.append(cover)
            size *= 2
        start += real
    return out

def fits(lo, hi, leaves):
    """Whether [lo, hi) is a node of the tree over `leaves` leaves (power-of-two prefix split)."""
    base = 0
    n = leaves
    while n > 0:
        p = 1 << (n.bit_length() - 1)
        # the complete subtree [base, base + p) holds every dyadic block inside it
        if base <= lo and hi <= base + p:
            return True
        base += p; n -= p
    return False

def allowed(rounds, s, k):
    for size in range(0, k + 1):
        for combo in itertools.combinations(range(rounds), size):
            if all(b - a >= s for a, b in zip(combo, combo[1:])):
                yield combo

def brute(rounds, s, k, restart_every=None, completion=False):
    ns = [set(n) for n in nodes(rounds, restart_every, completion)]
    best = 0
    for S in allowed(rounds, s, k):
        v = sum(len(n.intersection(S)) ** 2 for n in ns)
        best = max(best, v)
    return best

cases = []
for T in range(1, 15):
    for s in range(1, 6):
        for k in range(1, 5):
            b = brute(T, s, k)
            cases.append({"schedule": "single", "rounds": T, "min_separation": s,
                          "max_participations": k, "brute_force": b})
for T in range(1, 15):
    for R in (2, 3, 4, 5, 6):
        for completion in (False, True):
            for s in (1, 2, 3, R):
                for k in (1, 2, 3):
                    b = brute(T, s, k, R, completion)
                    cases.append({"schedule": "restart", "restart_every": R, "completion": completion,
                                  "rounds": T, "min_separation": s, "max_participations": k,
                                  "brute_force": b})
json.dump({"small": cases}, sys.stdout)
