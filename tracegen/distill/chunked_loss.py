"""The loss terms of one micro-batch, from the supervised hidden states, in chunks of rows.

The output layer turns N supervised hidden states ``[N, H]`` into ``[N, V]`` logits, and CE and KD
then make a few more ``[N, V]`` fp32 copies (log-softmax, its gradient): with Qwen3's 151k vocabulary
one copy of 16k tokens is about 10 GB. With ``distill.loss_chunk_tokens: C`` and N > C, the output
layer, CE and KD run on C rows at a time under ``torch.utils.checkpoint``: the forward keeps only the
per-token values ``[N]``, and the backward recomputes one chunk's logits at a time. The peak is then a
few ``[C, V]`` copies whatever N is, for one more output-layer forward per chunk in the backward.
N <= C (or C = 0) is the unchunked path, exactly as before.

Everything after the per-token values (proof weights, TKD weights, DISC's discrepancy, jump weights and
gap energy) works on ``[N]`` tensors and is shared with the unchunked path. DISC's smoothing replaces a
high-entropy row's logits by their window mean; the output layer is linear, so the chunked path
averages the hidden states instead (equal up to float rounding), after a no-grad chunked pass for the
entropies that pick the rows.

Liger Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy do the same for CE with
Triton GPU kernels; neither runs on a CPU, neither is installed here, and neither computes top-k KD
with a tail bucket or per-token values for DISC, so this stays plain torch.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F  # torch's own convention
from torch.utils.checkpoint import checkpoint

from tracegen.config import DiscrepancySettings
from tracegen.distill.discrepancy import disc_from_kd, disc_kd, entropy, exceeds_mean_sigma, window_mean_rows
from tracegen.distill.forward import SupervisedHidden
from tracegen.distill.losses import TeacherTopK, sparse_kd_per_token, weighted_ce_sum


class LossTerms(NamedTuple):
    ce_sum: torch.Tensor  # sum_t w_t * CE_t
    kd_sum: torch.Tensor | None  # sum_t a_t * KD_t (None without a teacher)
    energy_sum: torch.Tensor | None  # DISC: 0.5 * sum_t D_t^2
    jumps: int = 0  # DISC: tokens with an amplified KD weight
    smoothed: int = 0  # DISC: tokens with smoothed logits


def loss_terms(
    out: SupervisedHidden,
    weights: torch.Tensor,
    topk: TeacherTopK | None,
    counts: list[int],
    temperature: float,
    disc: DiscrepancySettings | None,
    kd_weights: torch.Tensor | None,
    chunk: int,
) -> LossTerms:
    """CE (weights ``weights``), and with ``topk`` the KD sum (times ``kd_weights``; DISC terms with ``disc``)."""
    hidden, targets, layer = out
    if chunk <= 0 or hidden.shape[0] <= chunk:
        logits = layer(hidden)
        ce = weighted_ce_sum(logits, targets, weights)
        if topk is None:
            return LossTerms(ce, None, None)
        if disc is not None:
            terms = disc_kd(logits, topk, counts, temperature, disc, kd_weights)
            return LossTerms(ce, terms.kd_sum, terms.energy_sum, terms.jumps, terms.smoothed)
        return LossTerms(ce, _weighted_sum(sparse_kd_per_token(logits, topk, temperature), kd_weights), None)
    kd_hidden = smoothed = None
    if topk is not None and disc is not None and disc.smoothing_window > 1:
        smoothed = exceeds_mean_sigma(chunked_entropy(hidden, layer, chunk), counts, disc.smoothing_sigma)
        kd_hidden = window_mean_rows(hidden, smoothed, counts, disc.smoothing_window)
    ce_tok, kd_tok = per_token_terms(out, topk, temperature, chunk, kd_hidden, smoothed)
    ce = (ce_tok * weights).sum()
    if kd_tok is None:
        return LossTerms(ce, None, None)
    if disc is not None:
        n_smoothed = int(smoothed.sum()) if smoothed is not None else 0
        terms = disc_from_kd(kd_tok, counts, disc, kd_weights, n_smoothed)
        return LossTerms(ce, terms.kd_sum, terms.energy_sum, terms.jumps, terms.smoothed)
    return LossTerms(ce, _weighted_sum(kd_tok, kd_weights), None)


def _weighted_sum(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return (values if weights is None else values * weights).sum()


def per_token_terms(
    out: SupervisedHidden,
    topk: TeacherTopK | None,
    temperature: float,
    chunk: int,
    kd_hidden: torch.Tensor | None = None,
    smoothed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(CE [N], KD [N] or None)`` per supervised token, ``chunk`` rows at a time (all at once when 0).

    KD is taken on ``kd_hidden``'s logits at the ``smoothed`` rows (DISC), on ``hidden``'s elsewhere.
    With gradients on, each chunk runs under checkpoint, so no chunk's logits outlive its own step.
    """
    hidden, targets, layer = out
    n = hidden.shape[0]
    step = chunk if chunk > 0 else max(n, 1)
    recompute = torch.is_grad_enabled() and n > step
    parts: list[torch.Tensor] = []
    for start in range(0, n, step):
        rows = slice(start, start + step)
        part_topk = None if topk is None else TeacherTopK(*(t[rows] for t in topk))
        fn = partial(_chunk_terms, layer, part_topk, temperature)
        args = [hidden[rows], targets[rows]]
        if kd_hidden is not None and smoothed is not None:
            args += [kd_hidden[rows], smoothed[rows]]
        parts.append(checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args))
    values = torch.cat(parts) if parts else hidden.new_zeros((0, 1 if topk is None else 2), dtype=torch.float32)
    return values[:, 0], (values[:, 1] if topk is not None else None)


def _chunk_terms(
    layer: torch.nn.Module,
    topk: TeacherTopK | None,
    temperature: float,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    kd_hidden: torch.Tensor | None = None,
    smoothed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[C, 1]`` CE, or ``[C, 2]`` CE and KD, of one chunk (one tensor out: what checkpoint keeps)."""
    logits = layer(hidden)
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    if topk is None:
        return ce.unsqueeze(-1)
    kd_logits = logits
    if kd_hidden is not None and smoothed is not None and bool(smoothed.any()):
        at = smoothed.nonzero().squeeze(1)
        kd_logits = logits.index_copy(0, at, layer(kd_hidden[at]).to(logits.dtype))
    return torch.stack([ce, sparse_kd_per_token(kd_logits, topk, temperature)], dim=-1)


def chunked_entropy(hidden: torch.Tensor, layer: torch.nn.Module, chunk: int) -> torch.Tensor:
    """``[N]`` entropy of each row's softmax(logits) (detached), ``chunk`` rows at a time."""
    with torch.no_grad():
        return torch.cat([entropy(layer(hidden[s : s + chunk])) for s in range(0, hidden.shape[0], chunk)])
