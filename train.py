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

import atexit
import contextlib
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from engine import distributed, finetune
from engine.checkpoint import load_model_dir
from engine.config import PRESETS, preset
from engine.data import fetch_shakespeare, load_or_train_tokenizer
from engine.model import Transformer
from engine.tasks import build_task, read_text_splits
from engine.train_args import MIN_TRAINED_VOCAB, explicit_flags, parse_args
from engine.trainer import (WARMUP_SHARE, MetricsLog, StepBoundaryInterrupt, Throughput,
                            configure_optimizer, decay_progress, final_report, finished_run, get_lr,
                            load_training_state, open_run_dir, save_last, step_seed, write_run_args)
from tokenizer import read_chat_template, set_chat_template


class NonFinite(Exception):
    """The loss or the weights stopped being finite: stop without saving over the last good
    checkpoint."""


def main(argv=None) -> int:
    args = parse_args(argv, __doc__)
    # What a Ctrl-C outside the loop interrupts (the loop itself stops at a step boundary).
    stage = {"now": "before training started; nothing was saved"}
    try:
        return _run(args, explicit_flags(argv), stage)
    except KeyboardInterrupt:
        print(f"\ninterrupted {stage['now']}", file=sys.stderr)
        return 130
    finally:  # a run that failed before writing anything (bad data, say) leaves no empty --out
        made = stage.get("created")
        if made and os.path.isdir(made) and not os.listdir(made):
            with contextlib.suppress(OSError):  # another rank may have removed it first
                os.rmdir(made)


