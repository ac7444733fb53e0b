"""Multi-process training under torchrun, on PyTorch's own engines: DistributedDataParallel for
every fine-tuning mode and FSDP2 (`torch.distributed.fsdp.fully_shard`) for full training.

Follows the PyTorch DDP and FSDP2 tutorials and torchtitan's layout (one `fully_shard` per
transformer block, then the root), with checkpoints through `torch.distributed.checkpoint
.state_dict` (full state dicts gathered to rank 0, so a checkpoint is the usual HF directory).

Exactness: `--batch-size` is the per-rank micro-batch. Every rank draws the SAME global batch
(batch-size x world size rows) from the shared-seed data generator and trains on its own
contiguous block of rows (`shard`), so N processes take exactly the steps one process takes with
an N times larger batch, the generator state is rank-independent, and a checkpoint resumes in
any world size that divides the global batch. What is synchronized:

  DDP   gradients of the optimizer's (requires_grad) parameters: all-reduce (mean) once per
        optimizer step (`no_sync` on accumulation micro-steps). Parameters are broadcast from
        rank 0 once at start; buffers (NF4 weights of QLoRA, caches) never.
  FSDP2 parameters all-gathered per block in forward and backward, gradients reduce-scattered,
        optimizer state sharded: each rank keeps 1/N of everything that trains.
  both  the reported loss (mean over ranks), rank 0's clock (LR schedule and time budget),
        flags (checked equal at start). Evaluation runs on every rank over the whole
        validation set, so every rank gets the single-process numbers without communication.
        DPO's precomputed reference log-probs (--finetune full / freeze): each rank computes
        its share of the pairs once before the first step, then all are gathered
        (all_gather_rows), so every rank holds the same figures.

In one process (no torchrun) every function here is a no-op or the identity.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as tdist

_rank, _world, _local_rank = 0, 1, 0
_timeout = 600.0
_barriers = 0  # barrier() calls so far (the same count on every rank)
_cpu_group = None  # gloo group for small CPU values and objects (even when the backend is nccl)
_wait_group = None  # gloo group without a practical deadline: waiting for rank 0's data preparation
PER_RANK_FLAGS = ("threads", "no_progress", "metrics_port", "dist_timeout")  # may differ per rank


# ---------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------
def launched() -> bool:
    """True under torchrun (or any env:// launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str, timeout_s: float) -> torch.device:
    """Join the process group described by torchrun's environment (gloo on CPU, nccl on CUDA;
    every collective gives up after timeout_s) and return this rank's device (cuda:LOCAL_RANK).
    Non-zero ranks print nothing to stdout (rank 0 logs for the job; errors still go to stderr)."""
    global _rank, _world, _local_rank, _timeout, _cpu_group, _wait_group
    dev = torch.device(device)
    if not launched():
        return dev
    if not timeout_s > 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    if "RANK" not in os.environ:
        raise ValueError("WORLD_SIZE is set but RANK is not: launch with torchrun (it sets RANK, "
                         "LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    _rank, _world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _local_rank, _timeout = int(os.environ.get("LOCAL_RANK", "0")), timeout_s
    if dev.type == "cuda":
        if dev.index is not None and _world > 1:
            raise ValueError(f"--device {device}: under torchrun pass --device cuda "
                             "(each rank uses cuda:LOCAL_RANK)")
        dev = torch.device("cuda", _local_rank)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: multi-process training runs on cuda or cpu")
    tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                             timeout=timedelta(seconds=timeout_s),
                             device_id=dev if dev.type == "cuda" else None)
    _cpu_group = tdist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    _wait_group = tdist.new_group(backend="gloo", timeout=timedelta(days=1))
    if _rank != 0:
        sys.stdout = open(os.devnull, "w")
    return dev


def cleanup(meet: bool = True) -> None:
    """Tear the process group down. meet=True (a run that ended well on every rank): the ranks
    meet first; a rank that destroyed the group while a peer still wrote (rank 0's last save)
    could take gloo down with "terminate called without an active exception" (SIGABRT, seen in
    CI). meet=False after Ctrl-C, when the ranks stopped at different points: a peer still in
    a step's collective then fails at once instead of waiting for this rank until the deadline."""
    if not tdist.is_initialized():
        return
    if meet and _cpu_group is not None:
        try:
            tdist.barrier(group=_cpu_group)
        except Exception:  # noqa: BLE001  (a peer already gone: nothing left to wait for)
            pass
    tdist.destroy_process_group()


def rank() -> int:
    return _rank


def world_size() -> int:
    return _world


def is_main() -> bool:
    return _rank == 0


def barrier() -> None:
    """After rank 0 wrote a checkpoint: the other ranks wait until it is complete, without a
    deadline (a large checkpoint may take long); rank 0 itself does not wait, so a rank that hung
    meanwhile (say in evaluation, which has no collectives) is caught by rank 0's next collective
    within --dist-timeout. Through the rendezvous store, keyed by a count of calls. When rank 0
    fails instead (a full disk), fail_together releases this barrier with its error, which the
    waiting ranks raise (under torchrun the store outlives rank 0, so they would wait on)."""
    global _barriers
    if _world == 1:
        return
    _barriers += 1
    key = _written_key(_barriers)
    store = tdist.distributed_c10d._get_default_store()
    if _rank == 0:
        store.set(key, _WRITTEN)
    else:
        store.wait([key], timedelta(days=1))
        value = store.get(key).decode(errors="replace")
        if value != _WRITTEN:
            raise PeerFailed(f"rank {_rank}: stopped because rank 0 failed while writing a "
                             f"checkpoint: {value}")


_WRITTEN = "written"  # a barrier key's value when rank 0 completed the checkpoint


class PeerFailed(RuntimeError):
    """Another rank failed with an error of its own (its message is this one's)."""


@contextlib.contextmanager
def main_first():
    """The block (downloads, tokenizer training, token caches) runs in three waves: rank 0 first;
    then the first rank of every node (LOCAL_RANK 0: on rank 0's node, or with a shared
    WHETSTONE_CACHE, it reads what rank 0 cached; on another node without one, it fills that
    node's caches, once per node rather than once per rank); then all the others (reading their
    node's caches). All wait without a deadline, then continue together. When the block raises
    on some rank (bad data, say), the later waves are still released: they run the block too and
    normally fail the same way, so every rank reports the real error (rather than waiting until
    the failed rank's exit reads as a lost connection)."""
    if _world == 1:
        yield
        return
    # Every rank passes the same 3 barriers, some before its turn and the rest after: rank 0
    # runs before the first, the other node leaders between the first and the second, the rest
    # after the second; the third is where all meet.
    wave = 0 if _rank == 0 else 1 if _local_rank == 0 else 2
    for _ in range(wave):
        tdist.barrier(group=_wait_group)  # (a peer lost here: raised, no further barriers)
    try:
        yield
    finally:
        for _ in range(3 - wave):
            tdist.barrier(group=_wait_group)


def broadcast_object(obj):
    """Rank 0's value of a small picklable object, on every rank."""
    if _world == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, group=_cpu_group)
    return box[0]


