"""`DistillationTrainer`: online-logit distillation of the draft against the live, frozen target (SpecVLM §3.5).

Each step the target runs under `no_grad` on the batch (visual tokens, features = the `lm_head` input, logits); the
draft is teacher-forced with EAGLE's one-token shift (position t reads `(e_{t+1}, f_t)` and predicts `f_{t+1}`) and
learns from `lambda_logit * CE + lambda_feat * SmoothL1` on the positions whose next token is an assistant token.
Nothing is precomputed or stored. Only the draft has trainable parameters.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from ..adapters import get_adapter
from .config import DistillationConfig
from .losses import distillation_loss


class DistillationTrainer(Trainer):
    """
    A `transformers.Trainer` whose model is the draft (`SpecVLMDraftModel`, bound to `target`).

    Args:
        model (`SpecVLMDraftModel`): the draft to train.
        target (`PreTrainedModel`): the frozen target; moved to the training device, never updated.
        args (`DistillationConfig`)
        other arguments: as `transformers.Trainer` (`train_dataset`, `data_collator`, `callbacks`, ...).
    """

    def __init__(self, model, target, args: DistillationConfig, **kwargs):
        if model.target is not target:
            raise ValueError("The draft must be bound to the target it is trained against (`draft.bind(target)`).")
        super().__init__(model=model, args=args, **kwargs)
        self.target = target.to(self.args.device).eval().requires_grad_(False)
        self.adapter = get_adapter(target)
        self._parts = {"logit_ce": 0.0, "feature_l1": 0.0, "top1": 0.0, "n": 0}

    @torch.no_grad()
    def target_pass(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None):
        """
        The target's view of a right-padded batch.

        Returns:
            `(inputs_embeds, features)`, both `(batch, seq_len, hidden_size)`: the text model's input embeddings
            (visual tokens scattered in) and its final features.
        """
        image_features = None
        if pixel_values is not None:
            image_features = self.adapter.image_features({"pixel_values": pixel_values})
        embeds = self.adapter.embed(input_ids, image_features)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return embeds, self.adapter.forward(embeds, positions)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, loss_mask = inputs["input_ids"], inputs["loss_mask"]
        embeds, features = self.target_pass(input_ids, inputs.get("pixel_values"))
        draft_input = features[:, :-1]
        if self.args.feature_noise > 0:
            draft_input = draft_input + (torch.rand_like(draft_input) * 2 - 1) * self.args.feature_noise
        positions = torch.arange(input_ids.shape[1] - 1, device=input_ids.device).expand(input_ids.shape[0], -1)
        hidden = model(embeds[:, 1:], draft_input, positions)  # [B, T-1, h]: predicted f_{t+1}
        selected = loss_mask[:, 1:]  # position t+1 holds an assistant token
        predicted, true = hidden[selected], features[:, 1:][selected]
        lm_head = self.adapter.lm_head
        with torch.no_grad():
            target_logits = lm_head(true)
        loss = distillation_loss(
            predicted, lm_head(predicted), true, target_logits, self.args.lambda_logit, self.args.lambda_feat
        )
        self._parts["logit_ce"] += float(loss.logit)
        self._parts["feature_l1"] += float(loss.feature)
        self._parts["top1"] += float(loss.top1)
        self._parts["n"] += 1
        return (loss.total, hidden) if return_outputs else loss.total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._parts["n"] and "loss" in logs:
            n = self._parts.pop("n")
            logs.update({key: round(value / n, 4) for key, value in self._parts.items()})
            self._parts = {"logit_ce": 0.0, "feature_l1": 0.0, "top1": 0.0, "n": 0}
        super().log(logs, start_time)
