"""Model and training configuration: dataclasses whose JSON form is a Hugging Face `config.json`.

Follows the key names of transformers' LlamaConfig / MistralConfig / Qwen2Config
(shared/FORMATS.md section 3). Presets are looked up by exact name only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

# HF `architectures` value -> model_type.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None = num_attention_heads (plain MHA)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    sliding_window: int | None = None  # Mistral: key j visible to query i iff i - window < j <= i
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    architectures: list[str] = field(default_factory=lambda: ["LlamaForCausalLM"])
    torch_dtype: str = "float32"

    def __post_init__(self):
        # A zero / non-integer size would otherwise surface later as a ZeroDivisionError or
        # TypeError deep in model construction (no file named, no clear cause).
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if v is None and name in ("num_key_value_heads", "head_dim"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("rms_norm_eps", "rope_theta"):  # a null / string here was a TypeError later
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        v = self.max_position_embeddings
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"max_position_embeddings must be a positive integer, got {v!r}")
        _check_rope_scaling(self.rope_scaling)
        _check_types(self)
        self.rope_scaling = _complete_llama3(self.rope_scaling, self.max_position_embeddings)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                                 f"num_attention_heads {self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in ("silu", "swish"):  # one function in transformers' ACT2FN
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} (only 'silu', also "
                             "called 'swish')")

    # Derived fields -------------------------------------------------------------------------
    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def model_type(self) -> str:
        return ARCHITECTURES.get(self.architectures[0], "llama")

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else list(e) if isinstance(e, (list, tuple)) else [e]

    def num_parameters(self) -> int:
        h, i, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        block = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + L * block + h

    # JSON io (HF config.json) ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = self.model_type
        if self.model_type == "qwen2" and self.sliding_window:  # HF Qwen2: a window on every layer
            d.update(use_sliding_window=True, max_window_layers=0)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from an HF config.json dict (transformers 4 or 5 RoPE layout); unknown keys ignored."""
        d = dict(d)
        q = d.get("quantization_config")
        if q:  # GPTQ / AWQ / bitsandbytes / FP8 weights need their own kernels and scales
            method = q.get("quant_method", "?") if isinstance(q, dict) else q
            raise ValueError(f"quantized checkpoints are not supported (quantization_config "
                             f"quant_method {method!r}); use the unquantized model or a GGUF")
        arch = d.get("architectures")
        if isinstance(arch, str):  # a bare string, not a list: arch[0] would be its first letter
            arch = [arch]
        if not arch:  # older configs name only the model_type
            mt = d.get("model_type", "llama")
            if mt not in _ARCH_BY_TYPE:
                raise ValueError(f"unsupported model_type {mt!r}; supported: "
                                 + ", ".join(_ARCH_BY_TYPE))
            arch = [_ARCH_BY_TYPE[mt]]
        if not isinstance(arch[0], str) or arch[0] not in ARCHITECTURES:  # [["..."]]: unhashable
            raise ValueError(f"unsupported architecture {arch[0]!r}; supported: "
                             + ", ".join(ARCHITECTURES))
        d["architectures"] = [arch[0]]
        # transformers 5: rope_parameters = {rope_theta, rope_type, factor, ...}; a transformers 4
        # rope_scaling, when set, replaces it whole (its convert_rope_params_to_dict), and a
        # rope_theta inside wins over a top-level one
        rp = d.pop("rope_parameters", None)
        for key, v in (("rope_parameters", rp), ("rope_scaling", d.get("rope_scaling"))):
            if v is not None and not isinstance(v, dict):
                raise ValueError(f"{key} must be an object or null, got {v!r}")
        rope = dict(d.get("rope_scaling") or rp or {})
        if any(isinstance(v, dict) for v in rope.values()):  # Gemma 3's one per layer type
            raise ValueError("rope_parameters per layer type are not supported (Llama, Mistral "
                             "and Qwen2 have one set)")
        if "rope_theta" in rope:
            d["rope_theta"] = rope.pop("rope_theta")
        kind = rope.get("rope_type", rope.get("type", "default"))
        d["rope_scaling"] = None if kind == "default" else rope
        family = ARCHITECTURES[arch[0]]
        for k, v in _HF_DEFAULTS[family].items():  # keys a partial config leaves out
            d.setdefault(k, v)
        if family == "qwen2":
            d["attention_bias"] = True  # HF Qwen2 always has q/k/v bias, whatever the key says
            d["sliding_window"] = _qwen2_window(d)
        elif family == "llama":
            d["sliding_window"] = None  # Llama has no window even if a config carries the key
            # HF Llama's attention_bias also puts a bias on o_proj, and mlp_bias on the MLP.
            if d.get("attention_bias") or d.get("mlp_bias"):
                raise ValueError("LlamaForCausalLM with attention_bias/mlp_bias is not supported")
            d["attention_bias"] = False  # a null there: no bias, as in transformers
        else:  # mistral: HF's MistralAttention has no q/k/v bias, whatever the key says.
            # Its sliding_window defaults to 4096 (in _HF_DEFAULTS; an explicit null: no window)
            d["attention_bias"] = False
        if "torch_dtype" not in d and "dtype" in d:
            d["torch_dtype"] = d["dtype"]
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"config is missing required keys: {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("torch_dtype") is None:
            kwargs.pop("torch_dtype", None)
        return cls(**kwargs)

    def save(self, path: str) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)


