"""DPO (engine/dpo.py, train.py --objective dpo): loss and gradients against a hand-computed
reference on a tiny model (log-probs by explicit per-token log_softmax gather over unpadded
sequences, reference from a separate copy of the base weights), conservative-DPO formula,
reference = base under disabled adapters, an end-to-end run that learns a trivial preference,
resume, and bad input."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from engine import dpo  # noqa: E402
from engine.config import preset  # noqa: E402
from engine.lora import apply_lora, disable_adapters, lora_layers  # noqa: E402
from engine.model import Transformer  # noqa: E402
from engine.sft import load_preferences  # noqa: E402
from tokenizer.base import Tokenizer  # noqa: E402


class CharTok(Tokenizer):
    """One id per ASCII character (10 + code point); BOS 1, EOS 2; no chat template."""

    def __init__(self):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id, self.add_bos = 140, 1, 2, None, True

    def encode(self, text, add_bos=None, add_eos=False, parse_special=True):
        bos = self.add_bos if add_bos is None else add_bos
        return [1] * bos + [10 + ord(c) for c in text] + [2] * add_eos

    def decode(self, ids, skip_special=False):
        return "".join(chr(i - 10) for i in ids if i >= 10)

    def save(self, directory):
        raise NotImplementedError


PAIRS = [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five, I think"},
         {"prompt": "Say hi", "chosen": " hello there", "rejected": " no"},
         {"prompt": "Color of sky:", "chosen": " blue", "rejected": " green"}]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def tiny_lora_model(seed=0):
    """(policy with non-zero LoRA, separate base copy without LoRA)."""
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=140)
    base = Transformer(cfg).eval()
    policy = Transformer(cfg).eval()
    policy.load_state_dict(base.state_dict())
    apply_lora(policy, targets="all-linear", r=4, alpha=8)
    with torch.no_grad():
        for lay in lora_layers(policy).values():
            lay.lora_B.weight.normal_(0, 0.05)  # policy != reference
    return policy, base


def explicit_logp(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    """log p(ids[n_prompt:] | ids[:n_prompt]) by log_softmax + gather, one unpadded sequence."""
    logits = model(torch.tensor([ids]))[0]                                 # (T, V)
    logp = torch.log_softmax(logits.double(), dim=-1)
    return sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids)))


@pytest.mark.parametrize("rpo_alpha", [0.0, 0.7])
def test_loss_and_gradients_equal_hand_computed_reference(tmp_path, rpo_alpha):
    policy, base = tiny_lora_model()
    tok = CharTok()
    raw, _ = load_preferences(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    data, _ = dpo.PreferenceSet.tokenize(raw, tok, seq_len=64)
    beta, ls = 0.5, 0.1
    trainer = dpo.DPO(data, data, batch_size=3, beta=beta, label_smoothing=ls, rpo_alpha=rpo_alpha)
    losses, rc, rr, nll = trainer.loss(policy, data, [0, 1, 2], "cpu")
    loss = losses.mean()
    loss.backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    policy.zero_grad()

    # By hand: prompt = BOS + prompt chars; completion = its chars + EOS.
    ref_losses, ref_rc, ref_rr, ref_nll = [], [], [], []
    for p in PAIRS:
        prompt = [1] + [10 + ord(c) for c in p["prompt"]]
        seqs = [prompt + [10 + ord(c) for c in p[k]] + [2] for k in ("chosen", "rejected")]
        pi = [explicit_logp(policy, s, len(prompt)) for s in seqs]
        with torch.no_grad():
            ref = [explicit_logp(base, s, len(prompt)) for s in seqs]
        z = beta * ((pi[0] - ref[0]) - (pi[1] - ref[1]))
        chosen_nll = -pi[0] / (len(p["chosen"]) + 1)  # per completion token (EOS included)
        ref_losses.append(-(1 - ls) * torch.log(torch.sigmoid(z)) - ls * torch.log(torch.sigmoid(-z))
                          + rpo_alpha * chosen_nll)
        ref_nll.append(chosen_nll.item())
        ref_rc.append(beta * (pi[0] - ref[0]).item())
        ref_rr.append(beta * (pi[1] - ref[1]).item())
    ref_loss = torch.stack(ref_losses).mean()
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    assert rc.tolist() == pytest.approx(ref_rc, abs=1e-5)
    assert rr.tolist() == pytest.approx(ref_rr, abs=1e-5)
    assert nll.tolist() == pytest.approx(ref_nll, abs=1e-5)
    worst = 0.0
    for n, p in policy.named_parameters():
        if p.requires_grad:
            g = p.grad.to(ours[n].dtype)
            worst = max(worst, (ours[n] - g).abs().max().item() / (g.abs().max().item() + 1e-12))
    assert ours and worst < 1e-4, f"worst relative gradient mismatch {worst:.2e}"
    assert all(not p.requires_grad or "lora_" in n for n, p in policy.named_parameters())


def test_label_smoothing_formula_and_gradient():
    # conservative DPO: eric-mitchell/direct-preference-optimization trainers.py preference_loss
    # (label_smoothing) and TRL 0.x DPOTrainer.dpo_loss, loss_type="sigmoid":
    #   -(1 - ls) * logsigmoid(beta * z) - ls * logsigmoid(-beta * z)
    pc, pr = torch.tensor([-3.0, -1.0, -7.0], requires_grad=True), torch.tensor([-2.0, -4.0, -7.5])
    rc, rr = torch.tensor([-2.5, -1.5, -6.0]), torch.tensor([-2.5, -3.0, -7.0])
    for beta, ls in ((0.1, 0.0), (0.3, 0.25)):
        losses, c, r = dpo.dpo_loss(pc, pr, rc, rr, beta, ls)
        for i in range(3):
            z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
            sig = 1 / (1 + math.exp(-z))
            assert losses[i].item() == pytest.approx(
                -(1 - ls) * math.log(sig) - ls * math.log(1 - sig), rel=1e-6)
            assert c[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
            assert r[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())
        (g,) = torch.autograd.grad(losses.sum(), pc)
        for i in range(3):  # d/dpc = beta * (-(1 - ls) (1 - sigmoid(z)) + ls sigmoid(z))
            z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
            sig = 1 / (1 + math.exp(-z))
            assert g[i].item() == pytest.approx(beta * (-(1 - ls) * (1 - sig) + ls * sig), rel=1e-5)
    s = dpo.summarize(*dpo.dpo_loss(pc, pr, rc, rr, 0.1))
    # chosen ratios (-0.5, 0.5, -1), rejected (0.5, -1, -0.5): only pair 2 ranks chosen higher
    assert s["reward_acc"] == pytest.approx(1 / 3, abs=1e-6)
    assert s["margin"] == pytest.approx(0.1 * (-1.0 + 1.5 - 0.5) / 3, abs=1e-6)
    assert s["rewards_chosen"] == pytest.approx(0.1 * (-0.5 + 0.5 - 1.0) / 3, abs=1e-6)


def test_ipo_and_hinge_formulas_and_gradients():
    """TRL 1.16 dpo_trainer.py: hinge = relu(1 - beta * delta); ipo = (delta_avg - 1/(2 beta))^2
    with delta_avg = chosen log-ratio / chosen completion tokens - rejected log-ratio / rejected
    completion tokens. Rewards stay beta * log-ratio (sums) for both, as TRL logs them."""
    pc = torch.tensor([-3.0, -1.0, -70.0], requires_grad=True)
    pr = torch.tensor([-2.0, -4.0, -7.5])
    rc, rr = torch.tensor([-2.5, -1.5, -60.0]), torch.tensor([-2.5, -3.0, -7.0])
    nc, nr = torch.tensor([3, 1, 20]), torch.tensor([5, 2, 0])  # 0: clamped to 1, as TRL
    beta = 0.2
    for loss_type in ("hinge", "ipo"):
        losses, c, r = dpo.dpo_loss(pc, pr, rc, rr, beta, 0.0, loss_type, nc, nr)
        (g,) = torch.autograd.grad(losses.sum(), pc)
        for i in range(3):
            cr, rj = (pc[i] - rc[i]).item(), (pr[i] - rr[i]).item()
            if loss_type == "hinge":
                want, dwant = max(0.0, 1 - beta * (cr - rj)), (-beta if 1 - beta * (cr - rj) > 0 else 0.0)
            else:
                d = cr / max(nc[i].item(), 1) - rj / max(nr[i].item(), 1)
                want, dwant = (d - 1 / (2 * beta)) ** 2, 2 * (d - 1 / (2 * beta)) / max(nc[i].item(), 1)
            assert losses[i].item() == pytest.approx(want, rel=1e-6), (loss_type, i)
            assert g[i].item() == pytest.approx(dwant, rel=1e-5, abs=1e-7), (loss_type, i)
            assert c[i].item() == pytest.approx(beta * cr) and r[i].item() == pytest.approx(beta * rj)
    # deltas -1, 1.5, -9.5: with beta 5 pair 1 is past the hinge (zero loss, zero gradient)
    losses = dpo.dpo_loss(pc, pr, rc, rr, 5.0, loss_type="hinge")[0]
    assert losses.tolist() == pytest.approx([6.0, 0.0, 48.5])
    (g,) = torch.autograd.grad(losses.sum(), pc)
    assert g.tolist() == pytest.approx([-5.0, 0.0, -5.0])
    with pytest.raises(ValueError, match="completion token count"):
        dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo")
    with pytest.raises(ValueError, match="--label-smoothing applies only to --dpo-loss sigmoid"):
        dpo.DPO(None, None, 2, beta, label_smoothing=0.1, loss_type="ipo")


def test_fresh_adapter_starts_at_log2(tmp_path):
    # LoRA B = 0 at init: policy = reference, so every pair's loss is log 2 and rewards are 0.
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=140))
    apply_lora(model, targets="all-linear", r=4)
    raw, _ = load_preferences(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    data, _ = dpo.PreferenceSet.tokenize(raw, CharTok(), seq_len=64)
    trainer = dpo.DPO(data, data, batch_size=2, beta=0.1)
    loss = trainer.train_step(model, torch.Generator().manual_seed(0), "cpu")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    logged = trainer.log()
    assert logged.pop("chosen_nll") > 0
    assert logged == {"train_loss": pytest.approx(math.log(2), abs=1e-5), "rewards_chosen": 0.0,
                      "rewards_rejected": 0.0, "reward_acc": 0.0, "margin": 0.0}


def test_reference_is_base_under_disabled_adapters(tmp_path):
    policy, base = tiny_lora_model()
    x = torch.randint(10, 140, (2, 12))
    with torch.no_grad(), disable_adapters(policy):
        assert torch.equal(policy(x), base(x))
    with torch.no_grad():
        assert not torch.allclose(policy(x), base(x))  # adapters back on afterwards
    # The cached reference log-probs are the base model's, for every pair.
    raw, _ = load_preferences(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    data, _ = dpo.PreferenceSet.tokenize(raw, CharTok(), seq_len=64)
    xb, yb = data.collate([2, 0], "cpu")
    c, r = dpo.reference_logps(policy, data, [2, 0], xb, yb)
    with torch.no_grad():
        want = dpo.sequence_logps(base, xb, yb)
    assert torch.allclose(torch.cat([c, r]), want, atol=1e-5)
    assert set(data.ref) == {0, 2}
    data.ref[0] = (1.0, 2.0)  # cached: not recomputed
    assert dpo.reference_logps(policy, data, [0], *data.collate([0], "cpu"))[0].item() == 1.0
    with pytest.raises(ValueError, match="adapters disabled"):
        dpo.reference_logps(base, data, [1], *data.collate([1], "cpu"))


def test_without_adapters_reference_is_precomputed_from_the_initial_weights(tmp_path):
    """--finetune full / freeze: every pair's reference log-probs are computed once, before the
    first step, from the initial weights (eval mode, no_grad, batched): equal to a direct
    computation with a separate copy of the base, pair by pair; the first step's loss is log 2
    (policy = reference); after the weights move the reference does not; the stored file
    restores the same figures and refuses other pairs."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=140))
    base = Transformer(preset("tiny", vocab_size=140)).eval()
    base.load_state_dict(model.state_dict())
    tok = CharTok()
    raw, _ = load_preferences(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    train_set, _ = dpo.PreferenceSet.tokenize(raw, tok, seq_len=64)
    val_set, _ = dpo.PreferenceSet.tokenize(raw[1:], tok, seq_len=64)
    task = dpo.DPO(train_set, val_set, batch_size=2, beta=0.5)
    with pytest.raises(ValueError, match="precomputed from the initial weights"):
        task.train_step(model, torch.Generator().manual_seed(0), "cpu")  # no adapters, no reference
    path, said = str(tmp_path / dpo.REFERENCE_FILE), []
    model.train()
    task.fix_reference(model, "cpu", torch.autocast("cpu", enabled=False), str(tmp_path), resuming=False,
                       progress=False, say=said.append)
    assert model.training and "3 training + 2 held-out pairs" in said[0] and len(said) == 2
    for data, rows in ((train_set, PAIRS), (val_set, PAIRS[1:])):
        assert sorted(data.ref) == list(range(len(rows)))
        for i, p in enumerate(rows):  # prompt = BOS + its chars; completion = its chars + EOS
            prompt = [1] + [10 + ord(ch) for ch in p["prompt"]]
            with torch.no_grad():
                want = [explicit_logp(base, prompt + [10 + ord(ch) for ch in p[k]] + [2], len(prompt))
                        for k in ("chosen", "rejected")]
            assert data.ref[i] == pytest.approx([w.item() for w in want], abs=1e-5)
    ref_before = dict(train_set.ref)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = task.train_step(model, torch.Generator().manual_seed(0), "cpu")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    opt.step()
    moved = task.loss(model, train_set, [0, 1, 2], "cpu")[0]
    assert train_set.ref == ref_before and abs(moved.mean().item() - math.log(2)) > 1e-3
    # the stored file: the same figures in a fresh task; other pairs are refused
    fresh_train, _ = dpo.PreferenceSet.tokenize(raw, tok, seq_len=64)
    fresh_val, _ = dpo.PreferenceSet.tokenize(raw[1:], tok, seq_len=64)
    fresh = dpo.DPO(fresh_train, fresh_val, batch_size=2)
    fresh.fix_reference(model, "cpu", None, str(tmp_path), resuming=True, say=said.append)  # no compute
    assert fresh_train.ref == ref_before and fresh_val.ref == val_set.ref and "read from" in said[-1]
    other, _ = dpo.PreferenceSet.tokenize(raw[:2], tok, seq_len=64)
    with pytest.raises(ValueError, match="the training data differs from the one the run"):
        dpo.load_reference(path, dpo.DPO(other, fresh_val, batch_size=2))
    open(path, "wb").write(b"not safetensors")
    with pytest.raises(ValueError, match="is damaged"):
        dpo.load_reference(path, fresh)


def test_a_reference_file_of_another_base_is_refused(tmp_path):
    """The file records the --base its figures came from: a resume whose --base differs (a file
    copied from another run) is refused with one line; files without a base name (or from a
    run without one) still load, and so does any file when the base is not known."""
    from safetensors.torch import load_file, save_file
    tok = CharTok()
    raw, _ = load_preferences(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    tr, _ = dpo.PreferenceSet.tokenize(raw, tok, seq_len=64)
    va, _ = dpo.PreferenceSet.tokenize(raw[1:], tok, seq_len=64)
    tr.ref = {i: (-1.0 - i, -2.0 - i) for i in range(3)}
    va.ref = {i: (-3.0 - i, -4.0 - i) for i in range(2)}
    task, path = dpo.DPO(tr, va, batch_size=2), str(tmp_path / dpo.REFERENCE_FILE)
    dpo.save_reference(path, task, "models/a")
    with pytest.raises(ValueError, match=r"holds the reference log-probs of --base models/a, not "
                                         r"of this run's --base models/b \(delete it"):
        task.fix_reference(None, "cpu", None, str(tmp_path), resuming=True, base="models/b",
                           say=lambda line: None)
    for base in ("models/a", None):
        task.train.ref = {}
        dpo.load_reference(path, task, base)
        assert task.train.ref == {i: (-1.0 - i, -2.0 - i) for i in range(3)}
    tensors = load_file(path)
    for meta in ({"train_key": tr.key, "val_key": va.key},  # no base name
                 {"train_key": tr.key, "val_key": va.key, "base": "None"}):
        save_file(tensors, path, metadata=meta)
        task.val.ref = {}
        dpo.load_reference(path, task, "models/b")
        assert task.val.ref == {i: (-3.0 - i, -4.0 - i) for i in range(2)}


@pytest.mark.parametrize("world", [2, 3])
def test_precompute_reference_gives_each_rank_its_share_of_the_batches(tmp_path, monkeypatch,
                                                                       world):
    """Under torchrun (simulated here: rank and world size set, the gather handed the ranks'
    results; tests/test_distributed.py runs it in 2 processes): each rank's forwards hold only
    its batches (every world-th), together every pair exactly once, and every rank ends with the
    one-process figures: for 5 pairs (not a multiple of the ranks) and 1 (fewer than the ranks)."""
    from engine import distributed
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=140))
    rows = PAIRS + [{"prompt": "Yes?", "chosen": " yes", "rejected": " nope"},
                    {"prompt": "1+1=", "chosen": " 2", "rejected": " 11"}]
    raw, _ = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    off = torch.autocast("cpu", enabled=False)
    seen = []  # pairs per forward
    real = dpo.sequence_logps
    monkeypatch.setattr(dpo, "sequence_logps", lambda m, x, y: (seen.append(len(x) // 2),
                                                                 real(m, x, y))[1])
    for n in (5, 1):
        one, _ = dpo.PreferenceSet.tokenize(raw[:n], CharTok(), seq_len=64)
        dpo.precompute_reference(model, one, 4, "cpu", off)
        local, forwards, refs = {}, {}, {}
        for phase in ("compute", "gather"):
            for r in range(world):
                monkeypatch.setattr(distributed, "_rank", r)
                monkeypatch.setattr(distributed, "_world", world)
                monkeypatch.setattr(distributed, "all_gather_rows", lambda t: (
                    local.__setitem__(r, t), [t] * world)[1] if phase == "compute"
                    else [local[q] for q in range(world)])
                data, _ = dpo.PreferenceSet.tokenize(raw[:n], CharTok(), seq_len=64)
                seen.clear()
                dpo.precompute_reference(model, data, 2, "cpu", off)
                forwards[r], refs[r] = list(seen), data.ref
        batches = [min(2, n - b) for b in range(0, n, 2)]  # pairs of each batch of 2
        for r in range(world):
            assert forwards[r] == batches[r::world], (n, r)
            assert refs[r] == refs[0] and list(refs[r]) == list(range(n))  # bit-equal
            for i in range(n):
                assert refs[r][i] == pytest.approx(one.ref[i], abs=1e-5), (n, i)
        assert sum(map(sum, forwards.values())) == n


# ---------------------------------------------------------------------------------------------
# train.py end to end
# ---------------------------------------------------------------------------------------------
FLAGS = ["--batch-size", "8", "--seq-len", "48", "--no-progress", "--threads", "1",
         "--warmup-steps", "2", "--log-every", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained base (train.py from scratch) and a trivially learnable preference set:
    the answer ' yes' is preferred over ' no' after any question."""
    tmp = tmp_path_factory.mktemp("dpo")
    os.environ["WHETSTONE_CACHE"] = str(tmp / "cache")
    rng = random.Random(2)
    words = ["is it", "yes", "no", "the sky", "blue", "a cat", "maybe", "Q:", "A:"]
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(6)) for _ in range(800)))
    run = str(tmp / "base")
    assert train.main(["--data", str(corpus), "--out", run, "--preset", "tiny", "--vocab-size", "300",
                       "--max-steps", "20", "--eval-every", "20", "--lr", "3e-3", *FLAGS]) == 0
    topics = ["the sky blue", "a cat", "it maybe", "the cat blue", "it a sky", "the sky a cat"]
    rows = [{"prompt": f"Q: is {rng.choice(topics)} {i}? A:", "chosen": " yes", "rejected": " no"}
            for i in range(60)]
    return run, write_jsonl(tmp / "prefs.jsonl", rows), tmp


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_end_to_end_learns_preference_and_saves_adapter(base):
    run_base, prefs, tmp = base
    out = str(tmp / "dpo-run")
    assert train.main(["--objective", "dpo", "--base", run_base, "--finetune", "lora", "--data", prefs,
                       "--out", out, "--max-steps", "16", "--eval-every", "8", "--lr", "2e-2",
                       "--lora-r", "4", "--beta", "0.5", *FLAGS, "--log-every", "1"]) == 0
    ev = metrics(out)
    logs = [e for e in ev if "reward_acc" in e]
    vals = [e for e in ev if "val_reward_acc" in e and not e.get("final")]
    final = ev[-1]
    assert final["final"] and final["val_reward_acc"] >= 0.9 and final["val_margin"] > 0
    assert final["val_loss"] < math.log(2) - 0.05  # DPO loss starts at log 2 (policy = reference)
    assert logs[0]["step"] == 1 and logs[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert logs[0]["reward_acc"] == 0 and logs[-1]["reward_acc"] == 1 and logs[-1]["margin"] > 0.3
    assert all(k in logs[0] for k in ("rewards_chosen", "rewards_rejected", "margin"))
    assert {"val_rewards_chosen", "val_rewards_rejected", "val_margin"} <= set(vals[0])
    # Output: a PEFT adapter, loadable on the base; its held-out reward accuracy reproduces.
    assert os.path.isfile(os.path.join(out, "adapter_config.json"))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    from engine.hub import load_model
    model, tok = load_model(run_base, adapter=out)
    with open(os.path.join(out, "run_args.json")) as f:
        assert json.load(f)["objective"] == "dpo"
    tr, va, _ = dpo.load_preference_data(prefs, tok, 48, 0.1)
    res = dpo.DPO(tr, va, 8, beta=0.5).evaluate(model, "cpu", torch.autocast("cpu", enabled=False))
    assert res["val_reward_acc"] == pytest.approx(final["val_reward_acc"])
    assert res["val_loss"] == pytest.approx(final["val_loss"], rel=1e-4)


def assert_same_metrics(a: list[dict], b: list[dict], tag: str = "") -> None:
    """Two runs' metrics.jsonl events: the same steps, each DPO figure within 1e-5."""
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for x, y in zip(a, b):
        for k in ("train_loss", "reward_acc", "margin", "val_loss", "val_margin"):
            assert (k in x) == (k in y)
            if k in x:
                assert x[k] == pytest.approx(y[k], abs=1e-5), (tag, x["step"], k)


def test_resume_identical(base):
    run_base, prefs, tmp = base
    common = ["--objective", "dpo", "--base", run_base, "--finetune", "qlora", "--data", prefs,
              "--max-steps", "8", "--eval-every", "4", "--lr", "1e-2", "--lora-r", "4", *FLAGS]
    full, part = str(tmp / "r-full"), str(tmp / "r-part")
    assert train.main([*common, "--out", full]) == 0
    assert train.main([*common, "--out", part, "--pause-at-step", "4"]) == 0
    assert train.main(["--resume", part, "--no-progress", "--threads", "1"]) == 0
    assert_same_metrics(metrics(full), metrics(part))


def test_full_finetune_dpo_end_to_end(base, monkeypatch):
    """--finetune full: the reference log-probs are computed once from --base before the step-0
    evaluation (whose loss is then exactly log 2), stored in the run, and equal the base's own
    log-probs of every pair; no second model is built (the reference is not a copy); the
    preference is learned and the output is a full model directory."""
    run_base, prefs, tmp = base
    from engine import model as model_mod
    from engine.hub import load_model
    built = []
    init = model_mod.Transformer.__init__
    monkeypatch.setattr(model_mod.Transformer, "__init__",
                        lambda self, *a, **k: (built.append(self), init(self, *a, **k))[1])
    out = str(tmp / "dpo-full")
    assert train.main(["--objective", "dpo", "--base", run_base, "--finetune", "full", "--data", prefs,
                       "--out", out, "--max-steps", "10", "--eval-every", "5", "--lr", "3e-3",
                       "--beta", "0.5", *FLAGS, "--log-every", "1"]) == 0
    monkeypatch.undo()
    # one model with real weights (the others are meta-device skeletons the loaders read names
    # from): the base, loaded once, is also the reference
    real = [m for m in built if any(p.device.type != "meta" for p in m.parameters())]
    assert len(real) == 1, f"{len(real)} models with weights"
    ev = metrics(out)
    assert ev[0]["step"] == 0 and ev[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert ev[0]["val_margin"] == 0 and ev[0]["val_reward_acc"] == 0
    logs = [e for e in ev if "reward_acc" in e]
    assert logs[0]["step"] == 1 and logs[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert ev[-1]["final"] and ev[-1]["val_loss"] < math.log(2) - 0.05 and ev[-1]["val_margin"] > 0
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    from safetensors.torch import load_file
    stored = load_file(os.path.join(out, dpo.REFERENCE_FILE))
    model, tok = load_model(run_base)
    tr, va, _ = dpo.load_preference_data(prefs, tok, 48, 0.1)
    for name, data in (("train", tr), ("val", va)):
        x, y = data.collate(list(range(len(data))), "cpu")
        with torch.no_grad():
            want = dpo.sequence_logps(model, x, y)                         # (2N,)
        assert stored[name].shape == (len(data), 2)
        assert torch.allclose(stored[name].T.reshape(-1), want, atol=1e-4), name


def test_freeze_dpo_resume_uses_the_original_base_reference(base):
    """A paused --finetune freeze DPO run resumes with the same losses as an uninterrupted one:
    reading the stored reference log-probs, or (file deleted) recomputing them from --base before
    the trained weights are restored; from the resumed weights they would differ."""
    run_base, prefs, tmp = base
    common = ["--objective", "dpo", "--base", run_base, "--finetune", "freeze", "--data", prefs,
              "--max-steps", "6", "--eval-every", "3", "--lr", "3e-3", "--dpo-loss", "ipo", *FLAGS]
    whole = str(tmp / "f-whole")
    assert train.main([*common, "--out", whole]) == 0
    for name, delete in (("f-part", False), ("f-part-del", True)):
        part = str(tmp / name)
        assert train.main([*common, "--out", part, "--pause-at-step", "3"]) == 0
        if delete:
            os.remove(os.path.join(part, dpo.REFERENCE_FILE))
        assert train.main(["--resume", part, "--no-progress", "--threads", "1"]) == 0
        assert os.path.isfile(os.path.join(part, dpo.REFERENCE_FILE))  # written back
        assert_same_metrics(metrics(whole), metrics(part), name)


def test_a_refused_resume_writes_no_reference_file_of_other_pairs(base, tmp_path):
    """--finetune full/freeze resumed without its reference file but on edited pairs: refused
    (the data changed), and the run is left as it was. The log-probs recomputed for the edited
    pairs were written back before the data check, so with the data restored every later
    resume was refused too ('the training data differs'), whatever the user did."""
    run_base, prefs, _ = base
    rows = [json.loads(l) for l in open(prefs)]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    run = str(tmp_path / "run")
    assert train.main(["--objective", "dpo", "--base", run_base, "--finetune", "freeze",
                       "--data", data, "--out", run, "--max-steps", "3", "--eval-every", "3",
                       "--pause-at-step", "1", *FLAGS]) == 0
    ref = os.path.join(run, dpo.REFERENCE_FILE)
    os.remove(ref)
    changed = [dict(r) for r in rows]
    changed[0]["rejected"] = changed[1]["rejected"] = " maybe"
    write_jsonl(tmp_path / "prefs.jsonl", changed)

    def resume(*more):
        return train.main(["--resume", run, "--no-progress", "--threads", "1", *more])

    with pytest.raises(ValueError, match="data differs from the one the run"):
        resume()
    assert not os.path.exists(ref)  # nothing of the edited pairs left in the run
    write_jsonl(tmp_path / "prefs.jsonl", rows)
    assert resume("--pause-at-step", "2") == 0 and os.path.isfile(ref)  # recomputed, written


def test_resume_refuses_preference_data_that_changed(base, tmp_path):
    """Resuming a DPO run on edited pairs would silently optimize other preferences (and judge
    the best checkpoint on other held-out pairs): refused, nothing touched; with the data
    restored it continues. A run saved before the key existed still resumes."""
    run_base, prefs, _ = base
    rows = [json.loads(l) for l in open(prefs)]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    run = str(tmp_path / "run")
    assert train.main(["--objective", "dpo", "--base", run_base, "--finetune", "lora", "--data", data,
                       "--out", run, "--max-steps", "3", "--eval-every", "3", "--lora-r", "4",
                       "--pause-at-step", "1", *FLAGS]) == 0
    before = open(os.path.join(run, "metrics.jsonl")).read()
    from engine.sft import split_indices

    def resume(*more):
        return train.main(["--resume", run, "--no-progress", "--threads", "1", *more])

    tr, va = split_indices(len(rows), 0.1)
    for k, split in ((tr[0], "training"), (va[0], "validation")):
        changed = [dict(r) for r in rows]
        changed[k]["rejected"] = " maybe"
        write_jsonl(tmp_path / "prefs.jsonl", changed)
        with pytest.raises(ValueError, match=f"the {split} data differs from the one the run"):
            resume()
        assert open(os.path.join(run, "metrics.jsonl")).read() == before
    write_jsonl(tmp_path / "prefs.jsonl", rows)
    assert resume("--pause-at-step", "2") == 0
    write_jsonl(tmp_path / "prefs.jsonl", changed)
    path = os.path.join(run, "last", "training_state.pt")  # as saved before the key existed
    state = torch.load(path, weights_only=True)
    state["extra"] = json.dumps({**json.loads(state["extra"]), "data": {}})
    torch.save(state, path)
    assert resume() == 0


@pytest.mark.parametrize("row, why", [
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "Q", "chosen": "", "rejected": "b"}, "empty 'chosen'"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "empty 'prompt'"),
    ({"prompt": "Q", "chosen": "a"}, "missing 'rejected'"),
    ("{not json", "invalid JSON"),
])
def test_bad_preference_lines_name_the_line(base, tmp_path, row, why):
    run_base, _, _ = base
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, good, row, good])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {why}"):
        train.main(["--objective", "dpo", "--base", run_base, "--data", bad, "--out",
                    str(tmp_path / "o"), "--max-steps", "2", *FLAGS])


