"""RoPE kernel vs the fp32 PyTorch reference: output and dx (interpreter on CPU)."""
from kernel_utils import DEVICES, DTYPES, assert_close  # first: sets TRITON_INTERPRET

import pytest
import torch

from kernels.rope import apply_rope, apply_rope_ref

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


def tables(T, D, device, batch=None, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D)
    pos = torch.arange(T, device=device, dtype=torch.float32)
    if batch is not None:  # per-row positions (left padding / packed rows): (B, 1, T, D)
        pos = pos[None, :] + torch.arange(batch, device=device)[:, None] * 3.0
    emb = torch.cat((pos[..., None] * inv, pos[..., None] * inv), dim=-1)
    if batch is not None:
        emb = emb[:, None]
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,D,layout", [(2, 3, 5, 16, "bhtd"), (1, 4, 9, 32, "bthd"),
                                            (2, 2, 7, 8, "batch_cos")])
def test_rope_matches_reference(device, dtype, B, H, T, D, layout):
    if layout == "bthd":  # what the model passes: a transposed view of (B, T, H, D)
        x = torch.randn(B, T, H, D, device=device).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(B, H, T, D, device=device).to(dtype)
    x.requires_grad_()
    cos, sin = tables(T, D, device, batch=B if layout == "batch_cos" else None)
    dy = torch.randn(B, H, T, D, device=device).to(dtype)
    y = apply_rope(x, cos, sin)
    y.backward(dy)
    xf = x.detach().float().requires_grad_()
    yf = apply_rope_ref(xf, cos, sin)
    yf.backward(dy.float())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, yf, TOL[dtype], "y")
    assert_close(x.grad, xf.grad, TOL[dtype], "dx")


def test_rope_rejects_bad_tables():
    x = torch.randn(1, 2, 4, 8)
    cos, sin = tables(5, 8, "cpu")
    with pytest.raises(ValueError, match="cos must be"):
        apply_rope(x, cos, sin)


def test_rope_ref_matches_transformers_and_gradchecks():
    """The reference itself: transformers' apply_rotary_pos_emb (rotate_half layout) on fp32,
    with (T, D) and per-row (B, 1, T, D) tables, and a float64 gradcheck."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    x = torch.randn(2, 3, 5, 16)
    cos, sin = tables(5, 16, "cpu")
    want, _ = llama.apply_rotary_pos_emb(x, x, cos[None], sin[None])
    assert torch.equal(apply_rope_ref(x, cos, sin), want)
    cos_b, sin_b = tables(5, 16, "cpu", batch=2)
    want, _ = llama.apply_rotary_pos_emb(x, x, cos_b[:, 0], sin_b[:, 0])
    assert torch.equal(apply_rope_ref(x, cos_b, sin_b), want)
    xd = torch.randn(1, 2, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope_ref(t, cos.double(), sin.double()), (xd,))


@pytest.mark.parametrize("device", DEVICES)
def test_rope_tables_of_different_batch_sizes(device):
    """cos and sin with different batch sizes ((T, D) or (1, 1, T, D) with (B, 1, T, D)): each
    table is read with its own batch stride (cos's served both: batch 0's sin for every row,
    or reads past the end of a shared sin)."""
    B, H, T, D = 3, 2, 5, 16
    one_c, one_s = tables(T, D, device)
    row_c, row_s = tables(T, D, device, batch=B)
    dy = torch.randn(B, H, T, D, device=device)
    for cos, sin in ((one_c, row_s), (row_c, one_s), (row_c, one_s[None, None]),
                     (one_c[None, None], row_s)):
        x = torch.randn(B, H, T, D, device=device, requires_grad=True)
        y = apply_rope(x, cos, sin)
        y.backward(dy)
        xf = x.detach().clone().requires_grad_()
        yf = apply_rope_ref(xf, cos, sin)
        yf.backward(dy)
        shapes = f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        assert_close(y, yf, TOL[torch.float32], f"y ({shapes})")
        assert_close(x.grad, xf.grad, TOL[torch.float32], f"dx ({shapes})")
