"""FlashAttention kernels vs the fp32 reference: output, dq, dk, dv; GQA, causal (bottom-right),
odd lengths, strided inputs, and the split-KV decode path (interpreter on CPU)."""
from kernel_utils import DEVICES, DTYPES, assert_close  # first: sets TRITON_INTERPRET

import pytest
import torch

from kernels.attention import attention, attention_decode, attention_ref

# (atol, rtol) for the output and every gradient, against the fp32 reference.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}

# (B, Hq, Hkv, T, S, D, causal, layout)
CASES = [
    (1, 2, 1, 37, 37, 16, True, "bhtd"),     # GQA 2:1, odd length, causal
    (2, 2, 2, 20, 33, 32, True, "bthd"),     # S > T: bottom-right causal; model's strided view
    (1, 4, 2, 19, 45, 16, False, "bhtd"),    # GQA, full attention, ragged tails
    (1, 1, 1, 16, 16, 64, False, "bhtd"),    # exact blocks, head_dim 64
    (1, 3, 1, 70, 100, 32, True, "bhtd"),    # longer: several full blocks before the diagonal
    (1, 2, 2, 24, 24, 128, True, "bhtd"),    # head_dim 128
]


def make(shape, dtype, device, layout):
    B, H, T, D = shape
    if layout == "bthd":  # (B, T, H, D).transpose(1, 2), as the model produces q, k, v
        return torch.randn(B, T, H, D, device=device).to(dtype).transpose(1, 2)
    return torch.randn(B, H, T, D, device=device).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,causal,layout", CASES)
def test_attention_matches_reference(device, dtype, B, Hq, Hkv, T, S, D, causal, layout):
    q = make((B, Hq, T, D), dtype, device, layout).requires_grad_()
    k = make((B, Hkv, S, D), dtype, device, layout).requires_grad_()
    v = make((B, Hkv, S, D), dtype, device, layout).requires_grad_()
    do = torch.randn(B, Hq, T, D, device=device).to(dtype)
    o = attention(q, k, v, causal=causal)
    o.backward(do)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    of = attention_ref(qf, kf, vf, causal=causal)
    of.backward(do.float())
    assert o.dtype == dtype and o.shape == (B, Hq, T, D)
    assert_close(o, of, TOL[dtype], "o")
    assert_close(q.grad, qf.grad, TOL[dtype], "dq")
    assert_close(k.grad, kf.grad, TOL[dtype], "dk")
    assert_close(v.grad, vf.grad, TOL[dtype], "dv")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,causal,splits", [(1, True, 3), (3, True, None), (2, False, 4)])
def test_attention_decode_matches_reference(device, dtype, T, causal, splits):
    """Few queries against a longer KV cache (no grad): split-KV kernel + merge."""
    B, Hq, Hkv, S, D = 2, 4, 2, 50, 32
    q = torch.randn(B, Hq, T, D, device=device).to(dtype)
    k = torch.randn(B, Hkv, S, D, device=device).to(dtype)
    v = torch.randn(B, Hkv, S, D, device=device).to(dtype)
    ref = attention_ref(q.float(), k.float(), v.float(), causal=causal)
    out = attention_decode(q, k, v, causal, D ** -0.5, num_splits=splits)
    assert_close(out, ref, TOL[dtype], "o (decode)")
    with torch.no_grad():  # the public function picks the decode path by itself
        assert_close(attention(q, k, v, causal=causal), ref, TOL[dtype], "o (public)")


@pytest.mark.parametrize("device", DEVICES)
def test_attention_kv_cache_slice(device):
    """k/v as a slice of a preallocated cache (strided over max_len), causal prefill chunk."""
    cache_k = torch.randn(1, 2, 64, 16, device=device)
    cache_v = torch.randn(1, 2, 64, 16, device=device)
    q = torch.randn(1, 4, 5, 16, device=device)
    k, v = cache_k[:, :, :21], cache_v[:, :, :21]
    with torch.no_grad():
        assert_close(attention(q, k, v), attention_ref(q, k, v), TOL[torch.float32], "o")


def test_attention_rejects_bad_input():
    q = torch.randn(1, 3, 4, 16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attention(q, torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))
    with pytest.raises(ValueError, match="S >= T for causal"):
        attention(q, torch.randn(1, 1, 3, 16), torch.randn(1, 1, 3, 16))
    with pytest.raises(ValueError, match="head_dim must be"):
        attention(torch.randn(1, 1, 4, 24), torch.randn(1, 1, 4, 24), torch.randn(1, 1, 4, 24))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [False, True])
