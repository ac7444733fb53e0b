"""Direct Preference Optimization (Rafailov et al. 2023), as TRL's dpo_trainer.py computes it.

For a prompt x with a chosen answer y_w and a rejected one y_l, logp(y|x) is the sum of the
token log-probabilities of the completion tokens only (the prompt is context, label -100), and

    delta = (logp_pi(y_w) - logp_ref(y_w)) - (logp_pi(y_l) - logp_ref(y_l))
    loss  = -(1 - ls) * log sigmoid(beta * delta) - ls * log sigmoid(-beta * delta)

with ls = label smoothing (0: the sigmoid DPO loss; > 0: conservative DPO, cDPO, as in Mitchell's
reference implementation and TRL 0.x's loss_type="sigmoid"; TRL 1.x's sigmoid ignores
label_smoothing, which there feeds its "robust" and "exo_pair" losses instead). Logged as in TRL
(rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins): rewards_chosen and
rewards_rejected = beta * (logp_pi - logp_ref), reward_acc (chosen reward > rejected reward, strict)
and margin (chosen - rejected reward); also chosen_nll, the policy's mean NLL per chosen
completion token. tests/test_dpo.py checks loss, rewards and gradients against TRL 1.16's
DPOTrainer for each loss type, with LoRA and with full fine-tuning (trl is a test-only dev extra).

--rpo-alpha a > 0 adds a * chosen_nll to each pair's loss (RPO, Pang et al. 2024; TRL 0.x's
rpo_alpha, TRL 1.x's loss_type ["sigmoid", "sft"] with loss_weights [1, a]). Pure DPO only
asks the chosen answer to gain on the rejected one, and when the two share most tokens
(minimal-edit pairs) it often gets there by making both unlikely: the "likelihood
displacement" that leaves answers rambling or unfinished. The NLL term keeps the
chosen answers likely. TRL averages it over the batch's tokens, here over each pair's (the same
when the chosen answers have equal lengths).

--dpo-loss picks the per-pair loss on the same log-ratios, as TRL 1.16's DPOTrainer loss_type:
    sigmoid  the loss above (label smoothing and RPO apply)
    ipo      (delta_avg - 1 / (2 beta))^2 (IPO, Azar et al. 2023, Eq. 17), where delta_avg uses
             each side's log-ratio divided by ITS number of completion tokens (TRL's length
             normalization, confirmed there with the IPO authors): beta is the regularization tau
    hinge    relu(1 - beta * delta) (SLiC, Zhao et al. 2023)
The logged rewards are beta * (logp_pi - logp_ref) (sums, not averages) for every loss type, as
TRL logs them. TRL 1.x's ipo and hinge ignore label_smoothing: with them it is refused here.

The reference, with adapters (lora, dora, qlora), is the policy itself with its LoRA adapters
switched off (engine.lora.disable_adapters) under no_grad: no second copy of the weights. The
base weights never change during adapter training, so a pair's reference log-probs are computed
once (the first time the pair is seen) and cached. Without adapters (--finetune full or freeze)
there is nothing to switch off: every training and held-out pair's reference log-probs are
computed once before the first step, from the initial (base) weights, in eval mode under no_grad
(TRL's precompute_ref_log_probs=True; again no second copy of the weights; under torchrun each
rank computes its share of the pairs and the figures are gathered), and stored in the run
(REFERENCE_FILE, safetensors) so that a resume uses the ORIGINAL base's, whatever the weights
are by then (DPO.fix_reference). Data loading and tokenization are engine/sft.py's
(load_preferences, tokenize_pair, collate_pairs); shapes (2B, T): B chosen rows, B rejected rows.
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

from engine.config import atomic_write_bytes
from engine.sft import (IGNORE, collate_pairs, data_key, encode_or_skip, load_preferences,
                        pad_id_of, split_indices, tokenize_pair)


# ---------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------
def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) sum over positions with labels != -100 of log p(labels[t] | input_ids[:t+1])."""
    nll = model(input_ids, labels=labels, ignore_index=IGNORE, reduction="none")  # (N, T), 0 where ignored
    return -nll.sum(dim=1)


LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid", chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,), chosen rewards (B,) and rejected rewards (B,) (rewards detached).
    ipo needs chosen_tokens and rejected_tokens (B,): each side's completion token count."""
    chosen_ratio = policy_chosen - ref_chosen                              # (B,)
    rejected_ratio = policy_rejected - ref_rejected                        # (B,)
    if loss_type == "sigmoid":
        logits = beta * (chosen_ratio - rejected_ratio)                     # beta * delta
        losses = (-(1 - label_smoothing) * F.logsigmoid(logits)
                  - label_smoothing * F.logsigmoid(-logits))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs each side's completion token count")
        # TRL 1.16: each side's log-ratio per completion token (at least 1), then Eq. 17
        delta = (chosen_ratio / chosen_tokens.clamp(min=1).to(chosen_ratio.dtype)
                 - rejected_ratio / rejected_tokens.clamp(min=1).to(rejected_ratio.dtype))  # (B,)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def check_hparams(beta: float, label_smoothing: float, rpo_alpha: float = 0.0,
                  loss_type: str = "sigmoid") -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"--dpo-loss must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"--beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing in [0, 0.5) is required, got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":  # TRL 1.x's ipo and hinge would ignore it
        raise ValueError(f"--label-smoothing applies only to --dpo-loss sigmoid (conservative DPO); "
                         f"the {loss_type} loss has no label-noise term")
    if not 0.0 <= rpo_alpha < math.inf:
        raise ValueError(f"--rpo-alpha must be >= 0, got {rpo_alpha}")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
