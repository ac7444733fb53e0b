"""FlashAttention-2 in Triton: forward, backward, and a split-KV decode path.

Follows Dao 2023 ("FlashAttention-2") and Triton's fused-attention tutorial, with what the
tutorial leaves out: any sequence lengths (masked tails, no multiple-of-128 rule), grouped-query
attention without repeating k/v, causal and full attention, fp16 / bf16 / fp32 inputs with fp32
accumulation, and a decode kernel for a few queries against a long KV cache.

Shapes: q (B, Hq, T, D); k, v (B, Hkv, S, D); Hq % Hkv == 0, query head h reads kv head
h // (Hq / Hkv). The T queries are the LAST T positions of the S keys (KV-cache convention), so
causal masking is bottom-right aligned: query i sees keys j <= S - T + i.

Forward: one program per (query block, batch*head); keys are visited in two stages, first the
blocks every query row sees entirely (no masking), then the diagonal / tail blocks (masked).
Online softmax in base 2: p = exp2(q.k * scale * log2(e) - m). Saves LSE (log2 units, fp32).
Backward: delta = rowsum(O * dO); a dK/dV pass (one program per key block and kv head, looping
over the query heads of its group, so GQA needs no atomics and no repeated k/v) and a dQ pass.
Padded query rows load q = dO = 0 and LSE = +inf, so they add nothing to dK/dV. Padded keys load
k = v = 0 but are still masked in the dQ pass (their p = exp2(-LSE) can overflow, and inf * 0 is
NaN); the dK/dV rows of padded keys are computed and never stored.
Offsets: batch and head terms are int64, and so are row indices before they meet a stride: in
the model's (B, T, H, D) layout a row stride is H * D, and T * H * D passes 2**31 within one
sequence (Llama-3-70B, H * D = 8192, past 256k tokens). The key / query loops add an int64
block start to the base pointer and keep the rows within a block int32 (fewer registers than
int64 rows; BLOCK * stride stays far below 2**31). CUDA caps grid axis 1 (batch * heads
here) at 65535, so the launchers split larger batches into several launches.
Decode (no grad, T * Hq/Hkv <= 64): the queries of a whole GQA group form one tile, the keys are
split across programs (Flash-Decoding), and a small kernel merges the partial softmaxes.
Launch configs: `_configs` lists each kernel's tiles, fastest first, and launch_fitting runs the
first one the GPU can build; `attention(..., configs=)` runs given tiles exactly instead, so the
benchmark can time other tiles (kernels/bench.py ATTN_DKDV_CANDIDATES) without editing `_configs`.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.utils import (check_device, interpreting, launch_fitting, next_pow2, num_programs,
                           upcast_dots)

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, offs_m, offs_d, start, end, S, off,
               qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < S)[:, None]
        n64 = tl.cast(n0, tl.int64)  # see "Offsets" in the module docstring
        rows = tl.arange(0, BLOCK_N)[:, None]
        k = tl.load(k_base + n64 * sks + rows * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n64 * svs + rows * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BM, BN), log2 units
        if MASK:
            valid = offs_n[None, :] < S
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + off)
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every row sees key 0 in its 1st block
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
                     sob, soh, sot, H, T, S, GROUP, qk_scale,
                     CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m64 = offs_m.to(tl.int64)[:, None]
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + m64 * sqt + offs_d[None, :],
                mask=(offs_m < T)[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    off = S - T  # query i sits at key position off + i
    if CAUSAL:
        hi = tl.minimum(S, off + m0 + BLOCK_M)  # keys some row of this block sees
        full_end = tl.minimum(S, off + m0 + 1) // BLOCK_N * BLOCK_N  # blocks all rows see
    else:
        hi = S
        full_end = S // BLOCK_N * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, offs_m, offs_d, 0,
                               full_end, S, off, qk_scale, False, CAUSAL, BLOCK_N, UPCAST, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, offs_m, offs_d,
                               full_end, hi, S, off, qk_scale, True, CAUSAL, BLOCK_N, UPCAST, PREC)
    acc = acc / l_i[:, None]
    row_mask = offs_m < T
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=row_mask)
    tl.store(O + b * sob + h * soh + m64 * sot + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_mask[:, None])


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, H, T,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m64 = offs_m.to(tl.int64)[:, None]
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_m < T)[:, None]
    o = tl.load(O + b * sob + h * soh + m64 * sot + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + m64 * sdt + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sdt, offs_n,
                    offs_d, start, end, T, off, qk_scale, MASK: tl.constexpr,
                    BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m < T
        m64 = tl.cast(m0, tl.int64)  # see "Offsets" in the module docstring
        r = tl.arange(0, BLOCK_M)[:, None]
        q = tl.load(q_base + m64 * sqt + r * sqt + offs_d[None, :], mask=rows[:, None], other=0.0)
        do = tl.load(do_base + m64 * sdt + r * sdt + offs_d[None, :], mask=rows[:, None],
                     other=0.0)
        if UPCAST:
            q, do = q.to(tl.float32), do.to(tl.float32)
        lse = tl.load(lse_base + offs_m, mask=rows, other=float("inf"))  # padded rows: p = 0
        delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
        pT = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :])
        if MASK:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + off, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)  # (BN, D)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)  # (BN, BM)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqh, sqt, skb, skh, sks,
                          svb, svh, svs, sdb, sdh, sdt, sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
                          H, HKV, T, S, GROUP, qk_scale, sm_scale,
                          CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b, hk = (bhk // HKV).to(tl.int64), (bhk % HKV).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n64 = offs_n.to(tl.int64)[:, None]
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = (offs_n < S)[:, None]
    k = tl.load(K + b * skb + hk * skh + n64 * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + n64 * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    off = S - T
    if CAUSAL:
        lo = tl.maximum(n0 - off, 0) // BLOCK_M * BLOCK_M  # first query block that sees a key
        # From here on every row sees the whole key block: row m0 sees key n0 + BLOCK_N - 1.
        full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M
        full = tl.minimum(full, tl.cdiv(T, BLOCK_M) * BLOCK_M)
    else:
        lo = 0
        full = 0
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(GROUP):  # the query heads sharing this kv head
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        stat = (b * H + h) * T
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + stat, DELTA + stat, sqt,
                                 sdt, offs_n, offs_d, lo, full, T, off, qk_scale, True,
                                 BLOCK_M, UPCAST, PREC)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + stat, DELTA + stat, sqt,
                                 sdt, offs_n, offs_d, full, T, T, off, qk_scale, False,
                                 BLOCK_M, UPCAST, PREC)
    tl.store(DK + b * sdkb + hk * sdkh + n64 * sdks + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + hk * sdvh + n64 * sdvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, offs_m, offs_d, start, end,
                  S, off, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                  BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < S)[:, None]
        n64 = tl.cast(n0, tl.int64)  # see "Offsets" in the module docstring
        rows = tl.arange(0, BLOCK_N)[:, None]
        k = tl.load(k_base + n64 * sks + rows * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n64 * svs + rows * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])
        if MASK:  # select, not multiply: p of a hidden key may be inf (its score > the LSE)
            valid = offs_n[None, :] < S
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + off)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, sqb, sqh, sqt, skb, skh, sks,
                        svb, svh, svs, sdb, sdh, sdt, sdqb, sdqh, sdqt, H, T, S, GROUP,
                        qk_scale, sm_scale, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                        PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < T
    m64 = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + b * sqb + h * sqh + m64 * sqt + offs_d[None, :], mask=rows[:, None],
                other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + m64 * sdt + offs_d[None, :], mask=rows[:, None],
                 other=0.0)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=rows, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=rows, other=0.0)
    off = S - T
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        hi = tl.minimum(S, off + m0 + BLOCK_M)
        full_end = tl.minimum(S, off + m0 + 1) // BLOCK_N * BLOCK_N
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, offs_m, offs_d, 0,
                           full_end, S, off, qk_scale, False, CAUSAL, BLOCK_N, UPCAST, PREC)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, offs_m, offs_d,
                           full_end, hi, S, off, qk_scale, True, CAUSAL, BLOCK_N, UPCAST, PREC)
    else:
        # Full attention masks the padded keys too (k = v = 0): their p = exp2(-lse) overflows
        # to inf when a row's scores are all very negative (lse < -128 in fp32; ds past 65504
        # in fp16), and inf * (k = 0) was NaN in the dq sum. One loop with a select per tile:
        # a second, unmasked loop cost registers (ptxas spills in the fp32 build).
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, offs_m, offs_d, 0,
                           S, S, off, qk_scale, True, CAUSAL, BLOCK_N, UPCAST, PREC)
    tl.store(DQ + b * sdqb + h * sdqh + m64 * sdqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None])


# ---------------------------------------------------------------------------------------------
# Decode: split-KV forward for few queries (no backward)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attn_decode_kernel(Q, K, V, O_PART, ML_PART, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
                        HKV, T, S, GROUP, qk_scale, keys_per_split, NUM_SPLITS,
                        CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    b, hk = (bhk // HKV).to(tl.int64), (bhk % HKV).to(tl.int64)
    R = GROUP * T
    r = tl.arange(0, BLOCK_R)  # row r = query t of head hk * GROUP + g, with r = g * T + t
    h = hk * GROUP + r // T
    t = r % T
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + t[:, None] * sqt + offs_d[None, :],
                mask=(r < R)[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, S)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n64 = offs_n.to(tl.int64)[:, None]  # see "Offsets" in the module docstring
        kv_mask = (offs_n < end)[:, None]
        k = tl.load(K + b * skb + hk * skh + n64 * sks + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        v = tl.load(V + b * svb + hk * svh + n64 * svs + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        valid = offs_n[None, :] < end
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= (S - T + t)[:, None])
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a split may hide all keys
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    part = bhk.to(tl.int64) * NUM_SPLITS + split
    rmask = r < R
    tl.store(O_PART + (part * R + r[:, None]) * HEAD_DIM + offs_d[None, :], acc,
             mask=rmask[:, None])
    tl.store(ML_PART + (part * R + r) * 2, m_i, mask=rmask)
    tl.store(ML_PART + (part * R + r) * 2 + 1, l_i, mask=rmask)


@triton.jit
def _attn_decode_reduce_kernel(O_PART, ML_PART, O, sob, soh, sot, HKV, T, GROUP, NUM_SPLITS,
                               HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    r = tl.program_id(0)
    bhk = tl.program_id(1)
    b, hk = (bhk // HKV).to(tl.int64), (bhk % HKV).to(tl.int64)
    R = GROUP * T
    s = tl.arange(0, BLOCK_S)
    smask = s < NUM_SPLITS
    row = (bhk.to(tl.int64) * NUM_SPLITS + s) * R + r  # (BLOCK_S,) part rows
    m = tl.load(ML_PART + row * 2, mask=smask, other=float("-inf"))
    l = tl.load(ML_PART + row * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, 0)  # finite: every query sees key 0
    w = tl.exp2(m - m_max)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.load(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], mask=smask[:, None],
                  other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    h = hk * GROUP + r // T
    tl.store(O + b * sob + h * soh + (r % T) * sot + offs_d, o.to(O.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _configs(kind: str, D: int, dtype: torch.dtype) -> list[dict]:
    """Launch configs for kind fwd | dkdv | dq | decode, fastest first (`launch_fitting` runs
    the first the GPU has shared memory for). The first is tutorial-style, tuned for H100-class
    GPUs (227 KiB of shared memory per block); then fewer pipeline stages and halved tiles for
    an A100 (163 KiB) or an RTX card (99 KiB). Decode keeps BLOCK_M out: its row tile is the
    GQA group. Tiny blocks in the interpreter, where every op costs a numpy call."""
    if interpreting():
        return [dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)]
    wide = D >= 256 or dtype == torch.float32  # halve tiles to fit registers / shared memory
    warps = 4 if D <= 64 else 8
    bm, bn, w, stages = {
        "fwd": (64, 32, 8, 2) if wide else (128, 64, warps, 3),
        # dK/dV holds two (BLOCK_N, D) fp32 accumulators: with 4 warps at D = 64 ptxas spills
        # 264 bytes per thread on sm_90, with 8 none (python -m kernels.compile_check)
        "dkdv": (32, 64, 8, 2) if wide else (32, 128, 8, 3),
        "dq": (64, 32, 8, 2) if wide else (128, 32, warps, 3),
        "decode": (16, 64, 4, 3),
    }[kind]
    chain = [(bm, bn, stages), (bm, bn, min(stages, 2))]
    while bm > 16 or bn > 16:  # halve the larger tile (decode's bm is 16: only keys halve)
        if bm >= bn and bm > 16:
            bm //= 2
        else:
            bn //= 2
        chain.append((bm, bn, min(stages, 2)))
    chain.append((bm, bn, 1))
    out = []
    for bm, bn, st in chain:
        cfg = dict(BLOCK_N=bn, num_warps=w, num_stages=st)
        if kind != "decode":
            cfg["BLOCK_M"] = bm
        if cfg not in out:
            out.append(cfg)
    return out


CONFIG_KINDS = ("fwd", "dkdv", "dq", "decode")


def _check_configs(configs) -> dict:
    """Validate `attention(..., configs=)`: kind -> one launch config with the keys that
    `_configs` gives that kind (BLOCK_N, num_warps, num_stages; and BLOCK_M except decode),
    blocks powers of two >= 16 (tl.dot's minimum). Returns a copy ({} for None)."""
    if configs is None:
        return {}
    if not isinstance(configs, dict) or set(configs) - set(CONFIG_KINDS):
        raise ValueError(f"attention: configs must map kinds of {', '.join(CONFIG_KINDS)} to "
                         f"launch configs, got {configs!r}")
    out = {}
    for kind, cfg in configs.items():
        keys = {"BLOCK_N", "num_warps", "num_stages"} | (set() if kind == "decode" else {"BLOCK_M"})
        ok = (isinstance(cfg, dict) and set(cfg) == keys
              and all(type(v) is int and v >= 1 for v in cfg.values())
              and all(cfg[b] >= 16 and cfg[b] & (cfg[b] - 1) == 0 for b in keys if b[0] == "B"))
        if not ok:
            raise ValueError(f"attention: configs[{kind!r}] must set {', '.join(sorted(keys))} "
                             f"(blocks powers of two >= 16), got {cfg!r}")
        out[kind] = dict(cfg)
    return out


def _launch(kernel, grid, kind: str, D: int, dtype: torch.dtype, given: dict, *args, **kwargs):
    """Launch with configs[kind] exactly when the caller gave one (a bench trying another tile:
    no fallback, so a build the GPU cannot run raises instead of timing something else; and
    launch_fitting's per-kernel memory of which default fits stays untouched), else with the
    first of `_configs` that fits."""
    cfg = given.get(kind)
    if cfg is None:
        return launch_fitting(kernel, grid, _configs(kind, D, dtype), *args, **kwargs)
    kernel[grid(cfg)](*args, **kwargs, **cfg)
    return cfg


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or upcast_dots(dtype) else "tf32"  # tf32 unused


MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1 (axis 0 allows 2**31 - 1)


def _batches(B: int, per_batch: int) -> list[tuple[int, int]]:
    """Batch ranges [b0, b1) small enough that (b1 - b0) * per_batch programs fit grid axis 1,
    which the kernels use for batch * heads (B * H passes 65535 at B = 2048 with 32 heads)."""
    step = max(1, MAX_GRID_Y // per_batch)
    return [(b0, min(b0 + step, B)) for b0 in range(0, B, step)]


def attention_forward(q, k, v, causal: bool, scale: float, configs: dict | None = None):
    """Launcher. Returns o (B, Hq, T, D) in q's dtype and lse (B, Hq, T) fp32, log2 units.
    configs: optional {"fwd": launch config} (see `attention`)."""
    configs = configs or {}
    B, H, T, D = q.shape
    S, HKV = k.shape[2], k.shape[1]
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    for b0, b1 in _batches(B, H):  # batch slices are views: same strides, offset bases
        qs, ks, vs, os_, ls = (t[b0:b1] for t in (q, k, v, o, lse))
        _launch(_attn_fwd_kernel, lambda c, n=(b1 - b0) * H: (triton.cdiv(T, c["BLOCK_M"]), n),
                "fwd", D, q.dtype, configs,
                qs, ks, vs, os_, ls, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                *o.stride()[:3], H, T, S, H // HKV, scale * LOG2E, CAUSAL=causal,
                HEAD_DIM=D, UPCAST=upcast_dots(q.dtype), PREC=_prec(q.dtype))
    return o, lse


def attention_backward(do, q, k, v, o, lse, causal: bool, scale: float,
                       configs: dict | None = None):
    """Launcher. Returns dq, dk, dv (fresh tensors in the inputs' dtype). configs: optional
    {"dkdv" / "dq": launch config} (see `attention`)."""
    configs = configs or {}
    B, H, T, D = q.shape
    S, HKV = k.shape[2], k.shape[1]
    delta = torch.empty_like(lse)
    BM = 16 if interpreting() else 64
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(CAUSAL=causal, HEAD_DIM=D, UPCAST=upcast_dots(q.dtype), PREC=_prec(q.dtype))
    for b0, b1 in _batches(B, H):  # HKV <= H: the dK/dV grid fits too
        qs, ks, vs, os_, dos, ls, ds, dqs, dks, dvs = (
            t[b0:b1] for t in (q, k, v, o, do, lse, delta, dq, dk, dv))
        nb = b1 - b0
        _bwd_preprocess_kernel[(triton.cdiv(T, BM), nb * H)](
            os_, dos, ds, *o.stride()[:3], *do.stride()[:3], H, T, HEAD_DIM=D, BLOCK_M=BM)
        _launch(_attn_bwd_dkdv_kernel, lambda c, n=nb * HKV: (triton.cdiv(S, c["BLOCK_N"]), n),
                "dkdv", D, q.dtype, configs,
                qs, ks, vs, dos, ls, ds, dks, dvs, *q.stride()[:3], *k.stride()[:3],
                *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
                H, HKV, T, S, H // HKV, scale * LOG2E, scale, **common)
        _launch(_attn_bwd_dq_kernel, lambda c, n=nb * H: (triton.cdiv(T, c["BLOCK_M"]), n),
                "dq", D, q.dtype, configs,
                qs, ks, vs, dos, ls, ds, dqs, *q.stride()[:3], *k.stride()[:3],
                *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3], H, T, S, H // HKV,
                scale * LOG2E, scale, **common)
    return dq, dk, dv


DECODE_MAX_ROWS = 64  # GQA group size * T up to which the decode kernel is used


def attention_decode(q, k, v, causal: bool, scale: float, num_splits: int | None = None,
                     config: dict | None = None):
    """Launcher for few queries against a long KV cache (forward only), split-KV. config: an
    optional decode launch config (see `attention`)."""
    B, H, T, D = q.shape
    S, HKV = k.shape[2], k.shape[1]
    if q.numel() == 0:  # an empty batch: no programs (and no division by B * HKV below)
        return torch.empty_like(q)
    group = H // HKV
    given = {"decode": config} if config is not None else {}
    # the first config's (fallbacks halve it: splits stay whole multiples)
    block_n = (config or _configs("decode", D, q.dtype)[0])["BLOCK_N"]
    if num_splits is None:  # enough programs to fill the GPU, each with >= 2 key blocks
        want = triton.cdiv(2 * num_programs(q.device, 1 << 20), B * HKV)
        num_splits = max(1, min(want, triton.cdiv(S, 2 * block_n)))
    keys_per_split = triton.cdiv(triton.cdiv(S, num_splits), block_n) * block_n
    num_splits = triton.cdiv(S, keys_per_split)
    R = group * T
    o_part = torch.empty((B * HKV, num_splits, R, D), dtype=torch.float32, device=q.device)
    ml_part = torch.empty((B * HKV, num_splits, R, 2), dtype=torch.float32, device=q.device)
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    for b0, b1 in _batches(B, HKV):
        qs, ks, vs, os_ = (t[b0:b1] for t in (q, k, v, o))
        ops, mls = o_part[b0 * HKV:b1 * HKV], ml_part[b0 * HKV:b1 * HKV]
        nbk = (b1 - b0) * HKV
        _launch(_attn_decode_kernel, lambda c, n=nbk: (num_splits, n), "decode", D, q.dtype,
                given, qs, ks, vs, ops, mls, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                HKV, T, S, group, scale * LOG2E, keys_per_split, num_splits,
                CAUSAL=causal, HEAD_DIM=D, BLOCK_R=max(16, next_pow2(R)),
                UPCAST=upcast_dots(q.dtype), PREC=_prec(q.dtype))
        _attn_decode_reduce_kernel[(R, nbk)](ops, mls, os_, *o.stride()[:3], HKV, T, group,
                                             num_splits, HEAD_DIM=D,
                                             BLOCK_S=max(16, next_pow2(num_splits)), num_warps=4)
    return o


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, configs=None):
        o, lse = attention_forward(q, k, v, causal, scale, configs)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.configs = causal, scale, configs  # the backward's tiles too
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.configs)
        return dq, dk, dv, None, None, None