def test_cli_errors_are_one_line(base, tmp_path, capsys):
    run_base, prefs, _ = base
    flag_errors = [(["--objective", "dpo", "--data", prefs], "needs --base"),
                   (["--objective", "dpo", "--base", run_base, "--data", prefs, "--dpo-loss",
                     "ipo", "--label-smoothing", "0.1"],
                    "--label-smoothing applies only to --dpo-loss sigmoid"),
                   (["--objective", "dpo", "--base", run_base, "--data", prefs, "--dpo-loss",
                     "hinge", "--label-smoothing", "0.1"],
                    "--label-smoothing applies only to --dpo-loss sigmoid"),
                   (["--objective", "dpo", "--base", run_base, "--data", prefs, "--dpo-loss", "kto"],
                    "argument --dpo-loss: invalid choice"),
                   (["--base", run_base, "--data", prefs, "--dpo-loss", "ipo"],
                    "--dpo-loss applies only to --objective dpo"),
                   (["--objective", "dpo", "--base", run_base, "--data", prefs, "--beta", "0"],
                    "--beta must be > 0"),
                   (["--objective", "dpo", "--base", run_base, "--data", prefs,
                     "--label-smoothing", "0.5"], "--label-smoothing in [0, 0.5)")]
    for args, msg in flag_errors:
        with pytest.raises(SystemExit) as e:
            train.parse_args(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and msg in err[0], (args, err)
    # Data errors surface as one line from the script, with the file and line number.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": "x", "rejected": "x"}])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--objective", "dpo",
                        "--base", run_base, "--data", bad, "--out", str(tmp_path / "o"),
                        "--max-steps", "1", "--no-progress"], capture_output=True, text=True,
                       cwd=str(tmp_path), env=dict(os.environ))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines == [f"error: {bad}:1: 'chosen' and 'rejected' are identical; "
                                           "--bad-lines skip leaves such lines out"]


