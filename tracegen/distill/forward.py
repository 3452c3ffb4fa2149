"""The forward pass on supervised positions only.

A causal LM's output layer is most of a small model's step (vocabulary x hidden per position), and
only about a quarter of the positions in a typical formatted dataset are supervised. So the decoder
runs over the whole batch, and the output layer only over the hidden states whose next-token label is
trained. Works for plain ``PreTrainedModel`` s and for PEFT-wrapped ones (LoRA layers stay active).

Not handled: architectures that post-process logits (e.g. Gemma 2's final logit soft-capping); their
logits here are the raw output layer's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from tracegen.distill.data import Batch


class SupervisedLogits(NamedTuple):
    logits: torch.Tensor  # [N, V]
    targets: torch.Tensor  # [N]


class SupervisedHidden(NamedTuple):
    """What the output layer would turn into ``SupervisedLogits`` (the chunked loss applies it chunk by chunk)."""

    hidden: torch.Tensor  # [N, H]
    targets: torch.Tensor  # [N]
    output_layer: torch.nn.Module


def _causal_lm(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supervised_logits(model: Any, batch: Batch, device: torch.device) -> SupervisedLogits:
    """``(logits [N, V], targets [N])`` for the N supervised positions of ``batch``, in row-major order."""
    hidden, targets, output_layer = supervised_hidden(model, batch, device)
    return SupervisedLogits(output_layer(hidden), targets)


def supervised_hidden(model: Any, batch: Batch, device: torch.device) -> SupervisedHidden:
    """The decoder's last hidden states ``[N, H]`` at the N supervised positions, their targets, the output layer."""
    lm = _causal_lm(model)
    # Packed: restarting positions give the block-diagonal mask (an attention mask would override it).
    masking = (
        {"position_ids": batch.position_ids.to(device)}
        if batch.position_ids is not None
        else {"attention_mask": batch.attention_mask.to(device)}
    )
    out = lm.get_decoder()(input_ids=batch.input_ids.to(device), use_cache=False, **masking)
    hidden: torch.Tensor = out.last_hidden_state[:, :-1]
    sel = batch.supervised().to(device)
    targets = batch.labels[:, 1:].to(device)[sel]
    return SupervisedHidden(hidden[sel], targets, lm.get_output_embeddings())
