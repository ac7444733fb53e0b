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

import collections
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
        # r > min(in, out) is wasteful but valid, as in PEFT (e.g. r=256 on a 576->192 k_proj)
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
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
        if self.quantized:  # rounded to the original dtype first, as PEFT's bnb dequantize
            w = nf4_dense_weight(nf4_of(self), self.weight_dtype)
            return w if dtype is None else w.to(dtype)
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
            return (result + lora * self.scaling).to(result.dtype)  # one rounding, as PEFT
        with torch.no_grad():  # DoRA: the weight norm is a constant for backward
            w = self.base_weight(xd.dtype)
            norm = torch.linalg.norm(w + self.delta_weight().to(w.dtype), dim=1)   # (out,)
        g = (self.lora_magnitude_vector / norm).to(xd.dtype)               # (out,)
        # dropout inactive (none, or eval mode): reuse the base output, as PEFT (no second matmul)
        if isinstance(self.lora_dropout, nn.Identity) or not self.lora_dropout.training:
            base = result if self.bias is None else result - self.bias.to(result.dtype)
        else:
            base = F.linear(xd, w)
        return (result + ((g - 1) * base.to(xd.dtype) + g * lora * self.scaling)).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A (DoRA: W <- (m / ||W + s B A||)[:, None] (W + s B A)), as a new
        weight tensor (a tied embedding keeps the old one)."""
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
        self._set_weight(new)
        self.merged = True

    def _set_weight(self, w: torch.Tensor) -> None:
        """A new tensor, never in place: a tied lm_head shares its weight with embed_tokens,
        which must keep the base values."""
        self.weight = nn.Parameter(w.to(self.weight.dtype), requires_grad=False)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.weight.float()
        if self.use_dora:
            w = w / self._dora_factor[:, None]
        self._set_weight(w - self.delta_weight().float())
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


def pattern_value(pattern: dict | None, name: str, default):
    """PEFT's rank_pattern / alpha_pattern rule (utils.other.get_pattern_key): the value of the
    first key (a regex) that matches the end of the module name, after a dot or whole."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def apply_lora(model: nn.Module, targets=("q_proj", "v_proj"), r: int = 8, alpha: float = 16,
               dropout: float = 0.0, rslora: bool = False, dora: bool = False,
               dtype: torch.dtype | None = None, rank_pattern: dict | None = None,
               alpha_pattern: dict | None = None) -> list[str]:
    """Swap the target linears for LoRALinear in place and freeze everything but the adapter
    (lora_A, lora_B, lora_magnitude_vector). `dtype`: LoRA parameter dtype (default: the base
    weight's). rank_pattern / alpha_pattern: {regex: r or alpha} for some modules, as PEFT's.
    Returns the full names of the wrapped modules."""
    if lora_layers(model):
        raise ValueError("model already has LoRA layers (merge_lora or a fresh model first)")
    names = resolve_targets(model, targets)
    for name in names:
        try:
            layer = LoRALinear(model.get_submodule(name), pattern_value(rank_pattern, name, r),
                               pattern_value(alpha_pattern, name, alpha), dropout, rslora, dora,
                               dtype)
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


