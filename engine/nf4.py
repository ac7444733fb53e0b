"""NF4 4-bit weights (QLoRA, Dettmers et al. 2023), bit-compatible with the bitsandbytes layout.

Follows shared/FORMATS.md section 1, read from bitsandbytes 0.50 (functional.py, backends/default
and csrc/cpu_ops): the 16-value NF4 code, blocks of 64, element 2i in the HIGH nibble, and double
quantization of the per-block absmax onto the signed 8-bit dynamic map in groups of 256 around
their mean. This file is the PyTorch reference; Triton kernels plug in through engine/ops.py.

    q = quantize_nf4(w)                   # NF4Weight: packed, absmax_q, nested_absmax, offset ...
    w2 = dequantize_nf4(q, torch.bfloat16)
    layer = NF4Linear.from_linear(linear)  # frozen 4-bit linear, input gradient only
    report = quantize_model(model)         # every nn.Linear except lm_head / embed_tokens
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import ops

# The 16 NF4 codes, exact float32 values (quantiles of N(0, 1) normalised to [-1, 1]).
NF4_CODE = torch.tensor(ops.NF4_CODE_VALUES, dtype=torch.float32)
# Decision thresholds: midpoints of adjacent codes, computed in float32 as bitsandbytes does.
NF4_THRESHOLDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
NESTED_BLOCKSIZE = 256  # absmax values per fp32 group scale in double quantization
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the sizes bitsandbytes accepts


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map: bitsandbytes create_dynamic_map(True, 7, 8), same float32 ops.

    For exponent e = 0..6 there are 2**e linearly spaced fractions in (0.1, 1] (midpoints of
    linspace(0.1, 1, 2**e + 1)), scaled by 10**(e - 6), with both signs; plus 0 and 1.0.
    256 sorted values: min -0.99297, code[127] = 0, code[255] = 1.
    """
    data: list[float] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + e)) * means).tolist()
        data += (-(10 ** (-6 + e)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_MAP = dynamic_map()


@dataclass
class NF4Weight:
    """One quantized weight. absmax[b] = nested_code[absmax_q[b]] * nested_absmax[b // 256] + offset
    with double quantization; otherwise `absmax` holds the fp32 block scales directly."""
    packed: torch.Tensor                # uint8 [(numel + 1) // 2], element 2i in the high nibble
    absmax_q: torch.Tensor | None       # uint8 [n_blocks] (double quant) else None
    absmax: torch.Tensor | None         # float32 [n_blocks] (no double quant) else None
    nested_absmax: torch.Tensor | None  # float32 [ceil(n_blocks / 256)] (double quant)
    nested_code: torch.Tensor | None    # float32 [256] dynamic map (double quant)
    offset: float                       # mean of the block absmax (0.0 without double quant)
    shape: tuple
    blocksize: int
    dtype: torch.dtype                  # dtype of the original weight

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def payload_bytes(self) -> int:
        """Bytes of codes and scales (what 4.127 bits/param counts; not the 1 KiB code table)."""
        scales = self.absmax_q if self.absmax_q is not None else self.absmax
        n = self.packed.numel() + scales.numel() * scales.element_size()
        return n + (self.nested_absmax.numel() * 4 if self.nested_absmax is not None else 0)

    def bits_per_param(self) -> float:
        return 8 * self.payload_bytes() / self.numel


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")


def _blockwise_absmax_scaled(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (n,) fp32 -> (absmax (n_blocks,), x / absmax clamped to [-1, 1]). Bitsandbytes' exact
    arithmetic: full blocks multiply by the fp32 reciprocal, the partial tail block divides, and
    the tail's stored absmax is clamped to 1e-38 (the full blocks' stored absmax is not)."""
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)                        # (n_full, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        tail_max = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(x[full:] / tail_max, -1, 1)])
    return absmax, scaled


def _dynamic_lut() -> torch.Tensor:
    """65536-entry table: grid point j (value 2j/65535 - 1) -> nearest DYNAMIC_MAP index, ties
    to the lower one. bitsandbytes' CPU kernel quantizes through such a table (checked on every
    entry by tests/test_nf4.py), so codes narrower than the grid step 3.05e-5 near zero are
    unreachable, and values near a midpoint can land on the farther code."""
    grid = torch.arange(65536, dtype=torch.float64) / 65535 * 2 - 1
    code = DYNAMIC_MAP.double()
    hi = torch.searchsorted(code, grid, right=True).clamp(1, 255)   # first code > g
    lo = hi - 1
    return torch.where((grid - code[hi]).abs() < (grid - code[lo]).abs(), hi, lo).to(torch.uint8)


DYNAMIC_LUT = _dynamic_lut()


def _quantize_absmax(centered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization onto DYNAMIC_MAP in groups of 256, bit-exact with
    bitsandbytes' CPU kernel: v = x / group_absmax, j = trunc(((v + 1) * 0.5) * 65535 + 0.5)
    in float32, code = DYNAMIC_LUT[j]. centered: (n_blocks,) fp32 -> (uint8 codes, group absmax)."""
    n = centered.numel()
    pad = (-n) % NESTED_BLOCKSIZE
    groups = F.pad(centered, (0, pad)).view(-1, NESTED_BLOCKSIZE)  # zero padding never wins a max
    group_absmax = groups.abs().amax(dim=-1)
    # no clamp of the divisor: bitsandbytes divides by a subnormal group absmax as it is
    v = groups / group_absmax.view(-1, 1)
    # A zero group (one block, or all absmax equal) is 0/0 = NaN in bitsandbytes, which lands on
    # index 0; any index dequantizes to exactly `offset` there. Use -1 -> index 0 likewise.
    v = torch.where(group_absmax.view(-1, 1) == 0, -1.0, v).reshape(-1)[:n].clamp(-1, 1)
    j = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)     # float32 ops, then truncate
    return DYNAMIC_LUT.to(centered.device)[j], group_absmax


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize any float tensor (flattened row-major) to NF4. Bit-identical to bitsandbytes'
    CPU quantize_4bit(weight, blocksize, quant_type="nf4", compress_statistics=double_quant),
    on any device. (bitsandbytes' CUDA kernel searches the 8-bit code without the CPU lookup
    table, so its nested absmax codes can differ from its own CPU backend by one step.)"""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_nf4 needs a float32/float16/bfloat16 tensor, "
                         f"got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("quantize_nf4 got an empty tensor")
    _check_blocksize(blocksize)
    x = weight.detach().reshape(-1).float()                          # (n,)
    if not torch.isfinite(x).all():
        raise ValueError("quantize_nf4: weight contains NaN or inf")
    absmax, scaled = _blockwise_absmax_scaled(x, blocksize)
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))                               # odd count: pad one zero
    idx = torch.bucketize(scaled, NF4_THRESHOLDS.to(x.device)).to(torch.uint8)  # x == t -> lower
    packed = (idx[0::2] << 4) | idx[1::2]                            # (ceil(n / 2),)
    q = NF4Weight(packed=packed, absmax_q=None, absmax=absmax, nested_absmax=None,
                  nested_code=None, offset=0.0, shape=tuple(weight.shape), blocksize=blocksize,
                  dtype=weight.dtype)
    if double_quant:
        # fp32 mean as bitsandbytes takes it; on the CPU so that CUDA inputs give the same bits
        offset = absmax.cpu().mean().item()
        q.absmax_q, q.nested_absmax = _quantize_absmax(absmax - offset)
        q.absmax, q.nested_code, q.offset = None, DYNAMIC_MAP.to(x.device), offset
    return q


def block_absmax(q: NF4Weight) -> torch.Tensor:
    """The fp32 per-block scales (n_blocks,), undoing double quantization if present."""
    if q.absmax_q is None:
        return q.absmax
    group = q.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: q.absmax_q.numel()]
    return q.nested_code[q.absmax_q.long()] * group + q.offset   # two fp32 roundings, as bnb


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """w[i] = code[nibble(i)] * absmax[i // blocksize] in fp32, cast to `dtype` (default: the
    original dtype). Returns a tensor of q.shape."""
    nibbles = torch.stack([q.packed >> 4, q.packed & 15], dim=-1).reshape(-1)[: q.numel].long()
    absmax = block_absmax(q)
    pad = (-q.numel) % q.blocksize
    w = NF4_CODE.to(q.packed.device)[nibbles]                          # (n,)
    w = (F.pad(w, (0, pad)).view(-1, q.blocksize) * absmax.view(-1, 1)).reshape(-1)[: q.numel]
    return w.to(dtype or q.dtype).view(q.shape)


# ---------------------------------------------------------------------------------------------
# bitsandbytes state-dict keys (Linear4bit._save_to_state_dict / QuantState.as_dict(packed=True))
# ---------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_bnb_state_dict(q: NF4Weight, prefix: str = "") -> dict[str, torch.Tensor]:
    """Keys `{prefix}weight`, `weight.absmax`, `weight.quant_map`, [`weight.nested_absmax`,
    `weight.nested_quant_map`], `weight.quant_state.bitsandbytes__nf4` (uint8 JSON bytes)."""
    p = prefix + "weight"
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": _dtype_name(q.dtype),
            "shape": list(q.shape)}
    sd = {p: q.packed.reshape(-1, 1),
          p + ".absmax": q.absmax_q if q.absmax_q is not None else q.absmax,
          p + ".quant_map": NF4_CODE.clone()}
    if q.absmax_q is not None:
        sd[p + ".nested_absmax"] = q.nested_absmax
        sd[p + ".nested_quant_map"] = q.nested_code.clone()
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                    nested_offset=q.offset)
    sd[p + ".quant_state.bitsandbytes__nf4"] = torch.tensor(
        list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return sd


def from_bnb_state_dict(sd: dict[str, torch.Tensor], prefix: str = "") -> NF4Weight:
    """Inverse of to_bnb_state_dict; reads any bitsandbytes NF4 Linear4bit state dict. A missing
    key or sizes that disagree with the recorded shape raise one ValueError naming the tensor."""
    p = prefix + "weight"
    key = p + ".quant_state.bitsandbytes__nf4"
    if key not in sd:
        raise ValueError(f"{key} missing: not a bitsandbytes NF4 state dict (fp4 is unsupported)")
    nested = p + ".nested_absmax" in sd
    try:
        meta = json.loads(bytes(sd[key].cpu().numpy().tobytes()).decode("utf-8"))
        shape, blocksize = tuple(int(d) for d in meta["shape"]), int(meta["blocksize"])
        dtype = getattr(torch, str(meta["dtype"]), None)
        offset = float(meta["nested_offset"]) if nested else 0.0
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError too
        raise ValueError(f"{key}: unreadable quantization state ({type(e).__name__}: {e})") \
            from None
    if meta.get("quant_type", "nf4") != "nf4":
        raise ValueError(f"{key}: quant_type {meta.get('quant_type')!r} is not 'nf4'")
    _check_blocksize(blocksize)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{key}: dtype {meta['dtype']!r} is not float32/float16/bfloat16")
    needed = [p, p + ".absmax", p + ".quant_map"] + [p + ".nested_quant_map"] * nested
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"bitsandbytes NF4 state dict lacks {', '.join(missing)}")
    if not torch.equal(sd[p + ".quant_map"].float().cpu(), NF4_CODE):
        raise ValueError(f"{p}.quant_map is not the NF4 code")
    if nested and meta.get("nested_blocksize") != NESTED_BLOCKSIZE:
        raise ValueError(f"nested_blocksize must be {NESTED_BLOCKSIZE}, "
                         f"got {meta.get('nested_blocksize')}")
    absmax = sd[p + ".absmax"]
    q = NF4Weight(
        packed=sd[p].reshape(-1).view(torch.uint8), shape=shape,
        absmax_q=absmax if nested else None, absmax=None if nested else absmax.float(),
        nested_absmax=sd[p + ".nested_absmax"].float() if nested else None,
        nested_code=sd[p + ".nested_quant_map"].float() if nested else None,
        offset=offset, blocksize=blocksize, dtype=dtype)
    sizes = {p: (q.packed.numel(), (q.numel + 1) // 2),
             p + ".absmax": (absmax.numel(), q.n_blocks)}
    if nested:
        sizes[p + ".nested_absmax"] = (q.nested_absmax.numel(), -(-q.n_blocks // NESTED_BLOCKSIZE))
        sizes[p + ".nested_quant_map"] = (q.nested_code.numel(), 256)
    for k, (have, want) in sizes.items():
        if have != want:
            raise ValueError(f"{k} has {have} elements but a {list(shape)} weight in blocks of "
                             f"{blocksize} needs {want}")
    return q


# ---------------------------------------------------------------------------------------------
# NF4 linear layer: frozen 4-bit base weight, gradient for the input only
# ---------------------------------------------------------------------------------------------
def _ops_fields(q: NF4Weight) -> tuple:
    """NF4Weight -> the positional fields of ops.nf4_linear / ops.nf4_dequantize."""
    scales = q.absmax_q if q.absmax_q is not None else q.absmax
    return q.packed, scales, q.nested_absmax, q.nested_code, q.offset, q.shape


def nf4_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: (..., in) -> (..., out) in x's dtype, through engine.ops: the fused Triton kernel on
    CUDA; on CPU an autograd function that dequantizes W (same math as dequantize_nf4) in
    forward and again in backward, returning the input (and bias) gradient only."""
    return ops.nf4_linear(x, *_ops_fields(q), bias=bias, blocksize=q.blocksize)