def test_bad_lines_skip_reaches_preference_data(base, tmp_path, capsys):
    run_base, _, _ = base
    good = [{"prompt": f"Q: is it {i}? A:", "chosen": " yes", "rejected": " no"} for i in range(12)]
    bad = write_jsonl(tmp_path / "bad.jsonl", [*good[:2], {"prompt": "Q", "chosen": "a"}, *good[2:]])
    assert train.main(["--objective", "dpo", "--base", run_base, "--data", bad, "--bad-lines", "skip",
                       "--out", str(tmp_path / "o"), "--max-steps", "1", *FLAGS]) == 0
    out = capsys.readouterr()
    assert "warning: skipping" in out.out and "bad.jsonl:3: missing 'rejected'" in out.out
    assert "1 malformed line(s) skipped (3)" in out.out


def test_pair_the_template_rejects_names_its_line_and_can_be_skipped(tmp_path):
    """A conversational pair that the chat template refuses (here: a system message) is a
    FILE:LINE error, or skipped and reported with on_error="skip"."""
    tok = CharTok()
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
                         "not supported') }}{% endif %}{% for m in messages %}{{ m['role'] + ': ' "
                         "+ m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
                         "{{ 'assistant: ' }}{% endif %}")
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": " yes", "rejected": " no"}
            for i in range(5)]
    rows[2]["prompt"] = [{"role": "system", "content": "s"}, *rows[2]["prompt"]]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match=r"p\.jsonl:3: chat template failed to render: System role"):
        dpo.load_preference_data(path, tok, 64)
    warnings = []
    train_set, val_set, rep = dpo.load_preference_data(path, tok, 64, on_error="skip",
                                                       warn=warnings.append)
    assert len(train_set) + len(val_set) == 4 and rep["skipped_lines"] == [3]
    assert len(warnings) == 1 and "p.jsonl:3: chat template failed to render" in warnings[0]


