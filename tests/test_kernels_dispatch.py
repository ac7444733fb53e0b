"""engine/ops.py dispatch: with kernels forced on, every op runs its Triton kernel (through the
interpreter on CPU) and agrees with the PyTorch path; NF4 ops match engine/nf4.py."""
from kernel_utils import DEVICES, assert_close  # first: sets TRITON_INTERPRET

import warnings

import pytest
import torch

from engine import ops

TOL = (1e-5, 1e-5)  # fp32 throughout


def both(fn, *args, **kw):
    """(torch result, kernel result, kernel grad_fn name) of fn(*args) with fresh leaves."""
    outs = []
    for mode in ("torch", "triton"):
        leaves = [a.detach().clone().requires_grad_(a.requires_grad) if torch.is_tensor(a)
                  else a for a in args]
        with ops.use_kernels(mode):
            y = fn(*leaves, **kw)
        if y.requires_grad:  # a non-uniform upstream gradient
            weights = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
            (y.float() * weights).sum().backward()
        outs.append((y, [a.grad for a in leaves if torch.is_tensor(a) and a.requires_grad],
                     type(y.grad_fn).__name__))
    return outs


@pytest.mark.parametrize("device", DEVICES)
def test_every_op_dispatches_to_its_kernel(device):
    r = lambda *s, g=True: torch.randn(*s, device=device).requires_grad_(g)  # noqa: E731
    cos, sin = torch.randn(5, 16, device=device), torch.randn(5, 16, device=device)
    t = torch.tensor([1, 4, -100, 7, 0], device=device)
    cases = {
        "RMSNormFunction": (ops.rms_norm, (r(3, 32), r(32), 1e-6), {}),
        "RoPEFunction": (ops.apply_rope, (r(2, 2, 5, 16), cos, sin), {}),
        "SwiGLUFunction": (ops.swiglu, (r(4, 24), r(4, 24)), {}),
        "AttentionFunction": (ops.attention, (r(1, 4, 5, 16), r(1, 2, 9, 16), r(1, 2, 9, 16)), {}),
        "CrossEntropyFunction": (ops.cross_entropy, (r(5, 40), t), {}),
        "LinearCrossEntropyFunction": (ops.linear_cross_entropy, (r(5, 16), r(40, 16), t), {}),
    }
    for name, (fn, args, kw) in cases.items():
        (y0, g0, _), (y1, g1, kernel_fn) = both(fn, *args, **kw)
        assert name in kernel_fn, f"{fn.__name__} did not run its kernel (got {kernel_fn})"
        assert_close(y1, y0, TOL, f"{fn.__name__} output")
        for i, (a, b) in enumerate(zip(g1, g0)):
            assert_close(a, b, TOL, f"{fn.__name__} grad {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_the_kernels_do_not_take_fall_back_to_pytorch(device):
    """With kernels on, inputs a kernel rejects (fp64 attention, e.g. a gradient check in
    double precision; swiglu of mixed dtypes) run the PyTorch path instead of raising; fp64
    inputs of the kernels that would take them (rms_norm, rope, swiglu compute in fp32) too,
    rather than coming back at fp32 precision (3e-7 off before)."""
    d = dict(device=device, dtype=torch.float64)
    q = torch.randn(1, 4, 5, 16, **d)
    k, v = torch.randn(2, 1, 2, 9, 16, **d)
    gate, up = torch.randn(4, 24, device=device), torch.randn(4, 24, device=device).bfloat16()
    cos, sin = torch.randn(5, 16, **d), torch.randn(5, 16, **d)
    for fn, args in ((ops.attention, (q, k, v)), (ops.swiglu, (gate, up)),
                     (ops.swiglu, (2 * gate.double(), up.double())),
                     (ops.rms_norm, (q, torch.randn(16, **d), 1e-6)),
                     (ops.apply_rope, (q, cos, sin))):
        with ops.use_kernels("torch"):
            ref = fn(*args)
        with ops.use_kernels("triton"):
            out = fn(*args)
        assert out.dtype == ref.dtype and torch.equal(out, ref), fn.__name__


@pytest.mark.parametrize("device", DEVICES)
def test_fp64_nf4_linear_takes_the_pytorch_path(device):
    """With kernels on (forced here, auto on a GPU), fp64 x in nf4_linear runs the PyTorch
    path like the other ops: the fused kernel does not build for fp64 on a GPU."""
    nf4 = pytest.importorskip("engine.nf4")
    q = nf4.quantize_nf4(torch.randn(24, 128))
    fields = [t.to(device) for t in (q.packed, q.absmax_q, q.nested_absmax, q.nested_code)]
    x = torch.randn(3, 128, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(24, dtype=torch.float64, device=device)
    out = []
    for mode in ("torch", "triton"):
        with ops.use_kernels(mode):
            y = ops.nf4_linear(x, *fields, q.offset, q.shape, bias)
        assert y.dtype == torch.float64, mode
        assert "NF4MatmulFunction" not in type(y.grad_fn).__name__, mode
        out.append(y)
    assert torch.equal(out[1], out[0])


@pytest.mark.parametrize("device", DEVICES)
def test_rope_with_per_row_tables_runs_the_kernel(device):
    """Per-row (B, 1, T, D) tables (packed sequences' position_ids), alone or with a shared
    (T, D) / (1, 1, T, D) one either way round, run the kernel (each table has its own batch
    stride) and match PyTorch, gradient included; tables of other shapes (broadcast over heads
    or over T) take PyTorch."""
    B, H, T, D = 2, 3, 5, 16
    one, rows = torch.randn(T, D, device=device), torch.randn(B, 1, T, D, device=device)
    x = torch.randn(B, H, T, D, device=device, requires_grad=True)
    for cos, sin in ((rows, rows.flip(0)), (one, rows), (rows, one), (one[None, None], rows)):
        (y_ref, (g_ref,), _), (y, (g,), name) = both(ops.apply_rope, x, cos, sin)
        shapes = (tuple(cos.shape), tuple(sin.shape))
        assert name == "RoPEFunctionBackward", shapes
        assert_close(y, y_ref, TOL, f"y {shapes}")
        assert_close(g, g_ref, TOL, f"dx {shapes}")
    per_head = torch.randn(B, H, T, D, device=device)  # a (B, H, T, D) table: PyTorch broadcasts
    (y_ref, _, _), (y, _, name) = both(ops.apply_rope, x, per_head, per_head)
    assert "RoPE" not in name and torch.equal(y, y_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_int32_targets_on_both_paths(device):
    """int32 targets, which the loss kernels take, give the int64 loss on the PyTorch path too
    (it raised 'expected scalar type Long')."""
    g = torch.Generator().manual_seed(3)
    logits, hidden = torch.randn(5, 40, generator=g), torch.randn(5, 16, generator=g)
    weight = torch.randn(40, 16, generator=g)
    t64 = torch.tensor([1, 4, -100, 7, 0])
    logits, hidden, weight, t64 = (a.to(device) for a in (logits, hidden, weight, t64))
    for mode in ("torch", "triton"):
        with ops.use_kernels(mode):
            for fn, args in ((ops.cross_entropy, (logits,)),
                             (ops.linear_cross_entropy, (hidden, weight))):
                assert_close(fn(*args, t64.int()), fn(*args, t64), TOL, f"{fn.__name__} {mode}")


@pytest.mark.parametrize("device", DEVICES)
def test_nf4_ops_match_engine_reference(device):
    nf4 = pytest.importorskip("engine.nf4")
    w = torch.randn(24, 128)
    q = nf4.quantize_nf4(w)
    fields = [t.to(device) for t in (q.packed, q.absmax_q, q.nested_absmax, q.nested_code)]
    expected = nf4.dequantize_nf4(q, torch.float32).to(device)
    x = torch.randn(3, 128, device=device)
    for mode in ("torch", "triton"):
        with ops.use_kernels(mode):
            w_deq = ops.nf4_dequantize(*fields, q.offset, q.shape, torch.float32)
            assert torch.equal(w_deq, expected), mode
            xg = x.clone().requires_grad_()
            y = ops.nf4_linear(xg, *fields, q.offset, q.shape)
            kernel_ran = "NF4MatmulFunction" in type(y.grad_fn).__name__
            assert kernel_ran == (mode == "triton"), type(y.grad_fn).__name__
            y.backward(torch.ones_like(y))
            assert_close(y, x @ expected.t(), TOL, f"nf4_linear ({mode})")
            assert_close(xg.grad, torch.ones(3, 24, device=device) @ expected, TOL,
                         f"nf4_linear dx ({mode})")


@pytest.mark.parametrize("shape,blocksize,double_quant", [
    ((24, 128), 64, True), ((7, 9), 64, True), ((5, 300), 256, False), ((3, 1000), 128, True),
    ((37, 1000), 64, True)])  # 579 blocks: three nested-absmax groups, the last one partial
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_torch_dequantize_is_exact(shape, blocksize, double_quant, dtype):
    """The PyTorch path's byte-pair gather equals engine.nf4's nibble-by-nibble reference bit
    for bit: odd element counts (a half-used last byte), a short last block, plain fp32 absmax,
    several groups of 256 block scales (each broadcast over its rows)."""
    nf4 = pytest.importorskip("engine.nf4")
    q = nf4.quantize_nf4(torch.randn(shape) * 3, blocksize=blocksize, double_quant=double_quant)
    scales = q.absmax_q if double_quant else q.absmax
    with ops.use_kernels("torch"):
        out = ops.nf4_dequantize(q.packed, scales, q.nested_absmax, q.nested_code, q.offset,
                                 q.shape, dtype, blocksize)
    assert out.dtype == dtype and torch.equal(out, nf4.dequantize_nf4(q, dtype))


@pytest.mark.parametrize("need", ["both", "hidden", "none"])
def test_torch_linear_cross_entropy_is_chunked_and_exact(need):
    """The PyTorch path of ops.linear_cross_entropy (several row chunks at V = 50k) equals the
    full-logits reference in loss and both gradients, ignore_index rows included."""
    from kernels.cross_entropy import linear_cross_entropy_ref
    g = torch.Generator().manual_seed(0)
    N, H, V = 400, 8, 50_000  # (8 << 20) // V = 167 rows per chunk: 3 chunks, a ragged last one
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = -100
    grads = {"both": (True, True), "hidden": (True, False), "none": (False, False)}[need]
    res = []
    for fn in (linear_cross_entropy_ref, ops.linear_cross_entropy):
        h, w = hidden.clone().requires_grad_(grads[0]), weight.clone().requires_grad_(grads[1])
        with ops.use_kernels("torch"):
            loss = fn(h, w, targets)
        if loss.requires_grad:
            (loss * 1.7).backward()
        res.append((loss.detach(), h.grad, w.grad))
    (l0, h0, w0), (l1, h1, w1) = res
    assert_close(l1, l0, TOL, "loss")
    for a, b, what in ((h1, h0, "grad hidden"), (w1, w0, "grad weight")):
        assert (a is None) == (b is None), what
        if a is not None:
            assert_close(a, b, TOL, what)


def test_torch_linear_token_nll_in_chunks_equals_full_logits():
    """ops.linear_token_nll (3 checkpointed chunks at V = 50k) equals F.cross_entropy with
    reduction="none" on the full logits, in values and both gradients."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(1)
    N, H, V = 400, 8, 50_000
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -100
    up = torch.randn(N, generator=g)
    res = []
    for full in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        nll = (F.cross_entropy(h @ w.t(), targets, reduction="none") if full
               else ops.linear_token_nll(h, w, targets))
        (nll * up).sum().backward()
        res.append((nll.detach(), h.grad, w.grad))
    for a, b, what in zip(res[1], res[0], ("nll", "grad hidden", "grad weight")):
        assert_close(a, b, TOL, what)
    with torch.no_grad():
        assert_close(ops.linear_token_nll(hidden, weight, targets), res[0][0], TOL, "no-grad nll")


def test_torch_linear_cross_entropy_under_autocast_with_mixed_dtypes():
    """Under autocast a bf16 hidden meets an fp32 lm_head weight: the chunked path runs (its
    gradient matmuls are not autocast) and agrees with the reference."""
    from kernels.cross_entropy import linear_cross_entropy_ref
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(300, 16, generator=g).bfloat16()
    weight = torch.randn(40_000, 16, generator=g)
    targets = torch.randint(0, 40_000, (300,), generator=g)
    out = []
    for fn in (linear_cross_entropy_ref, ops.linear_cross_entropy):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16), ops.use_kernels("torch"):
            loss = fn(h, w, targets)
        loss.backward()
        assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
        out.append((loss.detach(), h.grad.float(), w.grad))
    for a, b in zip(out[1], out[0]):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_forced_kernels_that_cannot_run_say_so_once(monkeypatch):
    """WHETSTONE_KERNELS=triton on CPU without the interpreter runs the reference, with one
    warning saying why (a silent fallback would pass for the kernels)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops._forced_but_unusable.cache_clear()
    x, w = torch.randn(3, 32), torch.randn(32)
    with ops.use_kernels("torch"):
        ref = ops.rms_norm(x, w, 1e-6)
    with ops.use_kernels("triton"):
        with pytest.warns(UserWarning, match="TRITON_INTERPRET=1: using the PyTorch reference"):
            y = ops.rms_norm(x, w, 1e-6)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call is quiet
            ops.rms_norm(x, w, 1e-6)
    assert torch.equal(y, ref)


def test_auto_mode_uses_kernels_only_from_compute_capability_8(monkeypatch):
    """Auto picks the kernels on sm_80 and newer (what kernels.compile_check builds for); a T4
    (7.5) or V100 (7.0), without bf16 tensor-core dots, gets the PyTorch path."""
    for cap, want in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True),
                      ((12, 0), True)):
        ops._capability.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, c=cap: c)
        assert ops.kernels_supported(torch.device("cuda", 0)) is want, cap
    ops._capability.cache_clear()


