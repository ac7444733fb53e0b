"""Model directories in Hugging Face format: config.json + model.safetensors (+ tokenizer files).

Follows transformers' save_pretrained / from_pretrained layout (shared/FORMATS.md section 3):
LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM configs, single-file or sharded
safetensors (`model.safetensors.index.json` weight_map), HF Llama tensor names, tied lm_head not
stored. Loading builds the model on the meta device and assigns each tensor as it is read (one
tensor in flight, no second copy of the model); a save is staged whole, then renamed into
place; nothing is pickled (a pytorch_model.bin-only directory is refused).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch.overrides import TorchFunctionMode

from engine.config import ARCHITECTURES, ModelConfig, atomic_write_bytes, atomic_write_text
from engine.model import Transformer
from tokenizer.base import drop_chat_template_files, park_chat_template_files

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# Keys some HF checkpoints carry that are recomputed here rather than stored.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ST_FLOATS = {"F64", *_ST_DTYPES}
_INDEX = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
_STAGE = ".save-"  # save_model's hidden staging folder in the target directory


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"unsupported dtype {name}; valid: float32, bfloat16, float16")
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def weights_tied(model: Transformer) -> bool:
    """True when lm_head really shares the embedding. A config may say tied while the weights
    are not any more (a merged LoRA on lm_head, a PEFT modules_to_save copy of embed_tokens)."""
    head = getattr(model.lm_head, "weight", None)
    return bool(model.config.tie_word_embeddings) and head is model.model.embed_tokens.weight


def model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """HF-named tensors, contiguous, without the tied lm_head copy (kept when no longer tied)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if weights_tied(model):
        sd.pop("lm_head.weight", None)
    elif model.config.tie_word_embeddings:  # state_dict drops a tied alias: add the head back
        sd["lm_head.weight"] = model.lm_head.weight.detach().contiguous()
    return sd


def hf_config(config: ModelConfig) -> ModelConfig:
    """The config under the HF architecture whose math matches ours (bias -> Qwen2, with its
    window on every layer if any; window -> Mistral), since HF Llama has neither; Qwen2 without
    bias -> Llama, since HF Qwen2 always has q/k/v biases."""
    arch = config.architectures[0]
    if config.attention_bias:
        arch = "Qwen2ForCausalLM"
    elif config.sliding_window:
        arch = "MistralForCausalLM"
    elif arch == "Qwen2ForCausalLM":
        arch = "LlamaForCausalLM"
    return dataclasses.replace(config, architectures=[arch])