def test_pack_is_refused_not_ignored(base, tmp_path):
    """--pack packs SFT samples; DPO pairs are never packed, so the flag would be ignored."""
    run_base, prefs, _ = base
    with pytest.raises(ValueError, match="--pack applies only to SFT data"):
        train.main(["--objective", "dpo", "--base", run_base, "--data", prefs, "--pack",
                    "--out", str(tmp_path / "o"), "--max-steps", "1", *FLAGS])
    assert not os.path.exists(tmp_path / "o")


def test_sft_data_or_text_given_to_dpo_names_what_it_holds(base, tmp_path):
    """SFT records or a text corpus given to --objective dpo read "FILE:1: missing 'prompt' ...;
    --bad-lines skip leaves such lines out" (skipping would leave out every line). Now one line
    saying what the file holds, for --data and --val-data, before anything is written."""
    run_base, prefs, _ = base
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    text = tmp_path / "t.txt"
    text.write_text("plain text\n")
    reads = "--objective dpo trains on preference (prompt/chosen/rejected) records"
    for flags, msg in [
            (["--data", chat], f"--data {chat} holds chat (messages) records (SFT data): {reads}"),
            (["--data", str(text)], f"--data {text} holds a text corpus: {reads}"),
            (["--data", prefs, "--val-data", chat],
             f"--val-data {chat} holds chat (messages) records (SFT data): {reads}")]:
        with pytest.raises(ValueError) as e:
            train.main(["--objective", "dpo", "--base", run_base, *flags,
                        "--out", str(tmp_path / "o"), "--max-steps", "1", *FLAGS])
        assert str(e.value) == f"{msg}; train on it without --objective dpo"
        assert not os.path.exists(tmp_path / "o")