class PreferenceSet:
    """Tokenized pairs (engine.sft.TokenizedPair) with their file line numbers, and the cache of
    reference log-probs (pair index -> (chosen, rejected))."""

    def __init__(self, pairs: list, lines: list[int], pad_id: int):
        self.pairs, self.lines, self.pad_id = pairs, lines, pad_id
        self.ref: dict[int, tuple[float, float]] = {}

    @classmethod
    def tokenize(cls, raw_pairs: list, tok, seq_len: int, on_error: str = "stop", warn=None,
                 source: str | None = None) -> tuple["PreferenceSet", dict]:
        """Tokenize; a pair whose chosen or rejected side keeps no completion token within
        seq_len (the prompt fills it) is dropped (dropped_lines), as is one whose two sides
        became identical (identical_lines: they differ only past seq_len, or render alike).
        A pair the chat template rejects raises ValueError("SOURCE:LINE: why"), or with
        on_error="skip" is left out (warned, listed in the report's skipped_lines)."""
        pairs, lines, truncated, dropped, identical, skipped = [], [], 0, [], [], []
        for p in raw_pairs:
            tp = encode_or_skip(lambda: tokenize_pair(p, tok, seq_len), source, p.line, on_error, warn)
            if tp is None:
                skipped.append(p.line)
                continue
            truncated += tp.truncated
            if all(t == IGNORE for t in tp.chosen_labels) or all(t == IGNORE for t in tp.rejected_labels):
                dropped.append(p.line)
                continue
            if (tp.chosen_ids, tp.chosen_labels) == (tp.rejected_ids, tp.rejected_labels):
                identical.append(p.line)  # e.g. they differ only past --seq-len: no preference left
                continue
            pairs.append(tp)
            lines.append(p.line)
        return cls(pairs, lines, pad_id_of(tok)), {"n_truncated": truncated, "dropped_lines": dropped,
                                                    "identical_lines": identical,
                                                    "skipped_lines": skipped}

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def key(self) -> str:
        """engine.sft.data_key of the tokenized pairs (computed once)."""
        if getattr(self, "_key", None) is None:
            self._key = data_key(p[:4] for p in self.pairs)
        return self._key

    def collate(self, idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = collate_pairs([self.pairs[i] for i in idx], self.pad_id)   # (2B, T) each
        return x.to(device), y.to(device)

    def sample(self, batch_size: int, gen: torch.Generator) -> list[int]:
        """Random pair indices (with replacement, like train.py's random windows: the data
        generator's state alone makes the sequence resumable)."""
        return torch.randint(len(self), (batch_size,), generator=gen).tolist()


def load_preference_data(path: str, tok, seq_len: int, val_fraction: float = 0.1,
                         val_path: str | None = None, seed: int = 0, on_error: str = "stop",
                         warn=print) -> tuple[PreferenceSet, PreferenceSet, dict]:
    """(train, held-out, report) from a preference JSONL ({"prompt","chosen","rejected"}, strings
    or message lists); held-out pairs are val_path's, else a seeded val_fraction of path's.
    Malformed lines raise ValueError("FILE:LINE: what is wrong") (on_error="stop"), or are left
    out with a warning and counted in the report's skipped_lines (on_error="skip")."""
    raw, skipped = load_preferences(path, on_error, warn)
    conversational = raw[0].conversational
    raw = _same_form(raw, conversational, path, on_error, warn, skipped)
    if val_path:
        val_raw, val_skipped = load_preferences(val_path, on_error, warn)
        val_raw = _same_form(val_raw, conversational, val_path, on_error, warn, val_skipped)
        train_raw, skipped = raw, skipped + val_skipped
    else:
        tr, va = split_indices(len(raw), val_fraction, seed, source=path)
        train_raw, val_raw = [raw[i] for i in tr], [raw[i] for i in va]
    train, rt = PreferenceSet.tokenize(train_raw, tok, seq_len, on_error, warn, path)
    val, rv = PreferenceSet.tokenize(val_raw, tok, seq_len, on_error, warn, val_path or path)
    skipped = sorted(skipped + rt["skipped_lines"] + rv["skipped_lines"])
    for name, ds, src in (("training", train, path), ("held-out", val, val_path or path)):
        if len(ds) == 0:
            raise ValueError(f"{src}: no {name} pair keeps a completion token (and a difference "
                             f"between chosen and rejected) within --seq-len {seq_len}")
    report = {"n_train": len(train), "n_val": len(val),
              "n_truncated": rt["n_truncated"] + rv["n_truncated"],
              "dropped_lines": sorted(rt["dropped_lines"] + rv["dropped_lines"]),
              "identical_lines": sorted(rt["identical_lines"] + rv["identical_lines"]),
              "skipped_lines": skipped, "conversational": conversational}
    return train, val, report


def _same_form(raw: list, conversational: bool, path: str, on_error: str, warn, skipped: list
               ) -> list:
    """raw's pairs of the given form (the training file's first pair's), as load_examples
    requires of SFT lines and TRL of a dataset: a standard pair in a conversational file would
    train without the chat template (and vice versa), a second prompt format nobody asked for.
    Another form raises ValueError("FILE:LINE: ..."), or with on_error="skip" is warned about and
    its line appended to `skipped`."""
    name = {True: "conversational (message lists)", False: "standard (strings)"}
    kept = []
    for p in raw:
        if p.conversational == conversational:
            kept.append(p)
            continue
        msg = (f"{path}:{p.line}: a {name[p.conversational]} pair in preference data whose first "
               f"pair is {name[conversational]}: every pair must have the same form")
        if on_error == "stop":
            raise ValueError(msg)
        skipped.append(p.line)
        if warn is not None:
            warn(f"warning: skipping {msg}")
    return kept


# ---------------------------------------------------------------------------------------------
# Steps: what train.py calls
# ---------------------------------------------------------------------------------------------
def _cache_reference(data: PreferenceSet, idx: list[int], logps: torch.Tensor) -> None:
    """data.ref[i] = (chosen, rejected) log-probs of pair idx[k]; logps (2B,): B chosen rows,
    then B rejected rows."""
    v, B = logps.float().tolist(), len(idx)
    data.ref.update((i, (v[k], v[B + k])) for k, i in enumerate(idx))


def reference_logps(model, data: PreferenceSet, idx: list[int], x: torch.Tensor,
                    y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs (B,), (B,) of the pairs idx: cached (precomputed without adapters),
    else the model with adapters disabled."""
    from engine.lora import disable_adapters, lora_layers
    if any(i not in data.ref for i in idx):
        if not lora_layers(model):  # full / freeze: the policy has moved, it is no reference
            raise ValueError("DPO's reference is the base model with its LoRA adapters disabled, "
                             "or, without adapters, log-probs precomputed from the initial weights "
                             "(DPO.fix_reference) before the first step")
        with torch.no_grad(), disable_adapters(model):
            _cache_reference(data, idx, sequence_logps(model, x, y))
    ref = torch.tensor([data.ref[i] for i in idx], dtype=torch.float32, device=x.device)  # (B, 2)
    return ref[:, 0], ref[:, 1]


@torch.no_grad()
def precompute_reference(model, data: PreferenceSet, batch_size: int, device, autocast_ctx,
                         bar=None) -> None:
    """Fill data.ref with every pair's reference log-probs from the model as it is now (eval
    mode, no_grad, batch_size pairs a forward; TRL's _precompute_ref_logps). Under torchrun the
    batches are dealt out in turn (rank r computes batches r, r + W, r + 2W, ... of W ranks: at
    most one batch more on some) and the float32 values gathered, so every rank holds the same
    figures, bit for bit; a collective then: every rank calls it with the same data and
    batch_size. `bar`: a tqdm advanced, as this rank finishes a batch, by the pairs of that
    round's W batches (every rank's), so it ends at len(data) when the ranks keep pace."""
    from engine import distributed
    W, me, n = distributed.world_size(), distributed.rank(), len(data)
    batches = [list(range(b, min(b + batch_size, n))) for b in range(0, n, batch_size)]
    mine = []  # this rank's batches' (B, 2) chosen, rejected
    was_training = model.training
    model.eval()
    try:
        for k in range(me, len(batches), W):
            idx = batches[k]
            x, y = data.collate(idx, device)                                # (2B, T)
            with autocast_ctx:
                logps = sequence_logps(model, x, y).float()                 # (2B,)
            mine.append(logps.view(2, len(idx)).T.cpu())                    # (B, 2)
            if bar is not None:  # the pairs of this round's W batches
                bar.update(sum(map(len, batches[k - me:k - me + W])))
    finally:
        model.train(was_training)
    parts = distributed.all_gather_rows(torch.cat(mine) if mine else torch.zeros(0, 2))
    got = {}
    for r, part in enumerate(parts):  # rank r's pairs, in the order it computed them
        pairs = [i for idx in batches[r::W] for i in idx]
        got.update(zip(pairs, map(tuple, part.tolist())))
    data.ref.update(sorted(got.items()))


REFERENCE_FILE = "reference_logps.safetensors"


def save_reference(path: str, task: "DPO", base: str | None = None) -> None:
    """The precomputed reference log-probs of task's pairs as safetensors (atomic): tensors
    train (N, 2) and val (M, 2) (chosen, rejected) in float32, metadata the pairs' data keys
    and the --base they were computed from (load_reference checks both)."""
    from safetensors.torch import save as st_save
    tensors = {name: torch.tensor([data.ref[i] for i in range(len(data))],
                                  dtype=torch.float32).reshape(len(data), 2)
               for name, data in (("train", task.train), ("val", task.val))}
    meta = {"train_key": task.train.key, "val_key": task.val.key, "base": str(base)}
    atomic_write_bytes(path, st_save(tensors, metadata=meta))


def load_reference(path: str, task: "DPO", base: str | None = None) -> None:
    """Fill task's caches from save_reference's file. ValueError when the pairs are not the
    file's (the data changed since the run started: as the resume's data-key check says), when
    the file records another --base than `base` (a file copied from another run: its figures
    would be another model's), or when it is damaged (deleting it has them recomputed from
    --base). A file or a `base` without a base name is not checked for it."""
    from safetensors import SafetensorError, safe_open
    from engine.tasks import check_data_keys
    damaged = (f"{path} is damaged ({{}}); it holds the run's reference log-probs (delete it to "
               "recompute them from --base)")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise ValueError(damaged.format(e)) from None
    check_data_keys(meta, task.train.key, task.val.key, "data")
    theirs = meta.get("base")
    if base is not None and theirs not in (None, "None") and theirs != str(base):
        raise ValueError(f"{path} holds the reference log-probs of --base {theirs}, not of this "
                         f"run's --base {base} (delete it to recompute them from {base})")
    for name, data in (("train", task.train), ("val", task.val)):
        t = tensors.get(name)
        if t is None or tuple(t.shape) != (len(data), 2):
            raise ValueError(damaged.format(f"no {name} tensor of shape ({len(data)}, 2)"))
        data.ref = {i: (c, r) for i, (c, r) in enumerate(t.tolist())}


def summarize(losses, chosen_rewards, rejected_rewards, chosen_nll=None, prefix: str = ""
              ) -> dict[str, float]:
    """Mean loss, rewards, reward accuracy and margin (TRL's rewards/chosen, rewards/rejected,
    rewards/accuracies, rewards/margins), chosen NLL, as floats."""
    losses, c, r = losses.detach().float(), chosen_rewards.float(), rejected_rewards.float()
    out = {f"{prefix}loss": losses.mean().item(), f"{prefix}rewards_chosen": c.mean().item(),
           f"{prefix}rewards_rejected": r.mean().item(),
           f"{prefix}reward_acc": (c > r).float().mean().item(),
           f"{prefix}margin": (c - r).mean().item()}
    if chosen_nll is not None:
        out[f"{prefix}chosen_nll"] = chosen_nll.detach().float().mean().item()
    return out


class DPO:
    """Training and held-out evaluation of the DPO objective over two PreferenceSets."""

    def __init__(self, train: PreferenceSet, val: PreferenceSet, batch_size: int, beta: float = 0.1,
                 label_smoothing: float = 0.0, rpo_alpha: float = 0.0, loss_type: str = "sigmoid"):
        check_hparams(beta, label_smoothing, rpo_alpha, loss_type)
        self.train, self.val, self.batch_size = train, val, batch_size
        self.beta, self.label_smoothing, self.rpo_alpha = beta, label_smoothing, rpo_alpha
        self.loss_type = loss_type
        self._stats: list[dict] = []
        self._tokens = 0  # real (non-padding) tokens through the policy since pop_tokens()
        self._unsaved_reference = None  # (path, base): recomputed on resume, saved once checked

    def loss(self, model, data: PreferenceSet, idx: list[int], device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair losses, chosen and rejected rewards, and chosen NLL per token (all (B,)) of
        pairs idx; the losses carry the policy's graph."""
        x, y = data.collate(idx, device)                                    # (2B, T)
        ref_c, ref_r = reference_logps(model, data, idx, x, y)              # (B,), (B,)
        logps = sequence_logps(model, x, y)                                 # (2B,)
        B = len(idx)
        n_tok = (y != IGNORE).sum(dim=1)                                    # (2B,) completion tokens
        losses, rc, rr = dpo_loss(logps[:B], logps[B:], ref_c, ref_r, self.beta, self.label_smoothing,
                                  self.loss_type, n_tok[:B], n_tok[B:])
        nll = -logps[:B] / n_tok[:B].clamp(min=1)                           # (B,)
        if self.rpo_alpha:
            losses = losses + self.rpo_alpha * nll
        return losses, rc, rr, nll.detach()

    def start_step(self, n_micro: int) -> None:
        pass  # micro-batches of equal pair counts: each is 1/n_micro of the step

    def fix_reference(self, model, device, autocast_ctx, run_dir: str, resuming: bool,
                      write: bool = True, progress: bool = True, base: str | None = None,
                      say=None) -> None:
        """Without adapters (--finetune full / freeze): every pair's reference log-probs, fixed
        before the first step. A new run computes them from `model` (the base, as loaded) and
        writes them to run_dir/REFERENCE_FILE (when `write`: rank 0, which also prints); a
        resumed run reads them back, so they stay the ORIGINAL base's whatever the weights are by
        then (and identical on any device; a file of another `base` is refused); if the file is
        missing, `model` (train.py calls this before restoring the trained weights, so still
        --base) computes them again, and load_state_dict writes them only once the run's data
        keys matched: the pairs may have been edited since, and a file of theirs would make
        every later resume refuse the restored data. Under torchrun each rank computes its
        share of the pairs (every W-th batch of batch_size / W pairs, W ranks), then the figures
        are gathered (precompute_reference), so every rank holds the same ones, bit for bit;
        rank 0's progress bar counts all pairs, each of its batches advancing it by the pairs
        of that round's W batches. The file is read only when every rank sees it."""
        from engine.distributed import all_gather_object, world_size
        path = os.path.join(run_dir, REFERENCE_FILE)
        say = say or ((lambda line: print(line, flush=True)) if write else (lambda line: None))
        # every rank must take the same branch (computing is a collective): read the file only
        # where every rank sees it
        if resuming and all(all_gather_object(os.path.exists(path))):
            load_reference(path, self, base)
            say(f"reference log-probs: read from {path} ({len(self.train):,} training + "
                f"{len(self.val):,} held-out pairs)")
            return
        from tqdm import tqdm
        n, t0 = len(self.train) + len(self.val), time.perf_counter()
        say(f"reference log-probs: computing them for {len(self.train):,} training + "
            f"{len(self.val):,} held-out pairs with the base weights (once, before the first step)"
            + (f"; {path} was missing" if resuming else "")
            + (" on another rank" if resuming and os.path.exists(path) else ""))
        bar = tqdm(total=n, desc="reference", dynamic_ncols=True, disable=not (progress and write))
        step = max(1, self.batch_size // world_size())  # a training micro-batch's pairs
        try:
            for data in (self.train, self.val):
                data.ref = {}
                precompute_reference(model, data, step, device, autocast_ctx, bar)
        finally:
            bar.close()
        say(f"reference log-probs: {n:,} pairs in {time.perf_counter() - t0:.1f}s"
            + (f" ({world_size()} processes, each computed its share)" if world_size() > 1 else ""))
        if write and not resuming:
            save_reference(path, self, base)
        elif write:  # saved by load_state_dict once the run's data keys are checked
            self._unsaved_reference = (path, base)

    def train_step(self, model, gen: torch.Generator, device) -> torch.Tensor:
        """Mean loss over one random batch (for backward); its statistics are kept for log()."""
        idx = self.train.sample(self.batch_size, gen)
        self._tokens += sum(len(self.train.pairs[i].chosen_ids) + len(self.train.pairs[i].rejected_ids)
                            for i in idx)
        from engine.distributed import shard  # under torchrun: this rank's pairs of the global batch
        losses, c, r, nll = self.loss(model, self.train, shard(idx), device)
        self._stats.append(summarize(losses, c, r, nll))
        return losses.mean()

    def state_dict(self) -> dict:
        # batches come from the generator alone (resume restores it); the keys tell a resume
        # whether the pairs are still the run's
        return {"train_key": self.train.key, "val_key": self.val.key}

    def load_state_dict(self, state: dict) -> None:
        from engine.tasks import check_data_keys
        check_data_keys(state, self.train.key, self.val.key, "data")
        if self._unsaved_reference:  # recomputed on resume, and these are the run's pairs
            save_reference(self._unsaved_reference[0], self, self._unsaved_reference[1])
            self._unsaved_reference = None

    def pop_tokens(self) -> int:
        """Tokens processed since the last call (for a tokens/s meter)."""
        n, self._tokens = self._tokens, 0
        return n

    def log(self, last: int = 1) -> dict[str, float]:
        """Statistics averaged over the `last` micro-batches (one optimizer step's), as
        train_loss, rewards_chosen, rewards_rejected, reward_acc, margin, chosen_nll; the rest is
        dropped."""
        stats, self._stats = self._stats[-last:], []
        keys = stats[0].keys() if stats else ()
        return {("train_loss" if k == "loss" else k): round(sum(s[k] for s in stats) / len(stats), 5)
                for k in keys}

    @torch.no_grad()
    def evaluate(self, model, device, autocast_ctx, full: bool = True) -> dict[str, float]:
        """DPO loss, rewards, reward accuracy and margin over every held-out pair (val_ prefix;
        `full` is accepted for the train.py task interface: evaluation is always full)."""
        was_training = model.training
        model.eval()
        parts = []
        from engine.distributed import world_size
        step = self.batch_size // world_size()  # each rank's micro-batch, not the global batch
        for b in range(0, len(self.val), step):
            with autocast_ctx:
                rows = list(range(b, min(b + step, len(self.val))))
                parts.append(self.loss(model, self.val, rows, device))
        model.train(was_training)
        losses, c, r, nll = (torch.cat(t) for t in zip(*parts))
        return summarize(losses, c, r, nll, prefix="val_")

    def final_is_periodic(self, full: bool) -> bool:
        return True  # every evaluation covers every held-out pair


def format_eval(res: dict) -> str:
    """One progress line for a DPO evaluation."""
    return (f"val DPO loss {res['val_loss']:.4f}, reward acc {res['val_reward_acc']:.1%}, "
            f"margin {res['val_margin']:.3f} (chosen {res['val_rewards_chosen']:+.3f}, "
            f"rejected {res['val_rewards_rejected']:+.3f}), chosen NLL/token "
            f"{res['val_chosen_nll']:.3f}")


def format_report(report: dict, path: str) -> str:
    s = (f"preference data: {path}: {report['n_train']:,} train / {report['n_val']:,} held-out "
         f"pairs ({'conversational' if report['conversational'] else 'standard'} form)")
    if report["n_truncated"]:
        s += f"; {report['n_truncated']:,} truncated to --seq-len"
    for key, why in (("dropped_lines", "no completion token within --seq-len"),
                     ("identical_lines", "chosen and rejected identical within --seq-len")):
        lines = report.get(key) or []
        if lines:
            s += (f"; {len(lines):,} dropped ({why}; lines {', '.join(map(str, lines[:10]))}"
                  + (", ..." if len(lines) > 10 else "") + ")")
    if report.get("skipped_lines"):
        lines = report["skipped_lines"]
        s += (f"; {len(lines):,} malformed line(s) skipped ({', '.join(map(str, lines[:10]))}"
              + (", ..." if len(lines) > 10 else "") + ")")
    return s