def _run(args, given: set[str], stage: dict) -> int:
    device = distributed.setup(args.device, args.dist_timeout)  # torchrun: join the process group
    distributed.check_same_flags(vars(args))
    args, run_dir, resume_dir = open_run_dir(args, given, stage)  # --resume or --out
    # A finished run (its final report written) is left as it is; rank 0 reads it for every rank.
    done = resume_dir and distributed.broadcast_object(
        finished_run(run_dir) if distributed.is_main() else None)
    if done and args.pause_at_step is not None:
        raise ValueError(f"--pause-at-step {args.pause_at_step}: {done}")
    if done:
        print(done)
        return 0
    args.world_size = distributed.world_size()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    monitor = None
    if args.metrics_port is not None and distributed.is_main():  # curl localhost:PORT/metrics
        from engine.metrics import TrainingMetricsServer
        try:
            monitor = TrainingMetricsServer(args.metrics_port)
        except OSError as e:  # the port is taken: say so before preparing anything
            raise ValueError(str(e)) from None
        atexit.register(monitor.close)
        print(f"metrics: {monitor.url}", flush=True)

    # Data: the tokenizer (the base model's, or trained on the corpus), then the task: language
    # modelling on text, SFT on instruction/chat JSONL, or DPO on preference pairs.
    # Under torchrun every rank draws the same global batches from this generator (the task
    # keeps its rank's rows); rank 0 fills the download/tokenizer/token caches first.
    gen = torch.Generator().manual_seed(args.seed)
    texts = None
    with distributed.main_first():
        data_path = args.data or fetch_shakespeare()
        if args.base:  # the base model brings its tokenizer
            from engine.hub import load_model
            model, tok = load_model(args.base, dtype=torch.float32, device=device,
                                    quantize="nf4" if args.finetune == "qlora" else None)
            if tok is None:
                raise ValueError(f"--base {args.base} has no tokenizer files")
            ctx = model.config.max_position_embeddings
            if args.seq_len > ctx and distributed.is_main():
                print(f"warning: --seq-len {args.seq_len} is longer than --base's context ({ctx} "
                      f"tokens, max_position_embeddings): positions past {ctx} were never "
                      "trained", file=sys.stderr)
        else:
            texts = read_text_splits(args, data_path)
            # Not given: the preset's, but room for the byte pieces, specials and every character
            # (sentencepiece refuses fewer ids than the characters it must cover; a space is its
            # "▁", which it needs even in a corpus without spaces)
            train_text = texts[0].text  # the training documents as one text
            chars = len(set(train_text) - {" "} | {"\u2581"})
            vocab_size = args.vocab_size or max(PRESETS[args.preset]["vocab_size"],
                                                MIN_TRAINED_VOCAB, 259 + chars)
            # A new run's rank 0 never reads --out: a tokenizer left there (by a failed torchrun
            # launch, say) may be another corpus's. The other ranks load the one it saves there.
            tok = load_or_train_tokenizer(train_text, vocab_size, resume_dir or (
                run_dir if not distributed.is_main() else None))
            del train_text  # a second copy of the corpus otherwise kept for the whole run
            if args.world_size > 1 and distributed.is_main() and not resume_dir:
                tok.save(run_dir)  # every rank, on every machine, then loads rank 0's tokenizer
        if args.chat_template:  # the run's template: SFT/DPO chat data, the saved tokenizer
            set_chat_template(tok, read_chat_template(args.chat_template))
        task = build_task(args, tok, data_path, gen, texts)
        del texts  # the task holds token ids; the documents are done with
    print(task.describe(data_path), flush=True)

    # Model and optimizer.
    mode = args.finetune or "full"
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    if args.base:
        report = finetune.prepare(model, mode, r=args.lora_r, alpha=args.lora_alpha,
                                  dropout=args.lora_dropout, rslora=args.rslora,
                                  targets=args.lora_targets,
                                  trainable_layers=args.trainable_layers)
        if args.objective == "dpo" and mode not in finetune.ADAPTER_MODES:
            # no adapters to switch off: the reference log-probs are the base's, fixed now (a
            # resume reads the run's; the trained weights are restored only below)
            task.fix_reference(model, device, autocast, run_dir, resuming=bool(resume_dir),
                               write=distributed.is_main(), progress=not args.no_progress,
                               base=args.base)
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
    step = 0
    extra = {"elapsed_s": 0.0, "best_val": math.inf, "bad_evals": 0, "tokens": 0,
             "train_s": 0.0,  # seconds in training steps only (tokens/s leaves evaluation out)
             "warmup_end_s": 0.0}  # elapsed_s when warmup ended (the time budget's decay starts)
    if resume_dir:
        step, loaded = load_training_state(
            resume_dir, distributed.optimizer_for_loading(model, optimizer, args.fsdp), gen)
        extra["train_s"] = loaded.get("elapsed_s", 0.0)  # older runs lack train_s
        extra.update(loaded)
        task.load_state_dict(extra.get("data", {}))
        print(f"resumed {run_dir} at step {step}", flush=True)
    elif distributed.is_main():
        write_run_args(run_dir, args)
    if args.pause_at_step is not None and not step < args.pause_at_step <= args.max_steps:
        where = (f"pause at a step in {step + 1}..{args.max_steps}" if step < args.max_steps
                 else "it has finished: there is no step left to pause at")
        raise ValueError(f"--pause-at-step {args.pause_at_step}: the run is at step {step} and ends "
                         f"at --max-steps {args.max_steps}; {where}")
    first_step = step  # where this session started
    hft_round = None
    if hft is not None:  # the round of this step (a resumed run may be in the middle of one)
        hft_round = step // args.half_round_steps
        hft.select(hft_round)
        candidates, now = hft.counts()  # what trains is this round's half, not prepare()'s count
        report.update(trainable_params=now, half_finetune=(
            f"round {hft_round} trains {now:,} of the {candidates:,} candidate params (the blocks' "
            f"matrices and norms; the halves alternate every {args.half_round_steps} steps)"))
    if args.base:
        print(finetune.report_line(report))
    metrics = (MetricsLog(os.path.join(run_dir, "metrics.jsonl"),
                          truncate_after_step=step if resume_dir else None)
               if distributed.is_main() else distributed.NoLog())
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
    budget_used = lambda: max(step / args.max_steps, elapsed() / budget_s if budget_s else 0.0)  # noqa: E731
    meter = Throughput()
    # under --max-minutes the bar shows the share of the budget used (of --max-steps when that
    # binds first): a count to the default 100000 steps showed an ETA of hours
    bar = tqdm(total=100 if budget_s else args.max_steps, initial=0 if budget_s else step,
               dynamic_ncols=True, desc="train", disable=args.no_progress or not distributed.is_main(),
               **({"bar_format": "{desc}{percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"}
                  if budget_s else {}))
    model.train()
    stop_reason = "max steps"
    saved_at = [step if resume_dir else None]  # the step last/ holds
    best_eval = []  # the score of the best checkpoint, if this session saved it
    resume_hint = lambda: (f"python train.py --resume {run_dir} continues from the checkpoint of "  # noqa: E731
                           f"step {saved_at[0]}" if saved_at[0] is not None
                           else "no resumable checkpoint was saved yet")

    def patience_spent() -> bool:
        return bool(args.patience) and extra["bad_evals"] >= args.patience

    def eta_s() -> float:
        p = budget_used()
        return elapsed() * (1 - p) / p if p > 0 else math.nan

    def do_eval():
        # rank 0's figures decide for every rank (best checkpoint, patience, non-finite stop):
        # ranks that differed in the last bit would run save_trained's collectives apart and hang
        res = distributed.broadcast_object(task.evaluate(model, device, autocast))
        tqdm.write(f"step {step}: {task.format_eval(res)}")
        metrics.log(step=step, elapsed_s=round(elapsed(), 2), **res)
        if monitor:
            monitor.update(step=step, val_loss=res["val_loss"])
        if not math.isfinite(res["val_loss"]):
            raise NonFinite(f"validation loss became {res['val_loss']}")
        extra["last_eval_step"] = step
        if res["val_loss"] < extra["best_val"]:
            extra["best_val"], extra["bad_evals"] = res["val_loss"], 0
            best_eval[:] = [res]  # this session's best checkpoint's score
            distributed.save_trained(model, tok, run_dir, mode, args.base)  # best-by-validation
        else:
            extra["bad_evals"] += 1
        checkpoint_last()

    def checkpoint_last():
        bad = any(not torch.isfinite(getattr(p, "_local_tensor", p)).all()  # FSDP2: this shard
                  for p in model.parameters() if p.requires_grad)
        if distributed.mean(float(bad)) > 0:  # every rank agrees (a shard may be the bad one)
            raise NonFinite("the weights became non-finite")
        extra["elapsed_s"], extra["data"] = elapsed(), task.state_dict()
        save_last(model, tok, run_dir, optimizer, step, gen, extra, args)
        saved_at[0] = step

    ctrl_c = StepBoundaryInterrupt(enabled=args.world_size == 1)
    if monitor:  # the step is known now (a resumed run's too); the other gauges at their first log
        monitor.update(step=step)
    in_loop = False
    try:
        if args.base and step == 0 and not resume_dir:
            stage["now"] = "during the base model's evaluation (step 0); nothing resumable was saved"
            do_eval()  # the base model's score: the baseline every later evaluation compares to
        in_loop = True
        with ctrl_c:
            while step < args.max_steps and not ctrl_c.requested:
                if patience_spent():  # an early-stopped run, resumed (to redo its final report)
                    stop_reason = f"early stop (no improvement in {args.patience} evaluations)"
                    break
                now = distributed.main_value(elapsed()) if budget_s else None  # one clock for all ranks
                if budget_s and now >= budget_s:
                    stop_reason = "time budget"
                    break
                t_step = time.perf_counter()
                if hft is not None and step // args.half_round_steps != hft_round:
                    hft_round = step // args.half_round_steps
                    hft.select(hft_round)
                # with a time budget, warmup ends by a tenth of it at the latest (a slow fine-tune
                # of 30 steps in --max-minutes was all warmup)
                warmup_time = now / (WARMUP_SHARE * budget_s) if budget_s else 0.0
                if warmup_time >= 1 and step < args.warmup_steps and not extra["warmup_end_s"]:
                    extra["warmup_end_s"] = now  # warmup ended by time: the cosine starts now
                lr = get_lr(step, decay_progress(step, args.max_steps, args.warmup_steps, now or 0.0,
                                                 budget_s, extra["warmup_end_s"]),
                            args.lr, args.warmup_steps, args.min_lr_ratio, warmup_time)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # LoRA dropout masks (the loop's only global-RNG draws): a function of the step and
                # rank (independent per rank), so a resume redoes them on any device, any world size
                torch.manual_seed(step_seed(args.seed, distributed.rank(), step))
                loss_sum = 0.0
                task.start_step(args.grad_accum)
                for micro in range(args.grad_accum):  # ranks sync gradients on the last micro-step only
                    with distributed.accumulating(net, sync=micro == args.grad_accum - 1):
                        with autocast:
                            loss = task.train_step(net, gen, device) / args.grad_accum
                        loss.backward()
                    loss_sum += loss.item()
                loss_sum = distributed.mean(loss_sum)  # the global batch's loss
                if not math.isfinite(loss_sum):
                    raise NonFinite(f"training loss became {loss_sum}")
                # the global norm before clipping (logged as HF Trainer does); max_norm inf: no clip
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf).item()
                if not math.isfinite(grad_norm):  # stop before the step writes it into the weights
                    raise NonFinite(f"gradient norm became {grad_norm}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                n_tokens = task.pop_tokens()
                dt = time.perf_counter() - t_step
                meter.add(n_tokens, dt)
                extra["tokens"] = extra.get("tokens", 0) + n_tokens
                extra["train_s"] += dt
                if step == args.warmup_steps and not extra["warmup_end_s"]:
                    extra["warmup_end_s"] = distributed.main_value(elapsed())
                if budget_s:
                    bar.set_description(f"train step {step}", refresh=False)
                    bar.update(min(100.0, 100 * budget_used()) - bar.n)
                else:
                    bar.update(1)
                if step % args.log_every == 0:
                    tps = meter.rate()
                    pref = distributed.mean_dict(task.log(args.grad_accum))  # DPO: rewards, accuracy, margin
                    metrics.log(step=step, elapsed_s=round(elapsed(), 2), train_loss=round(loss_sum, 5),
                                grad_norm=round(grad_norm, 5), lr=lr, tokens_per_s=round(tps, 1), **{k: v for k, v in pref.items()
                                                                      if k != "train_loss"})
                    if monitor:
                        monitor.update(step=step, loss=loss_sum, lr=lr, tokens_per_s=tps, eta_s=eta_s())
                    bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                                    **({"acc": f"{pref['reward_acc']:.2f}",
                                        "margin": f"{pref['margin']:.2f}"} if pref else {}))
                    if args.no_progress:
                        print(f"step {step}: loss {loss_sum:.4f}, grad norm {grad_norm:.3f}, lr {lr:.2e}, "
                              f"{tps:,.0f} tok/s" + (
                            f", reward acc {pref['reward_acc']:.2f}, margin {pref['margin']:.3f}"
                            if pref else ""), flush=True)
                if step % args.eval_every == 0:
                    do_eval()
                    if patience_spent():
                        stop_reason = f"early stop (no improvement in {args.patience} evaluations)"
                        break
                if step == args.pause_at_step:
                    bar.close()
                    if saved_at[0] != step:  # not saved by this step's evaluation already
                        checkpoint_last()
                    print(f"paused at step {step}; continue with: python train.py --resume {run_dir}")
                    return 0
        in_loop = False
        bar.close()
        if ctrl_c.requested:  # stopped at a step boundary: everything belongs to `step`
            stage["now"] = f"while saving the checkpoint of step {step}; {resume_hint()}"
            if saved_at[0] != step:  # not saved by this step's evaluation already
                checkpoint_last()
            print(f"\ninterrupted at step {step}; resume with: python train.py --resume {run_dir}",
                  file=sys.stderr)
            return ctrl_c.exit_code  # 130 Ctrl-C, 143 SIGTERM
        if extra.get("last_eval_step") != step:  # the last steps' score (step 0 if none ran)
            stage["now"] = f"during the evaluation of step {step}; {resume_hint()}"
            do_eval()
    except KeyboardInterrupt:  # a second Ctrl-C (or under torchrun the first): mid-step
        bar.close()
        if not in_loop:
            raise  # main() says what was interrupted
        print(f"\ninterrupted during step {step + 1}; not saved: {resume_hint()}", file=sys.stderr)
        return ctrl_c.exit_code
    except NonFinite as e:
        bar.close()
        print(f"error: {e} at step {step}; stopping. The last good checkpoint is kept in {run_dir} "
              "(try a lower --lr)", file=sys.stderr)
        return 1
    if step == 0 and stop_reason == "time budget":
        print("warning: the time budget ended before the first step: the saved model is the "
              "untrained step-0 one (raise --max-minutes)", file=sys.stderr)

    # Final report: the best checkpoint over the whole validation split, a model card, a plot.
    stage["now"] = (f"during the final evaluation: training is complete and saved in {run_dir}; "
                    f"python train.py --resume {run_dir} redoes the final report")
    if best_eval and task.final_is_periodic(args.final_eval_windows):
        final = best_eval[0]  # the same weights on the same batches: the same figures, again
    else:
        distributed.restore_trained(model, run_dir, mode)
        final = task.evaluate(model, device, autocast, full=args.final_eval_windows)
    if not distributed.is_main():
        return 0
    final_report(args, run_dir, task, data_path, metrics, final, step=step, wall=elapsed(),
                 extra=extra, stop_reason=stop_reason, resumed_at=first_step if resume_dir else None)
    return 0


if __name__ == "__main__":
    try:
        code = main()
        distributed.cleanup(meet=code == 0)
        sys.exit(code)
    except (ValueError, OSError, RuntimeError) as e:  # OSError: FileNotFoundError, a full disk ...
        print(f"error: {distributed.explain(e)}", file=sys.stderr)
        distributed.fail_together(e)
        sys.exit(2)