def test_pairs_identical_within_seq_len_are_reported_as_such(tmp_path):
    """A pair whose chosen and rejected differ only past --seq-len has no preference left and is
    dropped; the report said 'no completion token within --seq-len', which sent the user looking
    for an overlong prompt."""
    long = " yes it is, " + "x" * 40
    rows = [{"prompt": "Q: is it?", "chosen": long + " truly", "rejected": long + " not"},
            {"prompt": "Q" * 40, "chosen": " yes", "rejected": " no"},  # the prompt fills seq_len
            *({"prompt": f"Q{i}", "chosen": " yes", "rejected": " no"} for i in range(8))]
    path, val = write_jsonl(tmp_path / "p.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", PAIRS)
    tr, va, rep = dpo.load_preference_data(path, CharTok(), 32, val_path=val)
    assert rep["identical_lines"] == [1] and rep["dropped_lines"] == [2] and len(tr) == 8
    line = dpo.format_report(rep, path)
    assert "1 dropped (chosen and rejected identical within --seq-len; lines 1)" in line
    assert "1 dropped (no completion token within --seq-len; lines 2)" in line


def test_pairs_of_another_form_than_the_first_are_refused_or_skipped(tmp_path):
    """A standard (string) pair in a conversational file (or the reverse) was accepted and
    trained without the chat template, a second prompt format, while the report named one form.
    Like an SFT file (and a TRL dataset) a preference file has one form: FILE:LINE, or skipped."""
    tok = CharTok()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": " yes", "rejected": " no"}
            for i in range(6)]
    rows[3] = {"prompt": "q3", "chosen": " yes", "rejected": " no"}
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match=r"p\.jsonl:4: a standard \(strings\) pair in preference "
                                         r"data whose first pair is conversational"):
        dpo.load_preference_data(path, tok, 64)
    warnings = []
    tr, va, rep = dpo.load_preference_data(path, tok, 64, on_error="skip", warn=warnings.append)
    assert len(tr) + len(va) == 5 and rep["skipped_lines"] == [4] and rep["conversational"]
    assert len(warnings) == 1 and "p.jsonl:4: a standard" in warnings[0]
    # a held-out file is held to the training file's form
    val = write_jsonl(tmp_path / "v.jsonl", PAIRS)
    with pytest.raises(ValueError, match=r"v\.jsonl:1: a standard \(strings\) pair"):
        dpo.load_preference_data(write_jsonl(tmp_path / "t.jsonl", rows[:3]), tok, 64, val_path=val)


