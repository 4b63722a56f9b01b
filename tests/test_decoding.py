"""Our decoding loop (p2pswarm/decoding.py) against HF generate and against the model's own probabilities."""

import logging

import pytest
import torch
from scipy.stats import chi2
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from helpers import make_settings
from p2pswarm.decoding import Decoder, DecoderUnsupported, sample_next
from p2pswarm.trainer import GRPOTrainer
from p2pswarm.types import Group
from test_trainer import seq_logprob, tasks_with_prompts


def prompts(trainer, n=4, seed=1):
    tasks = tasks_with_prompts(n, seed=seed)
    enc = trainer._encode_prompts(tasks)
    assert (enc["attention_mask"] == 0).any()  # prompts of different lengths: real left padding
    return tasks, enc


def cut(row, eos):
    return row[: next((j + 1 for j, t in enumerate(row) if t in eos), len(row))]


def tiny_gpt2(vocab):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=32, n_layer=2, n_head=2, bos_token_id=2, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("arch", ["qwen2", "qwen2-static-cache", "gpt2"])
def test_greedy_output_equals_hf_generate(tmp_path, fresh_policy, arch):
    model, tok = fresh_policy
    if arch == "gpt2":  # a second architecture, learned positions instead of rotary ones
        model = tiny_gpt2(len(tok))
    trainer = GRPOTrainer(model, tok, make_settings(tmp_path, max_new_tokens=24))
    _, enc = prompts(trainer, 6)
    ours = Decoder(model, trainer.eos_ids, tok.pad_token_id, choice="ours", compile="off",
                   fused=arch == "qwen2")  # qwen2-static-cache: HF's forward in our loop, as for GPT-2
    assert ours.path == ("fused" if arch == "qwen2" else "static-cache")
    got = ours.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=24, greedy=True).tolist()
    want = model.generate(**enc, max_new_tokens=24, do_sample=False, temperature=None, top_p=None, top_k=None,
                          pad_token_id=tok.pad_token_id, eos_token_id=trainer.eos_ids)[:, enc["input_ids"].shape[1]:]
    eos = set(trainer.eos_ids)
    assert [cut(r, eos) for r in got] == [cut(r, eos) for r in want.tolist()]


def test_training_logprobs_equal_the_loops_sampling_logprobs(tmp_path, fresh_policy):
    """Left-padded sampling in our loop and the left-padded training forward see the same positions and tokens."""
    model, tok = fresh_policy
    s = make_settings(tmp_path, num_generations=2, max_new_tokens=12, temperature=0.7)
    trainer = GRPOTrainer(model, tok, s)
    tasks, enc = prompts(trainer)
    torch.manual_seed(0)
    new, lp = Decoder(model, trainer.eos_ids, tok.pad_token_id, choice="ours", compile="off").generate(
        enc["input_ids"], enc["attention_mask"], n=2, max_new_tokens=12, temperature=0.7, return_logprobs=True)
    for i, task in enumerate(tasks):
        ids = [cut(r, set(trainer.eos_ids)) for r in new[2 * i: 2 * i + 2].tolist()]
        g = Group(task, ["", ""], peer="me", completion_ids=ids, rewards=[0.0, 1.0])
        train_lp = seq_logprob(trainer, g)
        for k in range(2):
            gen_lp = lp[2 * i + k, : len(ids[k])].sum()
            assert torch.allclose(train_lp[k], gen_lp, atol=1e-3), (train_lp[k], gen_lp)


