"""What train.py optimizes: one object per objective with the same small interface.

  LMTask   plain text: random windows of a token memmap (its documents, each ending with EOS),
           next-token loss (pretraining and domain adaptation); validation loss, perplexity and
           bits per byte
  SFTTask  instruction / chat JSONL (engine/sft.py): loss on response tokens only
  DPO      preference pairs (engine/dpo.py)

Each has start_step(n_micro) (called before an optimizer step's n_micro train_step calls),
train_step(model, gen, device) -> loss (to backward; train.py divides it by n_micro), evaluate(model, device, autocast)
-> dict with val_loss, pop_tokens() -> tokens since the last call, log(n) -> extra metrics of the
last n micro-batches, and state_dict()/load_state_dict() for what resume must restore (or check)
beyond the generator (JSON-serializable).

Under torchrun a task's batch size is the GLOBAL one: every rank draws the same batch from the
shared generator and trains on its own rows (engine/distributed.py shard / shard_mean), so the
run takes exactly the steps of one process with the whole batch; tokens are counted globally.
"""
from __future__ import annotations

import contextlib

from engine.data import (ENCODER_VERSION, BadLine, Documents, TokenSplit, check_trainable,
                         corpus_files, eval_windows, get_batch, read_corpus, split_documents,
                         tokenize_cached, tokenizer_hash)
from engine.distributed import shard, shard_mean, world_size
from engine.trainer import evaluate as evaluate_windows


class LMTask:
    skipped = ()  # malformed JSONL lines left out (--bad-lines skip): "NAME:LINE" strings

    def __init__(self, train: TokenSplit, val: TokenSplit, batch_size: int, seq_len: int,
                 eval_batches: int):
        check_trainable(train, seq_len, "the training split")
        check_trainable(val, seq_len, "the validation split")
        self.train, self.val, self.batch_size, self.seq_len = train, val, batch_size, seq_len
        self.val_starts = eval_windows(val, seq_len, eval_batches * batch_size)
        self._tokens = 0

    def sizes(self) -> dict:
        return {"train tokens": len(self.train.tokens), "validation tokens": len(self.val.tokens),
                "bytes per token": round(self.train.bytes_per_token, 3),
                **({"skipped lines": len(self.skipped)} if self.skipped else {})}

    def describe(self, path: str) -> str:
        s = (f"data: {path}: {len(self.train.tokens):,} train / {len(self.val.tokens):,} val "
             f"tokens, {self.train.bytes_per_token:.2f} bytes/token")
        if self.skipped:  # as engine.sft.format_report says it
            s += (f"; {len(self.skipped):,} malformed line(s) skipped ({', '.join(self.skipped[:10])}"
                  + (", ..." if len(self.skipped) > 10 else "") + ")")
        return s

    def start_step(self, n_micro: int) -> None:
        pass  # equal-sized micro-batches: each is 1/n_micro of the step

    def train_step(self, model, gen, device):
        x, y = get_batch(self.train, self.batch_size, self.seq_len, gen)  # (B, T) each
        self._tokens += x.numel()
        return model(shard(x).to(device), labels=shard(y).to(device))  # this rank's rows

    def evaluate(self, model, device, autocast, full: int | bool = False) -> dict:
        """Periodic validation windows, or with `full` up to that many (True: 4096)."""
        starts = self._starts(full)
        # every rank evaluates every window, in batches of its own micro-batch (not the global
        # batch: world_size times the rows a training forward holds)
        return evaluate_windows(model, self.val, starts, self.seq_len,
                                self.batch_size // world_size(), device, autocast)

    def final_is_periodic(self, full: int | bool) -> bool:
        """Whether evaluate(full=full) scores the very batches a periodic evaluation does (a
        validation split with no more windows than the periodic ones): then the best
        checkpoint's periodic score is its final one."""
        return list(self._starts(full)) == list(self.val_starts)

    def _starts(self, full: int | bool):
        return (eval_windows(self.val, self.seq_len, 4096 if full is True else full) if full
                else self.val_starts)

    def format_eval(self, res: dict) -> str:
        return f"val loss {res['val_loss']:.4f}, ppl {res['val_ppl']:.2f}, bpb {res['val_bpb']:.4f}"

    def pop_tokens(self) -> int:
        n, self._tokens = self._tokens, 0
        return n

    def log(self, last: int = 1) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"train_key": self.train.key, "val_key": self.val.key, "encoder": ENCODER_VERSION}

    def load_state_dict(self, state: dict) -> None:
        if state.get("train_key") and state.get("encoder", 2) != ENCODER_VERSION:
            # its keys are another encoder's: say why, not that the data changed
            raise ValueError(f"--resume: the run was tokenized by an older encoder (version "
                             f"{state.get('encoder', '2 or older')}; now {ENCODER_VERSION}: each "
                             "document ends with EOS), so it cannot continue as it was; start a "
                             "new run")
        check_data_keys(state, self.train.key, self.val.key, "text")


