#!/usr/bin/env python3
"""A NumPy prototype of differentially private alternating least squares on MovieLens 1M.

Research only (not part of fedpref): measures whether a second-order private algorithm beats
the federated FedAdam rounds of `--preset movielens-1m-private` (docs/personalisation.md,
"Where the loss is"). Same split as `fedpref-sim run --validation`: per user, ratings sorted by
(time, item row), the latest round(0.2 n) held out as the test split; the latest round(0.2 n')
of the rest held out again as validation data (the default; `--test` evaluates on the test
split instead). Model and user step as fedpref's (k factors, weighted-λ ridge for the user's
vector and bias, the global offset fixed at --mu0).

One sweep is one DP release: every user computes its private part on the current item
parameters, then the per-item sufficient statistics of its ratings, upper triangle of
Σ x xᵀ and Σ x y with x = [u, 1] and y = r − μ − b_u; the whole vector is clipped to L2 norm C
and the server adds N(0, (σC)²) to every coordinate of the sum (user-level add/remove
neighbours, sensitivity C), then solves each item's ridge system (eigenvalues floored at the
ridge). σ for --eps at --delta over --iters releases from the zCDP bound of the Gaussian
mechanism (ρ = T / 2σ², ε = ρ + 2√(ρ ln 1/δ)), a little looser than fedpref's PLD accountant.
The noise comes from NumPy's PCG64: a prototype, not a release.

    python3 simulations/bench/dp_als.py --iters 2 --lam-i 2 --rho 0.1 --mu0 3.5
    python3 simulations/bench/dp_als.py --noclipnoise --iters 6 --lam-i 0.01 --rho 0.1 --mu0 3.5
"""
import argparse
import math
import os
import sys

import numpy as np


p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
p.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "ml-1m", "ratings.tsv"))
p.add_argument("--k", type=int, default=4)
p.add_argument("--iters", type=int, default=5)
p.add_argument("--clip", type=float, default=1.0)
p.add_argument("--eps", type=float, default=8.0)
p.add_argument("--delta", type=float, default=1e-6)
p.add_argument("--lam-u", type=float, default=0.2)   # per rating
p.add_argument("--beta", type=float, default=0.3)
p.add_argument("--lam-i", type=float, default=5.0)   # item ridge (absolute, in stat units)
p.add_argument("--nonprivate", action="store_true")
p.add_argument("--noclipnoise", action="store_true")
p.add_argument("--test", action="store_true")
p.add_argument("--seed", type=int, default=1)
p.add_argument("--ymax", type=float, default=0.0)
p.add_argument("--umax", type=float, default=0.0)
p.add_argument("--mu0", type=float, default=3.0)
p.add_argument("--rho", type=float, default=0.1)
p.add_argument("--rho-b", type=float, default=0.03)
p.add_argument("--damp", type=float, default=1.0)
a = p.parse_args()

if not os.path.exists(a.data):
    sys.exit(f"dp_als.py: {a.data} not found (MovieLens 1M as ratings.tsv: user, item, rating, time); set --data")
raw = np.loadtxt(a.data, dtype=np.int64)
uids, uidx = np.unique(raw[:, 0], return_inverse=True)
iids, iidx = np.unique(raw[:, 1], return_inverse=True)
r = raw[:, 2].astype(float); t = raw[:, 3]
nU, nI = len(uids), len(iids)
order = np.lexsort((iidx, t, uidx))
uidx, iidx, r, t = uidx[order], iidx[order], r[order], t[order]
starts = np.searchsorted(uidx, np.arange(nU + 1))

def tc(n):
    # round half away from zero, as fedpref's test_count
    x = int(math.floor(0.2 * n + 0.5))
    return max(x, 1) if n >= 2 else 0

tr_mask = np.zeros(len(r), bool); ev_mask = np.zeros(len(r), bool)
for u in range(nU):
    s, e = starts[u], starts[u + 1]
    n = e - s
    nt = tc(n)
    if a.test:
        tr_mask[s:e - nt] = True; ev_mask[e - nt:e] = True
    else:
        ntr = n - nt
        nv = tc(ntr)
        tr_mask[s:s + ntr - nv] = True; ev_mask[s + ntr - nv:s + ntr] = True

U, I, R = uidx[tr_mask], iidx[tr_mask], r[tr_mask]
EU, EI, ER = uidx[ev_mask], iidx[ev_mask], r[ev_mask]
nu = np.bincount(U, minlength=nU)
k = a.k
rng = np.random.default_rng(a.seed)
V = rng.normal(0, 0.1, (nI, k))
bi = np.zeros(nI)
mu = a.mu0