@pytest.mark.parametrize("temperature,top_p", [(2.0, 1.0), (3.0, 0.8)])
def test_sampling_frequencies_follow_the_models_probabilities(fresh_policy, temperature, top_p):
    """4000 draws of the first token after a short prompt: a chi-square test against HF's own temperature +
    top-p warpers applied to the model's logits (p = 0.001 of a false alarm; fixed seed, so never flaky). High
    temperatures, because the trained policy is nearly certain at 1.0 and a test needs several likely tokens."""
    model, tok = fresh_policy
    enc = tok(["The answer"], return_tensors="pt", add_special_tokens=False)
    N = 4000
    with torch.no_grad():
        logits = model(**enc).logits[:, -1].float()
        warped = TopPLogitsWarper(top_p)(enc["input_ids"], TemperatureLogitsWarper(temperature)(enc["input_ids"], logits))
        p = torch.softmax(warped, -1)[0].double()
    torch.manual_seed(1234)
    new = Decoder(model, [10**9], tok.pad_token_id, choice="ours", compile="off").generate(
        enc["input_ids"], enc["attention_mask"], n=N, max_new_tokens=1, temperature=temperature, top_p=top_p)
    assert chi2_ok(torch.bincount(new[:, 0], minlength=p.numel()).double(), p)


def chi2_ok(counts: torch.Tensor, p: torch.Tensor) -> bool:
    """Chi-square goodness of fit at p = 0.001 (bins expecting < 5 pooled), and nothing drawn where p is 0."""
    N = counts.sum()
    assert counts[p == 0].sum() == 0
    expected = N * p
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    assert dof >= 5, dof
    return stat < chi2.ppf(0.999, dof)