def check_data_keys(state: dict, train_key: str, val_key: str, what: str) -> None:
    """On resume: the same data (and tokenizer) as the run's, else the run would silently
    continue on other data, its best checkpoint judged on another validation split.
    (Runs saved before these keys existed are not checked.)"""
    for split, name, key in (("training", "train_key", train_key),
                             ("validation", "val_key", val_key)):
        saved = state.get(name)
        if saved and key and saved != key:
            raise ValueError(f"--resume: the {split} {what} differs from the one the run was "
                             "trained on (the data changed since it started), so the run "
                             "cannot continue as it was; restore that data, or start a new run")


class SFTTask(LMTask):
    def __init__(self, train, val, batch_size: int, gen, pack: bool = False):
        from engine.sft import BatchStream
        self.train, self.val, self.batch_size = train, val, batch_size
        self.stream = BatchStream(train, batch_size, gen, pack)
        self._tokens = 0
        self._queue, self._n_micro, self._step_trained = [], 1, 0

    def sizes(self) -> dict:
        return {k.removeprefix("n_").replace("_", " "): v for k, v in self.report.items()
                if k.startswith("n_")}

    def describe(self, path: str) -> str:
        from engine.sft import format_report
        return f"data: {path}: " + format_report(self.report)

    def start_step(self, n_micro: int) -> None:
        """Draw the step's micro-batches now: each one's loss is weighted by its share of the
        step's trained tokens, so batch 1 x accumulation 2 trains exactly like batch 2 (the
        weighting shard_mean applies across ranks)."""
        self._queue = [next(self.stream) for _ in range(n_micro)]
        self._n_micro = n_micro
        self._step_trained = sum(_n_trained(b) for b in self._queue)

    def train_step(self, model, gen, device):
        def loss(b):  # mean over b's response tokens
            b = b.to(device)
            return model(b.input_ids, **b.model_kwargs())

        if not self._queue:  # called without start_step: one micro-batch per step
            self.start_step(1)
        batch = self._queue.pop(0)
        self._tokens += _n_real(batch)
        # ranks weighted by their response tokens; micro-batches by theirs (train.py divides
        # each micro-batch's loss by n_micro, hence the factor)
        weight = self._n_micro * _n_trained(batch) / self._step_trained
        return shard_mean(batch, loss, _n_trained) * weight

    def evaluate(self, model, device, autocast, full: int | bool = False) -> dict:
        from engine.sft import response_loss
        r = response_loss(model, self.val, self.batch_size // world_size(), device, autocast)
        return {"val_loss": r["loss"], "val_ppl": r["ppl"]}

    def final_is_periodic(self, full: int | bool) -> bool:
        return True  # every evaluation covers the whole validation set

    def format_eval(self, res: dict) -> str:
        return f"val response loss {res['val_loss']:.4f}, ppl {res['val_ppl']:.2f}"

    def state_dict(self) -> dict:
        return {**self.stream.state_dict(), "train_key": self.train.key, "val_key": self.val.key}

    def load_state_dict(self, state: dict) -> None:
        check_data_keys(state, self.train.key, self.val.key, "data")  # before the order check
        if state:
            self.stream.load_state_dict(state)


def _n_trained(batch) -> int:
    return int((batch.labels != -100).sum())


def _n_real(batch) -> int:
    """Tokens of a batch that are not padding (what tokens/s counts, as for LM and DPO): each
    row's length as collated (engine.sft.SFTDataset.collate), packed or padded. (Not up to a
    row's last trained label: a sample truncated to --seq-len may end in untrained tokens,
    e.g. a chat cut inside a user turn.)"""
    return int(batch.lengths.sum())


def build_task(args, tok, data_path: str, gen, texts: tuple[Documents, Documents] | None = None):
    """The task for train.py's flags: DPO for --objective dpo, SFT for instruction / chat JSONL,
    otherwise language modelling on the documents, each ending with EOS (`texts`: the (train,
    val) split if already read).
    Batches are global: --batch-size (per process) x world size."""
    with _skip_hint():
        return _build_task(args, tok, data_path, gen, texts)


@contextlib.contextmanager
def _skip_hint():
    """A malformed JSONL line under --bad-lines stop (BadLine) names the way past it."""
    try:
        yield
    except BadLine as e:
        raise ValueError(f"{e}; --bad-lines skip leaves such lines out") from None


def _build_task(args, tok, data_path: str, gen, texts):
    batch_size = args.batch_size * world_size()
    if args.objective == "dpo":
        from engine import dpo as dpo_lib
        if args.pack:  # it would be ignored: each pair's two sides are rows of their own
            raise ValueError("--pack applies only to SFT data, not to --objective dpo")
        for flag, path in (("--data", data_path), ("--val-data", args.val_data)):
            _check_preference_data(flag, path)
        train_p, val_p, rep = dpo_lib.load_preference_data(data_path, tok, args.seq_len,
                                                           args.val_fraction, args.val_data,
                                                           on_error=args.bad_lines)
        task = dpo_lib.DPO(train_p, val_p, batch_size, args.beta, args.label_smoothing,
                           args.rpo_alpha, args.dpo_loss)
        task.describe = lambda path: dpo_lib.format_report(rep, path)
        task.format_eval = dpo_lib.format_eval
        task.sizes = lambda: {k.removeprefix("n_"): v for k, v in rep.items()
                              if k.startswith("n_") and isinstance(v, int)}
        return task
    from engine.sft import detect_format, load_sft
    fmt = detect_format(data_path)
    if fmt in ("instruction", "completion", "chat"):
        train, val, rep = load_sft(data_path, tok, args.seq_len, args.val_fraction, args.val_data,
                                   on_error=args.bad_lines)
        task = SFTTask(train, val, batch_size, gen, pack=args.pack)
        task.report = rep
        return task
    if fmt == "preference":
        raise ValueError(f"{data_path} holds preference pairs: use --objective dpo")
    if args.pack:  # it would be ignored: plain text has no samples to pack
        raise ValueError(f"--pack applies only to SFT or preference JSONL; {data_path} is "
                         "plain text")
    train_docs, val_docs = texts or read_text_splits(args, data_path)
    th = tokenizer_hash(tok)
    task = LMTask(tokenize_cached(train_docs, tok, th), tokenize_cached(val_docs, tok, th),
                  batch_size, args.seq_len, args.eval_batches)
    task.skipped = train_docs.skipped + val_docs.skipped
    return task


def read_text_splits(args, data_path: str) -> tuple[Documents, Documents]:
    """(train documents, validation documents): --val-data, or the last --val-fraction of the
    corpus (engine.data.split_documents). A malformed line of a JSONL corpus stops the run, or
    with --bad-lines skip is left out: warned, and listed in the `skipped` of its file's
    documents (the training split's, when the two splits share the file). SFT or preference
    JSONL is refused with the way to train on it (_check_text_data)."""
    paths = [data_path] + ([args.val_data] if args.val_data else [])
    if args.bad_lines == "skip" and not any(  # before reading: it would be ignored
            f.endswith((".jsonl", ".json")) for p in paths for f in corpus_files(p)):
        raise ValueError(f"--bad-lines skip applies only to JSONL data (SFT, preference or "
                         f"'text' records); {data_path} is plain text")
    _check_text_data(args, data_path)
    with _skip_hint():  # train.py reads a from-scratch corpus here, not through build_task
        corpus = read_corpus(data_path, on_error=args.bad_lines)
        held = read_corpus(args.val_data, on_error=args.bad_lines) if args.val_data else None
    if held is not None:
        return corpus, held
    train, val = split_documents(corpus, args.val_fraction)
    train.skipped = corpus.skipped  # the lines of the file the two splits share
    return train, val


def _check_preference_data(flag: str, path: str | None) -> None:
    """Refuse SFT data or text given to --objective dpo with the way to train on it: read as
    pairs, its first line was "missing 'prompt' ...; --bad-lines skip leaves such lines out",
    though skipping would leave out every line."""
    from engine.sft import file_form, records_name
    form = file_form(path) if path is not None else None  # None: the pair reader names its lines
    if form not in (None, "preference"):
        name = "a text corpus" if form == "text" else records_name(form)
        raise ValueError(f"{flag} {path} holds {name}: --objective dpo trains on preference "
                         "(prompt/chosen/rejected) records; train on it without --objective dpo")


def _check_text_data(args, data_path: str) -> None:
    """Refuse SFT or preference JSONL given as a text corpus (--data, --val-data, or a file of a
    corpus directory) with the way to train on it: read as text, each of its lines was "expected
    an object with a string 'text' field", and --bad-lines skip left an empty corpus."""
    from engine.sft import records_not_text, records_name
    found = records_not_text(data_path)
    if found:
        f, form = found
        need = ("training on them needs --objective dpo --base MODEL" if form == "preference"
                else "fine-tuning on them needs --base MODEL")
        if f != data_path:  # a file inside a corpus directory
            raise ValueError(f"{f} (in corpus directory {data_path}) holds {records_name(form)}: "
                             f"a corpus reads text, or JSONL with a 'text' field; {need}, with "
                             "that file as --data")
        raise ValueError(f"{data_path} holds {records_name(form)}: {need} (a from-scratch run "
                         "reads text, or JSONL with a 'text' field)")
    found = records_not_text(args.val_data) if args.val_data else None
    if found:  # --data is text (checked above): the two splits are of one kind
        raise ValueError(f"--val-data {found[0]} holds {records_name(found[1])}, but --data "
                         f"{data_path} is text: validation data is of the training data's kind")
