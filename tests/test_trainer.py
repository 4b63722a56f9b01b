"""The GRPO/SAPO trainer on the embedded policy: the maths meets a real model."""

import torch

from helpers import make_settings
from p2pswarm.data.reasoning_gym import ReasoningGymData
from p2pswarm.trainer import GRPOTrainer
from p2pswarm.types import GameState, Group


def tasks_with_prompts(n, seed=0):
    data = ReasoningGymData("easy", seed=seed, tasks_per_round=n)
    return data.with_prompts(data.round_tasks(0))


def seq_logprob(trainer, group):
    """Summed log-prob of each completion of a group under the current policy."""
    b = trainer._batch([group])
    with torch.no_grad():
        lp = trainer._logprobs(trainer.model, b)
    return (lp * b["mask"]).sum(1)


def test_generate_is_one_batched_call_with_g_completions_per_task(tmp_path, fresh_policy):
    model, tok = fresh_policy
    trainer = GRPOTrainer(model, tok, make_settings(tmp_path, num_generations=4))
    calls = []
    original = trainer.decoder.generate
    trainer.decoder.generate = lambda *a, **k: calls.append(k) or original(*a, **k)
    groups = trainer.generate(tasks_with_prompts(8))
    assert len(calls) == 1 and calls[0]["n"] == 4
    assert len(groups) == 8 and all(len(g.completions) == 4 == len(g.completion_ids) for g in groups)
    assert trainer.last_generate["tokens"] > 0


def test_training_logprobs_match_the_sampling_distribution(tmp_path, fresh_policy):
    """Left-padded generation and right-padded training must see the same positions and tokens."""
    model, tok = fresh_policy
    s = make_settings(tmp_path, num_generations=2, max_new_tokens=12)
    trainer = GRPOTrainer(model, tok, s)
    tasks = tasks_with_prompts(4, seed=1)  # prompts of different lengths -> real left padding
    enc = trainer._encode_prompts(tasks)
    assert (enc["attention_mask"] == 0).any()
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=12, num_return_sequences=2, top_k=0,
                         pad_token_id=tok.pad_token_id, eos_token_id=trainer.eos_ids,
                         output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    step_lp = torch.stack([torch.log_softmax(l.float(), -1) for l in out.logits], 1)  # (B, T, V)
    sampled_lp = step_lp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
    for i, task in enumerate(tasks):
        ids = []
        for row in new[2 * i: 2 * i + 2].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in trainer.eos_ids), len(row))
            ids.append(row[:cut])
        g = Group(task, ["", ""], peer="me", completion_ids=ids, rewards=[0.0, 1.0])
        train_lp = seq_logprob(trainer, g)
        for k in range(2):
            gen_lp = sampled_lp[2 * i + k, : len(ids[k])].sum()
            assert torch.allclose(train_lp[k], gen_lp, atol=1e-3), (train_lp[k], gen_lp)


def test_one_step_raises_the_rewarded_completion_and_lowers_the_other(tmp_path, fresh_policy):
    model, tok = fresh_policy
    # a small step, where the first-order picture holds (Adam's first step moves every weight by ~lr)
    s = make_settings(tmp_path, learning_rate=1e-4, num_iterations=1, local_groups=0, swarm_groups=1)
    trainer = GRPOTrainer(model, tok, s)
    task = tasks_with_prompts(1)[0]
    group = Group(task, [f"<answer>{task.answer}</answer>", "<answer>zzz</answer>"], peer="other", rewards=[1.0, 0.0])
    before = seq_logprob(trainer, group)
    state = GameState(0)
    state.add(0, [], [group])
    stats = trainer.train(state)
    after = seq_logprob(trainer, group)
    assert stats.swarm_groups == 1 and stats.swarm_peers == 1 and not stats.skipped
    assert after[0] > before[0] and after[1] < before[1]


