"""Pieces of the training loop that train.py reads top to bottom: optimizer groups, the
warmup + cosine schedule, evaluation (loss, perplexity, bits per byte), metrics logging,
resumable training state (saved as one unit in run/last) and the loss-curve plot. Follows
nanoGPT's train.py.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time

import numpy as np
import torch

from engine import distributed
from engine.config import atomic_write_bytes

STATE_FILE = "training_state.pt"
LAST = "last"  # subdirectory of a run with the most recent (resumable) weights and training state


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------
def configure_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                        betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norm weights, biases) don't. Frozen params are left out."""
    seen, decay, no_decay = set(), [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def get_lr(step: int, progress: float, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup over `warmup_steps`, then cosine from lr to lr * min_lr_ratio as
    `progress` (fraction of the step or time budget used, whichever is larger) goes 0 -> 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, split, starts: list[int], seq_len: int, batch_size: int,
             device, autocast_ctx) -> dict[str, float]:
    """Mean next-token loss over fixed windows of a TokenSplit; perplexity; bits per byte =
    total nats / UTF-8 bytes / ln 2, with bytes = tokens * (split bytes per token)."""
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    for i in range(0, len(starts), batch_size):
        rows = starts[i:i + batch_size]
        xy = torch.from_numpy(np.stack([split.tokens[s:s + seq_len + 1].astype(np.int64) for s in rows]))
        x, y = xy[:, :-1].to(device), xy[:, 1:].to(device)
        with autocast_ctx:
            loss = model(x, labels=y)
        total_nats += loss.item() * y.numel()
        total_tokens += y.numel()
    model.train(was_training)
    mean = total_nats / max(1, total_tokens)
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0)),
            "val_bpb": mean / split.bytes_per_token / math.log(2)}


# ---------------------------------------------------------------------------------------------
# Metrics and plot
# ---------------------------------------------------------------------------------------------
class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl (flushed, so a crash loses nothing)."""

    def __init__(self, path: str, truncate_after_step: int | None = None):
        self.path = path
        if truncate_after_step is not None and os.path.isfile(path):
            # On resume, drop events past the checkpoint so the log matches the trajectory.
            with open(path, encoding="utf-8") as f:
                keep = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= truncate_after_step]
            atomic_write_bytes(path, "".join(keep).encode())
        elif truncate_after_step is None and os.path.isfile(path):
            os.remove(path)

    def log(self, **event) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def read(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(l) for l in f if l.strip()]


def plot_losses(events: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr = [(e["step"], e["train_loss"]) for e in events if "train_loss" in e]
    va = [(e["step"], e["val_loss"]) for e in events if "val_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train", alpha=0.8)
    if va:
        ax.plot(*zip(*va), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Resumable state: optimizer, step, RNGs, bookkeeping (weights live in model.safetensors)
# ---------------------------------------------------------------------------------------------
def save_training_state(directory: str, optimizer, step: int, data_gen: torch.Generator,
                        extra: dict) -> None:
    state = {"optimizer": optimizer.state_dict(), "step": step,
             "data_rng": data_gen.get_state(), "torch_rng": torch.get_rng_state(),
             "extra": json.dumps(extra)}
    tmp = os.path.join(directory, f".{STATE_FILE}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(directory, STATE_FILE))


def load_training_state(directory: str, optimizer, data_gen: torch.Generator) -> tuple[int, dict]:
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {STATE_FILE} in {directory!r}: not a resumable checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    data_gen.set_state(state["data_rng"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), json.loads(state["extra"])


class Throughput:
    """Tokens per second over the steps since the last report."""

    def __init__(self):
        self.t, self.tokens = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.tokens += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.tokens / max(now - self.t, 1e-9)
        self.t, self.tokens = now, 0
        return r


def save_last(model, tok, run_dir: str, optimizer, step: int, gen, extra: dict, args) -> None:
    """Write weights + training state into run_dir/last as one unit (new dir, then swap).
    Under torchrun every rank calls this (FSDP2 gathers); rank 0 writes, then all meet."""
    new, last, old = (os.path.join(run_dir, n) for n in (LAST + ".new", LAST, LAST + ".old"))
    if distributed.is_main():
        shutil.rmtree(new, ignore_errors=True)
    distributed.save_trained(model, tok, new, args.finetune or "full", args.base)
    optimizer = distributed.optimizer_for_saving(model, optimizer, args.fsdp)
    if distributed.is_main():
        save_training_state(new, optimizer, step, gen, extra)
        if os.path.isdir(last):
            os.replace(last, old)
        os.replace(new, last)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