def _check(q, k, v, causal):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"attention: q must be (B, Hq, T, D), k and v (B, Hkv, S, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    (B, H, T, D), (Bk, HKV, S, Dk) = q.shape, k.shape
    if B != Bk or D != Dk or H % HKV:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree "
                         "(batch, head_dim, or Hq not a multiple of Hkv)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16,
                                                             torch.float32):
        raise ValueError(f"attention: q, k, v must share one of fp16/bf16/fp32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"attention: head_dim must be 16, 32, 64, 128 or 256, got {D}")
    if S == 0 or (causal and S < T):
        raise ValueError(f"attention: need S >= 1 keys (and S >= T for causal), got S={S}, T={T}")
    check_device(q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None, *, configs: dict | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v with GQA; q (B, Hq, T, D), k, v (B, Hkv, S, D).

    configs (for benchmarks; None = the tuned defaults): launch configs to use instead of
    `_configs`' first fit, by kind: "fwd", "dkdv", "dq" (the backward keeps them), "decode";
    each a dict like {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3} (decode
    without BLOCK_M). A given config runs as given: no fallback to smaller tiles."""
    _check(q, k, v, causal)
    configs = _check_configs(configs) or None
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if q.shape[2] == 0:
        return torch.empty_like(q)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    rows = q.shape[2] * (q.shape[1] // k.shape[1])
    if not needs_grad and rows <= DECODE_MAX_ROWS and q.shape[2] <= 16:
        return attention_decode(q, k, v, causal, scale, config=(configs or {}).get("decode"))
    return AttentionFunction.apply(q, k, v, causal, scale, configs)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  scale: float | None = None) -> torch.Tensor:
    """PyTorch reference, math in fp32 (fp64 for fp64 inputs, so it can be gradchecked):
    explicit scores, bottom-right causal mask, GQA by repeating k/v. Returns q's dtype."""
    (_, H, T, D), HKV, S = q.shape, k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    ct = torch.promote_types(q.dtype, torch.float32)
    kf = k.to(ct).repeat_interleave(H // HKV, dim=1)
    vf = v.to(ct).repeat_interleave(H // HKV, dim=1)
    scores = (q.to(ct) @ kf.transpose(-1, -2)) * scale  # (B, H, T, S)
    if causal:
        allowed = torch.arange(S, device=q.device)[None, :] <= \
            torch.arange(S - T, S, device=q.device)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (F.softmax(scores, dim=-1) @ vf).to(q.dtype)
