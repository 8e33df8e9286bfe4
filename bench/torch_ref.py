#!/usr/bin/env python3
"""The side-by-side reference for `realm bench`: realm-9m written in PyTorch.

Same maths as design.md section 7 and models/lib/nn.lua: byte embedding, pre-norm residual
blocks (mixer then SwiGLU MLP, each with its own RMSNorm), final RMSNorm, tied head,
cross-entropy; Mamba-3 SISO mixers with the chunked scan written in plain PyTorch ops;
sliding-window causal attention with RoPE. Trained the same way realm trains one step:
forward, loss, backward, global-norm clip (1.0), AdamW (fused). bf16 autocast, fp32 master
weights. Timed eager and under torch.compile, tokens/s printed as a RESULT line.

It is a benchmark, not a second implementation to check realm against: values are never
compared, only the parameter count (which must match `realm graph`) and the work per step.
Runs only on the GPU machine (bench/run.sh).
"""
import argparse
import math
import os
import re
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# realm-9m (models/realm-9m.lua)
VOCAB, D_MODEL, PATTERN, REPEATS = 256, 384, "MMMA", 2
M_N, M_P, M_EXPAND, M_CHUNK, ROPE_FRACTION = 64, 64, 2, 64, 0.5
A_HEADS, A_WINDOW, ROPE_BASE = 6, 1024, 10000.0
MLP_HIDDEN = 288
EPS = 1e-5
STD = 0.02


