"""GRPO math, free of models and settings (it takes tensors and numbers): group advantages, the clipped
surrogate, the KL estimate, loss aggregation."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads on first use: settings imports LOSS_TYPES, and `p2pswarm --help` must stay light
    import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")  # the variants aggregate() implements; settings accepts these


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean) / (std + eps) within one group (std is the unbiased sample std, as in TRL and GenRL).
    Dr. GRPO drops the division (scale=False): it biases updates toward low-variance groups."""
    centred = rewards - rewards.mean()
    if not scale or rewards.numel() < 2:
        return centred
    return centred / (rewards.std() + eps)


def token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float = 0.28,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss (B, T), per-token KL (k3 estimator, zeros without a reference), and a
    per-token "was clipped" mask. `advantages` is per sequence (B,)."""
    import torch

    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv
    loss = -torch.min(unclipped, clipped)
    was_clipped = (clipped < unclipped).float()
    if ref_logp is not None and beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    else:
        kl = torch.zeros_like(logp)
    return loss, kl, was_clipped


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    total_sequences: int,
    total_tokens: int,
    max_completion_length: int,
) -> torch.Tensor:
    """Reduce (B, T) losses of a micro-batch to the scalar that, summed over micro-batches, gives the
    loss of the whole batch (totals are of the whole batch, so gradient accumulation is exact).

    grpo    : mean over each sequence's tokens, then mean over sequences
    dapo    : mean over all tokens of the batch (long answers weigh more)
    dr_grpo : sum over tokens / (sequences * max completion length), a constant normaliser
    """
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / total_sequences
    if loss_type == "dapo":
        return masked.sum() / max(total_tokens, 1)
    if loss_type == "dr_grpo":
        return masked.sum() / (total_sequences * max_completion_length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, without materialising a second (B, T, V) tensor for log_softmax."""
    import torch

    logits = logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
