"""Fine-tuning modes for train.py: which parameters train, and how the result is saved.

  full    every parameter (optionally only --trainable-layers blocks)
  freeze  partial fine-tuning: only the blocks named by --trainable-layers (default: last 2)
  lora    LoRA adapters on --lora-targets (Hu et al. 2021; rsLoRA scaling with --rslora)
  dora    weight-decomposed LoRA (Liu et al. 2024)
  qlora   LoRA over NF4 4-bit base weights with double quantization (Dettmers et al. 2023)

Half Fine-Tuning (`--half-finetune`, after Hui et al. 2024, "HFT: Half Fine-Tuning for Large
Language Models"), for full/freeze modes: training runs in rounds; in round r each block trains
one half of its parameters and the other half stays frozen. Selection rule: within each block
the parameters are grouped by category (attention q/k/v/o, MLP gate/up/down, the two norms); for
each pair of rounds (2k, 2k+1) a generator seeded with (seed, k) permutes each category; round 2k
trains the first half (rounded down: 2 of 4, 1 of 3, 1 of 2) and round 2k+1 exactly the other
half, so every parameter trains in every second round.
Embeddings, the final norm and lm_head stay frozen. Adapter modes save PEFT adapters; the others
save full HF-format model directories.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from engine.checkpoint import read_safetensors_dir, save_model

MODES = ("full", "freeze", "lora", "dora", "qlora")
ADAPTER_MODES = ("lora", "dora", "qlora")


def parse_layers(spec: str | None, n_layers: int, default_last: int | None) -> list[int]:
    """'4' = the last 4 blocks; '0,2,5-7' (or '3-3' for one block) = those block indices.
    None -> the last default_last blocks, or all."""
    if spec is None:
        return list(range(n_layers - default_last, n_layers)) if default_last else list(range(n_layers))
    spec = spec.strip()
    try:
        if spec.isdigit():
            n = int(spec)
            if not 1 <= n <= n_layers:
                raise ValueError
            return list(range(n_layers - n, n_layers))
        out, backwards = set(), None
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            lo, hi = int(lo), int(hi or lo)
            if hi < lo:  # range() would be empty: no block would train
                backwards = part
            out.update(range(lo, hi + 1))
    except ValueError:
        raise ValueError(f"--trainable-layers {spec!r}: expected N (the last N of {n_layers} blocks) "
                         f"or indices like 0,2,5-7") from None
    if backwards:
        raise ValueError(f"--trainable-layers {spec!r}: the range {backwards!r} runs backwards "
                         "(write it low-high)")
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"--trainable-layers: block {bad[0]} does not exist (model has {n_layers})")
    return sorted(out)


def prepare(model: nn.Module, mode: str, *, r: int = 8, alpha: float = 16, dropout: float = 0.0,
            targets="all-linear", rslora: bool = False, trainable_layers: str | None = None) -> dict:
    """Set requires_grad / swap in LoRA (and NF4 for qlora) in place. Returns a report.
    targets: "all-linear", module names, or them as --lora-targets spells them ("q_proj,v_proj")."""
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if mode not in MODES:
        raise ValueError(f"unknown --finetune mode {mode!r}; valid: {', '.join(MODES)}")
    report: dict = {"mode": mode}
    n_layers = len(model.model.layers)
    if mode in ADAPTER_MODES:
        from engine.lora import apply_lora, lora_summary
        if mode == "qlora":  # quantized while loading (load_model(quantize="nf4")), or now
            from engine.nf4 import quantize_model
            q = getattr(model, "nf4_report", None) or quantize_model(model)
            report["nf4"] = {k: q[k] for k in ("layers", "bytes_before", "bytes_after", "bits_per_param")}
        apply_lora(model, targets=targets, r=r, alpha=alpha, dropout=dropout, rslora=rslora,
                   dora=mode == "dora", dtype=torch.float32)
        report.update(lora_summary(model))
        return report
    layers = parse_layers(trainable_layers, n_layers, 2 if mode == "freeze" else None)
    for p in model.parameters():
        p.requires_grad_(mode == "full" and trainable_layers is None)
    for i in layers:
        for p in model.model.layers[i].parameters():
            p.requires_grad_(True)
    report["trainable_layers"] = layers
    report["trainable_params"] = sum(p.numel() for p in unique_params(model) if p.requires_grad)
    report["total_params"] = sum(p.numel() for p in unique_params(model))
    return report


def report_line(report: dict) -> str:
    """train.py's startup line about what trains, e.g. "fine-tuning: mode qlora, trainable
    2,442,240 of 136,957,248 parameters (1.78%), nf4 210 layers 405.0 -> 57.0 MiB (4.13 bits
    per parameter)"."""
    parts = [f"mode {report['mode']}"]
    if "trainable_params" in report:
        n, total = report["trainable_params"], report["total_params"]
        parts.append(f"trainable {n:,} of {total:,} parameters ({100 * n / max(total, 1):.2f}%)")
    if "trainable_layers" in report:
        parts.append(f"trainable_layers {report['trainable_layers']}")
    if "nf4" in report:
        q = report["nf4"]
        parts.append(f"nf4 {q['layers']} layers {q['bytes_before'] / 2**20:.1f} -> "
                     f"{q['bytes_after'] / 2**20:.1f} MiB ({q['bits_per_param']:.2f} bits per "
                     f"parameter)")
    if "half_finetune" in report:  # train.py's sentence about the current round
        parts.append(f"half_finetune {report['half_finetune']}")
    return "fine-tuning: " + ", ".join(parts)