def rmsnorm(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


def rotate_pairs(x, ang):
    """Rotate pairs (2i, 2i+1), i < ang.shape[-1], by ang; dims >= 2*NA pass through."""
    na = ang.shape[-1]
    xr = x[..., : 2 * na].unflatten(-1, (na, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    c, s = torch.cos(ang), torch.sin(ang)
    y = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return torch.cat((y, x[..., 2 * na:]), dim=-1)


def _f32(t):
    """At least fp32 (float64 stays float64, for the self-check)."""
    return t if t.dtype == torch.float64 else t.float()


def segsum_exp(a):
    """exp of the segment sums of a [..., T]: out[..., i, j] = exp(sum a[j+1..i]) for j <= i,
    0 above the diagonal (Mamba-2's ssd_minimal form). Masked before exp."""
    T = a.shape[-1]
    cs = torch.cumsum(a, dim=-1)
    diff = cs[..., :, None] - cs[..., None, :]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return torch.exp(diff.masked_fill(~mask, float("-inf")))


class Mamba3(nn.Module):
    """Mamba-3 SISO mixer, chunked training form (design.md section 7)."""

    def __init__(self, d, resid_std):
        super().__init__()
        self.di = M_EXPAND * d
        self.H, self.P, self.N = self.di // M_P, M_P, M_N
        self.NA = int(M_N * ROPE_FRACTION / 2)
        n_in = 2 * self.di + 2 * self.N + 3 * self.H + self.NA
        self.in_proj = nn.Linear(d, n_in, bias=False)
        self.out_proj = nn.Linear(self.di, d, bias=False)
        nn.init.normal_(self.in_proj.weight, std=STD)
        nn.init.normal_(self.out_proj.weight, std=resid_std)
        self.B_norm = nn.Parameter(torch.ones(self.N))
        self.C_norm = nn.Parameter(torch.ones(self.N))
        dt = torch.exp(torch.rand(self.H) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))   # softplus^-1(dt)
        self.B_bias = nn.Parameter(torch.ones(self.H, self.N))
        self.C_bias = nn.Parameter(torch.ones(self.H, self.N))
        self.D = nn.Parameter(torch.ones(self.H))

    def forward(self, x):
        Bsz, S, _ = x.shape
        H, P, N, NA, Q = self.H, self.P, self.N, self.NA, M_CHUNK
        proj = self.in_proj(x)
        z, xv, Bm, Cm, dd_dt, dd_A, trap, ang = torch.split(
            proj, [self.di, self.di, N, N, H, H, H, NA], dim=-1)
        v = xv.unflatten(-1, (H, P))
        # The scalar paths stay fp32 (design: cs, ADT, DT, Theta in fp32).
        with torch.autocast("cuda", enabled=False):
            dd_dt, dd_A, trap, ang = (_f32(t) for t in (dd_dt, dd_A, trap, ang))
            DT = F.softplus(dd_dt + self.dt_bias)                      # threshold 20, as realm
            u_neg = torch.clamp(dd_A, max=0.0)                         # only the taken branch
            f = torch.where(dd_A >= 0, 1.0 + dd_A, 1.0 / (1.0 - u_neg))
            A = -torch.clamp(f, min=1e-4)
            ADT = A * DT                                               # [B,S,H]
            lam = torch.sigmoid(trap)
            theta = math.pi * torch.tanh(ang)                          # [B,S,NA], shared by heads
            Th = torch.cumsum(DT[..., None] * theta[:, :, None, :], dim=1)   # [B,S,H,NA]
            gamma = lam * DT
            nxt = F.pad(((1.0 - lam) * DT)[:, 1:], (0, 0, 0, 1))       # 0 at the sequence end
            scale = gamma + nxt
        Bn = rmsnorm(Bm, self.B_norm)
        Cn = rmsnorm(Cm, self.C_norm)
        K = Bn[:, :, None, :] + self.B_bias                            # [B,S,H,N]
        Qm = Cn[:, :, None, :] + self.C_bias
        Kr = rotate_pairs(_f32(K), Th)
        Qr = rotate_pairs(_f32(Qm), Th)
        diag = (gamma * (Qm * K).sum(-1) + self.D)[..., None] * v      # [B,S,H,P]

        pad = (-S) % Q
        if pad:  # zero tail: ADT 0 and scale 0 contribute nothing
            Kr, Qr, v_c = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (Kr, Qr, v))
            ADT_c, scale_c = (F.pad(t, (0, 0, 0, pad)) for t in (ADT, scale))
        else:
            v_c, ADT_c, scale_c = v, ADT, scale
        nC = (S + pad) // Q
        Kr = Kr.reshape(Bsz, nC, Q, H, N)
        Qr = Qr.reshape(Bsz, nC, Q, H, N)
        v_c = v_c.reshape(Bsz, nC, Q, H, P)
        a = ADT_c.reshape(Bsz, nC, Q, H).permute(0, 3, 1, 2)          # [B,H,nC,Q]
        sc = scale_c.reshape(Bsz, nC, Q, H)
        cs = torch.cumsum(a, dim=-1)                                   # chunk-local
        # intra-chunk: (Qr_t . Kr_s) exp(cs_t - cs_s) scale_s v_s, s < t
        L = segsum_exp(a)                                              # [B,H,nC,Q,Q], s <= t
        L = L * (1 - torch.eye(Q, device=x.device))                    # strictly causal
        scores = torch.einsum("bclhn,bcshn->bhcls", Qr, Kr) * L * sc.permute(0, 3, 1, 2)[:, :, :, None, :]
        y = torch.einsum("bhcls,bcshp->bclhp", scores.to(v_c.dtype), v_c)
        # chunk states and the recurrence between chunks
        decay_out = torch.exp(cs[..., -1:] - cs)                       # [B,H,nC,Q]
        wk = Kr * (decay_out.permute(0, 2, 3, 1) * sc)[..., None]      # [B,nC,Q,H,N]
        states = torch.einsum("bcshn,bcshp->bchpn", wk.to(v_c.dtype), v_c)
        states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)     # [B,nC+1,H,P,N]
        chunk_decay = segsum_exp(F.pad(cs[..., -1], (1, 0)))          # [B,H,nC+1,nC+1]
        entering = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay.to(states.dtype), states)[:, :-1]
        y = y + torch.einsum("bclhn,bchpn->bclhp", (Qr * torch.exp(cs).permute(0, 2, 3, 1)[..., None]).to(entering.dtype),
                             entering)
        y = y.reshape(Bsz, nC * Q, H, P)[:, :S] + diag
        out = y.reshape(Bsz, S, self.di) * F.silu(z)
        return self.out_proj(out)


