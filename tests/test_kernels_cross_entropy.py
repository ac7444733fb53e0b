"""Chunked cross-entropy and fused linear cross-entropy vs the fp32 PyTorch reference."""
from kernel_utils import DEVICES, DTYPES, assert_close  # first: sets TRITON_INTERPRET

import math

import pytest
import torch

from kernels.cross_entropy import (cross_entropy, cross_entropy_ref, linear_cross_entropy,
                                   linear_cross_entropy_ref)

# (atol, rtol) for the loss and every gradient, against the fp32 reference.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (4e-3, 2e-2)}


def make_targets(N, V, device, ignored=(2,)):
    t = torch.randint(0, V, (N,), device=device)
    for i in ignored:
        if i < N:
            t[i] = -100
    return t


def check_against_ref(x, t, tol):
    """cross_entropy(x, t) and d/dx against the fp32 reference; x: a leaf needing grad."""
    loss = cross_entropy(x, t)
    loss.backward()
    xf = x.detach().float().requires_grad_()
    ref = cross_entropy_ref(xf, t)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref, tol, "loss")
    assert_close(x.grad, xf.grad, tol, "dlogits")
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(7, 300), (5, 64), (3, 1000), (2, 5003)])
def test_cross_entropy_matches_reference(device, dtype, N, V):
    x = (3 * torch.randn(N, V, device=device)).to(dtype).requires_grad_()
    check_against_ref(x, make_targets(N, V, device), TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_all_ignored_is_nan_with_zero_grad(device):
    x = torch.randn(3, 50, device=device, requires_grad=True)
    t = torch.full((3,), -100, device=device)
    loss = cross_entropy(x, t)
    assert math.isnan(loss.item()) and math.isnan(cross_entropy_ref(x, t).item())
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_masked_vocabulary(device):
    """-inf logits (a vocabulary restricted by masking) filling whole chunks, the first one
    included (4200 > the GPU's 4096-wide chunk), give torch's finite loss and gradient."""
    N, V = 3, 5003
    x = torch.randn(N, V, device=device)
    x[:, :4200] = float("-inf")
    x[1, 4300:4400] = float("-inf")
    x = x.requires_grad_()
    check_against_ref(x, torch.tensor([4201, 5002, -100], device=device), TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_linear_cross_entropy_matches_reference(device, dtype, chunk_size):
    N, H, V = 13, 32, 200
    h = torch.randn(N, H, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=device) / 4).to(dtype).requires_grad_()
    t = make_targets(N, V, device, ignored=(0, 5))
    loss = linear_cross_entropy(h, w, t, chunk_size=chunk_size)
    loss.backward()
    hf, wf = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = linear_cross_entropy_ref(hf, wf, t)
    ref.backward()
    assert_close(loss, ref, TOL[dtype], "loss")
    assert_close(h.grad, hf.grad, TOL[dtype], "dhidden")
    assert_close(w.grad, wf.grad, TOL[dtype], "dweight")


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_no_grad_and_scaled_grad(device):
    """Inference computes no gradients; a non-unit upstream grad scales both gradients."""
    h, w = torch.randn(6, 16, device=device), torch.randn(40, 16, device=device)
    t = make_targets(6, 40, device)
    with torch.no_grad():
        assert_close(linear_cross_entropy(h, w, t), linear_cross_entropy_ref(h, w, t),
                     TOL[torch.float32], "loss")
    h.requires_grad_()
    (2.5 * linear_cross_entropy(h, w, t)).backward()
    hf = h.detach().clone().requires_grad_()
    (2.5 * linear_cross_entropy_ref(hf, w, t)).backward()
    assert_close(h.grad, hf.grad, TOL[torch.float32], "dhidden")


def test_cross_entropy_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match="target ids must be in"):
        cross_entropy(torch.randn(2, 10), torch.tensor([1, 10]))


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_autocast_scales_fp32_weight_grad_exactly(device):
    """Under autocast (bf16 hidden, fp32 lm_head weight) an upstream grad such as 1/3 (loss
    divided by accumulation steps) scales the fp32 weight gradient by 1/3, not by 1/3
    rounded to bf16 (0.334, a 0.2% bias on every step)."""
    h = torch.randn(10, 16, device=device).bfloat16()
    w = torch.randn(100, 16, device=device) * 0.3
    t = make_targets(10, 100, device)
    grads = []
    for scale in (1.0, 1 / 3):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = linear_cross_entropy(hh, ww, t)
        (loss * scale).backward()
        assert ww.grad.dtype == torch.float32
        grads.append(ww.grad)
    assert_close(grads[1], grads[0] / 3, TOL[torch.float32], "dweight (scaled by 1/3)")


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_under_no_grad_computes_no_gradients(device, monkeypatch):
    """Evaluation under torch.no_grad of weights that require grad: the loss only, no
    gradient kernels (before: grad_hidden and a (V, H) grad_weight were computed and held)."""
    import kernels.cross_entropy as kce
    h = torch.randn(6, 16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device, requires_grad=True)
    t = make_targets(6, 40, device)

    def no_grad_kernel(*args, **kw):
        raise AssertionError("gradient computed under no_grad")
    monkeypatch.setattr(kce, "ce_grad", no_grad_kernel)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t)
    assert not loss.requires_grad
    assert_close(loss, linear_cross_entropy_ref(h.detach(), w.detach(), t), TOL[torch.float32],
                 "loss")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["row_slice", "transposed", "expanded_rows"])
def test_cross_entropy_strided_logits_and_targets(device, layout):
    """Launcher strides: logits as a column slice of a wider buffer (row stride > V, read in
    place), a transposed view (unit-stride columns missing: copied), rows broadcast with stride
    0; targets as a strided view. The gradient comes back in the logits' shape."""
    N, V = 6, 300
    if layout == "row_slice":
        base = torch.randn(N, V + 37, device=device)[:, 5:V + 5]
    elif layout == "transposed":
        base = torch.randn(V, N, device=device).t()
    else:
        base = torch.randn(1, V, device=device).expand(N, V)
    x = base.requires_grad_()  # a view of a tensor without grad: a leaf, strides kept
    assert not x.is_contiguous()
    check_against_ref(x, make_targets(2 * N, V, device, ignored=(4,))[::2], TOL[torch.float32])
