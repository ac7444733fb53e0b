"""Llama-family decoder-only transformer (Llama 2/3, Mistral, Qwen2, SmolLM2, TinyLlama).

Follows Hugging Face transformers' LlamaForCausalLM module names and math (shared/FORMATS.md
section 3), so `Transformer.state_dict()` is an HF Llama state dict: RMSNorm in fp32, RoPE in the
rotate_half convention with llama3 scaling, grouped-query attention, SwiGLU MLP, optional tied
embeddings, q/k/v bias (Qwen2) and sliding-window attention (Mistral). A preallocated KV cache
serves incremental decoding. The math of each op lives in engine/ops.py (kernel or reference).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine import ops
from engine.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """inv_freq[i] = 1 / theta^(2i/d), with optional linear or llama3 scaling. (d/2,) fp32."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu")
                                       .float() / d))
    rs = config.rope_scaling
    if not rs:
        return inv
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        return inv / rs["factor"]
    if kind == "llama3":
        factor, low, high = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_ctx = rs.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


class Rotary(nn.Module):
    """cos/sin of positions * inv_freq, computed per call as transformers' LlamaRotaryEmbedding
    does: elementwise from the positions, so no table has to be sized by `positions.max()` (a
    host sync every decode step on a GPU). Same fp32 values a cached table gave, bit for bit:
    one fp32 product per element, then the same elementwise cos/sin."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.inv_freq = rope_inv_freq(config)  # plain attribute: not in the state dict
        self._inv: dict[torch.device, torch.Tensor] = {}  # inv_freq per device, copied once

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) or (B, T) int64 -> cos, sin of shape (T, D) or (B, 1, T, D), fp32."""
        inv = self._inv.get(positions.device)
        if inv is None:
            inv = self._inv[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv  # (..., T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, D): rotate_half layout
        cos, sin = emb.cos(), emb.sin()
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


class KVCache:
    """Preallocated keys/values for every layer, sized to what the request needs.

    k[l], v[l]: (B, n_kv_heads, max_len, head_dim). `pos` = number of positions filled.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) at [pos, pos+T); return all filled keys and values."""
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens > {self.max_len}")
        self.k[layer][:, :, self.pos:self.pos + T] = k
        self.v[layer][:, :, self.pos:self.pos + T] = v
        end = self.pos + T
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search): new row i = old row index[i]."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, h, bias=False)
        self.window = config.sliding_window

    def forward(self, x, cos, sin, cache: KVCache | None = None, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        # transformers casts cos/sin to the activations' dtype (the residual stream's: fp32
        # under autocast, where q is bf16) and rotates in that dtype: x * cos + rotate_half(x) * sin
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D), S = cached + T
            if k.dtype != q.dtype:  # a cache made under another autocast setting than this step
                k, v = k.to(q.dtype), v.to(q.dtype)
        # a cache whose rows sit at different positions (the server's) puts each row's window
        # in `mask`: ops.attention's own window is placed by the last key, right for one row only
        window = None if getattr(cache, "window_in_mask", False) else self.window
        if window is not None and mask is None:
            # keys before the first query's window are never attended: drop them, as
            # transformers' sliding-window cache does (the same keys, so the same attention
            # kernel and summation order: decode bit-identical to it in bf16; O(window) a step)
            first = k.shape[2] - T - window + 1
            if first > 0:
                k, v = k[:, :, first:], v[:, :, first:]  # (B, Hkv, T + window - 1, D)
        y = ops.attention(q, k, v, causal=True, window=window, mask=mask)  # (B, Hq, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF's `LlamaModel`: the `model.` prefix of every key."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """`Transformer(config)(input_ids)` -> logits (B, T, vocab); with `labels`, the mean loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config)
        self.grad_checkpointing = False
        self.reset_parameters()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_parameters(self):
        """Normal(0, 0.02); residual output projections scaled by 1/sqrt(2 * n_layers) (GPT-2)."""
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, resid_std)
            else:
                nn.init.normal_(p, 0.0, std)
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, ignore_index: int = -100,
                reduction: str = "mean", logits_to_keep: int = 0):
        """input_ids: (B, T). labels: (B, T) targets already aligned with the inputs (the token
        that follows each position; ignore_index where no loss). doc_ids: (B, T) document index
        per position for packed sequences: attention never crosses documents. Returns logits
        (B, T, V) without labels; with labels the mean loss, or with reduction="none" the (B, T)
        fp32 NLL per position (0 where ignored), both without the full fp32 logits.
        logits_to_keep=N (transformers' argument): logits of the last N positions only, (B, N, V)
        (a prefill needs one row, not T x V)."""
        B, T = input_ids.shape
        x = self.hidden_states(input_ids, cache, position_ids, doc_ids)  # (B, T, H)
        if labels is None:
            return self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)  # (B, T|N, V)
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        x, labels = x.reshape(B * T, -1), labels.reshape(B * T)
        fused = type(self.lm_head) is nn.Linear  # never holds the full fp32 logits
        if reduction == "none":
            nll = (ops.linear_token_nll(x, self.lm_head.weight, labels, ignore_index) if fused else
                   F.cross_entropy(self.lm_head(x).float(), labels, ignore_index=ignore_index,
                                   reduction="none"))
            return nll.view(B, T)
        if fused:
            return ops.linear_cross_entropy(x, self.lm_head.weight, labels, ignore_index=ignore_index)
        # a wrapped head (LoRA on lm_head): plain path
        return ops.cross_entropy(self.lm_head(x), labels, ignore_index)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      position_ids: torch.Tensor | None = None,
                      doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm's output (B, T, H) for input_ids (B, T): forward's trunk, before the
        lm_head (forward's arguments; advances cache.pos by T)."""
        T = input_ids.shape[1]
        start = cache.pos if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device)
        cos, sin = self.rotary(position_ids)  # fp32
        mask = None
        if doc_ids is not None:  # (B, 1, T, T): same document only; causality added in ops
            mask = (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # once here, not in every layer (Attention)
        for layer in self.model.layers:
            if self.grad_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, None, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, mask)
        x = self.model.norm(x)
        if cache is not None:
            cache.pos += T
        return x

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache in the dtype k/v come out in: under autocast (on the weights' device) the
        autocast dtype, as q is (an fp32 cache there would double its memory, and on CUDA be
        cast back every step and keep the attention kernel away); else the weights' dtype."""
        p = self.lm_head.weight
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        if torch.is_autocast_enabled(p.device.type):
            dtype = torch.get_autocast_dtype(p.device.type)
        return KVCache(self.config, batch_size, max_len, dtype, p.device)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters; a 4-bit (NF4) linear's frozen weight counts as in*out elements."""
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        if not trainable_only:
            n += sum(m.in_features * m.out_features for m in self.modules()
                     if hasattr(m, "packed") and hasattr(m, "in_features"))
        return n