def whole_module_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The modules_to_save copies load_adapter put in (e.g. `lm_head.weight`), our key names."""
    out = {}
    for mname, mod in model.named_modules():
        for b in mod._buffers:
            if b.startswith(_ORIGINAL):
                pname = b.removeprefix(_ORIGINAL)
                out[f"{mname}.{pname}" if mname else pname] = getattr(mod, pname).detach()
    return out


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

    def rank_alpha(self, module: str | None = None) -> tuple[int, float]:
        """(r, lora_alpha) of the config, with PEFT's defaults (8, 8) when absent; of `module`
        when given, from rank_pattern / alpha_pattern where a key matches it."""
        r, alpha = self.config.get("r", 8), self.config.get("lora_alpha", 8)
        r_name, alpha_name = "r", "lora_alpha"
        if module is not None and (v := pattern_value(self.config.get("rank_pattern"), module,
                                                      None)) is not None:
            r, r_name = v, f"rank_pattern gives {module} r"
        if module is not None and (v := pattern_value(self.config.get("alpha_pattern"), module,
                                                      None)) is not None:
            alpha, alpha_name = v, f"alpha_pattern gives {module} lora_alpha"
        if isinstance(r, bool) or not isinstance(r, (int, float)) or r != int(r) or r < 1:
            raise ValueError(f"adapter_config: {r_name}={r!r} is not a positive integer")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError(f"adapter_config: {alpha_name}={alpha!r} is not a number")
        return int(r), alpha

    def scaling(self) -> float:
        r, alpha = self.rank_alpha()
        return alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)

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
            # a .bin beside the safetensors file is ignored, as PEFT's load_peft_weights does
            if (p == st_path and not os.path.isfile(st_path)
                    and os.path.isfile(os.path.join(directory, "adapter_model.bin"))):
                raise ValueError(f"{directory} holds adapter_model.bin (a pickle, older PEFT), "
                                 "which is not read: convert it to adapter_model.safetensors "
                                 "(PEFT: PeftModel.from_pretrained(...).save_pretrained(DIR))")
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
# `bias` ("all" / "lora_only") is checked on the tensors instead (_check_tensors): on a model
# without biases (Llama) PEFT saves no bias tensor and the adapter is a plain LoRA one.
_UNSUPPORTED = {"fan_in_fan_out": False, "lora_bias": False,
                "layer_replication": None, "use_qalora": False,
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
    for key in ("rank_pattern", "alpha_pattern"):  # {regex: value} (PEFT: per-module r, alpha)
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"adapter_config: {key}={pattern!r} is not a mapping")
        for k in pattern:
            try:
                re.compile(k)
            except re.error as e:
                raise ValueError(f"adapter_config: {key} key {k!r} is not a regex: {e}") from None
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(f"adapter_config: init_lora_weights={init!r} is not supported (it "
                         "modifies the base weights, which the adapter files do not hold)")


def _check_tensors(adapter: Adapter) -> None:
    bias = adapter.config.get("bias", "none")
    biases = sorted(k for k in adapter.tensors if k.endswith(".bias"))
    if bias not in ("none", None) and biases:  # PEFT trained the model's biases in place (Qwen2)
        raise ValueError(f"adapter_config: bias={bias!r} is not supported: "
                         f"the adapter holds {len(biases)} trained bias vector(s), e.g. "
                         f"{biases[0]}")
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
    hp = {(lay.use_rslora, lay.use_dora, lay.lora_dropout.p
           if isinstance(lay.lora_dropout, nn.Dropout) else 0.0) for lay in layers.values()}
    if len(hp) > 1:
        raise ValueError(f"LoRA layers differ in (rslora, dora, dropout): {sorted(hp)}")
    rslora, dora, dropout = hp.pop()
    # r / alpha may differ per module (e.g. a PEFT adapter with rank_pattern): the most common
    # value is the default, the others go into PEFT's patterns under their exact module names
    r = collections.Counter(lay.r for lay in layers.values()).most_common(1)[0][0]
    alpha = collections.Counter(lay.lora_alpha for lay in layers.values()).most_common(1)[0][0]
    patterns = {"rank_pattern": {re.escape(n): lay.r for n, lay in layers.items() if lay.r != r},
                "alpha_pattern": {re.escape(n): lay.lora_alpha for n, lay in layers.items()
                                  if lay.lora_alpha != alpha}}
    # modules_to_save copies of a loaded PEFT adapter are part of it: keep them (full module
    # paths, which PEFT matches as suffixes)
    whole = whole_module_state_dict(model)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
           "lora_dropout": dropout, "target_modules": sorted({n.split(".")[-1] for n in layers}),
           "bias": "none", "base_model_name_or_path": base_model_name_or_path,
           "fan_in_fan_out": False, "use_rslora": rslora, "use_dora": dora,
           "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in whole}) or None,
           "init_lora_weights": True, "inference_mode": True,
           **{k: v for k, v in patterns.items() if v}, **(config or {})}
    adapter = Adapter(cfg, {**lora_state_dict(model), **whole})
    adapter.save(directory)
    return adapter


def load_adapter(model: nn.Module, adapter: str | Adapter) -> list[str]:
    """Apply LoRA to exactly the modules the adapter covers (per its config: r, alpha and their
    per-module patterns, rslora, dora, dropout) and load its tensors, kept in fp32 on a bf16 /
    fp16 base as PEFT does; a model that already has that LoRA layout (resume) just gets the
    tensors. Ours or PEFT's. Everything is checked first: a refused adapter (shape mismatch,
    unknown module, missing tensor) leaves the model as it was. Returns the module names."""
    if isinstance(adapter, str):
        adapter = Adapter.load(adapter)
    c = adapter.config
    _check_config(c)
    _check_tensors(adapter)
    modules = adapter.modules()
    if not modules:
        raise ValueError("adapter has no lora_A tensors")
    r, alpha = adapter.rank_alpha()
    hp = dict(r=r, alpha=alpha, dropout=c.get("lora_dropout", 0.0),
              rslora=bool(c.get("use_rslora")), dora=bool(c.get("use_dora")),
              rank_pattern=c.get("rank_pattern"), alpha_pattern=c.get("alpha_pattern"))
    existing = lora_layers(model)
    if not existing:
        resolve_targets(model, modules)  # names the modules the model lacks
    else:  # e.g. resuming: the same LoRA layout must already be in place
        if sorted(existing) != modules:
            raise ValueError(f"model already has LoRA layers on {len(existing)} modules, the "
                             f"adapter covers {len(modules)} others")
        for name, lay in existing.items():
            have = (lay.r, lay.lora_alpha, lay.use_rslora, lay.use_dora)
            if have != (*adapter.rank_alpha(name), hp["rslora"], hp["dora"]):
                raise ValueError(f"{name}: (r, alpha, rslora, dora) = {have} differs from the "
                                 f"adapter's config")
    whole = adapter.whole_module_keys()
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if whole and tied and c.get("ensure_weight_tying"):
        raise ValueError("adapter_config: ensure_weight_tying=true (modules_to_save kept tied to "
                         "the embedding) is not supported")
    _check_fits(model, adapter, existing)
    if existing:
        names = sorted(existing)
    else:  # fp32 adapter weights on a bf16 / fp16 base too, as PEFT loads them
        names = apply_lora(model, modules, **hp, dtype=torch.float32)  # (autocast_adapter_dtype)
    params = dict(model.named_parameters())
    for key, value in adapter.tensors.items():
        if key in whole:
            _load_whole(model, key, value)
        else:
            with torch.no_grad():
                params[key].copy_(value)
    return names


def _check_fits(model: nn.Module, adapter: Adapter, existing: dict[str, LoRALinear]) -> None:
    """Every adapter tensor has a place of its shape in the model, and every LoRA layer it
    implies gets all its tensors; checked before the model changes."""
    leaves = existing or _linear_leaves(model)
    dora = bool(adapter.config.get("use_dora"))
    want = {}  # our key -> shape of the LoRA tensor that load_adapter will create
    for m in adapter.modules():
        leaf = leaves.get(m)  # exact names: a key without "model." must not land on a layer
        if leaf is None:
            raise ValueError(f"adapter tensor {m}.lora_A.weight has no matching parameter in "
                             "the model")
        r = adapter.rank_alpha(m)[0]
        want.update({f"{m}.lora_A.weight": (r, leaf.in_features),         # (r, in)
                     f"{m}.lora_B.weight": (leaf.out_features, r)})       # (out, r)
        if dora:
            want[f"{m}.lora_magnitude_vector"] = (leaf.out_features,)
    whole = set(adapter.whole_module_keys())
    for key, value in adapter.tensors.items():
        if key in whole:
            _whole_target(model, key, value, want)
            continue
        if key not in want:
            raise ValueError(f"adapter tensor {key} has no matching parameter in the model")
        if tuple(value.shape) != want[key]:
            raise ValueError(f"adapter tensor {key} has shape {tuple(value.shape)} but the model "
                             f"expects {want[key]} (adapter for a different base?)")
    missing = sorted(set(want) - set(adapter.tensors))
    if missing:
        raise ValueError(f"adapter lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    for name, value in adapter.base_tensors.items():
        base = getattr(_submodule(model, name + BASE_LAYER), "weight", None)
        # compared in the less precise dtype: PEFT saves it in the training dtype (bf16 from
        # an fp32 checkpoint, say), the model here may be loaded in another one
        if not isinstance(base, torch.Tensor) or not (
                torch.equal(value.to(base), base)
                or torch.equal(value, base.to(device=value.device, dtype=value.dtype))):
            raise ValueError(f"adapter tensor {name}{BASE_LAYER} differs from the model's "
                             f"{name}.weight (adapter for a different or resized base?)")


def _submodule(model: nn.Module, key: str) -> nn.Module:
    try:
        return model.get_submodule(key.rsplit(".", 2 if key.endswith(BASE_LAYER) else 1)[0])
    except AttributeError:
        raise ValueError(f"adapter tensor {key} has no matching module in the model") from None


def _whole_target(model: nn.Module, key: str, value: torch.Tensor, lora_keys) -> nn.Parameter:
    """The parameter a modules_to_save tensor replaces, checked (module, shape, no LoRA)."""
    mod, pname = _submodule(model, key), key.rsplit(".", 1)[1]
    if isinstance(mod, LoRALinear) or key.rsplit(".", 1)[0] + ".lora_A.weight" in lora_keys:
        raise ValueError(f"adapter has both LoRA and a whole-module tensor ({key}) for one module")
    orig = getattr(mod, pname, None)
    if not isinstance(orig, nn.Parameter):
        raise ValueError(f"adapter tensor {key} has no matching parameter in the model")
    if tuple(value.shape) != tuple(orig.shape):
        raise ValueError(f"adapter tensor {key} has shape {tuple(value.shape)} but the model "
                         f"expects {tuple(orig.shape)} (adapter for a different base?)")
    return orig


def _load_whole(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """A modules_to_save tensor becomes a new Parameter of its own, as PEFT's copy: on a tied
    model the other side (lm_head or embed_tokens) keeps the original, and the original is kept
    (non-persistent buffer) for disable_adapters."""
    mod, pname = _submodule(model, key), key.rsplit(".", 1)[1]
    orig = _whole_target(model, key, value, ())
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
    approximation of sum w_i dW_i (k = rank or the largest r_i; a module with min(out, in) < k
    keeps its whole sum, zero-padded to rank k). Adapters may cover different modules: each
    module sums the adapters that have it."""
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
            for key in ("rank_pattern", "alpha_pattern"):  # one scaling per adapter here
                if a.config.get(key):
                    raise ValueError(f"adapter_config: {key}={a.config[key]!r} is not supported "
                                     "when combining adapters (load or merge it on its own)")
        except ValueError as e:
            raise ValueError(f"adapter {i + 1} of {len(ads)}: {e}") from None
        if a.whole_module_keys():  # only lora_A/B are combined: the copy would be lost
            raise ValueError(f"adapter {i + 1} of {len(ads)} has whole-module tensors "
                             f"(modules_to_save, e.g. {a.whole_module_keys()[0]}), which cannot "
                             "be combined; merge it on its own")
    if any(a.config.get("use_dora") for a in ads):
        raise ValueError("DoRA adapters cannot be combined")
    # a module some adapters do not cover takes the others' terms only (as PEFT does)
    modules = sorted({m for a in ads for m in a.modules()})
    same_modules = all(a.modules() == modules for a in ads)
    ranks = [a.rank_alpha()[0] for a in ads]
    if method == "linear" and len(set(ranks)) > 1:
        raise ValueError(f"linear combination needs equal ranks, got {ranks}")
    new_r = {"cat": sum(ranks), "linear": ranks[0], "svd": rank or max(ranks)}[method]
    scaled = [w * a.scaling() for w, a in zip(weights, ads)]
    tensors = {}
    for m in modules:
        have = [(w, a) for w, a in zip(scaled, ads) if m + ".lora_A.weight" in a.tensors]
        ws = [w for w, _ in have]
        As = [a.tensors[m + ".lora_A.weight"].float() for _, a in have]     # (r_i, in)
        Bs = [a.tensors[m + ".lora_B.weight"].float() for _, a in have]     # (out, r_i)
        if method == "cat":  # zero rows / columns for the ranks of adapters without m
            A = torch.cat([w * a for w, a in zip(ws, As)], dim=0)
            A = F.pad(A, (0, 0, 0, new_r - A.shape[0]))
            B = torch.cat(Bs, dim=1)
            B = F.pad(B, (0, new_r - B.shape[1]))
        elif method == "linear":
            A = sum(math.copysign(math.sqrt(abs(w)), w) * a for w, a in zip(ws, As))
            B = sum(math.sqrt(abs(w)) * b for w, b in zip(ws, Bs))
        else:
            dW = sum(w * (b @ a) for w, a, b in zip(ws, As, Bs))            # (out, in)
            U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
            # a module narrower than new_r keeps all min(out, in) triplets (dW exactly), zero-
            # padded to new_r: PEFT's config has one r for every module
            k = min(new_r, len(S))
            A = F.pad(Vh[:k], (0, 0, 0, new_r - k))                          # (new_r, in)
            B = F.pad(U[:, :k] * S[:k], (0, new_r - k))                      # (out, new_r)
        dtype = have[0][1].tensors[m + ".lora_A.weight"].dtype
        tensors[m + ".lora_A.weight"], tensors[m + ".lora_B.weight"] = A.to(dtype), B.to(dtype)
    config = {**ads[0].config, "r": new_r, "lora_alpha": new_r, "use_rslora": False,
              "modules_to_save": None}
    if same_modules:
        config["target_modules"] = _combined_targets([a.config.get("target_modules")
                                                      for a in ads], modules)
    else:  # the first adapter's layer filters would drop the others' modules
        config.update(target_modules=modules, layers_to_transform=None, layers_pattern=None,
                      exclude_modules=None)
    base = {k: v for a in reversed(ads) for k, v in a.base_tensors.items()}
    return Adapter(config, tensors, base)


def _combined_targets(targets: list, modules: list[str]):
    """target_modules of a combined adapter, as PEFT builds it: regex strings are OR-ed (a regex
    in a list would be read as a module name), lists are united. A mix, which PEFT refuses,
    becomes the exact module names."""
    if all(isinstance(t, str) for t in targets):
        return targets[0] if len(set(targets)) == 1 else "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) for t in targets):
        return list(modules)
    return sorted({t for ts in targets if ts is not None for t in ts})
