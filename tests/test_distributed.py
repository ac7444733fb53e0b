"""train.py under torchrun (engine/distributed.py), 2 processes on CPU with gloo: the same
trajectory and weights as one process with the same global batch (DDP: full training and LoRA;
FSDP2), checkpoints that resume in 1 or 2 processes, and bad input (mismatched flags, a world
size that does not divide the global batch, a rank that dies or hangs).

Each multi-process run is `python -m torch.distributed.run` or, where a test needs per-rank
control, two `python train.py` processes given the env:// variables torchrun would set.
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from demo_assets import word_corpus  # noqa: E402
from engine import distributed  # noqa: E402

TOL = 1e-5  # fp32: the ranks' gradient average vs one process's mean over the whole batch
# Logged losses are rounded to 5 decimals: two within TOL can land one rounding step apart
# (seen: 4.748085 vs 4.748084 logged as 4.74809 and 4.74808).
LOG_TOL = TOL + 1e-5
ANY_DATA = ["--seq-len", "16", "--no-progress", "--threads", "1", "--warmup-steps", "2",
            "--log-every", "1", "--eval-every", "3", "--seed", "3"]
FLAGS = [*ANY_DATA, "--eval-batches", "2"]  # (--eval-batches: plain-text data only)
SCRATCH = ["--preset", "tiny", "--vocab-size", "300", "--lr", "3e-3", *FLAGS]


def free_port() -> int:
    """A port free now, but not held: another process may take it before the caller binds it.
    Only for the test that needs rank 0 itself to host the store (TORCHRUN and ranks() take
    theirs atomically)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# torchrun's agent picks a free port for its store and holds it (no port picked, released, then