# ---------------------------------------------------------------------------------------------
# TRL's DPOTrainer itself (trl 1.16, a dev extra): loss, logged rewards,
# LoRA gradients, and keep_start truncation of pairs
# ---------------------------------------------------------------------------------------------
def _trl():
    import trl  # a dev extra, pinned to the minor release whose private entry points these call
    return trl


def _trl_compare(tmp_path, loss_type="sigmoid", rpo_alpha=0.0, full=False):
    """One batch of three pairs through TRL's DPOTrainer._compute_loss and through DPO.loss:
    (our summarize() figures, TRL's logged rewards/*, TRL's loss, our grads, TRL's grads).
    LoRA (full=False): the policy is a PEFT LoRA with random B, TRL's reference the base, ours
    the checkpoint loaded with load_model(base, adapter=...). Full (full=True): the policy is
    the base with every weight perturbed, TRL's reference a separately loaded frozen base, ours
    the reference log-probs precomputed from the base before the policy's weights are loaded
    (what --finetune full does)."""
    _trl()
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    from engine.hub import load_model
    from engine.sft import IGNORE, TokenizedPair

    torch.manual_seed(0)
    V, beta = 64, 0.3
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "base")
    if full:
        policy = hf
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # policy != reference
        policy.save_pretrained(tmp_path / "policy")
    else:
        policy = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                               target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)  # policy != reference
        policy.save_pretrained(tmp_path / "adapter")
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    # TRL needs a tokenizer and a dataset to start; the batch below is given as token ids
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    hf_tok = HFTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    hf_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=hf_tok, eos_token="</s>", pad_token="<pad>")
    losses = [loss_type, "sft"] if rpo_alpha else [loss_type]
    args = DPOConfig(str(tmp_path / "trl"), beta=beta, loss_type=losses,
                     loss_weights=[1.0, rpo_alpha] if rpo_alpha else None, report_to=[],
                     use_cpu=True, bf16=False, per_device_train_batch_size=3)
    trainer = DPOTrainer(policy, ref_model=ref, args=args, processing_class=hf_tok,
                         train_dataset=Dataset.from_list([{"prompt": "w3", "chosen": " w4",
                                                           "rejected": " w5"}] * 2))

    gen = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, V, (n,), generator=gen).tolist()

    pairs = [(ids(3), ids(2) + [2], ids(4) + [2]), (ids(5), ids(2) + [2], ids(1) + [2]),
             (ids(2), ids(2) + [2], ids(2) + [2])]  # (prompt, chosen, rejected), EOS 2
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    n_prompt = [len(p) for p, _, _ in pairs] * 2
    T = max(map(len, rows))
    x = torch.zeros(len(rows), T, dtype=torch.long)
    attn, completion = torch.zeros_like(x), torch.zeros_like(x)
    for i, (row, n) in enumerate(zip(rows, n_prompt)):
        x[i, :len(row)], attn[i, :len(row)], completion[i, n:len(row)] = torch.tensor(row), 1, 1
    trainer.model.train()
    trl_loss = trainer._compute_loss(trainer.model, {"input_ids": x, "attention_mask": attn,
                                                      "completion_mask": completion}, False)
    trl_loss.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    trl_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                 for n, p in trainer.model.named_parameters() if p.grad is not None}

    tokenized = []
    for p, c, r in pairs:  # inputs = sequence[:-1], labels = sequence[1:] on completion tokens
        sides = [(p + s)[:-1] for s in (c, r)], [[IGNORE] * (len(p) - 1) + s for s in (c, r)]
        tokenized.append(TokenizedPair(sides[0][0], sides[1][0], sides[0][1], sides[1][1], False))
    data = dpo.PreferenceSet(tokenized, [1, 2, 3], pad_id=0)
    task = dpo.DPO(data, data, batch_size=3, beta=beta, rpo_alpha=rpo_alpha, loss_type=loss_type)
    if full:
        base_model, _ = load_model(str(tmp_path / "base"))
        dpo.precompute_reference(base_model, data, 2, "cpu", torch.autocast("cpu", enabled=False))
        model, _ = load_model(str(tmp_path / "policy"))
    else:
        model, _ = load_model(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))
    model.train()
    ours, c, r, _ = task.loss(model, data, [0, 1, 2], "cpu")
    ours.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return dpo.summarize(ours, c, r), logged, trl_loss.item(), grads, trl_grads