def main_value(value: float) -> float:
    """Rank 0's value of a float on every rank (its clock: the LR schedule and the time budget
    must not depend on which rank reads the time)."""
    if _world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    tdist.broadcast(t, src=0, group=_cpu_group)
    return t.item()


def all_gather_object(obj) -> list:
    """Every rank's value of a small picklable object, in rank order, on every rank."""
    if _world == 1:
        return [obj]
    every = [None] * _world
    tdist.all_gather_object(every, obj, group=_cpu_group)
    return every


def all_gather_rows(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor (any number of rows), in rank order, on every rank, bit for bit, on
    the CPU. For small data (pickled through all_gather_object's gloo group whatever the
    backend): no padding to equal sizes, no second NCCL call. In one process: [t]."""
    return all_gather_object(t.detach().cpu()) if _world > 1 else [t]


def check_same_flags(flags: dict) -> None:
    """Every rank must run the same command: compare each rank's flags with rank 0's and fail on
    every rank with one line naming the first difference (mismatched torchrun commands on
    several machines would otherwise train inconsistent replicas or hang)."""
    if _world == 1:
        return
    every = all_gather_object({k: v for k, v in sorted(flags.items()) if k not in PER_RANK_FLAGS})
    for r, theirs in enumerate(every):
        for k in sorted(set(every[0]) | set(theirs)):
            if theirs.get(k) != every[0].get(k):
                raise ValueError(f"flags differ across ranks: rank {r} has --{k.replace('_', '-')} "
                                 f"{theirs.get(k)!r} but rank 0 has {every[0].get(k)!r} "
                                 "(run the same command on every rank)")


def _lost_contact(e: BaseException) -> bool:
    return _world > 1 and not isinstance(e, PeerFailed) and (isinstance(e, tdist.DistError) or any(
        s in str(e) for s in ("gloo", "Gloo", "NCCL", "Connection closed", "Timed out")))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _failed_key(r: int) -> str:
    return f"whetstone/failed/{r}"


def _left_key(r: int) -> str:  # fail_together: rank r is done with the store
    return f"whetstone/left/{r}"


def _written_key(n: int) -> str:  # barrier() number n: rank 0's checkpoint, or its error
    return f"whetstone/written/{n}"


def _peer_failure() -> str | None:
    """'rank R failed: ERROR' for the first other rank that recorded its error in the store
    (fail_together), or None (none did, or the store went away with the rank hosting it)."""
    try:
        store = tdist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))  # its host may be gone: don't wait on it
        for r in range(_world):
            if r != _rank and store.check([_failed_key(r)]):
                return f"rank {r} failed: {store.get(_failed_key(r)).decode(errors='replace')}"
    except Exception:  # noqa: BLE001  (no process group, or the store is unreachable)
        pass
    return None


def explain(e: BaseException) -> str:
    """A one-line message for an error; a failed collective says what probably happened: the
    error another rank reported (a rank that failed alone, say on its data), else a lost rank."""
    if _lost_contact(e):
        peer = _peer_failure()
        if peer:
            return f"rank {_rank}: stopped because {peer}"
        return (f"rank {_rank}: lost contact with the other ranks (a process died, or hung "
                f"longer than --dist-timeout {_timeout:g}s; the launcher's log names it): "
                f"{_first_line(e)}")
    return str(e)


def fail_together(e: BaseException, wait_s: float = 10.0) -> None:
    """Call after printing an error, before exiting. Bad input that every rank detects (a bad
    --resume, mismatched flags) makes every rank fail at about the same time; a rank that exits
    while a peer is still finishing the last collective would make that peer report a lost
    connection instead of the real error. So each rank records its error in the rendezvous
    store (a peer that loses contact reports it, see explain; rank 0 also releases the ranks
    waiting for its checkpoint) and waits (at most wait_s) until every rank has failed, then
    destroys the process group. Not after a lost connection."""
    if _world == 1 or not tdist.is_initialized() or _lost_contact(e):
        return
    try:
        store = tdist.distributed_c10d._get_default_store()
        store.set(_failed_key(_rank), _first_line(e))
        if _rank == 0:  # the next barrier() the others may be (or soon be) waiting at
            store.set(_written_key(_barriers + 1), _first_line(e))
        deadline = time.monotonic() + wait_s
        _poll(store, [_failed_key(r) for r in range(_world)], deadline)
        # Launched without torchrun's agent, rank 0 hosts the store: it leaves last, or a peer
        # still polling above would lose the store (a C++ warning dump, and no teardown).
        store.set(_left_key(_rank), "")
        if _rank == 0:
            _poll(store, [_left_key(r) for r in range(_world)], deadline)
    except Exception:  # noqa: BLE001  (the store is gone: just exit)
        pass
    # Tear the group down before exiting, even when the store is gone: left to interpreter exit,
    # its threads can die with "terminate called without an active exception" (SIGABRT instead
    # of exit status 2).
    try:
        tdist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def _poll(store, keys: list[str], deadline: float) -> None:
    """Wait until every key is set or the deadline passes. Polled: a store.wait that times out
    (a peer that did not fail) logs C++ warnings."""
    while not store.check(keys) and time.monotonic() < deadline:
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Data: every rank draws the global batch, trains on its rows
# ---------------------------------------------------------------------------------------------
def per_rank_batch(global_batch: int) -> int:
    """The per-rank micro-batch that keeps `global_batch` rows per micro-step in this world."""
    if global_batch % _world:
        raise ValueError(f"the run's global batch of {global_batch} rows (--batch-size x world "
                         f"size) does not divide among {_world} processes; use a world size that "
                         f"divides {global_batch}")
    return global_batch // _world


def local_rows(n: int) -> slice:
    """This rank's contiguous block of a global batch of n rows (the first n % world ranks get one
    row more; every row belongs to exactly one rank, in rank order)."""
    q, r = divmod(n, _world)
    start = _rank * q + min(_rank, r)
    return slice(start, start + q + (_rank < r))


def _take(batch, rows: slice):
    if batch is None:
        return None
    if isinstance(batch, tuple):  # NamedTuple batches (engine.sft.Batch) keep their type
        parts = [_take(t, rows) for t in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else tuple(parts)
    return batch[rows]


def _rows(batch) -> int:
    return len(batch[0]) if isinstance(batch, tuple) else len(batch)


def shard(batch):
    """This rank's rows of a global batch: a tensor (rows on dim 0), a list, or a tuple of them
    (None entries kept). In one process: the batch itself."""
    return batch if _world == 1 else _take(batch, local_rows(_rows(batch)))


def shard_mean(batch, loss_fn, count):
    """loss_fn's mean over the global batch's `count`ed items (tokens), computed on this rank's
    rows only: loss_fn(mine) * world * count(mine) / count(batch), so that DDP's average of the
    ranks' gradients is exactly the gradient of the global mean even when ranks hold different
    numbers of tokens. A rank left without rows (a short last batch) runs one row at weight 0,
    keeping every rank's collectives in step. In one process: loss_fn(batch)."""
    if _world == 1:
        return loss_fn(batch)
    rows = local_rows(_rows(batch))
    if rows.start == rows.stop:
        return loss_fn(_take(batch, slice(0, 1))) * 0.0
    mine = _take(batch, rows)
    return loss_fn(mine) * (_world * count(mine) / count(batch))