def test_attention_empty_batch(device, grad):
    """B = 0 (e.g. a serving step with no live sequences) gives an empty output, decode path
    (no grad) included."""
    q = torch.randn(0, 4, 1, 16, device=device, requires_grad=grad)
    k, v = torch.randn(2, 0, 2, 5, 16, device=device)
    assert attention(q, k, v).shape == (0, 4, 1, 16)


def test_attention_ref_against_sdpa_and_gradcheck():
    """The reference itself, independently: F.scaled_dot_product_attention with an explicit
    bottom-right causal mask (a KV cache holds the first S - T keys) and GQA, and a float64
    gradcheck of every input (the reference computed fp64 inputs in fp32 before: 2e-7 off,
    gradcheck failed)."""
    import torch.nn.functional as F
    d = dict(dtype=torch.float64)
    for T, S, causal in ((5, 9, True), (7, 7, True), (3, 11, False)):
        q, k, v = torch.randn(2, 4, T, 16, **d), torch.randn(2, 2, S, 16, **d), \
            torch.randn(2, 2, S, 16, **d)
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T) if causal else None
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        assert (attention_ref(q, k, v, causal) - want).abs().max() < 1e-12
    q = torch.randn(1, 2, 3, 16, **d, requires_grad=True)
    k, v = (torch.randn(1, 1, 5, 16, **d, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda q, k, v: attention_ref(q, k, v, True), (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_grads_finite_when_every_score_is_very_negative(device, dtype):
    """Full attention, S not a multiple of the key block: padded keys (k = v = 0) must be masked
    in the dQ pass. Scores near -100 make a row's LSE so negative that a padded key's
    p = exp2(-LSE) overflows (fp32: inf; fp16 ds: past 65504), and inf * k = 0 was NaN in dq."""
    B, H, T, S, D = 1, 2, 20, 21, 16
    q = (5.0 + 0.1 * torch.randn(B, H, T, D, device=device)).to(dtype).requires_grad_()
    k = (-5.0 + 0.1 * torch.randn(B, H, S, D, device=device)).to(dtype).requires_grad_()
    v = torch.randn(B, H, S, D, device=device).to(dtype).requires_grad_()
    do = torch.randn(B, H, T, D, device=device).to(dtype)
    attention(q, k, v, causal=False).backward(do)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    attention_ref(qf, kf, vf, causal=False).backward(do.float())
    for name, got, want in (("dq", q.grad, qf.grad), ("dk", k.grad, kf.grad),
                            ("dv", v.grad, vf.grad)):
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        assert_close(got, want, TOL[dtype], name)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_splits_batches_past_the_grid_limit(device, monkeypatch):
    """Grid axis 1 holds batch * heads and CUDA caps it at 65535: the launchers run batch
    slices then. A tiny cap here makes every launcher split (forward, backward, decode)."""
    import kernels.attention as attn
    monkeypatch.setattr(attn, "MAX_GRID_Y", 5)
    assert attn._batches(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert attn._batches(3, 8) == [(0, 1), (1, 2), (2, 3)]  # one batch row even if over
    B, Hq, Hkv, T, S, D = 5, 2, 1, 19, 23, 16
    q = make((B, Hq, T, D), torch.float32, device, "bthd").requires_grad_()
    k = make((B, Hkv, S, D), torch.float32, device, "bthd").requires_grad_()
    v = make((B, Hkv, S, D), torch.float32, device, "bthd").requires_grad_()
    do = torch.randn(B, Hq, T, D, device=device)
    o = attention(q, k, v, causal=True)
    o.backward(do)
    qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))
    of = attention_ref(qf, kf, vf, causal=True)
    of.backward(do)
    tol = TOL[torch.float32]
    assert_close(o, of, tol, "o")
    assert_close(q.grad, qf.grad, tol, "dq")
    assert_close(k.grad, kf.grad, tol, "dk")
    assert_close(v.grad, vf.grad, tol, "dv")
    with torch.no_grad():  # decode: grid axis 1 is batch * kv heads
        qd = q[:, :, -2:].detach()
        want = attention_ref(qd, k.detach(), v.detach(), causal=True)
        assert_close(attention_decode(qd, k.detach(), v.detach(), True, D ** -0.5,
                                      num_splits=2), want, tol, "o (decode)")


# Launch configs other than the defaults (the bench times other dK/dV tiles this way): tiles
# with M != N, a key block wider than the sequence (the bench's M=16 / M=32, N=128 candidates),
# two stages. The interpreter ignores warps and stages; natively they build as given.
OTHER_CONFIGS = [
    {"dkdv": dict(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=3)},
    {"dkdv": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2)},
    {"fwd": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2),
     "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
     "dq": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2)},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("configs", OTHER_CONFIGS, ids=["dkdv16", "dkdv-2st", "all"])
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,causal", [
    (1, 4, 2, 37, 37, 16, True),    # GQA 2:1, causal, odd length
    (1, 2, 1, 20, 45, 32, True),    # S > T: bottom-right causal, GQA
    (1, 4, 2, 19, 45, 16, False),   # GQA, full attention, ragged tails
])
def test_attention_configs_match_default(device, configs, B, Hq, Hkv, T, S, D, causal,
                                         monkeypatch):
    """attention(..., configs=) runs forward and backward with the given tiles (the autograd
    Function keeps them for its backward) and gives the default's output and gradients; the
    given kinds launch as given, not through launch_fitting's fallback chain."""
    import kernels.attention as attn
    q, k, v = (torch.randn(B, h, n, D, device=device) for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
    do = torch.randn(B, Hq, T, D, device=device)

    def run(cfg):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = attn.attention(*leaves, causal=causal, configs=cfg)
        o.backward(do)
        return [o.detach()] + [t.grad for t in leaves]

    want = run(None)
    fitted = []
    real = attn.launch_fitting
    monkeypatch.setattr(attn, "launch_fitting", lambda kernel, *a, **kw: (
        fitted.append(kernel.fn.__name__), real(kernel, *a, **kw))[1])
    got = run(configs)
    default_kinds = {"fwd", "dkdv", "dq"} - set(configs)
    assert len(fitted) == len(default_kinds)  # only the kinds not given went through it
    assert not any(kind in name for name in fitted for kind in configs)
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    o_ref = attention_ref(*ref, causal=causal)
    o_ref.backward(do)
    for name, g, w, r in zip(("o", "dq", "dk", "dv"), got, want,
                             [o_ref.detach()] + [t.grad for t in ref]):
        assert_close(g, w, (2e-5, 2e-5), f"{name} vs default")  # summation order only
        assert_close(g, r, TOL[torch.float32], f"{name} vs reference")


@pytest.mark.parametrize("device", DEVICES)
def test_attention_configs_bf16_and_decode(device):
    """bf16 through a given dK/dV tile, and a given decode key block (no grad, few queries)."""
    q = torch.randn(1, 4, 21, 32, device=device).bfloat16().requires_grad_()
    k = torch.randn(1, 2, 37, 32, device=device).bfloat16().requires_grad_()
    v = torch.randn(1, 2, 37, 32, device=device).bfloat16().requires_grad_()
    do = torch.randn(1, 4, 21, 32, device=device).bfloat16()
    attention(q, k, v, configs={"dkdv": dict(BLOCK_M=16, BLOCK_N=128, num_warps=8,
                                             num_stages=3)}).backward(do)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    attention_ref(qf, kf, vf).backward(do.float())
    for name, got, want in (("dq", q.grad, qf.grad), ("dk", k.grad, kf.grad),
                            ("dv", v.grad, vf.grad)):
        assert_close(got, want, TOL[torch.bfloat16], name)
    with torch.no_grad():
        qd = q[:, :, -2:].detach().float()
        kd, vd = k.detach().float(), v.detach().float()
        got = attention(qd, kd, vd, configs={"decode": dict(BLOCK_N=32, num_warps=4,
                                                            num_stages=2)})
        assert_close(got, attention_ref(qd, kd, vd), TOL[torch.float32], "o (decode)")


def test_attention_rejects_bad_configs():
    q = torch.randn(1, 2, 4, 16)
    good = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    for bad, match in (({"bwd": good}, "configs must map kinds"),
                       ([good], "configs must map kinds"),
                       ({"dkdv": dict(good, BLOCK_M=24)}, r"configs\['dkdv'\] must set"),
                       ({"dq": dict(good, BLOCK_N=8)}, "powers of two >= 16"),
                       ({"fwd": {"BLOCK_M": 16, "BLOCK_N": 16}}, "num_stages"),
                       ({"decode": good}, r"configs\['decode'\] must set BLOCK_N, num_stages")):
        with pytest.raises(ValueError, match=match):
            attention(q, q, q, configs=bad)