def mamba3_recurrent(m, x):
    """The decode form of design.md section 7, token by token (float64 check of the chunked
    code above; the benchmark never calls it)."""
    Bsz, S, _ = x.shape
    H, P, N, NA = m.H, m.P, m.N, m.NA
    z, xv, Bm, Cm, dd_dt, dd_A, trap, ang = torch.split(m.in_proj(x), [m.di, m.di, N, N, H, H, H, NA], dim=-1)
    v = xv.unflatten(-1, (H, P))
    DT = F.softplus(dd_dt + m.dt_bias)
    A = -torch.clamp(torch.where(dd_A >= 0, 1.0 + dd_A, 1.0 / (1.0 - torch.clamp(dd_A, max=0.0))), min=1e-4)
    lam = torch.sigmoid(trap)
    theta = math.pi * torch.tanh(ang)
    K = rmsnorm(Bm, m.B_norm)[:, :, None, :] + m.B_bias
    Q = rmsnorm(Cm, m.C_norm)[:, :, None, :] + m.C_bias
    St = torch.zeros(Bsz, H, P, N, dtype=x.dtype, device=x.device)
    Th = torch.zeros(Bsz, H, NA, dtype=x.dtype, device=x.device)
    kp = torch.zeros(Bsz, H, N, dtype=x.dtype, device=x.device)
    vp = torch.zeros(Bsz, H, P, dtype=x.dtype, device=x.device)
    ys = []
    for t in range(S):
        Th = torch.remainder(Th + DT[:, t, :, None] * theta[:, t, None, :], 2 * math.pi)
        Kr, Qr = rotate_pairs(K[:, t], Th), rotate_pairs(Q[:, t], Th)
        al = torch.exp(A[:, t] * DT[:, t])
        be = (1 - lam[:, t]) * DT[:, t] * al
        ga = lam[:, t] * DT[:, t]
        St = (al[..., None, None] * St + be[..., None, None] * vp[..., :, None] * kp[..., None, :]
              + ga[..., None, None] * v[:, t, :, :, None] * Kr[..., None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", St, Qr) + m.D[:, None] * v[:, t])
        kp, vp = Kr, v[:, t]
    y = torch.stack(ys, dim=1).reshape(Bsz, S, m.di) * F.silu(z)
    return m.out_proj(y)


def selfcheck(dev):
    """The chunked scan against the recurrence in float64, S not a multiple of the chunk."""
    torch.manual_seed(3)
    m = Mamba3(D_MODEL, STD).to(dev).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(2, 150, D_MODEL, dtype=torch.float64, device=dev)
        a, b = m(x), mamba3_recurrent(m, x)
    err = (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()
    print(f"selfcheck: chunked Mamba-3 scan vs recurrence (float64, S=150, chunk {M_CHUNK}): rel err {err:.3g}")
    assert err < 1e-9, err


def rope_tables(S, Dh, device):
    inv = ROPE_BASE ** (-torch.arange(0, Dh, 2, device=device, dtype=torch.float32) / Dh)
    ang = torch.arange(S, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cos(ang), torch.sin(ang)                              # [S, Dh/2]


def rope(x, cos, sin):
    """x [B,S,H,Dh], pairs (2i, 2i+1) as realm."""
    xr = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d, resid_std, use_flex):
        super().__init__()
        self.H, self.Dh = A_HEADS, d // A_HEADS
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        nn.init.normal_(self.qkv.weight, std=STD)
        nn.init.normal_(self.o_proj.weight, std=resid_std)
        self.use_flex = use_flex
        self.block_mask = None
        self.mask = None
        self.causal = False

    def forward(self, x, cos, sin):
        Bsz, S, d = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.H, self.Dh)).unbind(2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))               # [B,H,S,Dh]
        if self.use_flex:
            o = self.flex(q, k, v, block_mask=self.block_mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal)
        return self.o_proj(o.transpose(1, 2).reshape(Bsz, S, d))


