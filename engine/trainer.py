"""Pieces of the training loop that train.py reads top to bottom: optimizer groups, the
warmup + cosine schedule, evaluation (loss, perplexity, bits per byte), metrics logging,
resumable training state (saved as one unit in run/last) and the loss-curve plot. Follows
nanoGPT's train.py. Also train.py's first and last steps, kept out of the script: the run
directory (--out, or --resume with the run's saved flags) and the final report (model card,
the `done` line).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import threading
import time

import numpy as np
import torch

from engine import distributed, finetune
from engine.card import command_line, peak_memory_mb, write_model_card
from engine.config import atomic_write, atomic_write_bytes, atomic_write_text
from engine.train_args import COMMAND_KEY, RESUME_FLAGS, card_hyperparameters, read_run_args

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


WARMUP_SHARE = 0.1  # with a time budget, warmup ends by this share of it at the latest


def get_lr(step: int, progress: float, lr: float, warmup_steps: int, min_lr_ratio: float,
           warmup_time: float = 0.0) -> float:
    """Linear warmup over `warmup_steps`, or with a time budget until `warmup_time` (the time
    used over WARMUP_SHARE of the budget) reaches 1 if that comes first, then cosine from lr to
    lr * min_lr_ratio as `progress` (the decay phase used so far, see decay_progress) goes 0 -> 1."""
    if step < warmup_steps and warmup_time < 1:
        return lr * max((step + 1) / warmup_steps, warmup_time)
    p = min(max(progress, 0.0), 1.0)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def decay_progress(step: int, max_steps: int, warmup_steps: int, elapsed_s: float = 0.0,
                   budget_s: float | None = None, warmup_end_s: float = 0.0) -> float:
    """How far the cosine has run (0 -> 1) at `step`: the steps after warmup over the steps left
    for decay (nanoGPT's (it - warmup) / (decay_iters - warmup), so the LR does not jump when
    warmup ends), or with a time budget the time since warmup ended (warmup_end_s) over the time
    that was left then, whichever is further: the schedule follows the budget that ends first.
    Counted like warmup (step + 1): the last step (max_steps - 1) trains at the minimum LR."""
    p = (step + 1 - warmup_steps) / max(1, max_steps - warmup_steps)
    if budget_s:
        p = max(p, (elapsed_s - warmup_end_s) / max(budget_s - warmup_end_s, 1e-9))
    return min(max(p, 0.0), 1.0)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The global (device) RNG's seed for one optimizer step: its draws (LoRA dropout masks, the
    only ones in the loop) depend on (seed, rank, step) alone, so a resumed run draws what the
    uninterrupted one did on CUDA and under torchrun too, whose generators are not saved (one
    per device and rank). SeedSequence hashes the three: unlike seed + k * rank + step, no rank
    replays another's masks some steps later."""
    words = np.random.SeedSequence([seed % 2**64, rank, step]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1  # 63 bits: within torch.manual_seed's range


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
            # On resume, drop events past the checkpoint so the log matches the trajectory, and
            # the final report of a finished run (the resumed run writes its own).
            keep = [e for e in self.read() if e.get("step", 0) <= truncate_after_step
                    and not e.get("final")]
            atomic_write_bytes(path, "".join(json.dumps(e) + "\n" for e in keep).encode())
        elif truncate_after_step is None and os.path.isfile(path):
            os.remove(path)

    def log(self, **event) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def read(self) -> list[dict]:
        return read_events(self.path)


def read_events(path: str) -> list[dict]:
    """The events of a metrics.jsonl (none if it is missing); a torn last line (a kill during
    the append) is skipped, a bad line elsewhere is an error naming it."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, l) for n, l in enumerate(f, 1) if l.strip()]
    events = []
    for k, (n, line) in enumerate(lines):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k == len(lines) - 1 and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{n}: not a JSON event ({e.msg})") from None
    return events


def plot_losses(events: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr = [(e["step"], e["train_loss"]) for e in events if "train_loss" in e]
    # not the final report: the best checkpoint's score, which belongs to no step of the curve
    va = [(e["step"], e["val_loss"]) for e in events if "val_loss" in e and not e.get("final")]
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
    # fsynced before the rename, as the weights beside it are, since recover_last takes a
    # directory holding this file for a complete checkpoint; streamed, not built in memory (the
    # optimizer state is twice the trainable weights)
    atomic_write(os.path.join(directory, STATE_FILE), lambda f: torch.save(state, f))


def load_training_state(directory: str, optimizer, data_gen: torch.Generator) -> tuple[int, dict]:
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {STATE_FILE} in {directory!r}: not a resumable checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        step, extra = int(state["step"]), json.loads(state["extra"])
        rngs, saved = (state["data_rng"], state["torch_rng"]), state["optimizer"]
    except Exception as e:  # noqa: BLE001  (pickle, zip and key errors of a damaged file)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot read {path} (damaged?): {first}") from None
    if not _fits(optimizer, saved):  # torch would load it, then fail at the first step (shapes)
        raise ValueError(f"{path}: its optimizer state does not fit the parameters that train "
                         "now: a checkpoint of another model or fine-tuning setup (has --base "
                         "changed since the run started?)")
    optimizer.load_state_dict(saved)
    data_gen.set_state(rngs[0])
    torch.set_rng_state(rngs[1])
    return step, extra


def _fits(optimizer, saved) -> bool:
    """Whether a saved torch optimizer state_dict has this optimizer's groups, each with as many
    parameters, and per-parameter state of their shapes. (A --fsdp run's name-keyed state is
    checked by torch's set_optimizer_state_dict.)"""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return True
    try:
        groups = saved["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
            return False
        params = dict(zip((i for g in groups for i in g["params"]),
                          (p for g in optimizer.param_groups for p in g["params"])))
        return all(not torch.is_tensor(t) or t.dim() == 0 or t.shape == params[i].shape
                   for i, s in saved["state"].items() for t in s.values())
    except (KeyError, TypeError, AttributeError):
        return False


class Throughput:
    """Tokens per second of training over the steps since the last report: add() each step's
    tokens with the seconds the step took, so evaluation and checkpointing don't count."""

    def __init__(self):
        self.seconds, self.tokens = 0.0, 0

    def add(self, n: int, seconds: float) -> None:
        self.tokens += n
        self.seconds += seconds

    def rate(self) -> float:
        r = self.tokens / max(self.seconds, 1e-9)
        self.seconds, self.tokens = 0.0, 0
        return r


def save_last(model, tok, run_dir: str, optimizer, step: int, gen, extra: dict, args) -> None:
    """Write weights + training state into run_dir/last as one unit (new dir, then swap).
    Under torchrun every rank calls this (FSDP2 gathers); rank 0 writes, then all meet.
    A kill between the two renames leaves last.old and last.new: recover_last picks one."""
    new, last, old = (os.path.join(run_dir, n) for n in (LAST + ".new", LAST, LAST + ".old"))
    if distributed.is_main():
        shutil.rmtree(new, ignore_errors=True)
    distributed.save_trained(model, tok, new, args.finetune or "full", args.base)
    optimizer = distributed.optimizer_for_saving(model, optimizer, args.fsdp)
    if distributed.is_main():
        save_training_state(new, optimizer, step, gen, extra)
        # a last.old left by a kill after the swap (or recovered past) would make the rename
        # below fail (a directory is only renamed over an empty one); last/ is newer than it
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(last):
            os.replace(last, old)
        os.replace(new, last)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def recover_last(run_dir: str) -> None:
    """Finish a save_last that a kill interrupted between its renames: with no last/, last.new
    is complete if it holds the training state (written after the weights), else last.old is
    the previous checkpoint. Either becomes last/."""
    last = os.path.join(run_dir, LAST)
    if os.path.isdir(last):
        return
    for name in (LAST + ".new", LAST + ".old"):
        d = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(d, STATE_FILE)):
            os.replace(d, last)
            return


def has_run(run_dir: str) -> str | None:
    """What in run_dir belongs to an earlier run (a checkpoint, resumable state or its flags),
    or None: a new run must not overwrite it."""
    for name in ("config.json", "adapter_config.json", "run_args.json", LAST, LAST + ".new",
                 LAST + ".old"):
        if os.path.exists(os.path.join(run_dir, name)):
            return name
    return None


def _resumable(run_dir: str) -> bool:
    """Whether run_dir holds last/ (or what a save_last cut short left: recover_last's input)."""
    return any(os.path.exists(os.path.join(run_dir, n))
               for n in (LAST, LAST + ".new", LAST + ".old"))


def flags_only(run_dir: str) -> str | None:
    """If run_dir holds a run's run_args.json but no checkpoint (nor a save_last cut short), the
    line that says so and what to do, else None: the run stopped (or is starting right now, so
    the directory is not overwritten) before its first checkpoint, and there is nothing to resume."""
    if has_run(run_dir) != "run_args.json" or _resumable(run_dir):
        return None
    return (f"{run_dir} holds only a run's flags (run_args.json), no checkpoint: a run that stopped "
            f"(or is still starting) before its first checkpoint; nothing to resume — remove "
            f"{run_dir} or pick another --out")


def write_run_args(run_dir: str, args: argparse.Namespace) -> None:
    """run_args.json: the run's flags, which --resume continues with, and the command that started
    the run (COMMAND_KEY), which the model card shows after a resume too. Rank 0 writes it."""
    atomic_write_text(os.path.join(run_dir, "run_args.json"),
                      json.dumps({**vars(args), COMMAND_KEY: command_line()}, indent=2))


def finished_run(run_dir: str) -> str | None:
    """For --resume: if the run in run_dir has finished (its final report, metrics.jsonl's
    `final` event for the step last/ holds and the model card, was written), the line that says
    so: at which step and why, and where its results are. None when it has not (it trains on,
    or redoes a final report that was cut short). Read, not loaded: the state file is mapped."""
    card = os.path.join(run_dir, "README.md")
    finals = {e.get("step"): e for e in read_events(os.path.join(run_dir, "metrics.jsonl"))
              if e.get("final")}
    if not finals or not os.path.isfile(card):
        return None
    try:
        state = torch.load(os.path.join(run_dir, LAST, STATE_FILE), map_location="cpu",
                           weights_only=True, mmap=True)
        step = int(state["step"])
    except Exception:  # noqa: BLE001  (a damaged file: the resume itself says what is wrong)
        return None
    if step not in finals:
        return None
    why = finals[step].get("stop_reason")  # runs from before it was logged lack it
    return (f"{run_dir} is done{f' ({why})' if why else ''}: {step} steps; nothing to resume. Its "
            f"results: the best checkpoint, the model card README.md, metrics.jsonl and loss.png "
            f"in {run_dir}")


class StepBoundaryInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM (`kill PID`, `timeout`, a job scheduler before its kill) during
    the loop: the first one only sets `requested` and the loop stops at the next step boundary,
    where the data generator, the data stream, the weights and the optimizer all belong to the
    same step (a checkpoint taken mid-step would resume on another trajectory); a second one
    raises KeyboardInterrupt at once. `exit_code`: 128 + the last signal's number (130 Ctrl-C,
    143 SIGTERM), as a shell reports a process the signal ended. Not installed when disabled
    (under torchrun ranks would stop at different steps) or off the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.enabled, self.requested, self.signum = enabled, False, None
        self._previous: dict = {}  # signal -> its handler before __enter__

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)  # a KeyboardInterrupt not from here: Ctrl-C

    def _handle(self, signum, frame):
        self.signum = signum
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if signum == signal.SIGINT:
            print("\nCtrl-C: stopping after this step to save a resumable checkpoint (Ctrl-C again "
                  "to quit without saving it)", file=sys.stderr, flush=True)
        else:
            print("\nSIGTERM: stopping after this step to save a resumable checkpoint (SIGTERM or "
                  "Ctrl-C again to quit without saving it)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StepBoundaryInterrupt":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not set from Python
            signal.signal(sig, previous if previous is not None else
                          signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        self._previous = {}


# ---------------------------------------------------------------------------------------------
# The run directory and the final report (train.py's first and last steps)
# ---------------------------------------------------------------------------------------------
def open_run_dir(args: argparse.Namespace, given: set[str], stage: dict
                 ) -> tuple[argparse.Namespace, str, str | None]:
    """The run this invocation trains: (args, run_dir, resume_dir). --resume: the run's directory
    (last/ recovered after a kill mid-save), the flags it was started with as `args` (a given flag
    that differs is an error) and resume_dir its last/. Else --out (default out/<name>-<time>),
    created, never one that holds a run; resume_dir None. `stage` gets what a Ctrl-C now
    interrupts, and the directory made here (main() removes it if it stays empty). Every rank
    calls this: main_first and broadcast_object are collectives."""
    resume_dir = None
    if args.resume:
        run_dir = args.resume.rstrip("/")
        if os.path.basename(run_dir) == LAST:
            run_dir = os.path.dirname(run_dir)
        if not os.path.exists(run_dir):
            raise ValueError(f"--resume {args.resume}: {run_dir} does not exist")
        if os.path.isdir(run_dir):
            with distributed.main_first():  # a kill between last/'s renames left last.old/.new
                recover_last(run_dir)
        resume_dir = os.path.join(run_dir, LAST)
        if not os.path.isdir(resume_dir):
            early = flags_only(run_dir) if os.path.isdir(run_dir) else None
            raise ValueError(f"--resume {args.resume}: " + (
                early or f"no resumable checkpoint ({LAST}/) there"))
        saved = read_run_args(run_dir)
        # The run continues with its saved flags: a different value here would be ignored.
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run has {saved.get(k)})"
                   for k in sorted(given - set(RESUME_FLAGS)) if getattr(args, k) != saved.get(k)]
        if changed:
            raise ValueError(f"--resume continues {run_dir} with the flags it was started with; "
                             f"these differ and cannot change: {'; '.join(changed)} (only "
                             + ", ".join("--" + f.replace("_", "-") for f in RESUME_FLAGS[1:])
                             + " may be given with --resume)")
        args = argparse.Namespace(**{"fsdp": False, "rpo_alpha": 0.0, "dpo_loss": "sigmoid",
                                     **saved,  # older runs lack some
                                     "resume": args.resume, "device": args.device,
                                     "threads": args.threads, "no_progress": args.no_progress,
                                     "pause_at_step": args.pause_at_step,
                                     "metrics_port": args.metrics_port, "dist_timeout": args.dist_timeout})
        # the global batch stays the run's in any world size: per-rank batch = global / processes
        args.batch_size = distributed.per_rank_batch(saved["batch_size"] * saved.get("world_size", 1))
        stage["now"] = f"before training resumed; {run_dir} is unchanged"
    else:
        name = f"{args.finetune}-{os.path.basename(args.base.rstrip('/'))}" if args.base else args.preset
        if getattr(args, "objective", "lm") == "dpo":
            name = f"dpo-{name}"
        run_dir = distributed.broadcast_object(  # rank 0's clock names the run
            args.out or os.path.join("out", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"))
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise ValueError(f"--out {run_dir} is a file, not a directory")
        found = has_run(run_dir) if os.path.isdir(run_dir) else None
        if found:  # a finished, paused or interrupted run (or one starting now): never overwrite it
            then = (f"--out or continue it with --resume {run_dir}" if _resumable(run_dir)
                    else "--out (it has no resumable state: nothing to --resume)")
            raise ValueError(flags_only(run_dir) or f"{run_dir} already holds a checkpoint or run "
                             f"({found}); pick another {then}")
        try:
            if not os.path.isdir(run_dir):
                stage["created"] = run_dir
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create --out {run_dir}: {e.strerror or e}") from None
    return args, run_dir, resume_dir


def final_report(args: argparse.Namespace, run_dir: str, task, data_path: str, metrics: MetricsLog,
                 final: dict, *, step: int, wall: float, extra: dict, stop_reason: str,
                 resumed_at: int | None) -> None:
    """Rank 0's end of a run: the final metrics line, loss.png, the model card (README.md) and
    the `done` line. `final`: the best checkpoint's scores over the validation split; `wall`:
    the run's elapsed seconds; `resumed_at`: the step this session started at, None for a run
    that was not resumed."""
    mode = args.finetune or "full"
    # One set of figures for the metrics, the card and the done line, all over the whole run
    # (every session of a resumed one): wall = the loop with its evaluations and checkpoints plus
    # the final evaluation; tokens/s = over the training steps only.
    metrics.log(step=step, elapsed_s=round(wall, 2), final=True, stop_reason=stop_reason, **final)
    plot_losses(metrics.read(), os.path.join(run_dir, "loss.png"))
    tps = extra["tokens"] / max(extra["train_s"], 1e-9)
    peak = peak_memory_mb()
    last_train = next((e["train_loss"] for e in reversed(metrics.read()) if "train_loss" in e), None)
    write_model_card(run_dir, base_model=args.base,  # None: the card says "trained from scratch"
                     data_path=data_path, data_sizes=task.sizes(),
                     mode="+".join([mode if args.base else "pretrain"]
                                   + ["half"] * bool(args.half_finetune)
                                   + ["dpo"] * (args.objective == "dpo")),
                     adapter=mode in finetune.ADAPTER_MODES,
                     hyperparameters=card_hyperparameters(args),
                     # how to reproduce the run: the command that started it, not a resume's
                     **({"command": getattr(args, COMMAND_KEY, None) or
                         "# (not recorded: run_args.json predates the record of the command)",
                         "resumed_with": command_line()} if resumed_at is not None else {}),
                     metrics={"steps": step, "train_loss (last logged)": last_train,
                              "tokens_per_s": round(tps, 1), **peak, **{k: round(v, 5) for k, v in final.items()}},
                     wall_time_s=wall)
    mem = ", ".join(f"{k.removesuffix('_mb').replace('_', ' ')} {v:,.0f} MB" for k, v in peak.items())
    whole, mem_of = ((f", counted over the whole run (resumed at step {resumed_at})", " in this session")
                     if resumed_at is not None else ("", ""))
    print(f"done ({stop_reason}): {step} steps in {wall:.1f}s with evaluation ({extra['train_s']:.1f}s "
          f"in training steps: {tps:,.0f} tokens/s){whole}, {mem}{mem_of}; best checkpoint: "
          f"{task.format_eval(final)} -> {run_dir}")
