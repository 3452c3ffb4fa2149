"""The distillation losses, on the supervised positions only.

Every function here takes *already selected* rows: one row per supervised token (the position whose
next-token label is not -100), so the output layer and the losses never touch masked positions.

- :func:`proof_weight` -- the per-token weight of proof tokens, decaying linearly over optimizer steps.
- :func:`kd_alpha` -- alpha_kd of an optimizer step, with the optional ramp (0, then linear, then alpha_kd).
- :func:`weighted_ce_sum` -- the *sum* of per-token weighted cross-entropy. The trainer divides it by
  the number of supervised tokens in the whole gradient-accumulation window (never by the sum of the
  weights, which would cancel the weighting): a weight of 2.5 means 2.5 times the gradient.
- :func:`sparse_kd_sum` -- KL(teacher || student) at temperature T, scaled by T^2, computed exactly on
  the teacher's top-k ids with the remaining probability mass in one tail bucket. With k equal to the
  vocabulary the tail is empty and the value equals :func:`dense_kd_sum`. :func:`sparse_kd_per_token`
  is the same per token (the discrepancy operators and the per-token KD weights need it).

Not guaranteed: the tail bucket is a lower bound on the full KL (merging the tail ids into one bucket
can only lose divergence, by the log-sum inequality); it is exact only when k covers the vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F  # torch's own convention


def proof_weight(step: int, total_steps: int, start: float, end: float) -> float:
    """Weight of a proof token at optimizer step ``step`` (0-based) of ``total_steps``.

    Linear from ``start`` at the first step to ``end`` at the last; a one-step run uses ``start``.
    """
    if total_steps <= 1:
        return start
    return start + (end - start) * _progress(step, total_steps)


def _progress(step: int, total_steps: int) -> float:
    """How far into the run optimizer step ``step`` is: 0 at the first step, 1 at the last (total_steps > 1)."""
    return min(max(step, 0), total_steps - 1) / (total_steps - 1)


def kd_alpha(step: int, total_steps: int, alpha: float, ramp: tuple[float, float] | None) -> float:
    """alpha_kd at optimizer step ``step`` (0-based) of ``total_steps``.

    Without a ramp, ``alpha``. With ``ramp = (start, end)``: 0 while the run's progress is at most
    ``start``, linear up to ``alpha`` at ``end``, then ``alpha``. Progress is measured as for
    :func:`proof_weight`: step / (total_steps - 1), so the first step is 0% and the last 100%.
    """
    if ramp is None:
        return alpha
    progress = _progress(step, total_steps) if total_steps > 1 else 1.0
    start, end = ramp
    return alpha * min(max((progress - start) / (end - start), 0.0), 1.0)


def token_weights(proof_mask: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-token weights: ``weight`` where ``proof_mask`` is 1, else 1 (float32)."""
    ones = torch.ones(proof_mask.shape, dtype=torch.float32, device=proof_mask.device)
    return torch.where(proof_mask.bool(), ones * weight, ones)


def weighted_ce_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over rows of ``weights[i] * CE(logits[i], targets[i])``; logits ``[N, V]``, targets ``[N]``."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (ce * weights).sum()


