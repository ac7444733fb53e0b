"""Model directories in Hugging Face format: config.json + model.safetensors (+ tokenizer files).

Follows transformers' save_pretrained layout (shared/FORMATS.md section 3): tensors keep HF
Llama key names, tied lm_head is not stored, writes are atomic, nothing is pickled.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from engine.config import ModelConfig, atomic_write_bytes
from engine.model import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """HF-named tensors, contiguous, without the tied lm_head copy."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_model(model: Transformer, directory: str, tokenizer=None) -> None:
    """Write config.json, model.safetensors and (if given) the tokenizer's files."""
    os.makedirs(directory, exist_ok=True)
    cfg = model.config
    cfg.torch_dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    sd = model_state_dict(model)
    atomic_write_bytes(os.path.join(directory, "model.safetensors"),
                       st_save(sd, metadata={"format": "pt"}))
    cfg.save(os.path.join(directory, "config.json"))
    if tokenizer is not None:
        tokenizer.save(directory)


def load_model_dir(directory: str, dtype: torch.dtype | str = torch.float32,
                   device: str | torch.device = "cpu") -> Transformer:
    """Build the model on the meta device and assign tensors read (mmap) from safetensors."""
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {directory!r} (not a model directory)")
    config = ModelConfig.load(cfg_path)
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(config)
    state = read_safetensors_dir(directory)
    load_state(model, state, dtype, device)
    return model.eval()


def read_safetensors_dir(directory: str) -> dict[str, torch.Tensor]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors (or index) in {directory!r}")
    state = {}
    for name in files:
        path = os.path.join(directory, name)
        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    state[k] = f.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"cannot read {path}: {e}") from None
    return state


def load_state(model: Transformer, state: dict[str, torch.Tensor], dtype: torch.dtype,
               device: str | torch.device) -> None:
    """Copy HF-named tensors into a (meta or real) model; a clear error names the bad tensor."""
    expected = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"checkpoint is missing tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for k, ref in expected.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise ValueError(f"tensor {k!r} has shape {tuple(state[k].shape)}, "
                             f"expected {tuple(ref.shape)}")
    params = {k: state[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(params, strict=False, assign=True)
    model.tie_weights()
