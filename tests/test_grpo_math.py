"""GRPO math against values worked out by hand."""

import math

import pytest
import torch

from p2pswarm import grpo


def test_group_advantages_match_hand_computation():
    # rewards 1, 0, 0, 1: mean 0.5, sample std sqrt(1/3) = 0.57735
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), eps=0.0)
    expected = 0.5 / math.sqrt(1 / 3)
    assert torch.allclose(adv, torch.tensor([expected, -expected, -expected, expected]), atol=1e-5)


def test_dr_grpo_advantages_are_not_scaled():
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), scale=False)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_equal_rewards_give_zero_advantage():
    assert torch.all(grpo.group_advantages(torch.tensor([0.5, 0.5, 0.5])) == 0)


def test_clip_binds_above_one_plus_epsilon_high_for_positive_advantage():
    # ratio e^0.5 = 1.6487 > 1.28: the positive-advantage term is clipped at 1.28 * A
    logp, old = torch.tensor([[0.0]]), torch.tensor([[-0.5]])
    loss, _, clipped = grpo.token_losses(logp, old, torch.tensor([2.0]), epsilon=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(-1.28 * 2.0, rel=1e-6)
    assert clipped.item() == 1.0


def test_clip_does_not_bind_for_negative_advantage_when_ratio_is_high():
    # A < 0 and ratio 1.6487: min(ratio*A, clip*A) = ratio*A (the pessimistic bound), not clipped
    logp, old = torch.tensor([[0.0]]), torch.tensor([[-0.5]])
    loss, _, clipped = grpo.token_losses(logp, old, torch.tensor([-1.0]), epsilon=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(math.exp(0.5), rel=1e-6)
    assert clipped.item() == 0.0


def test_clip_binds_below_one_minus_epsilon_for_negative_advantage():
    # ratio e^-0.5 = 0.6065 < 0.8, A = -1: min(-0.6065, -0.8) = -0.8 -> loss 0.8
    logp, old = torch.tensor([[-0.5]]), torch.tensor([[0.0]])
    loss, _, _ = grpo.token_losses(logp, old, torch.tensor([-1.0]), epsilon=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(0.8, rel=1e-6)


def test_k3_kl_estimate():
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    _, kl, _ = grpo.token_losses(logp, logp, torch.tensor([0.0]), ref_logp=ref, beta=0.1)
    d = -0.5
    assert kl.item() == pytest.approx(math.exp(d) - d - 1, rel=1e-6)


def test_kl_is_zero_without_reference():
    _, kl, _ = grpo.token_losses(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2))
    assert torch.all(kl == 0)


def test_loss_aggregation_variants():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    kw = dict(total_sequences=2, total_tokens=4, max_completion_length=4)
    assert grpo.aggregate(per_token, mask, "grpo", **kw).item() == pytest.approx((1.0 + 4.0) / 2)
    assert grpo.aggregate(per_token, mask, "dapo", **kw).item() == pytest.approx(7.0 / 4)
    assert grpo.aggregate(per_token, mask, "dr_grpo", **kw).item() == pytest.approx(7.0 / 8)
    with pytest.raises(ValueError):
        grpo.aggregate(per_token, mask, "ppo", **kw)


def test_micro_batch_sums_equal_the_whole_batch():
    torch.manual_seed(0)
    per_token, mask = torch.rand(6, 5), (torch.rand(6, 5) > 0.3).float()
    kw = dict(total_sequences=6, total_tokens=int(mask.sum()), max_completion_length=5)
    for lt in grpo.LOSS_TYPES:
        whole = grpo.aggregate(per_token, mask, lt, **kw)
        parts = grpo.aggregate(per_token[:4], mask[:4], lt, **kw) + grpo.aggregate(per_token[4:], mask[4:], lt, **kw)
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def test_sequence_logprobs_equal_log_softmax():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    expected = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(grpo.sequence_logprobs(logits, targets), expected, atol=1e-6)