_ARCH_BY_TYPE = {v: k for k, v in ARCHITECTURES.items()}
# transformers' LlamaConfig / MistralConfig / Qwen2Config defaults that differ from ours, for
# keys a config.json leaves out (an explicit null num_key_value_heads still means "= heads").
_HF_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6),
    "mistral": dict(rms_norm_eps=1e-6, num_key_value_heads=8, max_position_embeddings=131072,
                    sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, num_key_value_heads=32, max_position_embeddings=32768,
                  bos_token_id=None, eos_token_id=None),
}
_ROPE_TYPES = ("linear", "llama3")  # what engine.model.rope_inv_freq implements


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_types(c: "ModelConfig") -> None:
    """One line for a config.json value of the wrong type: a string "false" tied the head
    silently (any non-empty string is true), a string window or llama3 key was a TypeError
    deep inside the model, a window of 0 or -1 hid every key."""
    for name in ("tie_word_embeddings", "attention_bias"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(c, name)!r}")
    w = c.sliding_window
    if w is not None and (not _is_int(w) or w < 1):
        raise ValueError(f"sliding_window must be a positive integer or null, got {w!r}")
    v = c.initializer_range
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
        raise ValueError(f"initializer_range must be a non-negative number, got {v!r}")
    for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
        v = getattr(c, name)
        listed = name == "eos_token_id" and isinstance(v, (list, tuple))
        if not (all(_is_int(i) for i in v) if listed else v is None or _is_int(v)):
            what = "a token id, a list of ids" if name == "eos_token_id" else "a token id"
            raise ValueError(f"{name} must be {what} or null, got {v!r}")
    rs = c.rope_scaling or {}
    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        v = rs.get(key, 1)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ValueError(f"rope_scaling {key} must be a positive number, got {v!r}")


def _qwen2_window(d: dict) -> int | None:
    """transformers' Qwen2: a window only with use_sliding_window, on the layers `layer_types`
    marks sliding_attention (by default those >= max_window_layers). None for no layer, the
    window when every layer has it; some layers only is refused (one window for all here)."""
    use, window = d.get("use_sliding_window", False), d.get("sliding_window", 4096)
    if not isinstance(use, bool):
        raise ValueError(f"use_sliding_window must be true or false, got {use!r}")
    if not use or window is None:
        return None
    types, n = d.get("layer_types"), d.get("num_hidden_layers")
    if not _is_int(n):  # missing or not a count: the size checks say so
        return None
    if types is None:
        first = d.get("max_window_layers", 28)  # Qwen2Config's default
        if not _is_int(first):
            raise ValueError(f"max_window_layers must be an integer, got {first!r}")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    kinds = ("sliding_attention", "full_attention")
    if not isinstance(types, list) or len(types) != n or not all(t in kinds for t in types):
        raise ValueError(f"layer_types must list 'sliding_attention' or 'full_attention' for "
                         f"each of the {n} layers, got {types!r}")
    if all(t == "sliding_attention" for t in types):
        return window
    if "sliding_attention" in types:
        raise ValueError(f"Qwen2 use_sliding_window=true is not supported with a window on "
                         f"{types.count('sliding_attention')} of {len(types)} layers (only all "
                         "or none)")
    return None


def _check_rope_scaling(rs) -> None:
    """Refuse, at config time, a rope_scaling the model cannot apply (dynamic / yarn / longrope
    change the math beyond inv_freq) or one without its `factor`."""
    if rs is None:
        return
    if not isinstance(rs, dict):
        raise ValueError(f"rope_scaling must be an object or null, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: "
                         + ", ".join(_ROPE_TYPES) + ")")
    factor = rs.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:  # NaN
        raise ValueError(f"rope_scaling {kind!r} needs a positive 'factor', got {factor!r}")


def _complete_llama3(rs, max_position_embeddings: int):
    """llama3 rope_scaling with every key transformers reads: original_max_position_embeddings
    falls back to max_position_embeddings as in transformers' standardize_rope_params, and the
    low/high frequency factors (which transformers requires) get Meta's 1 and 4."""
    if not rs or rs.get("rope_type", rs.get("type")) != "llama3":
        return rs
    return {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": max_position_embeddings, **rs}


# Presets: looked up by exact name ---------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # For tests: runs in milliseconds on CPU.
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    # Default for `python train.py`: 2M parameters, sized for a 5-minute run on 2 CPU cores (a
    # smaller model that sees more tokens beat a 4M one with a 4096 vocabulary: 2.21 vs 2.47
    # validation bits/byte in equal time on one core).
    "small": dict(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True),
    "medium": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                   tie_word_embeddings=True),
    # Shape of SmolLM2-135M (for training from scratch at that size).
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (pretraining or fine-tuning)."""
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int = 100000
    max_minutes: float | None = None
    eval_every: int = 100
    eval_batches: int = 20
    patience: int | None = None
    seed: int = 1337


def atomic_write_text(path: str, text: str) -> None:
    """Write via a temp file in the same directory, then rename: readers never see half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: str, write) -> None:
    """write(f) into a temp file in the same directory (streamed: torch.save(state, f), say),
    fsynced, then renamed to path: readers never see half a file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, Ctrl-C: no hidden half-written temp file stays behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except None: those flags say their default in words."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


class RaisingParser(argparse.ArgumentParser):
    """A bad flag raises UsageError (one line) instead of printing usage and exiting, so a
    script's cli() reports it like its other errors (generate.py, serve.py)."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


class OneLineParser(argparse.ArgumentParser):
    """Bad flags get one line (not the whole usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main, argv=None) -> int:
    """main(argv) for a command line: bad input and load / run failures (ValueError, OSError,
    RuntimeError) become one `error:` line on stderr and exit code 2; Ctrl-C exits 130."""
    try:
        return main(argv)
    except (ValueError, OSError, RuntimeError) as e:  # OSError: a missing file, a full disk ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
