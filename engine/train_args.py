"""train.py's command line: the flags, their checks (one usage line for a bad value or a flag that
would be ignored), and what --resume may change. Kept out of train.py so that the script stays
the training loop, readable top to bottom.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from engine import finetune
from engine.config import PRESETS, OneLineParser, TrainConfig
from engine.hub import pick_device
from tokenizer import read_chat_template

# What --resume may change: how and where this invocation runs, not what the run trains (the rest
# comes from the run's run_args.json; a different value on the command line is an error).
# run_args.json also holds keys that are no flag: world_size, and COMMAND_KEY.
RESUME_FLAGS = ("resume", "pause_at_step", "device", "threads", "no_progress", "metrics_port",
                "dist_timeout")
# A trained SentencePiece vocabulary holds 256 byte-fallback pieces and 3 special ids before any
# merge: presets smaller than that (tiny: 256, sized for model tests) get this many.
MIN_TRAINED_VOCAB = 320
# run_args.json's record of the command line that started the run (rank 0's; runs saved before it
# lack it): the model card shows it, not a resume's command line.
COMMAND_KEY = "command"


def build_parser(description: str | None = None) -> OneLineParser:
    d = TrainConfig()
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", help="text file, directory of text files (binary files in it, with a NUL byte in "
                     "their first 8000 bytes, are skipped with a warning), or JSONL with a 'text' "
                     "field (default: Shakespeare, fetched on first use)")
    a("--val-data", help="held-out corpus (default: the last --val-fraction of --data)")
    a("--val-fraction", type=float, default=0.1)
    a("--out", help="output directory (default: out/<preset>-<timestamp>)")
    a("--preset", default="small", help=f"model size: {', '.join(PRESETS)}")
    a("--vocab-size", type=int, default=None, help=f"SentencePiece vocabulary (default: the preset's, "
                                                   f"at least {MIN_TRAINED_VOCAB})")
    a("--max-steps", type=int, default=None, help="optimizer steps (default: 100000, or until --max-minutes)")
    a("--max-minutes", type=float, default=None, help="wall-clock budget for the loop (default: 5 if "
                                                      "--max-steps is not given)")
    a("--batch-size", type=int, default=d.batch_size, help="micro-batch per process (global batch "
                                                           "= this x processes x --grad-accum)")
    a("--seq-len", type=int, default=None,
      help=f"tokens per training window (default: 128 from scratch, {d.seq_len} fine-tuning)")
    a("--grad-accum", type=int, default=d.grad_accum)
    a("--lr", type=float, default=None, help="peak learning rate (default: 3e-3 from scratch, "
                                              "1e-3 for adapters, 5e-5 for full fine-tuning)")
    a("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    a("--warmup-steps", type=int, default=None,
      help=f"linear warmup, then cosine decay to --min-lr-ratio x --lr (default: {d.warmup_steps}, "
           "at most a tenth of --max-steps)")
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--grad-clip", type=float, default=d.grad_clip)
    a("--eval-every", type=int, default=d.eval_every)
    a("--eval-batches", type=int, default=d.eval_batches, help="batches per periodic validation")
    a("--final-eval-windows", type=int, default=1024,
      help="windows of the validation split scored at the end (plain-text data)")
    a("--log-every", type=int, default=10)
    a("--patience", type=int, default=None, help="stop after this many evaluations without improvement")
    a("--base", metavar="MODEL", help="fine-tune this model: a name (smollm2-135m-instruct), an HF "
                                      "model directory or a .gguf file (default: train from scratch)")
    a("--finetune", choices=finetune.MODES, default=None,
      help="with --base: which parameters train (default lora); see engine/finetune.py")
    a("--lora-r", type=int, default=8)
    a("--lora-alpha", type=float, default=16.0)
    a("--lora-dropout", type=float, default=0.0)
    a("--lora-targets", default="all-linear",
      help="comma-separated module names (q_proj,v_proj) or all-linear")
    a("--rslora", action="store_true", help="scale LoRA by alpha/sqrt(r) instead of alpha/r")
    a("--trainable-layers", default=None, metavar="SPEC",
      help="blocks that train in full/freeze modes: N (the last N) or indices like 0,2,5-7")
    a("--half-finetune", action="store_true",
      help="Half Fine-Tuning: each round half of every block trains (full/freeze modes)")
    a("--half-round-steps", type=int, default=50, help="steps per Half Fine-Tuning round")
    a("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    a("--pack", action="store_true", help="SFT data: pack several samples per row (attention "
                                          "never crosses samples) instead of padding")
    a("--chat-template", metavar="FILE|JINJA|chatml",
      help="the run's chat template instead of the base tokenizer's (a .jinja file, a "
           "tokenizer_config.json, the template itself, or chatml): SFT/DPO chat data is rendered "
           "with it and the saved tokenizer carries it")
    a("--bad-lines", choices=("stop", "skip"), default="stop",
      help="JSONL data (SFT, preference or 'text' records): stop at a malformed line, or skip "
           "it with a warning")
    a("--objective", choices=("lm", "dpo"), default="lm",
      help="lm: next-token loss; dpo: preference pairs in --data (engine/dpo.py; needs --base; the "
           "reference is the base: adapters disabled, or with --finetune full/freeze its "
           "log-probs computed once before the first step)")
    a("--dpo-loss", choices=("sigmoid", "ipo", "hinge"), default="sigmoid",
      help="DPO: the pair loss, as TRL's loss_type (sigmoid: DPO; ipo: IPO on per-token "
           "log-ratios; hinge: SLiC)")
    a("--beta", type=float, default=0.1, help="DPO: strength of the KL-style reference anchor")
    a("--label-smoothing", type=float, default=0.0, help="DPO: conservative DPO label noise in [0, 0.5)")
    a("--rpo-alpha", type=float, default=0.0,
      help="DPO: add this x the chosen answers' NLL per token (RPO; keeps them likely)")
    a("--resume", metavar="DIR", help="continue the run in DIR with its saved flags (same trajectory); "
                                      "only " + ", ".join("--" + f.replace("_", "-") for f in RESUME_FLAGS[1:])
                                      + " may be given with it")
    a("--pause-at-step", type=int, default=None, metavar="N",
      help="save a resumable checkpoint at step N and exit (train in chunks; --resume continues)")
    a("--seed", type=int, default=d.seed)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--threads", type=int, default=None, help="CPU threads for torch")
    a("--no-progress", action="store_true", help="no tqdm bar (logs to stdout instead)")
    a("--metrics-port", type=int, default=None, metavar="PORT",
      help="serve Prometheus /metrics for this job on 127.0.0.1:PORT (step, loss, lr, tokens/s, ETA)")
    a("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer "
                                          "state with FSDP2 (pretraining, --finetune full/freeze)")
    a("--dist-timeout", type=float, default=600.0, metavar="S", help="under torchrun: seconds a rank "
      "waits for the others in a collective before exiting with an error (a dead or hung rank)")
    return p


def explicit_flags(argv=None) -> set[str]:
    """The flags (dest names) given on the command line, as opposed to defaults."""
    q = build_parser()
    for action in q._actions:
        action.default = argparse.SUPPRESS
    return set(vars(q.parse_args(argv)))


# Flags that mean something only with other flags: given without them, they would be ignored.
_ONLY_WITH = (
    (("val_fraction",), lambda a: not a.val_data,
     "a validation split held out from --data (--val-data is the validation data)"),
    (("preset", "vocab_size"), lambda a: not a.base,
     "training from scratch (--base brings its own model and tokenizer)"),
    (("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "rslora"),
     lambda a: a.finetune in finetune.ADAPTER_MODES, "--finetune lora, dora or qlora"),
    (("trainable_layers",), lambda a: a.finetune in ("full", "freeze"), "--finetune full or freeze"),
    (("half_round_steps",), lambda a: a.half_finetune, "--half-finetune"),
    (("beta", "label_smoothing", "rpo_alpha", "dpo_loss"), lambda a: a.objective == "dpo",
     "--objective dpo"),
    (("eval_batches", "final_eval_windows"), lambda a: _plain_text(a),
     "plain-text data (SFT and DPO evaluate their whole validation set)"),
)


def _plain_text(args) -> bool:
    """Whether the run trains on plain text (LM windows), as build_task will decide; True when
    that cannot be told yet (a missing --data is reported later, with its own message)."""
    if args.objective == "dpo":
        return False
    if not args.base:  # a from-scratch run reads text (SFT data is refused then, saying why)
        return True
    from engine.sft import detect_format
    try:
        return args.data is None or detect_format(args.data) == "text"
    except (OSError, ValueError):
        return True


def card_hyperparameters(args: argparse.Namespace) -> dict:
    """The run's flags for its model card: only those that took part in it (not --preset for a
    fine-tune, nor --lora-r for a full one or for pretraining) and not how this invocation ran."""
    left_out = {"resume", "no_progress", "threads", "pause_at_step", "dist_timeout", COMMAND_KEY}
    for names, applies, _ in _ONLY_WITH:
        if not applies(args):
            left_out.update(names)
    return {k: v for k, v in vars(args).items() if v is not None and k not in left_out}


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    """The checked flags; `description` is --help's text (train.py passes its docstring)."""
    p = build_parser(description)
    args = p.parse_args(argv)
    given = explicit_flags(argv)
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if args.seq_len is None:
        args.seq_len = TrainConfig().seq_len if args.base else 128
    if args.max_steps is None:
        args.max_steps = 100000
        if args.max_minutes is None:
            args.max_minutes = 5.0
    for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_every", "eval_batches",
                 "final_eval_windows", "log_every", "lora_r", "half_round_steps", "patience",
                 "threads", "pause_at_step"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"{flag(name)} must be >= 1, got {value}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.vocab_size is not None and args.vocab_size < 260:
        p.error(f"--vocab-size must be >= 260 (256 byte pieces + 3 special ids + 1), got {args.vocab_size}")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        p.error(f"--metrics-port must be in 0..65535, got {args.metrics_port}")
    for name in ("lr", "max_minutes", "lora_alpha", "dist_timeout"):
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:  # NaN fails too
            p.error(f"{flag(name)} must be > 0 (and finite), got {value}")
    for name in ("weight_decay", "grad_clip"):  # 0: off
        if not 0 <= getattr(args, name) < math.inf:
            p.error(f"{flag(name)} must be >= 0 (and finite), got {getattr(args, name)}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        p.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if not 0.0 <= args.lora_dropout < 1.0:
        p.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if not 0.0 < args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    try:  # before any data preparation
        pick_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.chat_template is not None:
        try:  # read again where the tokenizer is known (train.py); here to fail before loading
            read_chat_template(args.chat_template)
        except ValueError as e:
            p.error(str(e))
    if args.preset not in PRESETS:
        p.error(f"unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)}")
    if args.finetune and not args.base:
        p.error("--finetune needs --base MODEL (the model to fine-tune)")
    if args.half_finetune and not args.base:
        p.error("--half-finetune needs --base MODEL and --finetune full or freeze (it fine-tunes "
                "half of every block per round)")
    if args.base and not args.finetune:
        args.finetune = "lora"
    if not args.lora_targets.replace(",", "").strip():  # else nothing would train
        p.error(f"--lora-targets {args.lora_targets!r} names no module (give e.g. q_proj,v_proj "
                "or all-linear)")
    if args.half_finetune and args.finetune not in ("full", "freeze"):
        p.error("--half-finetune works with --finetune full or freeze")
    if not args.resume:
        for names, applies, what in _ONLY_WITH:
            for name in names:
                if name in given and not applies(args):
                    p.error(f"{flag(name)} applies only to {what}")
    if args.fsdp and (args.finetune in finetune.ADAPTER_MODES or args.half_finetune):
        p.error("--fsdp shards full training (pretraining, --finetune full or freeze, no "
                "--half-finetune); adapters train data-parallel without it")
    if args.objective == "dpo":
        if not args.base or not args.data:
            p.error("--objective dpo needs --base MODEL and --data PREFERENCES.jsonl")
        from engine.dpo import check_hparams
        try:
            check_hparams(args.beta, args.label_smoothing, args.rpo_alpha, args.dpo_loss)
        except ValueError as e:
            p.error(str(e))
    if args.lr is None:
        args.lr = (TrainConfig().lr if not args.base else 1e-3 if args.finetune in finetune.ADAPTER_MODES
                   else 5e-5)
    if args.warmup_steps is None:  # a short fine-tune still reaches the peak LR and decays
        args.warmup_steps = min(TrainConfig().warmup_steps, max(1, args.max_steps // 10))
    elif args.warmup_steps >= args.max_steps and not args.resume:
        print(f"warning: --warmup-steps {args.warmup_steps} >= --max-steps {args.max_steps}: the "
              f"learning rate never reaches --lr {args.lr:g} and never decays", file=sys.stderr)
    if args.pause_at_step is not None and not args.resume and args.pause_at_step > args.max_steps:
        p.error(f"--pause-at-step {args.pause_at_step} is after --max-steps {args.max_steps}: the "
                "run would end without pausing")
    return args


def read_run_args(run_dir: str) -> dict:
    path = os.path.join(run_dir, "run_args.json")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--resume {run_dir}: no run_args.json there (the run's flags)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged (not valid JSON: {e}); it holds the run's flags, "
                         "which --resume needs") from None
    if not isinstance(saved, dict) or not {"batch_size", "max_steps", "seed"} <= saved.keys():
        raise ValueError(f"{path} does not hold a run's flags (written by train.py)")
    return saved
