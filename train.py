"""Train a Llama-style language model on a text corpus, from scratch or from a pretrained base.

    python train.py                       # Shakespeare, preset "small", ~5 minutes on 2 CPU cores
    python train.py --data my_corpus/ --preset medium --max-steps 2000
    python train.py --base smollm2-135m-instruct --finetune qlora --data notes.txt
    python train.py --resume out/RUN      # continue exactly where RUN stopped
    torchrun --nproc_per_node 4 train.py --preset medium ...   # data parallel (engine/distributed.py)

One loop, readable top to bottom (after nanoGPT's train.py): random-window batches from a
token memmap, AdamW with warmup + cosine, gradient accumulation and clipping, periodic
validation (loss, perplexity, bits per byte), best-by-validation checkpoint, early stopping,
resumable state. Output directory layout: see README.md.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from engine import distributed, finetune
from engine.checkpoint import load_model_dir
from engine.config import PRESETS, OneLineParser, TrainConfig, atomic_write_text, preset
from engine.card import peak_memory_mb, write_model_card
from engine.data import fetch_shakespeare, load_or_train_tokenizer
from engine.model import Transformer
from engine.tasks import build_task, read_text_splits
from engine.trainer import (LAST, MetricsLog, Throughput, configure_optimizer, get_lr,
                            load_training_state, plot_losses, save_last)


def parse_args(argv=None) -> argparse.Namespace:
    d = TrainConfig()
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", help="text file, directory of text files, or JSONL with a 'text' field "
                     "(default: Shakespeare, fetched on first use)")
    a("--val-data", help="held-out corpus (default: the last --val-fraction of --data)")
    a("--val-fraction", type=float, default=0.1)
    a("--out", help="output directory (default: out/<preset>-<timestamp>)")
    a("--preset", default="small", help=f"model size: {', '.join(PRESETS)}")
    a("--vocab-size", type=int, default=None, help="SentencePiece vocabulary (default: the preset's)")
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
    a("--warmup-steps", type=int, default=d.warmup_steps)
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
    a("--bad-lines", choices=("stop", "skip"), default="stop",
      help="SFT data: stop at a malformed JSONL line, or skip it with a warning")
    a("--objective", choices=("lm", "dpo"), default="lm",
      help="lm: next-token loss; dpo: preference pairs in --data (engine/dpo.py; needs --base and "
           "an adapter --finetune mode: the reference is the base with adapters disabled)")
    a("--beta", type=float, default=0.1, help="DPO: strength of the KL-style reference anchor")
    a("--label-smoothing", type=float, default=0.0, help="DPO: conservative DPO label noise in [0, 0.5)")
    a("--rpo-alpha", type=float, default=0.0,
      help="DPO: add this x the chosen answers' NLL per token (RPO; keeps them likely)")
    a("--resume", metavar="DIR", help="continue the run in DIR (same flags, same trajectory)")
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
    args = p.parse_args(argv)
    if args.seq_len is None:
        args.seq_len = d.seq_len if args.base else 128
    if args.max_steps is None:
        args.max_steps = 100000
        if args.max_minutes is None:
            args.max_minutes = 5.0
    for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_minutes is not None and args.max_minutes <= 0:
        p.error("--max-minutes must be > 0")
    if args.preset not in PRESETS:
        p.error(f"unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)}")
    if args.finetune and not args.base:
        p.error("--finetune needs --base MODEL (the model to fine-tune)")
    if args.base and not args.finetune:
        args.finetune = "lora"
    if args.half_finetune and args.finetune not in (None, "full", "freeze"):
        p.error("--half-finetune works with --finetune full or freeze")
    if args.fsdp and (args.finetune in finetune.ADAPTER_MODES or args.half_finetune):
        p.error("--fsdp shards full training (pretraining, --finetune full or freeze, no "
                "--half-finetune); adapters train data-parallel without it")
    if not args.dist_timeout > 0:
        p.error("--dist-timeout must be > 0")
    if args.objective == "dpo":
        if not args.base or not args.data:
            p.error("--objective dpo needs --base MODEL and --data PREFERENCES.jsonl")
        if args.finetune not in finetune.ADAPTER_MODES:
            p.error("--objective dpo needs --finetune lora, dora or qlora (the reference model is "
                    "the base with its adapters disabled)")
        from engine.dpo import check_hparams
        try:
            check_hparams(args.beta, args.label_smoothing, args.rpo_alpha)
        except ValueError as e:
            p.error(str(e))
    if args.lr is None:
        args.lr = (d.lr if not args.base else 1e-3 if args.finetune in finetune.ADAPTER_MODES
                   else 5e-5)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = distributed.setup(args.device, args.dist_timeout)  # torchrun: join the process group
    distributed.check_same_flags(vars(args))
    resume_dir = None
    if args.resume:
        run_dir = args.resume.rstrip("/")
        if os.path.basename(run_dir) == LAST:
            run_dir = os.path.dirname(run_dir)
        resume_dir = os.path.join(run_dir, LAST)
        if not os.path.isdir(resume_dir):
            raise ValueError(f"--resume {args.resume}: no resumable checkpoint ({LAST}/) there")
        with open(os.path.join(run_dir, "run_args.json")) as f:
            saved = json.load(f)
        args = argparse.Namespace(**{"fsdp": False, "rpo_alpha": 0.0, **saved,  # older runs lack some
                                     "resume": args.resume, "device": args.device,
                                     "threads": args.threads, "no_progress": args.no_progress,
                                     "pause_at_step": args.pause_at_step,
                                     "metrics_port": args.metrics_port, "dist_timeout": args.dist_timeout})
        # the global batch stays the run's in any world size: per-rank batch = global / processes
        args.batch_size = distributed.per_rank_batch(saved["batch_size"] * saved.get("world_size", 1))
    else:
        name = f"{args.finetune}-{os.path.basename(args.base.rstrip('/'))}" if args.base else args.preset
        run_dir = distributed.broadcast_object(  # rank 0's clock names the run
            args.out or os.path.join("out", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"))
        if any(os.path.isfile(os.path.join(run_dir, f)) for f in ("config.json", "adapter_config.json")):
            raise ValueError(f"{run_dir} already holds a checkpoint; pick another --out "
                             f"or continue it with --resume {run_dir}")
    args.world_size = distributed.world_size()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # Data: the tokenizer (the base model's, or trained on the corpus), then the task: language
    # modelling on text, SFT on instruction/chat JSONL, or DPO on preference pairs.
    # Under torchrun every rank draws the same global batches from this generator (the task
    # keeps its rank's rows); rank 0 fills the download/tokenizer/token caches first.
    gen = torch.Generator().manual_seed(args.seed)
    texts = None
    with distributed.main_first():
        data_path = args.data or fetch_shakespeare()
        os.makedirs(run_dir, exist_ok=True)
        if args.base:  # the base model brings its tokenizer
            from engine.hub import load_model
            model, tok = load_model(args.base, dtype=torch.float32, device=device,
                                    quantize="nf4" if args.finetune == "qlora" else None)
            if tok is None:
                raise ValueError(f"--base {args.base} has no tokenizer files")
        else:
            texts = read_text_splits(args, data_path)
            vocab_size = args.vocab_size or PRESETS[args.preset]["vocab_size"]
            tok = load_or_train_tokenizer(texts[0], vocab_size, resume_dir or run_dir)
            if args.world_size > 1 and distributed.is_main() and not resume_dir:
                tok.save(run_dir)  # every rank, on every machine, then loads rank 0's tokenizer
        task = build_task(args, tok, data_path, gen, texts)
    print(task.describe(data_path), flush=True)

    # Model and optimizer.
    mode = args.finetune or "full"
    if args.base:
        report = finetune.prepare(model, mode, r=args.lora_r, alpha=args.lora_alpha,
                                  dropout=args.lora_dropout, rslora=args.rslora,
                                  targets=_targets(args.lora_targets),
                                  trainable_layers=args.trainable_layers)
        print("fine-tuning: " + ", ".join(f"{k} {v}" for k, v in report.items()
                                          if k in ("mode", "trainable_params", "total_params",
                                                   "trainable_percent", "trainable_layers", "nf4")))
        if resume_dir:
            finetune.restore_trained(model, resume_dir, mode)
    elif resume_dir:
        model = load_model_dir(resume_dir, torch.float32, device)
    else:
        cfg = preset(args.preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                     eos_token_id=tok.eos_id)
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.seq_len)
        model = Transformer(cfg).to(device)
    model.grad_checkpointing = args.grad_checkpointing
    if args.fsdp:  # before the optimizer: parameters become this rank's shards
        distributed.shard_model(model, device)
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, (0.9, 0.95))
    hft = None
    if args.half_finetune:  # all candidates are in the optimizer; each round unfreezes half
        hft = finetune.HalfFineTuning(model, finetune.parse_layers(
            args.trainable_layers, len(model.model.layers), 2 if mode == "freeze" else None), args.seed)
    # What train_step calls: DDP under torchrun (gradients averaged over ranks), else the model.
    net = distributed.data_parallel(model, optimizer, device, toggles_trainable=hft is not None)
    step, extra = 0, {"elapsed_s": 0.0, "best_val": math.inf, "bad_evals": 0, "tokens": 0}
    if resume_dir:
        step, extra = load_training_state(
            resume_dir, distributed.optimizer_for_loading(model, optimizer, args.fsdp), gen)
        task.load_state_dict(extra.get("data", {}))
        print(f"resumed {run_dir} at step {step}", flush=True)
    elif distributed.is_main():
        atomic_write_text(os.path.join(run_dir, "run_args.json"), json.dumps(vars(args), indent=2))
    if args.world_size > 1:  # LoRA dropout masks: independent per rank (nothing else draws here)
        torch.manual_seed(args.seed + 7919 * distributed.rank() + step)
    metrics = (MetricsLog(os.path.join(run_dir, "metrics.jsonl"),
                          truncate_after_step=step if resume_dir else None)
               if distributed.is_main() else distributed.NoLog())
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    n_params = model.num_parameters()
    n_train = model.num_parameters(trainable_only=True)
    tokens_per_step = args.batch_size * args.world_size * args.seq_len * args.grad_accum
    print(f"model: {args.base or args.preset}, {n_params / 1e6:.2f}M parameters "
          f"({n_train / 1e6:.2f}M trainable); {tokens_per_step:,} tokens/step; run dir {run_dir}"
          + (f"; {args.world_size} processes{' (FSDP2)' if args.fsdp else ''}"
             if args.world_size > 1 else ""), flush=True)

    budget_s = args.max_minutes * 60 if args.max_minutes else None
    t0 = time.time() - extra["elapsed_s"]
    elapsed = lambda: time.time() - t0  # noqa: E731
    progress = lambda now=None: max(step / args.max_steps, (elapsed() if now is None else now)  # noqa: E731
                                    / budget_s if budget_s else 0.0)
    meter = Throughput()
    bar = tqdm(total=args.max_steps, initial=step, dynamic_ncols=True, desc="train",
               disable=args.no_progress or not distributed.is_main())
    model.train()
    stop_reason = "max steps"
    monitor = None
    if args.metrics_port is not None and distributed.is_main():  # curl localhost:PORT/metrics
        from engine.metrics import TrainingMetricsServer
        monitor = TrainingMetricsServer(args.metrics_port)
        atexit.register(monitor.close)
        print(f"metrics: {monitor.url}", flush=True)

    def eta_s() -> float:
        p = progress()
        return elapsed() * (1 - p) / p if p > 0 else math.nan

    def do_eval():
        res = task.evaluate(model, device, autocast)
        tqdm.write(f"step {step}: {task.format_eval(res)}")
        metrics.log(step=step, elapsed_s=round(elapsed(), 2), **res)
        if monitor:
            monitor.update(step=step, val_loss=res["val_loss"])
        if res["val_loss"] < extra["best_val"]:
            extra["best_val"], extra["bad_evals"] = res["val_loss"], 0
            distributed.save_trained(model, tok, run_dir, mode, args.base)  # best-by-validation
        else:
            extra["bad_evals"] += 1
        checkpoint_last()

    def checkpoint_last():
        extra["elapsed_s"], extra["data"] = elapsed(), task.state_dict()
        save_last(model, tok, run_dir, optimizer, step, gen, extra, args)

    if args.base and step == 0 and not resume_dir:
        do_eval()  # the base model's score: the baseline every later evaluation compares to

    try:
        while step < args.max_steps:
            now = distributed.main_value(elapsed()) if budget_s else None  # one clock for all ranks
            if budget_s and now >= budget_s:
                stop_reason = "time budget"
                break
            if hft is not None and step % args.half_round_steps == 0:
                hft.select(step // args.half_round_steps)
            lr = get_lr(step, progress(now), args.lr, args.warmup_steps, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(args.grad_accum):  # ranks sync gradients on the last micro-step only
                with distributed.accumulating(net, sync=micro == args.grad_accum - 1):
                    with autocast:
                        loss = task.train_step(net, gen, device) / args.grad_accum
                    loss.backward()
                loss_sum += loss.item()
            loss_sum = distributed.mean(loss_sum)  # the global batch's loss
            if not math.isfinite(loss_sum):
                bar.close()
                print(f"error: training loss became {loss_sum} at step {step}; stopping. The last "
                      f"good checkpoint is kept in {run_dir} (try a lower --lr)", file=sys.stderr)
                return 1
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n_tokens = task.pop_tokens()
            meter.add(n_tokens)
            extra["tokens"] = extra.get("tokens", 0) + n_tokens
            bar.update(1)
            if step % args.log_every == 0:
                tps = meter.rate()
                pref = distributed.mean_dict(task.log(args.grad_accum))  # DPO: rewards, accuracy, margin
                metrics.log(step=step, elapsed_s=round(elapsed(), 2), train_loss=round(loss_sum, 5),
                            lr=lr, tokens_per_s=round(tps, 1), **{k: v for k, v in pref.items()
                                                                  if k != "train_loss"})
                if monitor:
                    monitor.update(step=step, loss=loss_sum, lr=lr, tokens_per_s=tps, eta_s=eta_s())
                bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                                **({"acc": f"{pref['reward_acc']:.2f}",
                                    "margin": f"{pref['margin']:.2f}"} if pref else {}))
                if args.no_progress:
                    print(f"step {step}: loss {loss_sum:.4f}, lr {lr:.2e}, {tps:,.0f} tok/s" + (
                        f", reward acc {pref['reward_acc']:.2f}, margin {pref['margin']:.3f}"
                        if pref else ""), flush=True)
            if step % args.eval_every == 0:
                do_eval()
                if args.patience and extra["bad_evals"] >= args.patience:
                    stop_reason = f"early stop (no improvement in {args.patience} evaluations)"
                    break
            if step == args.pause_at_step:
                bar.close()
                checkpoint_last()
                print(f"paused at step {step}; continue with: python train.py --resume {run_dir}")
                return 0
    except KeyboardInterrupt:
        bar.close()
        if args.world_size == 1:  # under torchrun ranks stop at different points: keep the last one
            checkpoint_last()
        print(f"\ninterrupted at step {step}; resume with: python train.py --resume {run_dir}",
              file=sys.stderr)
        return 130
    bar.close()
    if step % args.eval_every:
        do_eval()

    # Final report: the best checkpoint over the whole validation split, a model card, a plot.
    distributed.restore_trained(model, run_dir, mode)
    final = task.evaluate(model, device, autocast, full=args.final_eval_windows)
    if not distributed.is_main():
        return 0
    metrics.log(step=step, elapsed_s=round(elapsed(), 2), final=True, **final)
    plot_losses(metrics.read(), os.path.join(run_dir, "loss.png"))
    tps = extra["tokens"] / max(elapsed(), 1e-9)
    peak = peak_memory_mb()
    last_train = next((e["train_loss"] for e in reversed(metrics.read()) if "train_loss" in e), None)
    write_model_card(run_dir, base_model=args.base or f"none (trained from scratch, preset {args.preset})",
                     data_path=data_path, data_sizes=task.sizes(),
                     mode=mode if args.base else "pretraining", adapter=mode in finetune.ADAPTER_MODES,
                     hyperparameters={k: v for k, v in vars(args).items() if v is not None and k not in
                                      ("resume", "no_progress", "threads", "pause_at_step",
                                       "dist_timeout")},
                     metrics={"steps": step, "train_loss (last logged)": last_train,
                              "tokens_per_s": round(tps, 1), **peak, **{k: round(v, 5) for k, v in final.items()}},
                     wall_time_s=elapsed())
    mem = ", ".join(f"{k.removesuffix('_mb').replace('_', ' ')} {v:,.0f} MB" for k, v in peak.items())
    print(f"done ({stop_reason}): {step} steps in {elapsed():.0f}s, {tps:,.0f} tokens/s, {mem}; best "
          f"checkpoint: {task.format_eval(final)} -> {run_dir}")
    return 0


def _targets(spec: str):
    return spec if spec == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]


if __name__ == "__main__":
    try:
        code = main()
        distributed.cleanup()
        sys.exit(code)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {distributed.explain(e)}", file=sys.stderr)
        distributed.fail_together(e)
        sys.exit(2)
