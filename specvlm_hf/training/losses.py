"""Online-logit distillation losses (SpecVLM §3.5): `lambda_logit * CE(draft, softmax(target)) + lambda_feat *
SmoothL1(draft features, target features)`, the EAGLE objective with the target computed live each step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DistillationLoss:
    """`total` is what is optimised; `logit`, `feature` (unweighted) and `top1` (draft argmax == target argmax share)
    are reported."""

    total: torch.Tensor
    logit: torch.Tensor
    feature: torch.Tensor
    top1: torch.Tensor


def soft_cross_entropy(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """
    Mean over rows of `-sum_v softmax(target)_v * log_softmax(draft)_v`; minimal (= the target's entropy) when the two
    distributions match.

    Args:
        draft_logits, target_logits (`torch.FloatTensor` of shape `(n, vocab_size)`)
    """
    target_probs = torch.softmax(target_logits.float(), dim=-1)
    return -(target_probs * torch.log_softmax(draft_logits.float(), dim=-1)).sum(dim=-1).mean()


def feature_loss(draft_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """Smooth L1 (beta 1) between predicted and true target features, mean over elements; 0 iff they are equal.

    Args:
        draft_features, target_features (`torch.FloatTensor` of shape `(n, hidden_size)`)
    """
    return F.smooth_l1_loss(draft_features.float(), target_features.float())


def distillation_loss(
    draft_features: torch.Tensor | None,
    draft_logits: torch.Tensor,
    target_features: torch.Tensor,
    target_logits: torch.Tensor,
    lambda_logit: float = 0.1,
    lambda_feat: float = 1.0,
) -> DistillationLoss:
    """
    The combined loss over the `n` supervised positions.

    Args:
        draft_features (`torch.FloatTensor` of shape `(n, hidden_size)`, *optional*): the draft's predicted
            features; `None` for a draft whose output is not the target's features (EAGLE-3): no feature term.
        draft_logits (`torch.FloatTensor` of shape `(n, vocab_size)`): `lm_head(draft_features)`.
        target_features (`torch.FloatTensor` of shape `(n, hidden_size)`): the target's features there.
        target_logits (`torch.FloatTensor` of shape `(n, vocab_size)`): the target's logits there.
    """
    logit = soft_cross_entropy(draft_logits, target_logits)
    feature = logit.new_zeros(()) if draft_features is None else feature_loss(draft_features, target_features)
    top1 = (draft_logits.argmax(-1) == target_logits.argmax(-1)).float().mean()
    return DistillationLoss(
        total=lambda_logit * logit + lambda_feat * feature,
        logit=logit.detach(),
        feature=feature.detach(),
        top1=top1.detach(),
    )