def save_model(model: Transformer, directory: str, tokenizer=None,
               max_shard_size: int | None = None) -> None:
    """Write config.json, model.safetensors (or shards + index when the tensors exceed
    `max_shard_size` bytes) and, if given, the tokenizer's files (tokenizer.save(directory))."""
    sd = model_state_dict(model)
    cfg = hf_config(model.config)
    # untied since load (merged lm_head LoRA...): the saved config must say so, or a reload
    # would drop the stored lm_head and use the embedding
    cfg.tie_word_embeddings = weights_tied(model)
    expected = set(_expected_names(cfg))
    extra = sorted(set(sd) - expected)
    if extra:
        raise ValueError(f"model has non-HF tensor {extra[0]!r}: merge LoRA / dequantize "
                         "before saving as an HF checkpoint")
    os.makedirs(directory, exist_ok=True)
    cfg.torch_dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    shards = _split_shards(sd, max_shard_size)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    # Every file is written into a hidden staging folder first and renamed into place only once
    # all are written: a save that fails (disk full, Ctrl-C, a tokenizer error) leaves the
    # previous model as it was, never new shards beside old ones or new weights with an old
    # config.json. A stage left by a save that was killed outright (SIGKILL, the OOM killer) never
    # reached its cleanup: it holds a whole model's weights, so it goes now.
    for n in os.listdir(directory):
        if n.startswith(_STAGE):
            shutil.rmtree(os.path.join(directory, n), ignore_errors=True)
    stage = tempfile.mkdtemp(prefix=_STAGE, dir=directory)
    try:
        for name, shard in zip(names, shards):
            atomic_write_bytes(os.path.join(stage, name), st_save(shard, metadata={"format": "pt"}))
        if len(shards) > 1:
            weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
            total = sum(t.numel() * t.element_size() for t in sd.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_text(os.path.join(stage, _INDEX), json.dumps(index, indent=2) + "\n")
            names.append(_INDEX)  # after the shards: a reader that sees it finds them all
        cfg.save(os.path.join(stage, "config.json"))
        if tokenizer is not None:
            tokenizer.save(stage)
        for n in names:
            os.replace(os.path.join(stage, n), os.path.join(directory, n))
        for n in sorted(os.listdir(directory), key=lambda n: n != _INDEX):  # stale index first
            if n not in names and (n == _INDEX or _SHARD_RE.fullmatch(n)):  # an earlier layout
                os.remove(os.path.join(directory, n))
        if tokenizer is not None:  # an earlier save's transformers 5 template files
            park_chat_template_files(directory)  # (chat_template.jinja, additional_chat_templates/)
        for n in os.listdir(stage):  # config.json and the tokenizer's files
            os.replace(os.path.join(stage, n), os.path.join(directory, n))
        if tokenizer is not None:  # would win over the new tokenizer_config.json: parked so the
            drop_chat_template_files(directory)  # old set loads whole until it is in, then gone
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _split_shards(sd: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict]:
    shards, size = [{}], 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if max_bytes and shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
class _SkipInit(TorchFunctionMode):
    """Makes in-place random initializers no-ops. On meta tensors `normal_` (nn.Embedding's
    init) would import torch._dynamo and sympy: ~150 MB and a second or more, for nothing."""

    _INIT = {nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_, nn.init.kaiming_uniform_,
             nn.init.ones_, nn.init.zeros_, torch.Tensor.normal_, torch.Tensor.uniform_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._INIT:
            t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def empty_model(config: ModelConfig) -> Transformer:
    """A Transformer whose tensors live on the meta device (no memory), to be assigned."""
    with torch.device("meta"), _SkipInit():
        return Transformer(config)


def load_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {directory!r} (not a model directory)")
    try:
        return ModelConfig.load(path)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def load_model_dir(directory: str, dtype: torch.dtype | str = torch.float32,
                   device: str | torch.device = "cpu", on_tensor=None) -> Transformer:
    """Build the model on the meta device, then assign each tensor as it is read from the
    (mmap'd) safetensors files, converted to `dtype` on `device`. A tensor already in `dtype`
    on the CPU is used in place (copy-on-write pages of the file, as gpt-fast's mmap load).
    `on_tensor(model, name)` runs after each assignment (engine.nf4.QuantizeOnLoad)."""
    config = load_config(directory)
    dtype = parse_dtype(dtype)
    model = empty_model(config)
    shapes = _expected_shapes(model)
    done, head = set(), None
    for path in safetensors_files(directory):
        with _open(path) as f:
            for name in f.keys():
                if name == "lm_head.weight" and config.tie_word_embeddings:  # compared below
                    _check_shape(name, tuple(f.get_slice(name).get_shape()),
                                 {name: shapes["model.embed_tokens.weight"]}, config, path)
                    head = _get(f, name, path).to(device=device, dtype=dtype)
                    continue
                if _skip(name, config):
                    continue
                sl = f.get_slice(name)
                _check_shape(name, tuple(sl.get_shape()), shapes, config, path)
                if sl.get_dtype() not in _ST_FLOATS:  # fp8 / int8 codes are not weights as such
                    raise ValueError(f"{path}: tensor {name!r} is {sl.get_dtype()}, not a float "
                                     "type (a quantized checkpoint?); not supported")
                if _ST_DTYPES.get(sl.get_dtype()) == dtype and torch.device(device).type == "cpu":
                    t = _get(f, name, path)  # zero-copy: backed by the private (COW) mapping
                else:  # convert from a mapping of its own, so no used pages stay resident
                    with _open(path) as g:
                        t = _get(g, name, path).to(device=device, dtype=dtype)
                assign_tensor(model, name, t)
                if on_tensor is not None:
                    on_tensor(model, name)
                done.add(name)
    _check_missing(shapes, done, directory)
    if head is not None and not torch.equal(head, model.model.embed_tokens.weight):
        # a "tied" config over a stored head of its own: transformers keeps the head untied
        warnings.warn(f"{directory}: config.json says tie_word_embeddings, but the stored "
                      "lm_head differs from the embedding: keeping both (as transformers does)")
        config.tie_word_embeddings = False
        assign_tensor(model, "lm_head.weight", head)
        if on_tensor is not None:
            on_tensor(model, "lm_head.weight")
    model.tie_weights()
    return model.eval()


def safetensors_files(directory: str) -> list[str]:
    """Paths of the weight files: the single model.safetensors, else the index's shards (the
    order transformers' from_pretrained looks them up in, should a directory hold both)."""
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(directory, _INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = [os.path.join(directory, n) for n in names]
        for p in files:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"shard {os.path.basename(p)!r} listed in {index} "
                                        "is missing")
        return files
    pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
               if os.path.isfile(os.path.join(directory, n))]
    if pickled:  # never unpickled: torch.load of a downloaded file can run arbitrary code
        raise ValueError(f"{directory!r} holds only {pickled[0]} (pickle), which is not loaded: "
                         "convert it to safetensors first (transformers: from_pretrained, then "
                         "save_pretrained)")
    raise FileNotFoundError(f"no model.safetensors (or {_INDEX}) in {directory!r}")


def read_safetensors_dir(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (for small models and tests)."""
    state = {}
    for path in safetensors_files(directory):
        with _open(path) as f:
            for k in f.keys():
                state[k] = f.get_tensor(k)
    return state


def load_state(model: Transformer, state: dict[str, torch.Tensor],
               dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None) -> None:
    """Assign HF-named tensors into a (meta or real) model; a clear error names the bad tensor.
    dtype/device None: keep each model tensor's current dtype/device (unless it is meta)."""
    shapes = _expected_shapes(model)
    current = dict(model.state_dict())
    dtype = parse_dtype(dtype) if dtype is not None else None
    for name, t in state.items():
        if _skip(name, model.config):
            continue
        _check_shape(name, tuple(t.shape), shapes, model.config, "state dict")
        ref = current[name]
        dev = device if device is not None else ("cpu" if ref.is_meta else ref.device)
        assign_tensor(model, name, t.to(device=dev, dtype=dtype or (t.dtype if ref.is_meta
                                                                    else ref.dtype)))
    _check_missing(shapes, set(state), "state dict")
    model.tie_weights()


def assign_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter/buffer `name` by `value` itself (no copy), keeping requires_grad."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    old = getattr(mod, leaf)
    if isinstance(old, nn.Parameter):
        setattr(mod, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        mod._buffers[leaf] = value


def _get(f, name: str, path: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:  # safetensors' own error types
        raise ValueError(f"cannot read tensor {name!r} from {path}: {e}") from None


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"cannot read {path}: {e}") from None


def _expected_names(config: ModelConfig) -> list[str]:
    names = list(empty_model(config).state_dict())
    return [n for n in names if not (config.tie_word_embeddings and n == "lm_head.weight")]


def _expected_shapes(model: Transformer) -> dict[str, tuple]:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _skip(name: str, config: ModelConfig) -> bool:
    """Tensors a checkpoint may hold that we rebuild: rotary tables, a tied head's copy."""
    return name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings
                                                and name == "lm_head.weight")


def _check_shape(name: str, shape: tuple, shapes: dict, config: ModelConfig, where: str) -> None:
    if name not in shapes:
        raise ValueError(f"{where}: unexpected tensor {name!r} for "
                         f"{config.architectures[0]} (config and weights disagree)")
    want = shapes[name]
    if shape == want:
        return
    if name in ("model.embed_tokens.weight", "lm_head.weight") and shape[1:] == want[1:]:
        raise ValueError(f"{where}: config vocab_size {config.vocab_size} does not match the "
                         f"{shape[0]} rows of {name!r}")
    raise ValueError(f"{where}: tensor {name!r} has shape {shape}, expected {want}")


def _check_missing(shapes: dict, done: set, where: str) -> None:
    missing = [k for k in shapes if k not in done]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{where}: checkpoint is missing tensor {missing[0]!r}{more}")


SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
