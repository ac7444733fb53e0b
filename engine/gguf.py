"""GGUF import: llama.cpp model files -> a Transformer (dequantized) + config + tokenizer metadata.

Follows llama.cpp's gguf-py (GGUFReader, gguf.quants.dequantize), its tensor names and metadata
keys, and convert_hf_to_gguf.py's q/k row permutation for the llama architecture
(shared/FORMATS.md section 4). Tensors are dequantized a block of rows at a time straight into
preallocated parameters, read with plain file reads (no mmap pages kept resident), so peak memory
is the model in the chosen dtype plus one chunk.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import re
import struct
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from engine.checkpoint import assign_tensor, empty_model, parse_dtype
from engine.config import ModelConfig
from engine.model import Transformer, rope_inv_freq

Q = gguf.GGMLQuantizationType
SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Types gguf.quants can dequantize that we accept (the i-quants and ternary types are not).
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
_CHUNK_ELEMS = 1 << 20  # dequantize ~1M values (4 MB fp32) at a time

# GGUF tensor name -> HF name ({} = layer index).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass
class TensorInfo:
    name: str  # GGUF name
    qtype: gguf.GGMLQuantizationType
    shape: tuple  # PyTorch order (rows, cols)
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int


def hf_name(name: str) -> str | None:
    """HF tensor name for a GGUF tensor name (None: not a model weight, e.g. rope_freqs)."""
    m = _BLK.fullmatch(name)
    if m:
        i, part, kind = m.groups()
        return f"model.layers.{i}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    base, _, kind = name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # GGUFValueType -> struct format (8 = str, 9 = array)


class _Header:
    """Sequential little-endian reads over the mapped file: the GGUF key/value and tensor-info
    sections (gguf-py's GGUFReader makes a numpy view per string: ~3 s and ~160 MB for a
    49k-token vocabulary, so the header is walked here; data are still decoded by gguf.quants)."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        if fmt == "<f":  # float32 -> its shortest decimal, so 1e-5 reads back as 1e-5
            v = float(str(np.float32(v)))
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"string of {n} bytes runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if n > len(self.buf) - self.pos:
                raise ValueError(f"array of {n} items runs past the end of the file")
            if etype in _SCALARS and etype != 7:  # numbers: one numpy read
                dt = np.dtype(_SCALARS[etype].replace("?", "b"))
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
                self.pos += n * dt.itemsize
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.scalar(_SCALARS[vtype])