class TeacherTopK(NamedTuple):
    """Cached teacher distribution for N supervised tokens.

    ``ids`` ``[N, k]`` int64; ``logprobs`` ``[N, k]`` log-softmax at T=1 of those ids; ``lse1`` ``[N]``
    logsumexp of the raw logits; ``lse_t`` ``[N]`` logsumexp of the logits divided by T.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    lse1: torch.Tensor
    lse_t: torch.Tensor


def teacher_logprobs_at(topk: TeacherTopK, temperature: float) -> torch.Tensor:
    """Teacher log-probabilities of the top-k ids at temperature T, from the T=1 cache.

    Raw logit z_i = logprob_i + lse1, so log p_T(i) = z_i / T - lse_T.
    """
    logits = topk.logprobs.float() + topk.lse1.float().unsqueeze(-1)
    return logits / temperature - topk.lse_t.float().unsqueeze(-1)


def _xlogy_diff(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q) with 0 * anything = 0 (an empty tail bucket contributes nothing)."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def sparse_kd_sum(student_logits: torch.Tensor, topk: TeacherTopK, temperature: float) -> torch.Tensor:
    """T^2 * sum over rows of KL(teacher_T || student_T) on top-k ids plus one tail bucket."""
    return sparse_kd_per_token(student_logits, topk, temperature).sum()


def sparse_kd_per_token(student_logits: torch.Tensor, topk: TeacherTopK, temperature: float) -> torch.Tensor:
    """``[N]``: T^2 * KL(teacher_T || student_T) of each row, on top-k ids plus one tail bucket."""
    t = temperature
    log_q_all = F.log_softmax(student_logits.float() / t, dim=-1)
    log_q = log_q_all.gather(-1, topk.ids)
    log_p = teacher_logprobs_at(topk, t)
    p = log_p.exp()
    head = _xlogy_diff(p, log_p, log_q).sum(-1)
    # Tail bucket: the mass outside the top-k ids, for teacher and student alike.
    p_tail = (1.0 - p.sum(-1)).clamp(min=0.0)
    log_p_tail = torch.log(p_tail.clamp(min=1e-30))
    # Only ids with teacher mass count as listed: a cache built from API log-probs pads its rows with
    # -inf entries (an entry with none listed is a token with no teacher signal: its KD is exactly 0).
    log_q_tail = _student_tail(log_q_all, log_q, topk.ids, torch.isfinite(log_p))
    tail = torch.where(p_tail > 1e-6, p_tail * (log_p_tail - log_q_tail), torch.zeros_like(p_tail))
    return (head + tail) * (t * t)


TIGHT_TAIL = 1e-3  # below this student tail mass, 1 - head loses too many digits in fp32


def _student_tail(
    log_q_all: torch.Tensor, log_q: torch.Tensor, ids: torch.Tensor, listed: torch.Tensor
) -> torch.Tensor:
    """``[N]`` log of the student's mass outside the ``listed`` entries of ``ids``.

    Unlisted (padding) entries repeat a listed id of their row, or the row lists none.

    As 1 - (mass on the top-k ids), which needs no further [N, V] tensor (a masked copy of the
    log-probs plus its logsumexp would be two more, the largest part of the loss's peak memory). Rows
    whose tail is tiny, where that subtraction cancels, are recomputed exactly from the masked copy.
    """
    head_mass = log_q.exp().masked_fill(~listed, 0.0).sum(-1)
    # The clamp keeps log1p's gradient finite on rows that are then replaced (0 * inf would be NaN).
    log_tail = torch.log1p(-head_mass.clamp(max=1.0 - 1e-6))
    tight = (1.0 - head_mass) < TIGHT_TAIL
    if bool(tight.any()):
        rows = tight.nonzero(as_tuple=True)[0]
        listed_ids = torch.where(listed[rows], ids[rows], ids[rows][:, :1])  # padding -> the row's first id
        masked = log_q_all[rows].scatter(-1, listed_ids, float("-inf"))
        log_tail = log_tail.index_put((rows,), torch.logsumexp(masked, dim=-1))  # -inf when k == V
    return log_tail


def dense_kd_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reference: T^2 * sum over rows of the full-vocabulary KL(teacher_T || student_T)."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum") * (t * t)


def topk_from_logits(teacher_logits: torch.Tensor, k: int, temperature: float) -> TeacherTopK:
    """What the cache stores for these logits (fp32 here; the cache rounds log-probs to fp16)."""
    z = teacher_logits.float()
    lse1 = torch.logsumexp(z, dim=-1)
    lse_t = torch.logsumexp(z / temperature, dim=-1)
    values, ids = z.topk(k, dim=-1)
    return TeacherTopK(ids=ids, logprobs=values - lse1.unsqueeze(-1), lse1=lse1, lse_t=lse_t)
