"""`DistillationTrainer`: online-logit distillation of the draft against the live, frozen target (SpecVLM §3.5).

Each step the target runs under `no_grad` on the batch (visual tokens, features = the `lm_head` input, logits); the
draft is teacher-forced with EAGLE's one-token shift (position t reads `(e_{t+1}, f_t)` and predicts `f_{t+1}`) and
learns from `lambda_logit * CE + lambda_feat * SmoothL1` on the positions whose next token is an assistant token.
The draft's elastic visual compressor, if it has one, is trained jointly: the draft's input passes through it as in
decoding (`draft_input`). Nothing is precomputed or stored. Only the draft has trainable parameters.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from transformers import DynamicCache, Trainer

from ..adapters import get_adapter
from ..compressor import SpecVLMCompressor
from ..loop import target_forward
from ..peft_wrappers import unwrap_peft
from ..tree import additive_mask
from .config import DistillationConfig
from .losses import distillation_loss


class DistillationTrainer(Trainer):
    """
    A `transformers.Trainer` whose model is the draft (`SpecVLMDraftModel`, bound to `target`).

    Args:
        model (`SpecVLMDraftModel`, or a `PeftModel` around one from `lora.add_lora`): the draft to train.
        target (`PreTrainedModel`, or a `PeftModel` around one): the frozen target; moved to the training device, never updated.
        args (`DistillationConfig`)
        other arguments: as `transformers.Trainer` (`train_dataset`, `data_collator`, `callbacks`, ...).

    Under several processes (`accelerate launch`, torchrun) each process holds the whole frozen target and trains on
    its share of each global batch; the loss is the mean over the global batch's supervised positions, so a run
    trains as one process with the whole global batch would, up to float rounding (`get_batch_samples`).
    """

    # `compute_loss` divides by the supervised positions of the whole step (all micro-batches), not per micro-batch.
    loss_is_scaled_for_ga = True

    def __init__(self, model, target, args: DistillationConfig, **kwargs):
        if model.target is not unwrap_peft(target):
            raise ValueError("The draft must be bound to the target it is trained against (`draft.bind(target)`).")
        if args.ddp_find_unused_parameters is None:
            # A select-mode compressor trains only the branches chosen for a step's rows, so DDP must look for
            # parameters without a gradient; without one every parameter is used and the search is wasted work.
            args.ddp_find_unused_parameters = isinstance(getattr(model, "compressor", None), SpecVLMCompressor)
        draft = unwrap_peft(model)
        parallel = draft.config.parallel_depth > 1
        if (args.ttt_steps > 1 or parallel) and isinstance(getattr(draft, "compressor", None), SpecVLMCompressor):
            raise ValueError(
                "Training-time test and parallel drafting unroll the draft over uncompressed positions; a draft with "
                "a visual compressor trains with ttt_steps=1 and parallel_depth=1."
            )
        if parallel and args.ttt_steps > 1:
            raise ValueError(
                f"A parallel draft trains one unrolled step per depth it drafts (parallel_depth="
                f"{draft.config.parallel_depth}); ttt_steps must stay 1."
            )
        if not draft.predicts_features and args.lambda_logit == 0:
            raise ValueError("An EAGLE-3 draft learns from the logit loss alone; lambda_logit must be > 0.")
        super().__init__(model=model, args=args, **kwargs)
        self.target = target.to(self.args.device).eval().requires_grad_(False)
        self.adapter = get_adapter(target)
        self._parts = _parts()
        self._branches: Counter = Counter()  # compressor branches chosen since the last log
        self.branch_totals: Counter = Counter()  # ... over the whole run

    @torch.no_grad()
    def target_pass(self, input_ids: torch.Tensor, visual_inputs: dict, layers: tuple[int, ...] | None = None):
        """
        The target's view of a right-padded batch (`adapter.batch_view`: visual tokens and positions as the
        architecture has them).

        Args:
            visual_inputs (`dict`): the batch's other inputs (`pixel_values`, `attention_mask`, `image_sizes`,
                `image_grid_thw`, `mm_token_type_ids`, ...).
            layers (`tuple[int, ...]`, *optional*): the draft's `feature_layers`.

        Returns:
            `(inputs_embeds, features, draft_features)`: the text model's input embeddings (visual tokens scattered
            in) and its final features, `(batch, seq_len, hidden_size)` each, and what the draft reads of the target
            (`loop.target_forward`: the features, or the hidden states entering `layers`).
        """
        embeds, positions = self.adapter.batch_view(input_ids, visual_inputs)
        return embeds, *target_forward(self.adapter, embeds, positions, None, layers=layers)

    def draft_input(self, model, input_ids: torch.Tensor, loss_mask: torch.Tensor, embeds, features):
        """
        The draft's teacher-forced input, built as the decoding loop builds it (`loop.prompt_draft_state`): position
        t pairs the target's input embedding at t+1 (the token's embedding for a draft that reads placeholders at
        visual slots, EAGLE-3) with its feature at t, and the draft's compressor (if any) compresses each row's
        visual pairs with the prompt (the positions before the first answer token) as its context, sampling its
        choice as training does (`SpecVLMCompressor.compress_row`).

        Returns:
            `(inputs_embeds, features, position_ids, source, branches)`: `(B, L, h)` twice and `(B, L)` twice,
            right-padded (`source` = the uncompressed position of each entry, `-1` at visual pairs and padding), and
            the branch chosen per row (`None` without a select-mode compressor).
        """
        draft = self.accelerator.unwrap_model(model)  # the model may be wrapped (DDP)
        inputs_embeds = embeds[:, 1:] if draft.visual_embeds else self.adapter.embed_tokens(input_ids[:, 1:])
        draft_features = features[:, :-1]
        batch, length = input_ids.shape[0], input_ids.shape[1] - 1
        positions = torch.arange(length, device=input_ids.device).expand(batch, -1)
        compressor = draft.compressor
        if not isinstance(compressor, SpecVLMCompressor):
            return inputs_embeds, draft_features, positions, positions, [None] * batch
        image_mask = self.adapter.visual_mask(input_ids[:, 1:])
        rows = []
        for b in range(batch):
            answer = loss_mask[b].nonzero()
            prompt_len = int(answer[0, 0]) if answer.numel() else length
            rows.append(compressor.compress_row(
                inputs_embeds[b], draft_features[b], positions[b], image_mask[b], prompt_len, sample=model.training
            ))  # fmt: skip
        width = max(row.source.shape[0] for row in rows)

        def pad(tensors, value):
            return torch.stack(
                [F.pad(t, (0, 0) * (t.dim() - 1) + (0, width - t.shape[0]), value=value) for t in tensors]
            )

        return (
            pad([r.inputs_embeds for r in rows], 0.0),
            pad([r.features for r in rows], 0.0),
            pad([r.position_ids for r in rows], 0),
            pad([r.source for r in rows], -1),
            [r.branch for r in rows],
        )

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """
        The step's micro-batches, and the number of supervised positions (whose next token is an answer token) in
        them summed over all processes (with `average_tokens_across_devices`, the default).
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        count = sum(batch["loss_mask"][:, 1:].sum() for batch in batch_samples)
        count = torch.as_tensor(count, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.reduce(count, "sum")
        return batch_samples, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, loss_mask = inputs["input_ids"], inputs["loss_mask"]
        visual = {key: value for key, value in inputs.items() if key not in ("input_ids", "loss_mask")}
        draft = unwrap_peft(self.accelerator.unwrap_model(model))
        embeds, features, target_view = self.target_pass(input_ids, visual, draft.feature_layers)
        noisy = target_view  # EAGLE's feature noise: on the draft's input only, never on what it learns to predict
        if self.args.feature_noise > 0:
            noisy = target_view + (torch.rand_like(target_view) * 2 - 1) * self.args.feature_noise
        draft_embeds, draft_features, positions, source, branches = self.draft_input(
            model, input_ids, loss_mask, embeds, noisy
        )
        for branch in branches:
            if branch is not None:
                self._branches[branch] += 1
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(source)
        total = 0.0
        # Parallel drafting trains each depth from its mask entries; otherwise `ttt_steps` unrolls the draft's own.
        parallel = draft.config.parallel_depth > 1
        steps = draft.config.parallel_depth if parallel else self.args.ttt_steps
        mask_inputs = (draft.mask_embeds, draft.mask_features) if parallel else None
        for step, hidden in enumerate(unrolled(model, draft_embeds, draft_features, positions, steps, mask_inputs)):
            # Entry t predicts position source[t] + 1 + j; train where that position holds an assistant token.
            next_position = source + 1 + step
            selected = (source >= 0) & (next_position < input_ids.shape[1])
            selected &= loss_mask.gather(1, next_position.clamp(max=input_ids.shape[1] - 1))
            predicted, true = hidden[selected], features[rows[selected], next_position[selected]]
            with torch.no_grad():
                target_logits = self.adapter.lm_head(true)
            draft_logits, target_logits = draft.training_logits(predicted, target_logits)
            loss = distillation_loss(
                predicted if draft.predicts_features else None, draft_logits, true, target_logits,
                self.args.lambda_logit, self.args.lambda_feat,
            )  # fmt: skip
            parts = (("logit_ce", loss.logit), ("feature_l1", loss.feature), ("top1", loss.top1))
            for part, value in parts if draft.predicts_features else parts[::2]:
                self._parts[part if step == 0 else f"{part}_{step + 1}"] += float(value)
            step_loss = loss.total
            if num_items_in_batch is not None:
                # sum over this micro-batch's positions / positions in the global batch; DDP (and DeepSpeed, FSDP)
                # then average the gradients over processes, which the factor undoes.
                processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
                step_loss = step_loss * selected.sum() / num_items_in_batch * processes
            total = total + self.args.ttt_decay**step * step_loss
        self._parts["n"] += 1
        return (total, hidden) if return_outputs else total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.args.world_size > 1:
            self._gather_parts()  # every process logs the training loss, so all of them get here
        if self._parts["n"] and "loss" in logs:
            n = self._parts.pop("n")
            logs.update({key: round(value / n, 4) for key, value in self._parts.items()})
            self._parts = _parts()
        if self._branches and "loss" in logs:  # the share of inputs each compressor branch was chosen for
            total = sum(self._branches.values())
            logs.update({f"gate/{name}": round(count / total, 3) for name, count in sorted(self._branches.items())})
            self.branch_totals.update(self._branches)
            self._branches = Counter()
        super().log(logs, start_time)

    def _gather_parts(self) -> None:
        """The loss parts and compressor choices since the last log, summed over all processes (so the logged
        means are over the global batches, as the logged loss is)."""
        from accelerate.utils import gather_object

        keys = tuple(self._parts)
        parts = torch.tensor([float(self._parts[key]) for key in keys], dtype=torch.float64, device=self.args.device)
        self._parts = dict(zip(keys, self.accelerator.reduce(parts, "sum").tolist()))
        self._parts["n"] = int(self._parts["n"])
        self._branches = sum((Counter(b) for b in gather_object([dict(self._branches)])), Counter())


def _parts() -> defaultdict:
    """Loss parts summed since the last log (`logit_ce`, `feature_l1`, `top1`, with `_<j>` for training-time test
    step j > 1) and the number of micro-batches `n`."""
    return defaultdict(float, n=0)


def unrolled(
    model,
    inputs_embeds: torch.Tensor,
    features: torch.Tensor,
    position_ids: torch.Tensor,
    steps: int,
    mask_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """
    Training-time test (EAGLE-3): the draft's outputs over `steps` unrolled steps, one `(batch, L, hidden_size)`
    tensor per step. Step 0 is teacher forcing (entry t reads the embedding of token t + 1 and the target's view at
    t). Step j feeds position t + j the embedding of token t + j + 1 and the draft's own step j - 1 output for entry
    t, attending to the teacher-forced entries <= t and its own chain above them (`ttt_attention_mask`): what the
    decoding loop's draft computes at depth j + 1 of a chain drafted after committed position t, when the chain's
    tokens are the true ones.

    With `mask_inputs` (parallel drafting: `(mask_embeds, mask_features)`, `(hidden_size,)` each), step j feeds
    position t + j the mask entry instead, with the same attention: what the loop's parallel draft computes for
    depth j + 1 after committed position t, one forward for every depth.

    Args:
        model (`SpecVLMDraftModel` or a wrapper of one): called as `model(inputs_embeds, features, position_ids,
            attention_mask, cache)`.
        inputs_embeds (`(batch, L, hidden_size)`), features (`(batch, L, feature_size)`), position_ids
            (`(batch, L)`): the teacher-forced input (`DistillationTrainer.draft_input`, uncompressed).
    """
    cache = DynamicCache() if steps > 1 else None
    hidden = features
    for step in range(steps):
        mask = ttt_attention_mask(inputs_embeds.shape[1], step, inputs_embeds.dtype, inputs_embeds.device)
        if step and mask_inputs is not None:
            embeds, state = (values.to(inputs_embeds.dtype).expand_as(inputs_embeds) for values in mask_inputs)
        else:
            embeds, state = _shifted(inputs_embeds, step), hidden
        hidden = model(embeds, state, position_ids + step, mask, cache)
        yield hidden


def _shifted(inputs_embeds: torch.Tensor, step: int) -> torch.Tensor:
    """`inputs_embeds` (`(batch, L, h)`) moved `step` entries left, zeros after the end: entry t holds entry t + step."""
    return F.pad(inputs_embeds[:, step:], (0, 0, 0, step)) if step else inputs_embeds


def ttt_attention_mask(length: int, step: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """
    Training-time test's attention at step `step` (EAGLE-3): `(1, 1, L, (step + 1) * L)` additive, over the keys of
    steps 0..step in order. Query t sees the teacher-forced keys <= t (step 0, causal) and, of each later step, only
    its own entry t: the chain drafted from t, as the decoding loop's draft sees the committed prefix and the path
    of drafted tokens above it.
    """
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=device)
    return additive_mask(torch.cat([causal] + [eye] * step, dim=1), dtype)