def test_kernel_mode_values(monkeypatch):
    """WHETSTONE_KERNELS: case and spaces do not matter, empty means auto (as unset), anything
    else is one clear ValueError naming the choices (empty raised one before)."""
    for value, want in (("", "auto"), (" Triton ", "triton"), ("TORCH", "torch"),
                        ("auto", "auto")):
        monkeypatch.setenv("WHETSTONE_KERNELS", value)
        assert ops.kernel_mode() == want, value
    monkeypatch.delenv("WHETSTONE_KERNELS")
    assert ops.kernel_mode() == "auto"
    monkeypatch.setenv("WHETSTONE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="must be auto, triton or torch, got 'cuda'"):
        ops.kernel_mode()


@pytest.mark.parametrize("device", DEVICES)
def test_attention_window_wider_than_the_keys_uses_the_kernel(device):
    """A sliding window that hides nothing (Mistral's 4096 at shorter lengths) is plain
    causal attention: the kernel runs (before: always the masked PyTorch path) with the same
    result; a window that bites still takes the masked path."""
    r = lambda *s: torch.randn(*s, device=device).requires_grad_()  # noqa: E731
    for window, kernel in ((9, True), (40, True), (4, False)):
        (y0, g0, _), (y1, g1, name) = both(ops.attention, r(1, 4, 5, 16), r(1, 2, 9, 16),
                                           r(1, 2, 9, 16), window=window)
        assert ("AttentionFunction" in name) == kernel, (window, name)
        assert_close(y1, y0, TOL, f"window {window} output")
        for i, (a, b) in enumerate(zip(g1, g0)):
            assert_close(a, b, TOL, f"window {window} grad {i}")


def test_bad_kernel_env_is_refused_at_startup(monkeypatch):
    """Every command line picks its device through engine.hub.pick_device: a typo in
    WHETSTONE_KERNELS is one line there, before a model is loaded, not at the first op."""
    from engine.hub import pick_device
    monkeypatch.setenv("WHETSTONE_KERNELS", "trition")
    with pytest.raises(ValueError, match="WHETSTONE_KERNELS must be auto, triton or torch"):
        pick_device("cpu")
    monkeypatch.setenv("WHETSTONE_KERNELS", "torch")
    assert pick_device("cpu").type == "cpu"


def test_another_kernels_package_first_on_the_path_takes_pytorch(monkeypatch):
    """PyPI's `kernels` (Hugging Face's hub kernels, required by transformers >= 5.25) has our
    kernels/' import name: imported instead of ours, every op would fail to import its kernel.
    ops says so once and runs the PyTorch path."""
    import sys
    import types
    other = types.ModuleType("kernels")
    other.__file__ = "/site-packages/kernels/__init__.py"
    monkeypatch.setitem(sys.modules, "kernels", other)
    ops.triton_available.cache_clear()
    ops._forced_but_unusable.cache_clear()
    x, w = torch.randn(3, 32), torch.randn(32)
    try:
        with ops.use_kernels("triton"), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            y = ops.rms_norm(x, w, 1e-6)
            ops.rms_norm(x, w, 1e-6)
        assert y.grad_fn is None and torch.equal(y, ops.rms_norm(x, w, 1e-6))
        said = [str(m.message) for m in seen]
        assert said == ["`import kernels` finds /site-packages/kernels/__init__.py, not "
                        "Whetstone's kernels/ (PyPI's `kernels` has the same name; pip uninstall "
                        "kernels): using the PyTorch reference",
                        "WHETSTONE_KERNELS=triton, but Triton or Whetstone's kernels do not "
                        "import: using the PyTorch reference"], said
    finally:
        monkeypatch.undo()
        ops.triton_available.cache_clear()
        ops._forced_but_unusable.cache_clear()
    assert ops.triton_available()  # ours again