def mean(value: float) -> float:
    """The mean of a float over the ranks (the loss each rank reports)."""
    if _world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    tdist.all_reduce(t, group=_cpu_group)
    return t.item() / _world


def mean_dict(values: dict) -> dict:
    """Mean over ranks of each (float) value; every rank must pass the same keys."""
    if _world == 1 or not values:
        return values
    t = torch.tensor([float(values[k]) for k in sorted(values)], dtype=torch.float64)
    tdist.all_reduce(t, group=_cpu_group)
    return {k: round(v / _world, 5) for k, v in zip(sorted(values), t.tolist())}


# ---------------------------------------------------------------------------------------------
# Model wrapping
# ---------------------------------------------------------------------------------------------
def fsdp_available() -> bool:
    try:
        import torch.distributed.fsdp as fsdp
    except ImportError:
        return False
    return hasattr(fsdp, "fully_shard")  # FSDP2 (torch >= 2.6)


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 in place: one shard group per transformer block, then the root (embeddings, final
    norm, lm_head). Call before building the optimizer (parameters become sharded DTensors).
    In one process nothing changes (the run is an ordinary single-device run)."""
    if _world == 1:
        return
    if not fsdp_available():
        raise ValueError(f"--fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6), this "
                         f"is torch {torch.__version__}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (_world,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_fsdp(model: torch.nn.Module) -> bool:
    if not fsdp_available():
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def data_parallel(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  device: torch.device, toggles_trainable: bool = False) -> torch.nn.Module:
    """The module train_step should call: DDP over `model` under torchrun, else `model` itself
    (also for FSDP2, which is already data parallel). DDP's reducer is built for the optimizer's
    parameters; with `toggles_trainable` (Half Fine-Tuning changes requires_grad every round)
    they are all registered and find_unused_parameters lets each step sync only those that got a
    gradient (the others keep grad None, as in one process)."""
    if _world == 1 or is_fsdp(model):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    params = [p for g in optimizer.param_groups for p in g["params"]]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates broadcast_buffers, but advises
            warnings.simplefilter("ignore", FutureWarning)  # it while buffers must not sync at init
            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      broadcast_buffers=False, find_unused_parameters=toggles_trainable)
    finally:
        for p, rg in zip(params, before):
            p.requires_grad_(rg)
    return net


def accumulating(net: torch.nn.Module, sync: bool):
    """Context for one micro-step's forward + backward: gradients are synchronized only when
    `sync` (the last micro-step of an optimizer step); before that they accumulate locally."""
    if _world == 1 or sync:
        if is_fsdp(net):
            net.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if is_fsdp(net):
        net.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return net.no_sync()


# ---------------------------------------------------------------------------------------------
# Checkpoints: rank 0 writes, everyone waits (FSDP: everyone joins the gather first)
# ---------------------------------------------------------------------------------------------
def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def save_trained(model: torch.nn.Module, tokenizer, directory: str, mode: str, base) -> None:
    """engine.finetune.save_trained, written by rank 0 only; FSDP2 weights are gathered (to rank
    0's CPU memory) into an ordinary Transformer first, so the directory is the usual HF one."""
    from engine import finetune
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from engine.checkpoint import empty_model, load_state
        state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
        if _rank == 0:
            plain = empty_model(model.config)
            load_state(plain, state)
            finetune.save_trained(plain, tokenizer, directory, mode, base)
    elif _rank == 0:
        finetune.save_trained(model, tokenizer, directory, mode, base)
    barrier()


def restore_trained(model: torch.nn.Module, directory: str, mode: str) -> None:
    """engine.finetune.restore_trained on every rank (FSDP2: each rank keeps its shard)."""
    from engine import finetune
    if not is_fsdp(model):
        return finetune.restore_trained(model, directory, mode)
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    from engine.checkpoint import read_safetensors_dir
    state = read_safetensors_dir(directory)
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    set_model_state_dict(model, state, options=_full_options(strict=False))


class _FullOptimizerState:
    """Optimizer state keyed by parameter names, complete (gathered from every shard): what a
    --fsdp run saves, so it resumes in any world size, or in one process."""

    def __init__(self, model, optimizer, state=None):
        self.model, self.optimizer, self.state = model, optimizer, state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        if not state["state"]:  # saved before the first step: nothing to restore
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        set_optimizer_state_dict(self.model, self.optimizer, state, options=_full_options())


def optimizer_for_saving(model, optimizer, fsdp: bool):
    """What engine.trainer.save_training_state should save (call on every rank): the optimizer
    itself (DDP: its state is identical on every rank), or for --fsdp runs the full name-keyed
    state gathered to rank 0."""
    if not fsdp:
        return optimizer
    if not optimizer.state:
        # Before the first step: get_optimizer_state_dict would create the state by an lr-0 step,
        # which counts as a step for Adam's bias correction and changes the trajectory.
        return _FullOptimizerState(model, optimizer, {"state": {}, "param_groups": []})
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    return _FullOptimizerState(model, optimizer, state)


def optimizer_for_loading(model, optimizer, fsdp: bool):
    """What engine.trainer.load_training_state should load into (the counterpart of the above)."""
    return _FullOptimizerState(model, optimizer) if fsdp else optimizer


class NoLog:
    """MetricsLog stand-in for ranks other than 0 (only rank 0 writes metrics.jsonl)."""

    def log(self, **event) -> None:
        pass

    def read(self) -> list:
        return []