def test_sapo_selection_drops_flat_groups_and_respects_i_and_j(tmp_path, fresh_policy):
    model, tok = fresh_policy
    trainer = GRPOTrainer(model, tok, make_settings(tmp_path, local_groups=2, swarm_groups=3))
    task = tasks_with_prompts(1)[0]

    def groups(n, rewards, local):
        return [Group(task, ["a", "b"], peer=f"p{i}", rewards=list(rewards), completion_ids=[[1], [2]] if local else None)
                for i in range(n)]

    state = GameState(0)
    state.add(0, groups(5, [1.0, 0.0], True) + groups(5, [1.0, 1.0], True),
              groups(2, [0.0, 1.0], False) + groups(4, [0.0, 0.0], False))
    local, swarm = trainer.select(state)
    assert len(local) == 2 and len(swarm) == 2  # only 2 swarm groups carry a signal
    assert all(g.has_signal for g in local + swarm) and all(g.local for g in local) and not any(g.local for g in swarm)
    flat = GameState(0)
    flat.add(0, groups(3, [1.0, 1.0], True), [])
    assert trainer.train(flat).skipped


def test_swarm_text_is_retokenised_with_eos_unless_cut(tmp_path, fresh_policy):
    model, tok = fresh_policy
    trainer = GRPOTrainer(model, tok, make_settings(tmp_path, max_new_tokens=8))
    short = trainer._completion_ids("<answer>42</answer>")
    assert short[-1] == trainer.end_id and tok.decode(short[:-1]) == "<answer>42</answer>"
    long = trainer._completion_ids("word " * 50)
    assert len(long) == 8 and trainer.end_id not in long


def test_kl_needs_a_reference_model_only_when_beta_is_positive(tmp_path, fresh_policy):
    model, tok = fresh_policy
    assert GRPOTrainer(model, tok, make_settings(tmp_path)).ref_model is None
    # two steps: the KL is measured in the second, after the first has moved the policy
    t = GRPOTrainer(model, tok, make_settings(tmp_path, beta=0.04, learning_rate=1e-2, num_iterations=2))
    task = tasks_with_prompts(1)[0]
    state = GameState(0)
    state.add(0, [Group(task, ["<answer>1</answer>", "<answer>2</answer>"], "p", rewards=[1.0, 0.0])], [])
    state.local[0][0].completion_ids = [t._completion_ids(c) for c in state.local[0][0].completions]
    stats = t.train(state)
    assert t.ref_model is not None and stats.kl > 0  # the policy moved away from the frozen reference


def test_save_and_load_restore_weights_and_optimizer(tmp_path, fresh_policy, policy_path):
    from p2pswarm import models

    model, tok = fresh_policy
    s = make_settings(tmp_path, learning_rate=1e-2)
    t = GRPOTrainer(model, tok, s)
    task = tasks_with_prompts(1)[0]
    state = GameState(0)
    state.add(0, [], [Group(task, ["<answer>1</answer>", "<answer>2</answer>"], "p", rewards=[1.0, 0.0])])
    t.train(state)
    t.save(tmp_path / "ckpt")
    m2, tok2 = models.load(policy_path, torch.device("cpu"), torch.float32)
    t2 = GRPOTrainer(m2, tok2, s)
    t2.load(tmp_path / "ckpt")
    for (n, a), (_, b) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    saved, loaded = t.optimizer.state_dict()["state"], t2.optimizer.state_dict()["state"]
    assert loaded.keys() == saved.keys() and saved  # one entry per parameter the update touched
    for i in saved:
        assert loaded[i].keys() == saved[i].keys()
        for name in ("exp_avg", "exp_avg_sq"):  # AdamW's moments: a resumed run continues the same update
            assert torch.equal(loaded[i][name], saved[i][name]), (i, name)
        assert torch.equal(torch.as_tensor(loaded[i]["step"]), torch.as_tensor(saved[i]["step"])), i
    assert t2.rng.random() == t.rng.random()


def test_evaluate_says_how_many_answers_were_tagged(tmp_path, fresh_policy):
    """Greedy held-out accuracy counts only answers in an <answer> block, so a policy that answers in words
    scores 0 however right it is: `eval_answer_tagged` says which of the two a low figure is."""
    from p2pswarm.rewards import extract_answer

    model, tok = fresh_policy
    trainer = GRPOTrainer(model, tok, make_settings(tmp_path))
    texts = []
    out = trainer.evaluate(tasks_with_prompts(12), lambda t, text: texts.append(text) or 0.0)
    assert len(texts) == 12 and out["eval_reward"] == 0.0
    assert out["eval_answer_tagged"] == sum(extract_answer(t) is not None for t in texts) / 12