# maybe taken by another test's process before rank 0 binds it: a flaky "address in use").
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def env(cache):
    return {**os.environ, "WHETSTONE_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def torchrun(cache, *args, n=2):
    cmd = [*TORCHRUN, "--nproc_per_node", str(n), os.path.join(ROOT, "train.py"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(cache), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def ranks(cache, tmp, per_rank_args, timeout=None, cwds=None, script=None, nodes=1,
          agent_store=True):
    """Start one `python train.py` (or `script`) per entry of per_rank_args with torchrun's
    env:// variables (per-rank flags: what a mistyped command on one machine gives; per-rank
    `cwds`: what different files under one path on each machine give; `nodes`: the ranks as
    torchrun numbers them on that many machines, LOCAL_RANK counting from 0 on each). Returns
    the Popen objects; stdout / stderr go to tmp/rank{r}.out / .err. As under torchrun, the
    rendezvous store is held here (on a port it bound itself) and outlives the ranks;
    agent_store=False: rank 0 hosts it, as in a launch without torchrun."""
    n, procs = len(per_rank_args), []
    store = (torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
             if agent_store else None)
    port = store.port if store else free_port()
    local = n // nodes
    for r, args in enumerate(per_rank_args):
        e = {**env(cache), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
             "LOCAL_RANK": str(r % local), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(local),
             "GROUP_RANK": str(r // local), "TORCHELASTIC_USE_AGENT_STORE": str(agent_store)}
        out, err = (open(os.path.join(tmp, f"rank{r}.{x}"), "w") for x in ("out", "err"))
        procs.append(subprocess.Popen([sys.executable, script or os.path.join(ROOT, "train.py"),
                                       *args], stdout=out, stderr=err, env=e,
                                      cwd=cwds[r] if cwds else ROOT))
        procs[-1].store = store  # kept while the ranks run
        out.close()
        err.close()
    if timeout is not None:
        try:
            for p in procs:
                p.wait(timeout=timeout)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return procs


def read(tmp, r, what="err"):
    with open(os.path.join(tmp, f"rank{r}.{what}")) as f:
        return f.read()


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def trajectory(run, steps=None):
    """{step: (train_loss, val_loss)} of the non-final events."""
    out = {}
    for e in metrics(run):
        if e.get("final") or (steps and e["step"] not in steps):
            continue
        tl, vl = out.get(e["step"], (None, None))
        out[e["step"]] = (e.get("train_loss", tl), e.get("val_loss", vl))
    return out


def assert_close(a, b):
    """Two trajectories, equal within LOG_TOL (pytest.approx compares tuples in a dict exactly)."""
    assert a.keys() == b.keys() and a, (a, b)
    for s in a:
        for u, v in zip(a[s], b[s]):
            assert (u is None and v is None) or abs(u - v) <= LOG_TOL, (s, a[s], b[s])


def assert_same_run(ref, run, steps=None, weights="last/model.safetensors"):
    assert_close(trajectory(ref, steps), trajectory(run, steps))
    wa, wb = load_file(os.path.join(ref, weights)), load_file(os.path.join(run, weights))
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"{run}: worst weight difference {worst:.2e}")
    assert worst < TOL


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Corpus, shared cache, and the single-process reference: 6 steps, global batch 8."""
    tmp = tmp_path_factory.mktemp("dist")
    cache = tmp / "cache"
    os.environ["WHETSTONE_CACHE"] = str(cache)
    corpus = word_corpus(tmp / "corpus.txt", 800)
    ref = str(tmp / "ref")
    assert train.main(["--data", str(corpus), "--out", ref, "--max-steps", "6",
                       "--batch-size", "8", *SCRATCH]) == 0
    return tmp, cache, str(corpus), ref


def test_ddp_full_equals_one_process_and_resumes_in_1_and_2(setup):
    tmp, cache, corpus, ref = setup
    run = str(tmp / "ddp")
    r = torchrun(cache, "--data", corpus, "--out", run, "--max-steps", "6", "--batch-size", "4",
                 "--pause-at-step", "3", *SCRATCH)
    assert "2 processes" in r.stdout and "paused at step 3" in r.stdout
    assert_close(trajectory(run), trajectory(ref, steps=range(4)))
    assert json.load(open(os.path.join(run, "run_args.json")))["world_size"] == 2
    one = str(tmp / "ddp-resumed-in-1")
    shutil.copytree(run, one)
    ranks(cache, tmp, [["--resume", run, "--no-progress", "--threads", "1"]] * 2, timeout=120)
    assert train.main(["--resume", one, "--no-progress", "--threads", "1"]) == 0
    for resumed in (run, one):
        assert_same_run(ref, resumed)
        assert_same_run(ref, resumed, weights="model.safetensors")  # best-by-validation


def test_ddp_lora_on_sft_equals_one_process_with_accumulation(setup):
    """LoRA on a tiny base with SFT data: 9 samples in global micro-batches of 4 rows leave a last
    batch of 1 row (rank 1 gets none), so ranks hold different token counts; gradient
    accumulation runs the micro-steps under no_sync."""
    tmp, cache, _, ref = setup
    data = tmp / "sft.jsonl"
    rng = random.Random(1)
    words = ["king", "lord", "night", "prince", "be", "not", "alas", "sweet"]
    say = lambda n: " ".join(rng.choices(words, k=rng.randint(1, n)))  # noqa: E731
    data.write_text("".join(json.dumps({"prompt": say(6) + " ", "completion": say(9)}) + "\n"
                            for _ in range(10)))
    common = ["--base", ref, "--finetune", "lora", "--lora-r", "4", "--data", str(data),
              "--max-steps", "3", "--grad-accum", "2", *ANY_DATA, "--seq-len", "48", "--lr", "1e-2"]
    one, two = str(tmp / "lora1"), str(tmp / "lora2")
    assert train.main([*common, "--out", one, "--batch-size", "4"]) == 0
    torchrun(cache, *common, "--out", two, "--batch-size", "2")
    assert_same_run(one, two, weights="last/adapter_model.safetensors")


def test_ddp_half_finetuning_equals_one_process(setup):
    """HFT freezes a different half of every block each round: DDP registers every candidate and
    syncs only what got a gradient; the frozen half stays untouched (no weight decay, no Adam
    moments), as in one process."""
    tmp, cache, corpus, ref = setup
    common = ["--base", ref, "--finetune", "full", "--half-finetune", "--half-round-steps", "2",
              "--data", corpus, "--max-steps", "4", *FLAGS, "--lr", "1e-3"]
    one, two = str(tmp / "hft1"), str(tmp / "hft2")
    assert train.main([*common, "--out", one, "--batch-size", "8"]) == 0
    torchrun(cache, *common, "--out", two, "--batch-size", "4")
    assert_same_run(one, two)


def test_fsdp2_full_finetune_equals_one_process_and_resumes_in_one(setup):
    """FSDP2 runs on CPU with gloo in this torch: sharded full fine-tuning, gathered HF
    checkpoints (from step 0 on: the base model's score), name-keyed full optimizer state that
    a single process resumes from."""
    tmp, cache, corpus, ref = setup
    common = ["--base", ref, "--finetune", "full", "--data", corpus, "--max-steps", "6", *FLAGS,
              "--lr", "1e-3"]
    one, run = str(tmp / "full1"), str(tmp / "fsdp")
    assert train.main([*common, "--out", one, "--batch-size", "8"]) == 0
    ranks(cache, tmp, [[*common, "--out", run, "--batch-size", "4", "--pause-at-step", "3",
                        "--fsdp"]] * 2, timeout=120)
    assert "FSDP2" in read(tmp, 0, "out"), read(tmp, 0) + read(tmp, 1)
    assert_close(trajectory(run), trajectory(one, steps=range(4)))
    assert train.main(["--resume", run, "--no-progress", "--threads", "1"]) == 0
    assert_same_run(one, run)


def test_ddp_full_dpo_equals_one_process(setup):
    """DPO with --finetune full: each rank computes the base's reference log-probs of its share
    of the pairs (gathered: the file rank 0 writes holds one process's figures), trains on its
    pairs of the global batch; losses, rewards, reward accuracy, margins (train and held-out)
    and the weights equal one process's."""
    tmp, cache, _, ref = setup
    rng = random.Random(4)
    words = ["the king", "my lord", "good night", "sweet prince", "to be", "or not", "alas"]
    data = tmp / "prefs.jsonl"
    pairs = [(" ".join(rng.choices(words, k=3)) + " ", *rng.sample(words, 2)) for _ in range(24)]
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                            for p, c, r in pairs))
    common = ["--objective", "dpo", "--base", ref, "--finetune", "full", "--data", str(data),
              "--max-steps", "4", "--beta", "0.5", *ANY_DATA, "--seq-len", "32", "--lr", "1e-3"]
    one, two = str(tmp / "dpo1"), str(tmp / "dpo2")
    assert train.main([*common, "--out", one, "--batch-size", "8"]) == 0
    torchrun(cache, *common, "--out", two, "--batch-size", "4")
    keys = ("train_loss", "rewards_chosen", "rewards_rejected", "reward_acc", "margin",
            "chosen_nll", "val_loss", "val_rewards_chosen", "val_rewards_rejected",
            "val_reward_acc", "val_margin")
    a, b = metrics(one), metrics(two)
    assert [e["step"] for e in a] == [e["step"] for e in b]
    compared = 0
    for x, y in zip(a, b):
        for k in keys:
            assert (k in x) == (k in y), (x["step"], k)
            if k in x:
                assert abs(x[k] - y[k]) <= LOG_TOL, (x["step"], k, x[k], y[k])
                compared += 1
    assert compared >= 4 * 6 and any(e.get("reward_acc", 0) > 0 for e in a), a  # it trained
    assert_same_run(one, two)
    ra, rb = (load_file(os.path.join(run, "reference_logps.safetensors")) for run in (one, two))
    assert ra.keys() == rb.keys() == {"train", "val"}
    for k in ra:
        assert ra[k].shape == rb[k].shape and torch.allclose(ra[k], rb[k], atol=TOL), k


DPO_REFERENCE = """import contextlib, os, sys
import torch
sys.path.insert(0, {root!r})
from engine import distributed, dpo
from engine.config import preset
from engine.model import Transformer
from engine.sft import IGNORE, TokenizedPair

out = sys.argv[1]
distributed.setup("cpu", 60)
r = distributed.rank()
torch.manual_seed(0)
model = Transformer(preset("tiny", vocab_size=64))
gen = torch.Generator().manual_seed(3)

def ids(n):
    return torch.randint(3, 64, (n,), generator=gen).tolist()

def pair(i):  # (prompt, chosen, rejected) of different lengths; EOS 2
    p, c, j = ids(2 + i % 3), ids(1 + i % 2) + [2], ids(2 + i % 4) + [2]
    return TokenizedPair((p + c)[:-1], [IGNORE] * (len(p) - 1) + c,
                         (p + j)[:-1], [IGNORE] * (len(p) - 1) + j, False)

pairs = [pair(i) for i in range(6)]

def task():  # 5 training pairs (odd), 1 held-out (fewer than the ranks)
    return dpo.DPO(dpo.PreferenceSet(pairs[:5], [1, 2, 3, 4, 5], 0),
                   dpo.PreferenceSet(pairs[5:], [6], 0), batch_size=4)

forwards = []  # pairs per forward
real = dpo.sequence_logps
dpo.sequence_logps = lambda m, x, y: (forwards.append(len(x) // 2), real(m, x, y))[1]
got = {{}}
for name, run_dir in (("new", os.path.join(out, "run")),
                      # resumed where only rank 0 sees the file (another machine's directory):
                      # every rank computes again, none waits for the others in vain
                      ("resumed", os.path.join(out, "run" if r == 0 else "elsewhere"))):
    os.makedirs(run_dir, exist_ok=True)
    forwards.clear()
    t = task()
    t.fix_reference(model, "cpu", contextlib.nullcontext(), run_dir, resuming=name == "resumed",
                    write=distributed.is_main(), progress=False)
    got[name] = {{"forwards": list(forwards), "train": t.train.ref, "val": t.val.ref}}
torch.save(got, os.path.join(out, f"rank{{r}}.pt"))
distributed.cleanup()
"""


def test_dpo_reference_log_probs_are_computed_once_across_the_ranks(tmp_path):
    """--finetune full / freeze DPO's reference log-probs in 2 processes: each rank's forwards
    hold only its share of the pairs (every other batch of batch-size / 2 pairs: 5 training
    pairs, not a multiple of 2, and 1 held-out pair, fewer than the ranks), every pair is
    computed exactly once, both ranks end with the same figures bit for bit, those of one
    process, and rank 0's file holds them. A resume where one rank lacks the file has every
    rank compute again (a rank reading it alone would leave the other in the gather)."""
    from safetensors.torch import load_file
    script = tmp_path / "dpo_reference.py"
    script.write_text(DPO_REFERENCE.format(root=ROOT))
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, str(script), str(one)], capture_output=True, text=True,
                       env=env(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reference log-probs: computing them for 5 training + 1 held-out pairs" in r.stdout
    cmd = [*TORCHRUN, "--nproc_per_node", "2", str(script), str(two)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes, each computed its share" in r.stdout, r.stdout
    assert "reference_logps.safetensors was missing on another rank" in r.stdout, r.stdout
    single = torch.load(one / "rank0.pt")
    rank = [torch.load(two / f"rank{q}.pt") for q in range(2)]
    assert single["new"]["forwards"] == [4, 1, 1]  # 4 + 1 training pairs, 1 held-out
    assert single["resumed"]["forwards"] == []  # read from the file
    for name in ("new", "resumed"):
        # 2 pairs a forward: training batches [0, 1], [2, 3], [4]; held-out [0]
        assert rank[0][name]["forwards"] == [2, 1, 1] and rank[1][name]["forwards"] == [2], name
        for split in ("train", "val"):
            a, b, want = rank[0][name][split], rank[1][name][split], single["new"][split]
            assert a == b and list(a) == list(want), (name, split)  # bit-equal across ranks
            for i in want:
                assert a[i] == pytest.approx(want[i], abs=TOL), (name, split, i)
    fa, fb = (load_file(d / "run" / "reference_logps.safetensors") for d in (one, two))
    for split in ("train", "val"):
        assert torch.equal(fb[split], torch.tensor([rank[0]["new"][split][i]
                                                    for i in range(len(fb[split]))]))
        assert fa[split].shape == fb[split].shape and torch.allclose(fa[split], fb[split], atol=TOL)


MAIN_FIRST = """import sys, time
sys.path.insert(0, {root!r})
from engine import distributed

log, failing = sys.argv[1], int(sys.argv[2])
distributed.setup("cpu", 60)
r = distributed.rank()

def note(what):  # O_APPEND: each line lands whole, in the order the ranks wrote them
    with open(log, "a") as f:
        f.write(f"{{what}} {{r}}\\n")

try:
    with distributed.main_first():
        note("enter")
        time.sleep(0.2)
        note("exit")
        if r == failing:
            raise ValueError("bad data")
except ValueError:
    note("failed")
distributed.cleanup()
"""


@pytest.mark.parametrize("failing", [-1, 2])
def test_main_first_runs_rank_0_then_each_node_leader_then_the_rest(tmp_path, failing):
    """4 ranks as torchrun numbers them on 2 nodes of 2 (node 0: ranks 0 and 1, node 1: ranks 2
    and 3; LOCAL_RANK 0, 1, 0, 1): rank 0 runs the block alone, then node 1's first rank (it
    fills that node's caches when WHETSTONE_CACHE is not shared), then ranks 1 and 3 (which read
    their node's). When a rank fails in the block (here node 1's leader), the later ones still
    run it and every rank gets out of main_first."""
    script, log = tmp_path / "main_first.py", tmp_path / "order.log"
    script.write_text(MAIN_FIRST.format(root=ROOT))
    procs = ranks(tmp_path / "cache", tmp_path, [[str(log), str(failing)]] * 4, timeout=120,
                  script=str(script), nodes=2)
    assert [p.returncode for p in procs] == [0] * 4, "".join(read(tmp_path, r) for r in range(4))
    events = [tuple(line.split()) for line in log.read_text().splitlines()]
    print(events)
    assert sorted(events) == sorted([(w, str(r)) for r in range(4) for w in ("enter", "exit")]
                                    + [("failed", str(failing))] * (failing >= 0))
    at = {e: i for i, e in enumerate(events)}
    waves = [[0], [2], [1, 3]]
    for before, after in zip(waves, waves[1:]):  # a wave starts after the one before ended
        assert max(at["exit", str(r)] for r in before) < min(at["enter", str(r)] for r in after), \
            events


def one_clear_line(text: str, needle: str) -> None:
    lines = [line for line in text.strip().splitlines() if "Warning" not in line]
    assert any(needle in line for line in lines) and "Traceback" not in text, text


def test_mismatched_flags_fail_on_every_rank(setup):
    tmp, cache, corpus, _ = setup
    base = ["--data", corpus, "--out", str(tmp / "mismatch"), "--max-steps", "2",
            "--batch-size", "4", *SCRATCH]
    procs = ranks(cache, tmp, [base, [*base, "--lr", "1e-3"]], timeout=120)
    for r, p in enumerate(procs):
        assert p.returncode == 2
        one_clear_line(read(tmp, r), "flags differ across ranks: rank 1 has --lr 0.001 but rank 0 "
                                     "has 0.003")


def only_line(text: str, expected: str) -> None:
    """stderr is exactly `expected` (besides Python warnings): no traceback, no C++ log lines."""
    lines = [line for line in text.strip().splitlines()
             if "Warning" not in line and "warnings.warn" not in line]
    assert lines == [expected], text


def test_world_size_must_divide_the_global_batch(setup):
    tmp, cache, corpus, _ = setup
    run = str(tmp / "odd")
    assert train.main(["--data", corpus, "--out", run, "--max-steps", "2", "--batch-size", "3",
                       "--pause-at-step", "1", *SCRATCH]) == 0
    procs = ranks(cache, tmp, [["--resume", run, "--no-progress"]] * 2, timeout=120)
    for r, p in enumerate(procs):
        assert p.returncode == 2, read(tmp, r)
        one_clear_line(read(tmp, r), "global batch of 3 rows (--batch-size x world size) does not "
                                     "divide among 2 processes")


def test_bad_data_on_rank_0_fails_every_rank_with_the_real_error(tmp_path):
    """Rank 0 prepares the data first (main_first); when that fails, the other ranks are
    released, meet the same error and say so, instead of reporting a lost rank 0."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = ["--data", str(empty), "--out", str(tmp_path / "o"), "--max-steps", "4", *SCRATCH]
    procs = ranks(tmp_path / "cache", tmp_path, [args, args], timeout=120)
    for r, p in enumerate(procs):
        assert p.returncode == 2, read(tmp_path, r)
        one_clear_line(read(tmp_path, r), f"error: corpus {empty} is empty")
        assert "lost contact" not in read(tmp_path, r)


def test_a_rank_that_fails_alone_stops_the_others_with_its_error(setup, tmp_path):
    """Rank 1's copy of the data is bad (the same path on another machine): rank 0 has moved on
    into a collective, loses contact when rank 1 exits, and names rank 1's error (from the
    store) rather than a lost process; rank 1's wait for the others logs nothing."""
    _, cache, corpus, _ = setup
    for r in (0, 1):
        os.makedirs(tmp_path / f"machine{r}")
    shutil.copy(corpus, tmp_path / "machine0" / "corpus.txt")
    (tmp_path / "machine1" / "corpus.txt").write_text("")
    args = ["--data", "corpus.txt", "--out", str(tmp_path / "o"), "--max-steps", "4",
            "--batch-size", "4", *SCRATCH]
    procs = ranks(cache, tmp_path, [args, args], timeout=120,
                  cwds=[tmp_path / "machine0", tmp_path / "machine1"])
    assert [p.returncode for p in procs] == [2, 2], read(tmp_path, 0) + read(tmp_path, 1)
    only_line(read(tmp_path, 1), "error: corpus corpus.txt is empty")
    only_line(read(tmp_path, 0), "error: rank 0: stopped because rank 1 failed: corpus corpus.txt "
                                 "is empty")


FAIL_TOGETHER = """import sys, time
import torch.distributed as tdist
sys.path.insert(0, {root!r})
from engine import distributed

distributed.setup("cpu", 60)
if distributed.rank() == 0:
    time.sleep(0.3)  # rank 1 fails first and polls the store for rank 0's error
else:  # ... sleeping between its polls long enough that rank 0 (the store's host) could leave
    sleep = time.sleep
    distributed.time.sleep = lambda s: sleep(1.0)
e = ValueError("bad data")
print(f"error: {{e}}", file=sys.stderr)
distributed.fail_together(e)
if tdist.is_initialized():
    print("process group left to interpreter exit", file=sys.stderr)
sys.exit(2)
"""


def test_fail_together_keeps_the_store_until_every_rank_is_done_with_it(tmp_path):
    """Launched without torchrun's agent, rank 0 hosts the rendezvous store. Rank 0 left as soon
    as it saw every rank's error, while rank 1 could still be polling: rank 1 lost the store, its
    stderr got a C++ stack dump after the error line, and its process group was left to
    interpreter exit (which can die with SIGABRT instead of exit status 2)."""
    script = tmp_path / "fail_together.py"
    script.write_text(FAIL_TOGETHER.format(root=ROOT))
    procs = ranks(tmp_path / "cache", tmp_path, [[], []], timeout=60, script=str(script),
                  agent_store=False)
    assert [p.returncode for p in procs] == [2, 2], read(tmp_path, 0) + read(tmp_path, 1)
    for r in (0, 1):
        only_line(read(tmp_path, r), "error: bad data")


FAIL_TO_SAVE = """import os, runpy, sys
sys.path.insert(0, {root!r})
from engine import finetune
real = finetune.save_trained
def failing(model, tok, directory, *a, **k):  # rank 0's disk fills up at the first last/
    if os.environ["RANK"] == "0" and directory.rstrip("/").endswith("last.new"):
        raise OSError(28, "No space left on device")
    return real(model, tok, directory, *a, **k)
finetune.save_trained = failing
sys.argv = [{train!r}, *sys.argv[1:]]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_rank_0_failing_to_write_a_checkpoint_releases_the_waiting_ranks(setup, tmp_path):
    """The other ranks wait for rank 0's checkpoint through the store, which under torchrun
    outlives rank 0 (its agent holds it): rank 0's error releases them with its message, at
    once, instead of a wait for a lost store (or forever)."""
    _, cache, corpus, _ = setup
    script = tmp_path / "fail_to_save.py"
    script.write_text(FAIL_TO_SAVE.format(root=ROOT, train=os.path.join(ROOT, "train.py")))
    args = ["--data", corpus, "--out", str(tmp_path / "o"), "--max-steps", "6", "--batch-size",
            "4", *SCRATCH]
    t = time.time()
    procs = ranks(cache, tmp_path, [args, args], timeout=120, script=str(script))
    print(f"both ranks exited {time.time() - t:.1f}s after the start")
    assert [p.returncode for p in procs] == [2, 2], read(tmp_path, 0) + read(tmp_path, 1)
    only_line(read(tmp_path, 0), "error: [Errno 28] No space left on device")
    only_line(read(tmp_path, 1), "error: rank 1: stopped because rank 0 failed while writing a "
                                 "checkpoint: [Errno 28] No space left on device")


ACCUMULATE = """import sys
import torch
sys.path.insert(0, {root!r})
from engine import distributed
from engine.config import preset
from engine.model import Transformer
from engine.trainer import configure_optimizer

mode, out = sys.argv[1:]
dev = distributed.setup("cpu", 60)
torch.manual_seed(0)
model = Transformer(preset("tiny", vocab_size=64))
if mode == "fsdp":
    distributed.shard_model(model, dev)
net = distributed.data_parallel(model, configure_optimizer(model, 1e-2, 0.1, (0.9, 0.95)), dev)
calls = []  # gradient reductions (DDP: all-reduce per bucket; FSDP2: reduce-scatter per group)
if mode == "ddp":
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    def hook(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)
    net.register_comm_hook(None, hook)
else:
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group
    real = group.foreach_reduce
    group.foreach_reduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
x = torch.randint(64, (3, 8, 9), generator=torch.Generator().manual_seed(1))  # 3 micro x 8 rows
syncs = []
for m in range(3):
    before = len(calls)
    with distributed.accumulating(net, sync=m == 2):
        (net(distributed.shard(x[m, :, :-1]), labels=distributed.shard(x[m, :, 1:])) / 3).backward()
    syncs.append(len(calls) - before)
grads = {{n: getattr(p.grad, "full_tensor", lambda: p.grad)() for n, p in model.named_parameters()}}
if distributed.is_main():
    torch.save({{"syncs": syncs, "grads": grads}}, out)
distributed.cleanup()
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_accumulation_reduces_gradients_once_on_the_last_micro_step(tmp_path, mode):
    """3 micro-steps on 2 ranks: no reduction on the first two (DDP no_sync, FSDP2 without
    gradient sync), one on the last, and the accumulated gradients equal one process's over
    the whole batch (an all-reduce per micro-step would give the same numbers: hence the count)."""
    from engine.config import preset
    from engine.model import Transformer
    script, out = tmp_path / "accumulate.py", tmp_path / "grads.pt"
    script.write_text(ACCUMULATE.format(root=ROOT))
    cmd = [*TORCHRUN, "--nproc_per_node", "2", str(script), mode, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64))
    x = torch.randint(64, (3, 8, 9), generator=torch.Generator().manual_seed(1))
    for m in range(3):
        (model(x[m, :, :-1], labels=x[m, :, 1:]) / 3).backward()
    assert got["syncs"][:2] == [0, 0] and got["syncs"][2] > 0, got["syncs"]
    worst = max((got["grads"][n] - p.grad).abs().max().item() for n, p in model.named_parameters())
    largest = max(p.grad.abs().max().item() for p in model.parameters())
    print(f"{mode}: reductions per micro-step {got['syncs']}, worst gradient difference "
          f"{worst:.1e} (largest gradient {largest:.1e})")
    assert worst < 1e-6 < largest * 1e-3


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_lost_rank_makes_the_other_exit_with_a_message(setup, how):
    """Rank 1 is killed (or stopped) mid-run: rank 0 exits on its own, with one clear line,
    within --dist-timeout (plus start-up slack) instead of waiting forever."""
    tmp, cache, corpus, _ = setup
    timeout = 4
    args = ["--data", corpus, "--out", str(tmp / f"lost-{how}"), "--max-steps", "100000",
            "--batch-size", "4", "--dist-timeout", str(timeout), *SCRATCH, "--eval-every", "100000"]
    p0, p1 = ranks(cache, tmp, [args, args])
    try:
        deadline = time.time() + 120
        while "step 2:" not in read(tmp, 0, "out"):
            assert time.time() < deadline and p0.poll() is None, read(tmp, 0) + read(tmp, 1)
            time.sleep(0.2)
        os.kill(p1.pid, signal.SIGKILL if how == "dies" else signal.SIGSTOP)
        t = time.time()
        rc = p0.wait(timeout=timeout + 60)
        print(f"rank 1 {how}: rank 0 exited after {time.time() - t:.1f}s")
    finally:
        for p in (p0, p1):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert rc == 2
    one_clear_line(read(tmp, 0), "rank 0: lost contact with the other ranks")


def test_rows_and_weights_partition_the_global_batch(monkeypatch):
    """shard / shard_mean without processes: contiguous blocks covering every row once, and
    per-rank losses weighted so their average is the global token mean."""
    batch = torch.arange(7)
    values = torch.tensor([3.0, 1, 4, 1, 5, 9, 2])  # a per-row loss
    for world in (1, 2, 3, 4, 8):
        rows, parts = [], []
        for r in range(world):
            monkeypatch.setattr(distributed, "_rank", r)
            monkeypatch.setattr(distributed, "_world", world)
            rows += distributed.shard(batch).tolist()
            mean = distributed.shard_mean(batch, lambda b: values[b].mean(), len)
            parts.append(float(mean))
        assert rows == list(range(7))
        assert sum(parts) / world == pytest.approx(values.mean().item())
    monkeypatch.setattr(distributed, "_world", 4)
    assert distributed.per_rank_batch(8) == 2
    with pytest.raises(ValueError, match="global batch of 6 rows .* does not divide among 4"):
        distributed.per_rank_batch(6)


def test_each_task_trains_only_its_rows_of_the_shared_global_batch(monkeypatch):
    """LM windows, SFT rows and DPO pairs: every rank draws the same global batch (of 6 rows) from
    the same generator state and gives the model only its block of rows; the blocks, in rank
    order, are exactly what one process trains on."""
    import numpy as np
    from engine.data import TokenSplit
    from engine.dpo import DPO
    from engine.sft import SFTDataset
    from engine.tasks import LMTask, SFTTask

    split = TokenSplit(np.arange(500, dtype=np.uint16), 1000)
    sft = SFTDataset([([i, i + 1, i + 2], [-100, i + 2, i + 3]) for i in range(10, 60, 3)], 8, 0)
    pairs = SimpleNamespace(pairs=[SimpleNamespace(chosen_ids=[1], rejected_ids=[2])] * 20,
                            sample=lambda n, g: torch.randint(20, (n,), generator=g).tolist())
    seen = []
    monkeypatch.setattr(DPO, "loss", lambda self, m, data, idx, device: (
        seen.append(list(idx)), (torch.zeros(len(idx)),) * 4)[1])  # losses, rc, rr, nll

    def model(x, labels=None, **kw):  # records the rows it is given
        seen.append(x.tolist())
        return x.float().mean() * 0 + 1.0

    tasks = {"lm": lambda gen: LMTask(split, split, 6, 8, 1),
             "sft": lambda gen: SFTTask(sft, sft, 6, gen),
             "dpo": lambda gen: DPO(pairs, None, 6)}
    for name, make in tasks.items():
        per_rank = {}
        for world, rank in ((1, 0), (2, 0), (2, 1)):
            monkeypatch.setattr(distributed, "_rank", rank)
            monkeypatch.setattr(distributed, "_world", world)
            seen.clear()
            gen = torch.Generator().manual_seed(5)
            task = make(gen)
            for _ in range(2):
                task.train_step(model, gen, "cpu")
            per_rank[world, rank] = list(seen)
        for k in range(2):
            assert per_rank[2, 0][k] + per_rank[2, 1][k] == per_rank[1, 0][k], name
            assert len(per_rank[2, 0][k]) == 3, name