class SwiGLU(nn.Module):
    def __init__(self, d, resid_std):
        super().__init__()
        self.w_in = nn.Linear(d, 2 * MLP_HIDDEN, bias=False)
        self.w_out = nn.Linear(MLP_HIDDEN, d, bias=False)
        nn.init.normal_(self.w_in.weight, std=STD)
        nn.init.normal_(self.w_out.weight, std=resid_std)

    def forward(self, x):
        a, b = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, kind, d, resid_std, use_flex):
        super().__init__()
        self.kind = kind
        self.norm = nn.Parameter(torch.ones(d))
        self.mixer = Mamba3(d, resid_std) if kind == "M" else Attention(d, resid_std, use_flex)
        self.mlp_norm = nn.Parameter(torch.ones(d))
        self.mlp = SwiGLU(d, resid_std)

    def forward(self, x, cos, sin):
        h = rmsnorm(x, self.norm)
        x = x + (self.mixer(h) if self.kind == "M" else self.mixer(h, cos, sin))
        return x + self.mlp(rmsnorm(x, self.mlp_norm))


class Realm9M(nn.Module):
    def __init__(self, use_flex):
        super().__init__()
        kinds = PATTERN * REPEATS
        resid_std = STD / math.sqrt(2 * len(kinds))
        self.embed = nn.Parameter(torch.randn(VOCAB, D_MODEL) * STD)
        self.layers = nn.ModuleList(Block(k, D_MODEL, resid_std, use_flex) for k in kinds)
        self.final_norm = nn.Parameter(torch.ones(D_MODEL))

    def forward(self, tokens, targets, cos, sin):
        x = F.embedding(tokens, self.embed)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = rmsnorm(x, self.final_norm) @ self.embed.t()          # tied head
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))


# ---- decode: the recurrent step in eager PyTorch (the side-by-side row for realm generate) ----

def mamba3_step(m, x, st):
    """One byte through a Mamba-3 mixer: x [B, d]; st = (S [B,H,P,N], Theta, Kr_prev, v_prev)."""
    H, P, N, NA = m.H, m.P, m.N, m.NA
    S, Th, kp, vp = st
    z, xv, Bm, Cm, dd_dt, dd_A, trap, ang = torch.split(m.in_proj(x), [m.di, m.di, N, N, H, H, H, NA], dim=-1)
    v = xv.unflatten(-1, (H, P)).float()
    dd_dt, dd_A, trap, ang = (t.float() for t in (dd_dt, dd_A, trap, ang))
    DT = F.softplus(dd_dt + m.dt_bias)
    A = -torch.clamp(torch.where(dd_A >= 0, 1.0 + dd_A, 1.0 / (1.0 - torch.clamp(dd_A, max=0.0))), min=1e-4)
    lam = torch.sigmoid(trap)
    Th = torch.remainder(Th + DT[..., None] * (math.pi * torch.tanh(ang))[:, None, :], 2 * math.pi)
    K = rmsnorm(Bm.float(), m.B_norm)[:, None, :] + m.B_bias
    Q = rmsnorm(Cm.float(), m.C_norm)[:, None, :] + m.C_bias
    Kr, Qr = rotate_pairs(K, Th), rotate_pairs(Q, Th)
    al = torch.exp(A * DT)
    be, ga = (1 - lam) * DT * al, lam * DT
    S = (al[..., None, None] * S + be[..., None, None] * vp[..., :, None] * kp[..., None, :]
         + ga[..., None, None] * v[..., :, None] * Kr[..., None, :])
    y = torch.einsum("bhpn,bhn->bhp", S, Qr) + m.D[:, None] * v
    out = m.out_proj((y.reshape(x.shape[0], m.di) * F.silu(z.float())).to(x.dtype))
    return out, (S, Th, Kr, v)