def unique_params(model: nn.Module):
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


class HalfFineTuning:
    """Each round, half of every block's parameters train (see module docstring)."""

    CATEGORIES = (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"),
                  ("input_layernorm", "post_attention_layernorm"))

    def __init__(self, model: nn.Module, layers: list[int], seed: int):
        self.blocks = [model.model.layers[i] for i in layers]
        self.seed = seed
        for p in model.parameters():  # outside the blocks nothing trains
            p.requires_grad_(False)

    def select(self, round_idx: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 1000003 + round_idx // 2)
        for block in self.blocks:
            mods = dict(block.named_modules())
            for cat in self.CATEGORIES:
                perm = torch.randperm(len(cat), generator=g).tolist()
                half = perm[:len(cat) // 2] if round_idx % 2 == 0 else perm[len(cat) // 2:]
                chosen = {cat[i] for i in half}
                for name in cat:
                    leaf = next(m for n, m in mods.items() if n.split(".")[-1] == name)
                    for p in leaf.parameters():
                        p.requires_grad_(name in chosen)

    def counts(self) -> tuple[int, int]:
        """(parameters that take turns, those that train in the selected round)."""
        names = {name for cat in self.CATEGORIES for name in cat}
        params = {id(p): p for block in self.blocks for n, m in block.named_modules()
                  if n.split(".")[-1] in names for p in m.parameters()}.values()
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def save_trained(model: nn.Module, tokenizer, directory: str, mode: str, base: str | None) -> None:
    """Adapter modes: PEFT adapter files; others: an HF model directory. Tokenizer files beside."""
    if mode in ADAPTER_MODES:
        from engine.lora import save_adapter
        os.makedirs(directory, exist_ok=True)
        if base is not None and os.path.exists(base):  # a local base: found from any directory
            base = os.path.abspath(base)
        save_adapter(model, directory, base_model_name_or_path=base)
        if tokenizer is not None:
            tokenizer.save(directory)
    else:
        from engine.config import atomic_write_bytes
        from engine.hub import derived_generation_config
        save_model(model, directory, tokenizer)
        # the base's stop ids beyond config.json's eos (Llama 3's <|eot_id|>), as merge keeps them
        gen = os.path.join(directory, "generation_config.json")
        content = derived_generation_config(base, tokenizer, model.config) if base else None
        if content is not None:
            atomic_write_bytes(gen, content)
        elif os.path.exists(gen):  # a replaced model's stop ids are not this one's
            os.remove(gen)


def restore_trained(model: nn.Module, directory: str, mode: str) -> None:
    """Load what save_trained wrote back into this (already prepared) model."""
    if mode in ADAPTER_MODES:
        from engine.lora import load_adapter
        load_adapter(model, directory)
        return
    state = read_safetensors_dir(directory)
    own = model.state_dict(keep_vars=True)
    for name, t in own.items():  # checked before any copy: a refusal leaves the model as it was
        if name in state and state[name].shape != t.shape:
            raise ValueError(f"{directory}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                             f"the model has {tuple(t.shape)} (a checkpoint of another model: "
                             "has --base changed since the run started?)")
    with torch.no_grad():
        for name, t in own.items():
            if name in state:
                t.copy_(state[name])