@pytest.mark.parametrize("draw", ["race", "cdf"])
@pytest.mark.parametrize("shape", ["peaked", "flat"])
def test_both_draws_follow_hfs_top_p_distribution(draw, shape):
    """sample_next's two draws against HF's temperature + top-p warpers on synthetic logits: peaked (the CPU
    draw finds the nucleus among its first 64 candidates) and flat over 512 tokens (it has to sort them all)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 512, generator=g) * (4.0 if shape == "peaked" else 0.5)
    top_p, temperature, N = 0.8, 1.3, 20000
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits))
    p = torch.softmax(warped, -1)[0].double()
    held = torch.softmax(logits / temperature, -1).topk(64)[0].sum()
    assert (held >= top_p) == (shape == "peaked")  # each case takes the path it is named for
    torch.manual_seed(5)
    nxt, _ = sample_next(logits.expand(N, -1), torch.zeros((), dtype=torch.long), torch.tensor([2]), greedy=False,
                         temperature=temperature, top_p=top_p, min_new_tokens=0, draw=draw)
    assert chi2_ok(torch.bincount(nxt, minlength=512).double(), p)


def test_eos_ends_each_row_on_its_own_and_min_new_tokens_holds_it_back(tmp_path, fresh_policy):
    model, tok = fresh_policy
    trainer = GRPOTrainer(model, tok, make_settings(tmp_path))
    _, enc = prompts(trainer, 4)
    args = (enc["input_ids"], enc["attention_mask"])
    torch.manual_seed(0)
    free = Decoder(model, [10**9], tok.pad_token_id, choice="ours", compile="off").generate(
        *args, n=8, max_new_tokens=16, temperature=2.0).tolist()  # no eos at all: 16 tokens each
    # as eos, a token in some rows but not all (some rows stop early, the others run on), and the one most often
    # drawn after the 6th token, where min_new_tokens=6 below lets it end a row
    seen = {t: sum(t in r for r in free) for r in free for t in r}
    late = {t: sum(t in r[6:] for r in free) for t in seen if 0 < seen[t] < len(free)}
    eos = max(late, key=lambda t: (late[t], -abs(seen[t] - len(free) / 2)))
    assert 0 < seen[eos] < len(free) and late[eos] > 0
    dec = Decoder(model, [eos], tok.pad_token_id, choice="ours", compile="off")
    torch.manual_seed(0)  # the same draws: each row is the free one up to its own first eos, then padding
    out = dec.generate(*args, n=8, max_new_tokens=16, temperature=2.0).tolist()
    for f, r in zip(free, out):
        end = f.index(eos) + 1 if eos in f else len(f)
        assert r[:end] == f[:end] and all(t == tok.pad_token_id for t in r[end:]), (f, r)
    torch.manual_seed(0)
    held = dec.generate(*args, n=8, max_new_tokens=16, min_new_tokens=6, temperature=2.0).tolist()
    assert all(eos not in r[:6] for r in held) and any(eos in r for r in held)


def test_a_model_the_loop_cannot_drive_falls_back_to_generate_said_once(tmp_path, fresh_policy, caplog):
    from transformers import CTRLConfig, CTRLLMHeadModel

    _, tok = fresh_policy
    torch.manual_seed(0)
    model = CTRLLMHeadModel(CTRLConfig(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                                       dff=64)).eval()  # a causal LM without static-cache support
    model.generation_config.eos_token_id = 2
    with pytest.raises(DecoderUnsupported):
        GRPOTrainer(model, tok, make_settings(tmp_path, decoder="ours"))
    with caplog.at_level(logging.INFO, logger="p2pswarm.decoding"):
        trainer = GRPOTrainer(model, tok, make_settings(tmp_path, decoder="auto", num_generations=2, max_new_tokens=6))
        assert trainer.decoder.uses_hf
        for _ in range(2):
            groups = trainer.generate(tasks_with_prompts(3))
            assert all(len(g.completion_ids) == 2 and all(0 < len(c) <= 6 for c in g.completion_ids) for g in groups)
    said = [r for r in caplog.records if "HF generate" in r.getMessage()]
    assert len(said) == 1 and "CTRLLMHeadModel" in said[0].getMessage()


def test_trainer_generates_with_our_loop_and_trains_on_its_completions(tmp_path, fresh_policy):
    from p2pswarm.types import GameState

    model, tok = fresh_policy
    trainer = GRPOTrainer(model, tok, make_settings(tmp_path, num_generations=4, max_new_tokens=10))
    calls = []
    model.generate = lambda *a, **k: calls.append(k)  # must not be reached
    steps = []
    groups = trainer.generate(tasks_with_prompts(4), progress=lambda phase, done, total: steps.append((phase, done, total)))
    assert not calls and not trainer.decoder.uses_hf
    assert steps and steps[-1] == ("generate", 10, 10)
    assert all(len(g.completion_ids) == 4 and all(1 <= len(c) <= 10 for c in g.completion_ids) for g in groups)
    for g in groups:
        g.rewards = [float(i) for i in range(4)]
    state = GameState(0)
    state.add(0, groups, [])
    stats = trainer.train(state)
    assert not stats.skipped and stats.local_groups == 4 and stats.loss == stats.loss  # finite, not NaN


def test_a_step_that_fails_to_compile_runs_eagerly_then_on_the_fused_forward(tmp_path, fresh_policy, caplog,
                                                                             monkeypatch):
    """torch.compile failing (as it may on a machine's first CUDA run) costs nothing but speed: the call in
    flight finishes on HF's forward, said once, and later calls decode on the fused forward; greedy output
    stays generate's throughout."""
    model, tok = fresh_policy
    trainer = GRPOTrainer(model, tok, make_settings(tmp_path, max_new_tokens=12))
    _, enc = prompts(trainer, 4)

    def broken(fn, **kw):
        def raise_(*a, **k):
            raise RuntimeError("inductor: no compiler here")
        return raise_

    monkeypatch.setattr(torch, "compile", broken)
    dec = Decoder(model, trainer.eos_ids, tok.pad_token_id, choice="ours", compile="on")
    assert dec.path == "static-cache"
    want = model.generate(**enc, max_new_tokens=12, do_sample=False, temperature=None, top_p=None, top_k=None,
                          pad_token_id=tok.pad_token_id, eos_token_id=trainer.eos_ids)[:, enc["input_ids"].shape[1]:]
    eos = set(trainer.eos_ids)
    with caplog.at_level(logging.INFO, logger="p2pswarm.decoding"):
        for _ in range(2):
            got = dec.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=12, greedy=True)
            assert [cut(r, eos) for r in got.tolist()] == [cut(r, eos) for r in want.tolist()]
    assert dec.path == "fused"
    said = [r.getMessage() for r in caplog.records]
    assert sum("torch.compile failed" in m for m in said) == 1 and sum("fused forward" in m for m in said) == 1