def attention_step(a, x, pos, cache):
    """One byte through sliding-window attention with a ring buffer of the last A_WINDOW keys
    and values: x [B, d], cache = (k [B,H,W,Dh], v [B,H,W,Dh])."""
    Bsz, d = x.shape
    q, k, v = a.qkv(x).unflatten(-1, (3, a.H, a.Dh)).unbind(1)        # [B,H,Dh]
    inv = ROPE_BASE ** (-torch.arange(0, a.Dh, 2, device=x.device, dtype=torch.float32) / a.Dh)
    ang = pos * inv
    c, s = torch.cos(ang), torch.sin(ang)

    def rot(t):
        tr = t.float().unflatten(-1, (-1, 2))
        return torch.stack((tr[..., 0] * c - tr[..., 1] * s, tr[..., 0] * s + tr[..., 1] * c), -1).flatten(-2)
    kc, vc = cache
    slot = pos % A_WINDOW
    kc[:, :, slot] = rot(k).to(kc.dtype)
    vc[:, :, slot] = v.to(vc.dtype)
    n = min(pos + 1, A_WINDOW)
    sc = torch.einsum("bhd,bhwd->bhw", rot(q), kc[:, :, :n].float()) / math.sqrt(a.Dh)
    o = torch.einsum("bhw,bhwd->bhd", torch.softmax(sc, -1), vc[:, :, :n].float())
    return a.o_proj(o.reshape(Bsz, d).to(x.dtype)), (kc, vc)


def decode_bench(model, B, positions, steps, dev):
    """ms per decode step at each position, eager, batch B (same maths as realm's step graph)."""
    states = []
    for layer in model.layers:
        if layer.kind == "M":
            m = layer.mixer
            states.append((torch.zeros(B, m.H, m.P, m.N, device=dev), torch.zeros(B, m.H, m.NA, device=dev),
                           torch.zeros(B, m.H, m.N, device=dev), torch.zeros(B, m.H, m.P, device=dev)))
        else:
            a = layer.mixer
            states.append((torch.zeros(B, a.H, A_WINDOW, a.Dh, device=dev), torch.zeros(B, a.H, A_WINDOW, a.Dh, device=dev)))
    tok = torch.randint(0, VOCAB, (B,), device=dev)
    rows = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        def one(pos):
            nonlocal tok
            x = F.embedding(tok, model.embed)
            for i, layer in enumerate(model.layers):
                h = rmsnorm(x, layer.norm)
                if layer.kind == "M":
                    h, states[i] = mamba3_step(layer.mixer, h, states[i])
                else:
                    h, states[i] = attention_step(layer.mixer, h, pos, states[i])
                x = x + h
                x = x + layer.mlp(rmsnorm(x, layer.mlp_norm))
            logits = (rmsnorm(x, model.final_norm) @ model.embed.t()).float()
            tok = torch.argmax(logits, -1)                             # the host needs the byte
            return int(tok[0])
        for p in positions:
            for k in range(3):
                one(p + k)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for k in range(steps):
                one(p + 3 + k)
            torch.cuda.synchronize()
            ms = 1000 * (time.perf_counter() - t0) / steps
            rows.append((p, ms))
            print(f"torch eager decode: batch {B}, position {p}: {ms:.3f} ms/step, {B * 1000 / ms:.0f} bytes/s")
            print(f"RESULT torch_decode B={B} pos={p} ms_step={ms:.4f}")
    return rows