@pytest.mark.parametrize("loss_type, rpo_alpha, full", [
    ("sigmoid", 0.0, False), ("sigmoid", 0.5, False), ("ipo", 0.0, False), ("hinge", 0.0, False),
    ("ipo", 0.5, False), ("sigmoid", 0.0, True), ("ipo", 0.0, True), ("hinge", 0.5, True)])
def test_loss_rewards_and_gradients_equal_trl_dpo_trainer(tmp_path, loss_type, rpo_alpha, full):
    """Same loss, rewards/* and gradients (LoRA's, or with full=True every weight's) as TRL's
    DPOTrainer for each --dpo-loss. ipo normalizes each side by its own completion length (the
    pairs' chosen and rejected answers have 3 vs 5, 2 and 3 tokens). RPO is TRL 1.x's loss_type
    [LOSS, "sft"] with weights [1, alpha]: its NLL is the batch's token mean, ours each pair's,
    equal here because every chosen answer has 3 tokens."""
    s, logged, trl_loss, grads, trl_grads = _trl_compare(tmp_path, loss_type, rpo_alpha, full)
    assert s["loss"] == pytest.approx(trl_loss, rel=1e-6, abs=1e-6)  # ipo: ~2.6, squared
    assert 0 < s["reward_acc"] < 1  # both outcomes occur in the batch
    for theirs, mine in (("chosen", "rewards_chosen"), ("rejected", "rewards_rejected"),
                         ("accuracies", "reward_acc"), ("margins", "margin")):
        assert s[mine] == pytest.approx(logged[f"rewards/{theirs}"], abs=1e-6), mine
    assert set(grads) == set(trl_grads) and len(grads) == (21 if full else 12)
    worst = max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in trl_grads.items())
    assert worst < 1e-4, f"worst relative gradient mismatch {worst:.2e}"


