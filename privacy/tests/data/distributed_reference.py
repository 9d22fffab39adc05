"""Reference values for the distributed discrete Gaussian accountant.

Writes distributed_reference.json beside this file. Needs only mpmath (1.3.0 was used):
    python3 distributed_reference.py

Two independent computations, neither of which reads the Rust code:

1. `proposition_14`: the RDP bound of Kairouz, Liu, Steinke 2021 (ICML), Prop. 14 with
   Theorem 1's tau, and the conditional-rounding L2 bound of their Prop. 22, computed in
   60-digit arithmetic from the paper's formulas, for a set of configurations, at several
   orders; then epsilon after T rounds by the improved RDP -> (eps, delta) conversion
   (Canonne, Kamath, Steinke 2020, Prop. 12) minimised over the 156-order grid of Google's
   dp-accounting. The formula transcription was compared with the public
   google-research/federated `distributed_dp/accounting_utils.py` (`compute_rdp_dgaussian`,
   `rounded_l2_norm_bound`), which implements the same proposition.

2. `exact_divergence`: the exact Renyi divergence D_alpha(Z + shift || Z) where Z is the sum
   of m independent discrete Gaussians N_Z(0, s2), computed by convolving the probability mass
   functions (truncated where the mass is below e^-1800) in 60-digit arithmetic, maximised
   over integer shifts 1..floor(Delta2) for d = 1. The bound must lie above it.
"""

import json
import os

import mpmath as mp

mp.mp.dps = 60


def l2_bound(c, d, beta):
    always = c + mp.sqrt(d)
    if beta == 0:
        return always
    cond = mp.sqrt(c**2 + mp.mpf(d) / 4 + mp.sqrt(2 * mp.log(1 / mp.mpf(beta))) * (c + mp.sqrt(d) / 2))
    return min(always, cond)


def tau(s2, m):
    return 10 * mp.fsum(mp.exp(-2 * mp.pi**2 * s2 * mp.mpf(k) / (k + 1)) for k in range(1, m))


def proposition_14(clip, gamma, d, beta, s2, m, alpha):
    c = mp.mpf(clip) / mp.mpf(gamma)
    l2 = l2_bound(c, d, beta)
    l1 = min(mp.sqrt(d) * l2, l2**2)
    sigma = mp.sqrt(m * mp.mpf(s2))
    t = tau(s2, m)
    a = mp.mpf(alpha)
    l2s, l1s = l2 / sigma, l1 / sigma
    return min(
        a / 2 * l2s**2 + t * d,
        a / 2 * (l2s**2 + 2 * l1s * t + t**2 * d),
        a / 2 * (l2s + mp.sqrt(d) * t) ** 2,
    ), l2, t


def default_orders():
    return [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def epsilon(rdp_of, rounds, delta):
    best = mp.inf
    for a in default_orders():
        r = rounds * rdp_of(a)
        if a <= 1.01:
            continue
        a = mp.mpf(a)
        e = r + mp.log1p(-1 / a) - (mp.log(delta) + mp.log(a)) / (a - 1)
        best = min(best, e)
    return max(best, 0)


def dgauss_pmf(s2, half_width):
    w = [mp.exp(-mp.mpf(x) ** 2 / (2 * s2)) for x in range(-half_width, half_width + 1)]
    total = mp.fsum(w)
    return [v / total for v in w]


def convolve(p, q):
    out = [mp.mpf(0)] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        if a == 0:
            continue
        for j, b in enumerate(q):
            out[i + j] += a * b
    return out


def exact_divergence(s2, m, shift, alpha):
    half = int(20 * mp.sqrt(s2)) + 40
    base = dgauss_pmf(mp.mpf(s2), half)
    pmf = base
    for _ in range(m - 1):
        pmf = convolve(pmf, base)
    # pmf[i] is P[Z = i - m*half]
    total = mp.mpf(0)
    for i in range(shift, len(pmf)):
        p_shifted = pmf[i - shift]  # P[Z + shift = z]
        p = pmf[i]
        total += p_shifted**alpha * p ** (1 - alpha)
    return mp.log(total) / (alpha - 1)


def main():
    configs = [
        dict(name="large model, fine lattice", clip=1.0, gamma=1 / 1024, d=16384, beta=0.0, s2=10000, m=50),
        dict(name="large model, conditional rounding", clip=1.0, gamma=1 / 1024, d=16384, beta=float(mp.exp(-0.5)), s2=10000, m=50),
        dict(name="coarse lattice, tau visible", clip=1.0, gamma=0.5, d=4, beta=0.0, s2=1, m=10),
        dict(name="tau times d dominates", clip=0.1, gamma=1e-3, d=1000, beta=float(mp.exp(-0.5)), s2=2, m=3),
        dict(name="many devices, unit variance", clip=1.0, gamma=0.25, d=100, beta=0.1, s2=1, m=200),
        dict(name="calibrated-looking", clip=0.5, gamma=2 ** -12, d=4096, beta=float(mp.exp(-0.5)), s2=123457, m=99),
    ]
    orders = [1.5, 2.0, 3.0, 10.0, 64.0, 256.0]
    vectors = []
    for cfg in configs:
        args = (cfg["clip"], cfg["gamma"], cfg["d"], cfg["beta"], cfg["s2"], cfg["m"])
        rdp = []
        for a in orders:
            r, l2, t = proposition_14(*args, a)
            rdp.append(float(r))
        eps = {}
        for rounds in (1, 100):
            e = epsilon(lambda a: proposition_14(*args, a)[0], rounds, mp.mpf("1e-5"))
            eps[str(rounds)] = float(e)
        vectors.append(dict(cfg, orders=orders, rdp=rdp, l2_sensitivity=float(l2), tau=float(t),
                            epsilon_delta_1e_5=eps))
    exact = []
    for s2 in (1, 2, 4):
        for m in (1, 2, 3, 5):
            # d = 1, beta = 0, clip/gamma = 2: Delta2 = 3, integer shifts up to 3.
            for alpha in (2, 3, 5, 8):
                worst = max(exact_divergence(s2, m, shift, alpha) for shift in (1, 2, 3))
                bound, _, t = proposition_14(2.0, 1.0, 1, 0.0, s2, m, alpha)
                exact.append(dict(s2=s2, m=m, alpha=alpha, clip=2.0, gamma=1.0, d=1, beta=0.0,
                                  exact_rdp=float(worst), bound=float(bound), tau=float(t)))
    out = dict(
        description="Distributed discrete Gaussian RDP (KLS21 Prop. 14) and exact divergences; see distributed_PROVENANCE.md",
        generator="distributed_reference.py, mpmath " + mp.__version__ + ", 60 digits",
        proposition_14=vectors,
        exact_divergence=exact,
    )
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_reference.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