def realm_param_count(realm_bin):
    out = subprocess.run([realm_bin, "graph", "models/realm-9m.lua"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"^parameters\s+(\d+)", out, re.M)
    if not m:
        sys.exit(f"torch_ref: no parameter count in `realm graph` output:\n{out}")
    return int(m.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--mode", choices=["eager", "compile", "decode"], default="eager")
    ap.add_argument("--positions", default="1024,16384,262144", help="decode mode: positions to time")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--realm-bin", default="build/realm")
    ap.add_argument("--profile", action="store_true", help="after timing, list the kernels of one step (torch.profiler)")
    ap.add_argument("--selfcheck", action="store_true", help="check the chunked scan against the recurrence, then exit")
    a = ap.parse_args()

    dev = torch.device("cuda")
    if a.selfcheck:
        selfcheck(dev)
        return
    torch.manual_seed(0)
    flex = None
    if a.mode == "compile":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = torch.compile(flex_attention)
        except ImportError:
            flex = None
    model = Realm9M(use_flex=flex is not None).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    want = realm_param_count(a.realm_bin)
    assert abs(n_params - want) <= 0.005 * want, f"parameters: torch {n_params}, realm {want}"
    B, S = a.batch, a.seq
    if a.mode == "decode":
        decode_bench(model, B, [int(p) for p in a.positions.split(",")], a.steps, dev)
        return
    cos, sin = rope_tables(S, D_MODEL // A_HEADS, dev)
    attn_kind = "sdpa+mask"
    for layer in model.layers:
        if layer.kind != "A":
            continue
        if flex is not None:
            def sliding(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (q_idx - kv_idx < A_WINDOW)
            layer.mixer.flex = flex
            layer.mixer.block_mask = create_block_mask(sliding, None, None, S, S, device=dev)
            attn_kind = "flex"
        elif S <= A_WINDOW:
            layer.mixer.causal = True                                  # the window covers S
            attn_kind = "sdpa causal"
        else:
            i = torch.arange(S, device=dev)
            layer.mixer.mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < A_WINDOW)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    # compile: the model (forward, and through AOTAutograd its backward); clipping and the
    # fused AdamW stay eager, as they are single multi-tensor kernels already.
    fwd = torch.compile(model) if a.mode == "compile" else model

    def step(tokens, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(tokens, targets, cos, sin)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    fwd_bwd = step
    g = torch.Generator(device=dev).manual_seed(1)

    def batch():
        r = torch.randint(0, VOCAB, (B, S + 1), device=dev, generator=g)
        return r[:, :-1].contiguous(), r[:, 1:].contiguous()

    t0 = time.time()
    losses = []
    for _ in range(a.warmup):
        losses.append(float(fwd_bwd(*batch()).detach()))
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    ms = []
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(a.steps):
        tok, tgt = batch()
        e0.record()
        loss = fwd_bwd(tok, tgt)
        e1.record()
        e1.synchronize()
        ms.append(e0.elapsed_time(e1))
        losses.append(float(loss.detach()))
    ms.sort()
    med = ms[len(ms) // 2] if len(ms) % 2 else 0.5 * (ms[len(ms) // 2 - 1] + ms[len(ms) // 2])
    tps = B * S / (med * 1e-3)
    peak = torch.cuda.max_memory_allocated() / 2**20
    print(f"torch {torch.__version__} {a.mode} ({attn_kind}) on {torch.cuda.get_device_name()}: "
          f"batch {B} x seq {S}, {n_params} parameters (realm {want})")
    print(f"  warm-up {a.warmup} steps {warm_s:.1f} s (compile included); loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"  ms/step median {med:.3f} (min {ms[0]:.3f}, max {ms[-1]:.3f}); {tps:.0f} tokens/s; peak memory {peak:.0f} MiB")
    print(f"RESULT torch_{a.mode} B={B} S={S} tok_s={tps:.1f} ms_step={med:.4f} attn={attn_kind} peak_mib={peak:.0f}")
    if a.profile:
        profile_step(fwd_bwd, batch)


def profile_step(fwd_bwd, batch):
    """Where PyTorch's step spends its time: CUDA kernels of one step, slowest first."""
    from torch.profiler import ProfilerActivity, profile
    tok, tgt = batch()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd_bwd(tok, tgt)
        torch.cuda.synchronize()
    rows = [(e.device_time_total / 1e3, e.count, e.key) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"kernels of one step: {total:.2f} ms of device time")
    for ms_, n, name in rows[:40]:
        print(f"  {ms_:8.3f} ms {n:5d}x  {name[:110]}")


if __name__ == "__main__":
    main()