def read_gguf(path: str) -> tuple[dict, dict[str, TensorInfo]]:
    """Metadata as plain values and tensor descriptors; one clear error for a bad file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            h = _Header(buf)
            if bytes(buf[:4]) != b"GGUF":
                raise ValueError("not a GGUF file (bad magic)")
            h.pos = 4
            version = h.scalar("<I")
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version} (supported: 2, 3)")
            n_tensors, n_kv = h.scalar("<Q"), h.scalar("<Q")
            fields = {}
            for _ in range(n_kv):
                key = h.string()
                if key in fields:  # llama.cpp refuses these too
                    raise ValueError(f"duplicate metadata key {key!r}")
                fields[key] = h.value(h.scalar("<I"))
            infos, names = [], set()
            for _ in range(n_tensors):
                name = h.string()
                if name in names:
                    raise ValueError(f"duplicate tensor {name!r}")
                names.add(name)
                dims = [h.scalar("<Q") for _ in range(h.scalar("<I"))]
                infos.append((name, dims, h.scalar("<I"), h.scalar("<Q")))
            align = fields.get("general.alignment", 32)
            if not isinstance(align, int) or align <= 0:
                raise ValueError(f"bad general.alignment {align!r}")
            start = (h.pos + align - 1) // align * align
    except (ValueError, struct.error, OSError, IndexError) as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from None
    tensors = {}
    for name, dims, tid, off in infos:
        try:
            qtype = Q(tid)
        except ValueError:
            raise ValueError(f"{path}: tensor {name!r} has unknown type id {tid}") from None
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        n = int(np.prod(dims))
        if not dims:
            raise ValueError(f"{path}: tensor {name!r} has no dimensions")
        if dims[0] % block:
            raise ValueError(f"{path}: tensor {name!r} has rows of {dims[0]} values, not whole "
                             f"{qtype.name} blocks of {block}")
        # GGUF lists dims innermost-first; PyTorch order is the reverse.
        t = TensorInfo(name, qtype, tuple(reversed(dims)), start + off, n // block * nbytes)
        if t.offset + t.n_bytes > size:
            raise ValueError(f"GGUF file {path} is truncated: tensor {name!r} ends at byte "
                             f"{t.offset + t.n_bytes}, the file has {size}")
        tensors[name] = t
    return fields, tensors


def config_from_gguf(fields: dict, tensors: dict[str, TensorInfo],
                     path: str = "GGUF") -> ModelConfig:
    """ModelConfig from `{arch}.*` metadata; vocab from the embedding rows (checked against the
    token list), tied when there is no `output` tensor, bias when `attn_q.bias` exists."""
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: "
                         + ", ".join(SUPPORTED_ARCHS))

    def get(key, default=KeyError, kind=None):
        v = fields.get(f"{arch}.{key}", default)
        if v is KeyError:
            raise ValueError(f"{path}: GGUF metadata is missing {arch}.{key}")
        if kind is not None and v is not None:  # an array or a string where a number belongs
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"{path}: GGUF metadata {arch}.{key} must be a number, "
                                 f"got {type(v).__name__}")
            v = kind(v)
        return v

    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor")
    rows = tensors["token_embd.weight"].shape[0]
    n_tokens = len(fields.get("tokenizer.ggml.tokens") or [])
    declared = get("vocab_size", None)
    if n_tokens > rows or (declared is not None and declared != rows):
        raise ValueError(f"{path}: vocab size ({declared or n_tokens}) does not match the "
                         f"{rows} rows of token_embd.weight")
    n_head, hidden = get("attention.head_count", kind=int), get("embedding_length", kind=int)
    if n_head < 1:
        raise ValueError(f"{path}: num_attention_heads must be a positive integer, got {n_head}")
    head_dim = get("attention.key_length", hidden // n_head, kind=int)
    rot = get("rope.dimension_count", head_dim)
    if rot != head_dim:
        raise ValueError(f"{path}: partial rotary ({rot} of {head_dim} dims) is not supported")
    # As llama.cpp's llama_model::load_hparams: the type defaults to linear, the factor is
    # rope.scaling.factor or the older rope.scale_linear, and a missing or 0 factor means none.
    rope_scaling = None
    kind = get("rope.scaling.type", "linear")
    if kind not in ("linear", "none"):
        raise ValueError(f"{path}: unsupported rope scaling {kind!r} (supported: linear, llama3)")
    factor = get("rope.scaling.factor", None, kind=float)
    if factor is None:
        factor = get("rope.scale_linear", None, kind=float)
    if kind == "linear" and factor:
        rope_scaling = {"rope_type": "linear", "factor": factor}
    ffn, layers = get("feed_forward_length", kind=int), get("block_count", kind=int)
    # checked before a model is built: a corrupt count (millions of layers) took minutes and GBs
    in_file = 1 + max((int(m[1]) for n in tensors if (m := _BLK.fullmatch(n))), default=-1)
    if layers != in_file:
        raise ValueError(f"{path}: {arch}.block_count is {layers}, but the file has tensors for "
                         f"{in_file} blocks")
    n_kv = get("attention.head_count_kv", n_head, kind=int)
    ctx = get("context_length", 2048, kind=int)
    eps = get("attention.layer_norm_rms_epsilon", kind=float)
    theta = get("rope.freq_base", 10000.0, kind=float)
    try:
        return ModelConfig(
            vocab_size=rows, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=n_head, num_key_value_heads=n_kv, head_dim=head_dim,
            max_position_embeddings=ctx, rms_norm_eps=eps, rope_theta=theta,
            rope_scaling=rope_scaling, tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
            architectures=[SUPPORTED_ARCHS[arch]])
    except ValueError as e:  # ModelConfig's checks (0 heads, 0 layers...): name the file
        raise ValueError(f"{path}: {e}") from None


def _llama3_from_rope_freqs(cfg: ModelConfig, factors: torch.Tensor, fields: dict,
                            path: str) -> dict:
    """llama.cpp stores Llama 3.1 scaling as per-frequency divisors (`rope_freqs`); find the
    llama3 rope_scaling parameters that reproduce them (factor = the largest divisor)."""
    arch = fields.get("general.architecture")
    old_ctx = fields.get(f"{arch}.rope.scaling.original_context_length", 8192)
    rs = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": int(old_ctx)}
    got = (rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
           / rope_inv_freq(dataclasses.replace(cfg, rope_scaling=rs)))
    if got.shape != factors.shape or not torch.allclose(got, factors.float(), rtol=1e-3):
        raise ValueError(f"{path}: rope_freqs tensor does not match llama3 scaling; not supported")
    return rs


def _read_rows(f, info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """Dequantized rows [start, stop) of a tensor as float32 (stop - start, cols)."""
    rows, cols = (1, info.shape[0]) if len(info.shape) == 1 else info.shape
    row_bytes = info.n_bytes // rows
    f.seek(info.offset + start * row_bytes)
    raw = np.empty((stop - start, row_bytes), dtype=np.uint8)
    if f.readinto(memoryview(raw).cast("B")) != raw.nbytes:
        raise ValueError(f"{f.name}: tensor {info.name!r} is truncated")
    return gguf.quants.dequantize(raw, info.qtype).reshape(stop - start, cols)


def _fill(param: torch.Tensor, f, info: TensorInfo) -> None:
    """Dequantize `info` into `param` chunk by chunk: only one chunk of fp32 at a time."""
    view = param.view(1, -1) if param.dim() == 1 else param
    rows, cols = view.shape
    step = max(1, _CHUNK_ELEMS // cols)
    for r in range(0, rows, step):
        chunk = _read_rows(f, info, r, min(rows, r + step))
        view[r:r + chunk.shape[0]].copy_(torch.from_numpy(chunk))


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's permute (llama arch): per head, interleaved RoPE pairs back to
    HF's rotate_half halves. w: (n_head * head_dim, in) or a bias (n_head * head_dim,)."""
    rest = w.shape[1:]
    return w.reshape(n_head, -1, 2, *rest).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's permute (the inverse of unpermute_qk); used by tests and writers."""
    rest = w.shape[1:]
    return w.reshape(n_head, 2, -1, *rest).transpose(1, 2).reshape(w.shape)


