"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024) by module swap,
with PEFT-format adapter files.

Follows shared/FORMATS.md section 2 (read from peft 0.21 tuners/lora and utils/save_and_load).
`apply_lora` swaps matching nn.Linear / NF4Linear leaves for LoRALinear, which keeps the base
tensors under their own names (`...q_proj.weight`, or the NF4 buffers), so the model state dict
stays an HF one and adapter keys are PEFT's minus the `base_model.model.` prefix:

    names = apply_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)   # freezes all but LoRA
    save_adapter(model, "out/adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
    load_adapter(fresh_model, "out/adapter")      # ours, or any PEFT LoRA / DoRA for this base
    with disable_adapters(model): ref_logits = model(ids)   # the base model (DPO reference)
    merge_lora(model)                              # plain nn.Linear leaves again
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import atomic_write_bytes, atomic_write_text
from engine.nf4 import (NF4Linear, apply_keeping_nf4, nf4_dense_weight, nf4_linear, nf4_of,
                        register_nf4)

PEFT_PREFIX = "base_model.model."
LORA_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")
BASE_LAYER = ".base_layer.weight"  # PEFT also saves the base weight of a LoRA-wrapped lm_head
_ORIGINAL = "lora_original_"  # buffer prefix: the base tensor a modules_to_save copy replaced


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B(A(dropout(x))). With DoRA (PEFT's form), x' = dropout(x):
    y = base(x) + (g - 1) * (x' W^T) + g * scaling * B(A(x')), g = m / ||W + sBA||_row, the norm
    detached. The base is frozen: `weight` (+ `bias`) of an nn.Linear, or the NF4 buffers of an
    NF4Linear, registered under the same names as in the base module."""

    def __init__(self, base: nn.Linear | NF4Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dora: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if r > min(self.in_features, self.out_features):
            raise ValueError(f"LoRA rank {r} exceeds min(in, out) = "
                             f"{min(self.in_features, self.out_features)} of a "
                             f"{self.in_features}->{self.out_features} linear")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {dropout}")
        self.quantized = isinstance(base, NF4Linear)
        if self.quantized:
            register_nf4(self, nf4_of(base))
            base_dtype, device = base.weight_dtype, base.packed.device
        else:
            self.weight = base.weight
            base_dtype, device = base.weight.dtype, base.weight.device
        self.bias = base.bias
        self.r, self.lora_alpha, self.use_rslora, self.use_dora = r, alpha, rslora, dora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(dtype=dtype or base_dtype, device=device)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)   # weight (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)  # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))     # PEFT's init
        nn.init.zeros_(self.lora_B.weight)
        if dora:  # m = ||W + s B A||_row, i.e. ||W|| at init: the layer starts equal to the base
            self.lora_magnitude_vector = nn.Parameter(self._row_norm().to(kw["dtype"]))
        self.disabled = False
        self.merged = False
        self._dora_factor: torch.Tensor | None = None  # m / norm used by merge(), for unmerge()

    # -- base layer ---------------------------------------------------------------------------
    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen (out, in) base weight, dequantized for an NF4 base."""
        if self.quantized:
            return nf4_dense_weight(nf4_of(self), dtype or self.weight_dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return nf4_linear(x, nf4_of(self), self.bias)
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        if self.quantized:  # never cast the fp32 NF4 scales (see nf4.apply_keeping_nf4)
            return apply_keeping_nf4(self, super()._apply, fn, recurse)
        return super()._apply(fn, recurse)

    # -- adapter ------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in) in the LoRA dtype."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def _row_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, fp32 (out,)."""
        w = self.base_weight(torch.float32) + self.delta_weight().float()
        return torch.linalg.norm(w, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self._base_forward(x)                                      # (..., out)
        if self.merged:
            if self.disabled:
                raise RuntimeError("cannot disable a merged LoRA layer; unmerge() it first")
            return result
        if self.disabled:
            return result
        xd = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(xd))                                 # (..., out)
        if not self.use_dora:
            return result + (lora * self.scaling).to(result.dtype)
        with torch.no_grad():  # DoRA: the weight norm is a constant for backward
            w = self.base_weight(xd.dtype)
            norm = torch.linalg.norm(w + self.delta_weight().to(w.dtype), dim=1)   # (out,)
        g = (self.lora_magnitude_vector / norm).to(xd.dtype)               # (out,)
        if isinstance(self.lora_dropout, nn.Identity):
            base = result if self.bias is None else result - self.bias.to(result.dtype)
        else:
            base = F.linear(xd, w)
        return result + ((g - 1) * base.to(xd.dtype) + g * lora * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A (DoRA: W <- (m / ||W + s B A||)[:, None] (W + s B A)), in place."""
        if self.quantized:
            raise ValueError("cannot merge into a 4-bit base in place; merge_lora(model) "
                             "builds dequantized nn.Linear layers instead")
        if self.merged:
            return
        w = self.weight.float()
        new = w + self.delta_weight().float()
        if self.use_dora:
            self._dora_factor = self.lora_magnitude_vector.float() / torch.linalg.norm(new, dim=1)
            new = self._dora_factor[:, None] * new
        self.weight.copy_(new.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.weight.float()
        if self.use_dora:
            w = w / self._dora_factor[:, None]
        self.weight.copy_((w - self.delta_weight().float()).to(self.weight.dtype))
        self.merged = False

    def merged_linear(self) -> nn.Linear:
        """A new plain nn.Linear equal to this layer (base + adapter), in the base dtype."""
        w = self.base_weight(torch.float32)
        if not self.merged:
            w = w + self.delta_weight().float()
            if self.use_dora:
                w = (self.lora_magnitude_vector.float() / torch.linalg.norm(w, dim=1))[:, None] * w
        dtype = self.weight_dtype if self.quantized else self.weight.dtype
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out.requires_grad_(False)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "rsLoRA" if self.use_rslora else "LoRA"
        return (f"{kind} in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"alpha={self.lora_alpha}, nf4={self.quantized}")


# ---------------------------------------------------------------------------------------------
# Model-level functions
# ---------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _linear_leaves(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))}


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """Full module names for `targets`: a list of names (a name matches itself and any module
    path ending in '.' + name, as in PEFT), "all-linear" (every linear but lm_head), or a regex
    string (full match, as in PEFT)."""
    leaves = _linear_leaves(model)
    if targets == "all-linear":
        return [n for n in leaves if n.split(".")[-1] != "lm_head"]
    if isinstance(targets, str):
        names = [n for n in leaves if re.fullmatch(targets, n)]
        if not names:
            raise ValueError(f"LoRA target regex {targets!r} matches no linear module; "
                             f"available: {sorted({n.split('.')[-1] for n in leaves})}")
        return names
    targets = list(targets)
    found = {t: [n for n in leaves if n == t or n.endswith("." + t)] for t in targets}
    missing = [t for t, ns in found.items() if not ns]
    if missing:  # an adapter for a deeper model misses hundreds: name a few
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"unknown LoRA target(s) {missing[:3]}{more}; linear modules available: "
                         f"{sorted({n.split('.')[-1] for n in leaves})}")
    return [n for n in leaves if any(n in ns for ns in found.values())]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, targets=("q_proj", "v_proj"), r: int = 8, alpha: float = 16,
               dropout: float = 0.0, rslora: bool = False, dora: bool = False,
               dtype: torch.dtype | None = None) -> list[str]:
    """Swap the target linears for LoRALinear in place and freeze everything but the adapter
    (lora_A, lora_B, lora_magnitude_vector). `dtype`: LoRA parameter dtype (default: the base
    weight's). Returns the full names of the wrapped modules."""
    if lora_layers(model):
        raise ValueError("model already has LoRA layers (merge_lora or a fresh model first)")
    names = resolve_targets(model, targets)
    for name in names:
        try:
            layer = LoRALinear(model.get_submodule(name), r, alpha, dropout, rslora, dora, dtype)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        layer.train(model.get_submodule(name).training)  # eval model: LoRA dropout off too
        _set_module(model, name, layer)
    for pname, p in model.named_parameters():
        p.requires_grad_(any(part in pname.split(".") for part in LORA_PARTS))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by the equivalent plain nn.Linear (NF4 bases are dequantized to
    their original dtype). Returns the model, which no longer needs any LoRA code."""
    for name, layer in lora_layers(model).items():
        _set_module(model, name, layer.merged_linear())
    for _, mod, buf in _whole_module_originals(model):  # the trained copies stay
        delattr(mod, buf)
    return model


def _whole_module_originals(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(param name, module, buffer name) for each base tensor a modules_to_save copy replaced."""
    return [(b.removeprefix(_ORIGINAL), m, b) for m in model.modules()
            for b in list(m._buffers) if b.startswith(_ORIGINAL)]


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model: every LoRA layer is bypassed inside the block, and modules_to_save
    copies are swapped for the original tensors."""
    layers = list(lora_layers(model).values())
    before = [lay.disabled for lay in layers]
    whole = [(mod, pname, getattr(mod, pname)) for pname, mod, _ in _whole_module_originals(model)]
    for lay in layers:
        lay.disabled = True
    for mod, pname, _ in whole:
        setattr(mod, pname, nn.Parameter(getattr(mod, _ORIGINAL + pname), requires_grad=False))
    try:
        yield model
    finally:
        for lay, d in zip(layers, before):
            lay.disabled = d
        for mod, pname, trained in whole:
            setattr(mod, pname, trained)


def lora_summary(model: nn.Module) -> dict:
    """Trainable-parameter report. total_params counts NF4 weights by their element count."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    total += sum(math.prod(m.weight_shape) for m in model.modules() if hasattr(m, "packed"))
    layers = lora_layers(model)
    return {"lora_layers": len(layers), "trainable_params": trainable, "total_params": total,
            "trainable_percent": 100.0 * trainable / max(total, 1),
            "ranks": sorted({lay.r for lay in layers.values()}),
            "nf4_base": any(lay.quantized for lay in layers.values())}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter-only state dict with our (= PEFT minus prefix) key names."""
    return {k: v.detach() for k, v in model.state_dict().items()
            if any(part in k.split(".") for part in LORA_PARTS)}


# ---------------------------------------------------------------------------------------------
# PEFT adapter files
# ---------------------------------------------------------------------------------------------
@dataclass
class Adapter:
    """An adapter in memory: PEFT adapter_config as a dict; tensors with our key names."""
    config: dict
    tensors: dict[str, torch.Tensor]
    # PEFT's copies of base weights (`lm_head.base_layer.weight` -> key `lm_head`): not adapter
    # parameters; load_adapter checks they equal the model's
    base_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def modules(self) -> list[str]:
        return sorted({k.rsplit(".lora_A.weight", 1)[0] for k in self.tensors
                       if k.endswith(".lora_A.weight")})

    def scaling(self) -> float:
        c = self.config
        return c["lora_alpha"] / (math.sqrt(c["r"]) if c.get("use_rslora") else c["r"])

    def save(self, directory: str) -> None:
        from safetensors.torch import save
        tensors = {PEFT_PREFIX + k: v.detach().contiguous().clone()
                   for k, v in self.tensors.items()}
        tensors.update({PEFT_PREFIX + k + BASE_LAYER: v.detach().contiguous().clone()
                        for k, v in self.base_tensors.items()})
        atomic_write_bytes(os.path.join(directory, "adapter_model.safetensors"),
                           save(tensors, metadata={"format": "pt"}))
        atomic_write_text(os.path.join(directory, "adapter_config.json"),
                          json.dumps(self.config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str) -> "Adapter":
        from safetensors.torch import load_file
        cfg_path = os.path.join(directory, "adapter_config.json")
        st_path = os.path.join(directory, "adapter_model.safetensors")
        for p in (cfg_path, st_path):
            if not os.path.isfile(p):
                raise ValueError(f"not an adapter directory: {p} is missing")
        with open(cfg_path, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(config, dict) or config.get("peft_type") != "LORA":
            got = config.get("peft_type") if isinstance(config, dict) else config
            raise ValueError(f"{cfg_path}: peft_type {got!r} is not 'LORA'")
        try:
            tensors = load_file(st_path)
        except Exception as e:  # noqa: BLE001  (safetensors' own error types, as checkpoint._open)
            raise ValueError(f"cannot read {st_path}: {e}") from None
        ours = {_our_key(k): v for k, v in tensors.items()}
        base = {k.removesuffix(BASE_LAYER): ours.pop(k)
                for k in list(ours) if k.endswith(BASE_LAYER)}
        return cls(config, ours, base)

    def whole_module_keys(self) -> list[str]:
        """Keys of whole-module tensors (PEFT modules_to_save), e.g. `lm_head.weight`."""
        return sorted(k for k in self.tensors if not any(p in k.split(".") for p in LORA_PARTS))


def _our_key(key: str) -> str:
    """PEFT key -> ours: strip `base_model.model.`, an adapter name (`lora_A.default.weight`),
    `modules_to_save.<name>.`, and DoRA's in-memory `.weight` on lora_magnitude_vector."""
    key = key.removeprefix(PEFT_PREFIX)
    key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in LORA_PARTS:
            head = ".".join(parts[:i + 1])
            return head if part == "lora_magnitude_vector" else head + ".weight"
    return key


# peft 0.21 LoraConfig fields that change the forward and that we do not implement, with the
# value that means "off" (None / False / {} / [] also do). The other fields only steer target
# selection, training or the initialization, whose result the saved tensors already hold.
_UNSUPPORTED = {"fan_in_fan_out": False, "bias": "none", "lora_bias": False, "rank_pattern": {},
                "alpha_pattern": {}, "layer_replication": None, "use_qalora": False,
                "target_parameters": None, "trainable_token_indices": None,
                "alora_invocation_tokens": None, "arrow_config": None, "use_bdlora": None,
                "velora_config": None, "monteclora_config": None, "kasa_config": None,
                "megatron_config": None}
# init_lora_weights values that also rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ,
# LoRA-GA): such an adapter is only right on the base it was trained from, not the original one
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _check_config(config: dict) -> None:
    for key, off in _UNSUPPORTED.items():
        value = config.get(key, off)
        if value != off and value not in (None, False, {}, []):
            raise ValueError(f"adapter_config: {key}={value!r} is not supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(f"adapter_config: init_lora_weights={init!r} is not supported (it "
                         "modifies the base weights, which the adapter files do not hold)")


def _check_tensors(adapter: Adapter) -> None:
    emb = sorted({k.split(".lora_embedding_")[0] for k in adapter.tensors
                  if ".lora_embedding_" in k})
    if emb:
        raise ValueError(f"adapter has LoRA on embedding layer {emb[0]}, which is not supported "
                         "(LoRA applies to linear layers only)")


def save_adapter(model: nn.Module, directory: str, base_model_name_or_path: str | None = None,
                 config: dict | None = None) -> Adapter:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT format) atomically.
    `config` entries override the generated config (e.g. {"task_type": ...})."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save")
    hp = {(lay.r, lay.lora_alpha, lay.use_rslora, lay.use_dora, lay.lora_dropout.p
           if isinstance(lay.lora_dropout, nn.Dropout) else 0.0) for lay in layers.values()}
    if len(hp) > 1:
        raise ValueError(f"LoRA layers differ in (r, alpha, rslora, dora, dropout): {sorted(hp)}")
    r, alpha, rslora, dora, dropout = hp.pop()
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
           "lora_dropout": dropout, "target_modules": sorted({n.split(".")[-1] for n in layers}),
           "bias": "none", "base_model_name_or_path": base_model_name_or_path,
           "fan_in_fan_out": False, "use_rslora": rslora, "use_dora": dora,
           "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
           **(config or {})}
    adapter = Adapter(cfg, lora_state_dict(model))
    adapter.save(directory)
    return adapter


def load_adapter(model: nn.Module, adapter: str | Adapter) -> list[str]:
    """Apply LoRA to exactly the modules the adapter covers (per its config: r, alpha, rslora,
    dora, dropout) and load its tensors; a model that already has that LoRA layout (resume) just
    gets the tensors. Ours or PEFT's; raises on any shape mismatch. Returns the module names."""
    if isinstance(adapter, str):
        adapter = Adapter.load(adapter)
    c = adapter.config
    _check_config(c)
    _check_tensors(adapter)
    modules = adapter.modules()
    if not modules:
        raise ValueError("adapter has no lora_A tensors")
    hp = dict(r=int(c["r"]), alpha=c["lora_alpha"], dropout=c.get("lora_dropout", 0.0),
              rslora=bool(c.get("use_rslora")), dora=bool(c.get("use_dora")))
    existing = lora_layers(model)
    if not existing:
        names = apply_lora(model, modules, **hp)
    else:  # e.g. resuming: the same LoRA layout must already be in place
        names = sorted(existing)
        if names != modules:
            raise ValueError(f"model already has LoRA layers on {len(names)} modules, the adapter "
                             f"covers {len(modules)} others")
        for name, lay in existing.items():
            have = (lay.r, lay.lora_alpha, lay.use_rslora, lay.use_dora)
            if have != (hp["r"], hp["alpha"], hp["rslora"], hp["dora"]):
                raise ValueError(f"{name}: (r, alpha, rslora, dora) = {have} differs from the "
                                 f"adapter's config")
    whole = adapter.whole_module_keys()
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if whole and tied and c.get("ensure_weight_tying"):
        raise ValueError("adapter_config: ensure_weight_tying=true (modules_to_save kept tied to "
                         "the embedding) is not supported")
    for name, value in adapter.base_tensors.items():
        base = getattr(_submodule(model, name + BASE_LAYER), "weight", None)
        if not isinstance(base, torch.Tensor) or not torch.equal(value.to(base), base):
            raise ValueError(f"adapter tensor {name}{BASE_LAYER} differs from the model's "
                             f"{name}.weight (adapter for a different or resized base?)")
    params = dict(model.named_parameters())
    own = lora_state_dict(model)
    for key, value in adapter.tensors.items():
        if key in whole:
            _load_whole(model, key, value)
            continue
        if key not in params:
            raise ValueError(f"adapter tensor {key} has no matching parameter in the model")
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"adapter tensor {key} has shape {tuple(value.shape)} but the model "
                             f"expects {tuple(params[key].shape)} (adapter for a different base?)")
        with torch.no_grad():
            params[key].copy_(value)
    missing = sorted(set(own) - set(adapter.tensors))
    if missing:
        raise ValueError(f"adapter lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    return names


def _submodule(model: nn.Module, key: str) -> nn.Module:
    try:
        return model.get_submodule(key.rsplit(".", 2 if key.endswith(BASE_LAYER) else 1)[0])
    except AttributeError:
        raise ValueError(f"adapter tensor {key} has no matching module in the model") from None


def _load_whole(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """A modules_to_save tensor becomes a new Parameter of its own, as PEFT's copy: on a tied
    model the other side (lm_head or embed_tokens) keeps the original, and the original is kept
    (non-persistent buffer) for disable_adapters."""
    mod, pname = _submodule(model, key), key.rsplit(".", 1)[1]
    if isinstance(mod, LoRALinear):
        raise ValueError(f"adapter has both LoRA and a whole-module tensor ({key}) for one module")
    orig = getattr(mod, pname, None)
    if not isinstance(orig, nn.Parameter):
        raise ValueError(f"adapter tensor {key} has no matching parameter in the model")
    if tuple(value.shape) != tuple(orig.shape):
        raise ValueError(f"adapter tensor {key} has shape {tuple(value.shape)} but the model "
                         f"expects {tuple(orig.shape)} (adapter for a different base?)")
    if _ORIGINAL + pname not in mod._buffers:  # a second load (resume) keeps the first original
        mod.register_buffer(_ORIGINAL + pname, orig.detach(), persistent=False)
    new = value.detach().to(device=orig.device, dtype=orig.dtype).clone()
    setattr(mod, pname, nn.Parameter(new, requires_grad=orig.requires_grad))


def combine_adapters(adapters: list, weights: list[float], method: str = "cat",
                     rank: int | None = None) -> Adapter:
    """PEFT's add_weighted_adapter for LoRA (FORMATS section 2). New adapter: lora_alpha = r,
    no rsLoRA, so its scaling is 1. cat: A' = rows(w_i s_i A_i), B' = cols(B_i), exactly
    sum w_i dW_i. linear (equal ranks): A' = sum sign(w_i s_i) sqrt|w_i s_i| A_i,
    B' = sum sqrt|w_i s_i| B_i (has cross terms: NOT sum w_i dW_i). svd: best rank-k
    approximation of sum w_i dW_i (k = rank or the largest r_i)."""
    ads = [Adapter.load(a) if isinstance(a, str) else a for a in adapters]
    if not ads or len(ads) != len(weights):
        raise ValueError(f"need one weight per adapter, got {len(ads)} adapters and "
                         f"{len(weights)} weights")
    if method not in ("cat", "linear", "svd"):
        raise ValueError(f"combination method must be cat, linear or svd, got {method!r}")
    if rank is not None and not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"svd rank must be a positive integer, got {rank!r}")
    for i, a in enumerate(ads):  # the same checks as load_adapter, for every input
        try:
            _check_config(a.config)
            _check_tensors(a)
        except ValueError as e:
            raise ValueError(f"adapter {i + 1} of {len(ads)}: {e}") from None
        if a.whole_module_keys():  # only lora_A/B are combined: the copy would be lost
            raise ValueError(f"adapter {i + 1} of {len(ads)} has whole-module tensors "
                             f"(modules_to_save, e.g. {a.whole_module_keys()[0]}), which cannot "
                             "be combined; merge it on its own")
    if any(a.config.get("use_dora") for a in ads):
        raise ValueError("DoRA adapters cannot be combined")
    modules = ads[0].modules()
    if any(a.modules() != modules for a in ads):
        raise ValueError("adapters cover different modules; they must target the same layers")
    ranks = [int(a.config["r"]) for a in ads]
    if method == "linear" and len(set(ranks)) > 1:
        raise ValueError(f"linear combination needs equal ranks, got {ranks}")
    new_r = {"cat": sum(ranks), "linear": ranks[0], "svd": rank or max(ranks)}[method]
    ws = [w * a.scaling() for w, a in zip(weights, ads)]
    tensors = {}
    for m in modules:
        As = [a.tensors[m + ".lora_A.weight"].float() for a in ads]         # (r_i, in)
        Bs = [a.tensors[m + ".lora_B.weight"].float() for a in ads]         # (out, r_i)
        if method == "cat":
            A = torch.cat([w * a for w, a in zip(ws, As)], dim=0)
            B = torch.cat(Bs, dim=1)
        elif method == "linear":
            A = sum(math.copysign(math.sqrt(abs(w)), w) * a for w, a in zip(ws, As))
            B = sum(math.sqrt(abs(w)) * b for w, b in zip(ws, Bs))
        else:
            dW = sum(w * (b @ a) for w, a, b in zip(ws, As, Bs))            # (out, in)
            if new_r > min(dW.shape):
                raise ValueError(f"svd rank {new_r} exceeds min(out, in) = {min(dW.shape)} of {m}")
            U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
            B, A = U[:, :new_r] * S[:new_r], Vh[:new_r]
        dtype = ads[0].tensors[m + ".lora_A.weight"].dtype
        tensors[m + ".lora_A.weight"], tensors[m + ".lora_B.weight"] = A.to(dtype), B.to(dtype)
    targets = sorted({t for a in ads for t in _as_list(a.config.get("target_modules"))})
    config = {**ads[0].config, "r": new_r, "lora_alpha": new_r, "use_rslora": False,
              "target_modules": targets, "modules_to_save": None}
    return Adapter(config, tensors, dict(ads[0].base_tensors))


def _as_list(t) -> list:
    return [] if t is None else [t] if isinstance(t, str) else list(t)
