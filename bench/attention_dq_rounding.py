#!/usr/bin/env python3
"""Why the bf16 attention dq check feeds inputs on the bf16 grid (tests/kernelcheck.c).

An fp64 emulation of the rounding points of realm's tensor-core dq kernel (attention_bwd_dq_tc:
Q, K, V, dO rounded to bf16; S, dP accumulated in fp32; D = dO . O in fp32; dS rounded to bf16
for dQ = dS K), one head, S = 80 causal, head dim 64 (the realm-9m check's sizes). It prints the
normwise error of the emulated kernel against the fp64 result:
  1. of the unrounded inputs (what the check measured before): 1-4% when V shares a large
     common part across positions or the softmax rows are sharp; the check's bound is 1%;
  2. of inputs already on the bf16 grid (what it measures now): about 0.2% in every case.
Needs numpy only; not part of the product or of CI.   python3 bench/attention_dq_rounding.py
"""
import numpy as np

S, D = 80, 64
rng = np.random.default_rng(0)


def bf16(x):
    b = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32).astype(np.float64)


def dq_error(sq, sv, common, on_grid):
    q, k = rng.normal(0, sq, (S, D)), rng.normal(0, sq, (S, D))
    v = rng.normal(0, sv, (S, D)) + common * rng.normal(0, 1, (1, D))
    do = rng.normal(0, 1, (S, D))
    if on_grid:
        q, k, v, do = bf16(q), bf16(k), bf16(v), bf16(do)
    sc, mask = 1 / np.sqrt(D), np.tril(np.ones((S, S), bool))
    s = q @ k.T * sc
    s[~mask] = -np.inf
    m = s.max(1, keepdims=True)
    p = np.exp(s - m)
    l = p.sum(1, keepdims=True)
    p /= l
    lse, o = (m + np.log(l))[:, 0], p @ v
    dq = (p * (do @ v.T - (do * o).sum(1)[:, None]) * sc) @ k
    qb, kb, vb, db = bf16(q), bf16(k), bf16(v), bf16(do)
    s2 = qb @ kb.T * sc
    s2[~mask] = -np.inf
    p2 = np.exp(np.float32(s2 - lse[:, None]))
    p2[~mask] = 0
    d2 = (np.float32(do) * np.float32(o)).sum(1)
    dq2 = bf16(p2 * (db @ vb.T - d2[:, None]) * sc) @ kb
    return np.linalg.norm(dq2 - dq) / np.linalg.norm(dq)


print(f"{'q,k std':>8} {'v std':>6} {'common':>7} {'inputs':>10} {'median':>8} {'max':>8}")
for sq, sv, c in [(1, 1, 0), (1, 1, 3), (1, 0.3, 3), (2, 1, 0)]:
    for grid in (False, True):
        e = [dq_error(sq, sv, c, grid) for _ in range(30)]
        print(f"{sq:>8} {sv:>6} {c:>7} {'bf16 grid' if grid else 'fp32':>10} {np.median(e):8.4f} {max(e):8.4f}")