def test_truncation_and_prompt_mask_equal_trl_keep_start(tmp_path):
    """Standard pairs tokenized by TRL 1.x (prompt / completion split, EOS added, the collator's
    keep_start truncation to max_length, pairs whose prompt fills it dropped) and by
    PreferenceSet.tokenize with a byte-level BPE both load: same token ids, same completion mask,
    same pairs dropped. --seq-len N is TRL's max_length N + 1 (N inputs, each with a target)."""
    _trl()
    from datasets import Dataset
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from engine.sft import IGNORE
    from tokenizer import load_tokenizer

    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["Q: is the sky blue? A: yes it is, truly",
                             "the cat is a cat, not a dog", "Say hi hello there no"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                     pad_token="<|endoftext|>")
    hf_tok.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    rows = [{"prompt": "Q: is the sky blue? A:", "chosen": " yes it is, truly the sky is blue",
             "rejected": " no"},
            {"prompt": "Say hi", "chosen": " hello there", "rejected": " no, the cat is a dog"},
            {"prompt": "the cat is a cat, not a dog the cat is a cat", "chosen": " yes",
             "rejected": " no"}]
    raw, _ = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    kept_by_len = {}
    for seq_len in (40, 12, 8):
        args = DPOConfig(str(tmp_path / "trl"), report_to=[], use_cpu=True,
                         max_length=seq_len + 1, truncation_mode="keep_start")
        trainer = DPOTrainer(LlamaForCausalLM(cfg), ref_model=LlamaForCausalLM(cfg), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=hf_tok)
        collate = DataCollatorForPreference(pad_token_id=hf_tok.pad_token_id,
                                            max_length=seq_len + 1, truncation_mode="keep_start")
        theirs = list(trainer.train_dataset)
        ours, _ = dpo.PreferenceSet.tokenize(raw, tok, seq_len)
        assert len(theirs) == len(ours)
        kept_by_len[seq_len] = ours.lines
        for row, pair in zip(theirs, ours.pairs):
            batch = collate([row])
            for side, (x, y) in enumerate(((pair.chosen_ids, pair.chosen_labels),
                                           (pair.rejected_ids, pair.rejected_labels))):
                real = batch["attention_mask"][side].bool()
                ids = batch["input_ids"][side][real].tolist()
                mask = batch["completion_mask"][side][real].tolist()
                assert x + y[-1:] == ids
                assert y == [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    assert kept_by_len == {40: [1, 2, 3], 12: [1, 2], 8: [2]}  # truncated, then prompts too long