def fit_users(V, bi, mu):
    # ridge per user on X = [V_i, 1], y = r - mu - bi
    X = np.concatenate([V[I], np.ones((len(I), 1))], axis=1)
    y = R - mu - bi[I]
    d = k + 1
    G = np.zeros((nU, d, d)); h = np.zeros((nU, d))
    np.add.at(G, U, X[:, :, None] * X[:, None, :])
    np.add.at(h, U, X * y[:, None])
    lam = a.lam_u * nu
    reg = np.ones(d); reg[-1] = a.beta
    G = G + lam[:, None, None] * np.eye(d)[None] * reg[None, None, :]
    w = np.linalg.solve(G, h[:, :, None])[:, :, 0]
    return w[:, :k], w[:, k]

def rmse(V, bi, mu, Uf, Ub):
    pred = mu + bi[EI] + Ub[EU] + np.sum(V[EI] * Uf[EU], axis=1)
    pred = np.clip(pred, 1, 5)
    return math.sqrt(np.mean((pred - ER) ** 2))

def sigma_for(T, eps, delta):
    # zCDP: rho = T/(2 s^2); eps = rho + 2 sqrt(rho ln(1/delta))
    L = math.log(1 / delta)
    x = -math.sqrt(L) + math.sqrt(L + eps)
    rho = x * x
    return math.sqrt(T / (2 * rho))

sigma = sigma_for(a.iters, a.eps, a.delta)
private = not (a.nonprivate or a.noclipnoise)
print(f"k={k} iters={a.iters} C={a.clip} sigma={sigma:.3f} private={private}", file=sys.stderr)
d = k + 1
tri = np.triu_indices(d)
ntri = len(tri[0])
for it in range(a.iters):
    Uf, Ub = fit_users(V, bi, mu)
    uf = Uf.copy()
    if a.umax > 0:
        nrm = np.linalg.norm(uf, axis=1); f = np.minimum(1, a.umax / np.maximum(nrm, 1e-12)); uf *= f[:, None]
    Xt = np.concatenate([uf[U], np.ones((len(U), 1))], axis=1)  # per rating x~ = [u,1]
    y = R - mu - Ub[U]            # target for [V_i, b_i]
    if a.ymax > 0: y = np.clip(y, -a.ymax, a.ymax)
    outer = (Xt[:, :, None] * Xt[:, None, :])[:, tri[0], tri[1]]  # (n, ntri)
    xy = Xt * y[:, None]
    # per-user norms of the stats vector (items distinct per user)
    per_rating_sq = np.sum(outer ** 2, axis=1) + np.sum(xy ** 2, axis=1)
    user_sq = np.bincount(U, weights=per_rating_sq, minlength=nU)
    if private or a.noclipnoise:
        s = np.minimum(1.0, a.clip / np.sqrt(user_sq))
    else:
        s = np.ones(nU)
    sw = s[U]
    Gs = np.zeros((nI, ntri)); hs = np.zeros((nI, d))
    np.add.at(Gs, I, outer * sw[:, None]); np.add.at(hs, I, xy * sw[:, None])
    if private:
        Gs += rng.normal(0, sigma * a.clip, Gs.shape)
        hs += rng.normal(0, sigma * a.clip, hs.shape)
    G = np.zeros((nI, d, d)); G[:, tri[0], tri[1]] = Gs; G[:, tri[1], tri[0]] = Gs
    lam = a.lam_i * (a.clip if private or a.noclipnoise else 1.0)
    cnt = np.maximum(G[:, k, k], 0.0)
    regd = np.zeros((nI, d)); regd[:, :k] = (a.rho * cnt + lam)[:, None]; regd[:, k] = a.rho_b * cnt + lam
    G = G + regd[:, :, None] * np.eye(d)[None]
    # make PSD: eigen clip
    wv, Q = np.linalg.eigh(G)
    wv = np.maximum(wv, lam)
    sol = np.einsum('nij,nj->ni', Q, np.einsum('nji,nj->ni', Q, hs) / wv)
    newV, newb = sol[:, :k], sol[:, k]
    V = (1 - a.damp) * V + a.damp * newV; bi = (1 - a.damp) * bi + a.damp * newb
    Uf, Ub = fit_users(V, bi, mu)
    print(f"iter {it+1}: mu={mu:.4f} rmse={rmse(V, bi, mu, Uf, Ub):.4f}", file=sys.stderr)
print(f"final {rmse(V, bi, mu, Uf, Ub):.4f}")