def load_gguf(path: str, dtype: torch.dtype | str = torch.float32,
              device: str | torch.device = "cpu", on_tensor=None) -> tuple[Transformer, dict]:
    """(model, metadata fields). Each tensor is dequantized into a preallocated parameter;
    `on_tensor(model, hf_name)` runs after each (engine.nf4.QuantizeOnLoad)."""
    dtype = parse_dtype(dtype)
    fields, tensors = read_gguf(path)
    cfg = config_from_gguf(fields, tensors, path)
    for t in tensors.values():
        if t.qtype not in SUPPORTED_TYPES:
            raise ValueError(f"{path}: tensor {t.name!r} has unsupported quant type "
                             f"{t.qtype.name}; supported: "
                             + ", ".join(q.name for q in SUPPORTED_TYPES))
    with open(path, "rb") as f:
        if "rope_freqs.weight" in tensors:
            factors = torch.from_numpy(_read_rows(f, tensors["rope_freqs.weight"], 0, 1)[0])
            cfg.rope_scaling = _llama3_from_rope_freqs(cfg, factors, fields, path)
        model = empty_model(cfg)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            shapes.pop("lm_head.weight")
        permute = fields["general.architecture"] == "llama"
        done = set()
        for t in tensors.values():
            name = hf_name(t.name)
            if name is None:
                if t.name != "rope_freqs.weight":
                    raise ValueError(f"{path}: unexpected GGUF tensor {t.name!r}")
                continue
            if name not in shapes or shapes[name] != t.shape:
                want = shapes.get(name, "no such tensor")
                raise ValueError(f"{path}: tensor {t.name!r} has shape {t.shape}, expected {want}")
            param = torch.empty(t.shape, dtype=dtype, device=device)
            _fill(param, f, t)
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            if permute and kind in ("attn_q", "attn_k"):
                n = cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads
                param.copy_(unpermute_qk(param, n))
            assign_tensor(model, name, param)
            del param  # a hook that replaces the module frees the full-precision weight
            if on_tensor is not None:
                on_tensor(model, name)
            done.add(name)
    missing = [k for k in shapes if k not in done]
    if missing:
        raise ValueError(f"{path}: GGUF file is missing tensor for {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.tie_weights()
    return model.eval(), fields


def tokenizer_from_gguf(fields: dict, path: str = "GGUF"):
    """The tokenizer described by GGUF metadata (tokens, merges or scores, special ids, add-BOS,
    chat template), built by tokenizer/ (no torch there). None if the file has no tokenizer."""
    if fields.get("tokenizer.ggml.model") in (None, "none", "no_vocab"):  # llama.cpp's no-vocab
        return None
    from tokenizer import from_gguf_metadata
    try:
        return from_gguf_metadata(fields)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