def nf4_dense_weight(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Dense (out, in) weight through engine.ops (Triton on CUDA). dequantize_nf4 is the exact
    reference; this is for hot paths such as DoRA's weight norm."""
    return ops.nf4_dequantize(*_ops_fields(q), dtype=dtype, blocksize=q.blocksize)


_FP32_BUFFERS = ("absmax", "nested_absmax", "nested_code")


def register_nf4(module: nn.Module, q: NF4Weight) -> None:
    """Give `module` the NF4 buffers (packed, absmax_q | absmax, nested_absmax, nested_code,
    offset) and metadata. Shared by NF4Linear and lora.LoRALinear over a 4-bit base."""
    for name in ("packed", "absmax_q", *_FP32_BUFFERS):
        module.register_buffer(name, getattr(q, name))
    # offset lives on the CPU so that reading it never synchronises a GPU
    module.register_buffer("offset", torch.tensor(q.offset, dtype=torch.float32))
    module.weight_shape, module.blocksize = tuple(q.shape), q.blocksize
    module.weight_dtype = q.dtype


def nf4_of(module: nn.Module) -> NF4Weight:
    """The NF4Weight view of a module's buffers (no copy)."""
    return NF4Weight(packed=module.packed, absmax_q=module.absmax_q, absmax=module.absmax,
                     nested_absmax=module.nested_absmax, nested_code=module.nested_code,
                     offset=float(module.offset), shape=module.weight_shape,
                     blocksize=module.blocksize, dtype=module.weight_dtype)


def apply_keeping_nf4(module: nn.Module, super_apply, fn, recurse: bool = True) -> nn.Module:
    """Module._apply that moves the NF4 buffers but never casts them (model.half() would
    destroy the fp32 scales) and leaves `offset` on the CPU."""
    saved = {n: module._buffers[n] for n in _FP32_BUFFERS if module._buffers.get(n) is not None}
    offset = module._buffers["offset"]
    super_apply(fn, recurse)
    for n, t in saved.items():
        module._buffers[n] = t.to(module._buffers[n].device)
    module._buffers["offset"] = offset
    return module


def _empty_nf4(out_features: int, in_features: int, blocksize: int, double_quant: bool,
               dtype: torch.dtype, device=None) -> NF4Weight:
    """Zero buffers of the right sizes (to load a state dict into)."""
    n = out_features * in_features
    nb = -(-n // blocksize)
    u8, f32 = dict(dtype=torch.uint8, device=device), dict(dtype=torch.float32, device=device)
    return NF4Weight(
        packed=torch.zeros((n + 1) // 2, **u8),
        absmax_q=torch.zeros(nb, **u8) if double_quant else None,
        absmax=None if double_quant else torch.zeros(nb, **f32),
        nested_absmax=torch.zeros(-(-nb // NESTED_BLOCKSIZE), **f32) if double_quant else None,
        nested_code=DYNAMIC_MAP.to(device) if double_quant else None, offset=0.0,
        shape=(out_features, in_features), blocksize=blocksize, dtype=dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4. Buffers: packed, absmax_q (or absmax), nested_absmax,
    nested_code, offset; optional `bias` (a frozen parameter in the compute dtype)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 blocksize: int = 64, double_quant: bool = True,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        _check_blocksize(blocksize)
        self.in_features, self.out_features = in_features, out_features
        empty = _empty_nf4(out_features, in_features, blocksize, double_quant, dtype, device)
        register_nf4(self, empty)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_nf4(cls, q: NF4Weight, bias: torch.Tensor | None = None) -> "NF4Linear":
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {q.shape}")
        layer = cls(q.shape[1], q.shape[0], bias=False, blocksize=q.blocksize,
                    double_quant=q.absmax_q is not None, dtype=q.dtype, device="meta")
        register_nf4(layer, q)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64,
                    double_quant: bool = True) -> "NF4Linear":
        return cls.from_nf4(quantize_nf4(linear.weight, blocksize, double_quant), linear.bias)

    def nf4_weight(self) -> NF4Weight:
        return nf4_of(self)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W as a dense (out, in) tensor in `dtype` (default: the original weight dtype)."""
        return dequantize_nf4(nf4_of(self), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, nf4_of(self), self.bias)

    def _apply(self, fn, recurse=True):
        return apply_keeping_nf4(self, super()._apply, fn, recurse)

    def to_bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        sd = to_bnb_state_dict(nf4_of(self), prefix)
        if self.bias is not None:
            sd[prefix + "bias"] = self.bias.detach()
        return sd

    def extra_repr(self) -> str:
        dq = "double_quant" if self.absmax_q is not None else "fp32 absmax"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, {dq}")


def _matches(name: str, patterns) -> bool:
    parts = name.split(".")
    return any(p == name or p in parts or name.endswith("." + p) for p in patterns)


def quantize_model(model: nn.Module, skip=("lm_head", "embed_tokens"), blocksize: int = 64,
                   double_quant: bool = True) -> dict:
    """Replace every nn.Linear leaf (except names matching `skip`: a path component or a dotted
    suffix) by an NF4Linear, in place. Returns {"layers", "params", "bytes_before",
    "bytes_after", "bits_per_param", "skipped"}; bits_per_param counts codes and scales
    (4.127 with double quant), bytes_after all NF4 buffers including the 1 KiB code tables."""
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("quantize_model must run before apply_lora (the model has LoRA layers)")
    q = QuantizeOnLoad(skip, blocksize, double_quant)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            q(model, name + ".weight")
    return q.report()


class QuantizeOnLoad:
    """Quantizes an nn.Linear to NF4 when called with the name of its just-loaded weight.
    Passed as `on_tensor` to the loaders (engine.hub.load_model(..., quantize="nf4")), it
    keeps the full-precision model from ever existing at once: QLoRA's load peak is the NF4
    weights, the unquantized embeddings / norms / lm_head, and one linear's weight."""

    def __init__(self, skip=("lm_head", "embed_tokens"), blocksize: int = 64,
                 double_quant: bool = True):
        _check_blocksize(blocksize)
        self.skip = (skip,) if isinstance(skip, str) else tuple(skip)
        self.blocksize, self.double_quant = blocksize, double_quant
        self.counts = dict(layers=0, params=0, bytes_before=0, bytes_after=0, payload_bytes=0)
        self.skipped: list[str] = []

    def __call__(self, model: nn.Module, tensor_name: str) -> None:
        name, _, leaf = tensor_name.rpartition(".")
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, child_name, None)
        if leaf != "weight" or not isinstance(child, nn.Linear):
            return
        if _matches(name, self.skip):
            self.skipped.append(name)
            return
        # A bias not loaded yet is a meta tensor here; the loader assigns it into the NF4Linear.
        layer = NF4Linear.from_linear(child, self.blocksize, self.double_quant)
        setattr(parent, child_name, layer)
        c = self.counts
        c["layers"] += 1
        c["params"] += child.weight.numel()
        c["bytes_before"] += child.weight.numel() * child.weight.element_size()
        c["payload_bytes"] += layer.nf4_weight().payload_bytes()
        c["bytes_after"] += sum(b.numel() * b.element_size() for b in layer.buffers()
                                if b is not layer.bias)

    def report(self) -> dict:
        out = {k: v for k, v in self.counts.items() if k != "payload_bytes"}
        out["bits_per_param"] = 8 * self.counts["payload_bytes"] / max(self.counts["params"], 1)
        out["skipped"] = list(self.skipped)
        return out
