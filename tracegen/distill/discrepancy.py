"""Discrepancy operators on per-token signals, for DISC (``distill.discrepancy``) and TKD (``distill.topology``).

Every operator works on *flattened* supervised tokens, as the trainer has them: ``[N]`` (or ``[N, V]``)
rows in row-major order, with ``counts`` giving how many consecutive rows belong to each sequence.
Nothing ever mixes two sequences: every sum, mean and window below stays inside one sequence.

Definitions (for one sequence; t and t + j index its valid, i.e. supervised, tokens):

- Discrete discrepancy of a per-token signal f, horizon h::

      D_t = (1/h) * sum_{j=1..h} |f_{t+j} - f_t| / j            (h = 1: D_t = |f_{t+1} - f_t|)

  At the sequence end the terms with t + j beyond the last valid token are dropped and D_t is the
  average of the terms that exist (1/h' instead of 1/h, h' = their number); the last token has no
  term and D = 0. Valid tokens are consecutive in the signal even when masked tokens lie between
  them in the text.
- Sequence statistics: mean and *population* standard deviation (divide by n) over the sequence's
  valid tokens. "x exceeds mean + c * sigma" means by more than 1e-6, so rounding on a flat signal
  never flags a token.
- Discrepancy-weighted KD (DISC): f is the per-token KD term T^2 * KL(teacher_T || student_T). A
  token whose D_t exceeds mean + jump_sigma * sigma of its sequence gets its KD weight multiplied by
  jump_amplifier (DISC v3: c = 2.0, amplifier 3.0). The weights come from the detached D.
- DG-limit smoothing (DISC): where the student's entropy (of softmax(logits) at T = 1, detached)
  exceeds mean + smoothing_sigma * sigma of its sequence, the student's logits at that token are
  replaced by their average over a centred window of w tokens, positions t - (w-1)//2 .. t + w//2
  (DISC v3: w = 3, i.e. t-1..t+1), clipped at the sequence's edges, averaging the original
  (unsmoothed) logits. This feeds the KD term only; the CE term sees the student's own logits.
  Order: smoothing -> per-token KD -> D -> jump weights.
- Gap energy (DISC): E_disc = 0.5 * mean(D_t^2) over the valid tokens (each sequence's last token,
  D = 0, included). It is differentiable (D is computed from the live KD term) and enters the loss as
  ``gap_energy_weight * E_disc``; DISC v3: L = 0.55 CE + 0.45 KD + 0.02 E_disc.

Topology pass (TKD), once before training, from the teacher cache:

- Teacher signal: the teacher's entropy at T = 1 estimated from the cached top-k log-probs plus one
  tail bucket holding the remaining mass (a lower bound of the full entropy, as the tail's ids are
  merged). It needs no student and no target token.
- Jumps: D (h = 1) of that signal above mean + jump_sigma * sigma of the row (TKD: 3 sigma), fixed
  for the whole run. A jump token's loss weight is multiplied by ``jump_weight`` (TKD: 1.25):
  ``jump_target: loss`` (the card: "the loss weight is amplified") scales both its CE weight and its
  KD weight, so the amplification works while a ``kd_alpha_ramp`` holds alpha_kd at 0;
  ``jump_target: kd`` scales the KD weight only.
- Drift channel (TKD's third channel, ``drift_weight``). The card splits the transfer into smooth
  distillation (the per-token KD), jump corrections and "drift corrections for gradual distributional
  shifts" (the Cantor part of a BV derivative) without defining the last as a formula. A token
  sequence has no Cantor part in the strict sense; the reading used here is its discrete analogue,
  the variation of the signal that accumulates off the jumps. Per sequence, with f^S and f^T the
  student's and the teacher's entropy of the same coarse-graining (the teacher's top-k ids plus one
  tail bucket, at T = 1), g = f^S - f^T and J the teacher's jump tokens::

      C_t = sum_{u < t, u not in J} (g_{u+1} - g_u)          (C = 0 at the first token)
      drift = 0.5 * sum_t C_t^2

  i.e. the student's accumulated non-jump drift away from the teacher's, squared. It enters the
  loss as ``drift_weight * drift`` (divided by the window's supervised tokens, as every term) and
  its gradient reaches the student's logits; jump steps are left to the jump weights.
- Gap-energy density: e_t = 0.5 * D_t^2 at the row's supervised positions and 0 at every other
  token position (nothing is learned there), then a centred moving average over ``energy_window``
  token positions (clipped at the row's edges). Windows start where it is lowest
  (:func:`tracegen.distill.data.adaptive_windows`); a window's difficulty is its mean over the
  positions the window trains, and the curriculum sorts by it (:func:`tracegen.distill.data.curriculum_phases`).
  Every epoch runs the whole curriculum again (phases reshuffled inside with the epoch's seed).
  The eval split is not windowed: ``eval_loss`` stays the CE of whole rows cut to ``max_length``.

Not guaranteed: the teacher cache holds the teacher's view of the *whole* row, while a window
gives the student only the window's tokens as context; KD on a window's first tokens therefore asks
for more than the window shows. The overlap (context-only tokens) is what limits this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F  # torch's own convention

from tracegen.config import DiscrepancySettings, TopologySettings
from tracegen.distill.cache import TeacherCache
from tracegen.distill.data import (
    Row,
    Window,
    adaptive_windows,
    cache_start,
    curriculum_phases,
    n_supervised,
    window_row,
)
from tracegen.distill.losses import TeacherTopK, sparse_kd_per_token

EPS = 1e-6  # "exceeds" margin, so a flat signal's rounding flags nothing


def segment_ids(counts: list[int], device: torch.device) -> torch.Tensor:
    """``[N]`` int64: the sequence each flattened token belongs to."""
    return torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))


def discrepancy(f: torch.Tensor, counts: list[int], horizon: int = 1) -> torch.Tensor:
    """``[N]``: D_t of the signal ``f`` ``[N]`` within each sequence (see the module docstring)."""
    seg = segment_ids(counts, f.device)
    total = torch.zeros_like(f)
    terms = torch.zeros_like(f)
    for j in range(1, min(horizon, f.numel() - 1) + 1):
        same = (seg[j:] == seg[:-j]).to(f.dtype)  # t and t + j in one sequence
        total = total + F.pad(same * (f[j:] - f[:-j]).abs() / j, (0, j))
        terms = terms + F.pad(same, (0, j))
    return total / terms.clamp(min=1)


def exceeds_mean_sigma(x: torch.Tensor, counts: list[int], sigma: float) -> torch.Tensor:
    """``[N]`` bool: ``x`` above its sequence's mean + ``sigma`` * (population) standard deviation."""
    x = x.detach().double()
    seg = segment_ids(counts, x.device)
    n = torch.tensor(counts, dtype=x.dtype, device=x.device).clamp(min=1)
    mean = torch.zeros_like(n).index_add(0, seg, x) / n
    var = torch.zeros_like(n).index_add(0, seg, (x - mean[seg]) ** 2) / n
    return x > mean[seg] + sigma * var.sqrt()[seg] + EPS


def jump_weights(d: torch.Tensor, counts: list[int], sigma: float, amplifier: float) -> torch.Tensor:
    """``[N]`` float32: ``amplifier`` where D exceeds mean + sigma * std of its sequence, else 1."""
    return weight_where(exceeds_mean_sigma(d, counts, sigma), amplifier)


def weight_where(jumps: torch.Tensor, weight: float) -> torch.Tensor:
    """``[N]`` float32 KD weights: ``weight`` on the ``jumps`` tokens, 1 elsewhere."""
    return torch.where(jumps, weight, 1.0).float()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """``[N]``: entropy of softmax(logits) per row (nats)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def smooth_logits(
    logits: torch.Tensor, counts: list[int], sigma: float, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DG-limit smoothing: (logits with high-entropy rows replaced by their window mean, which rows).

    Differentiable: a smoothed row's gradient reaches the rows it averages.
    """
    if window <= 1:
        return logits, torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    flagged = exceeds_mean_sigma(entropy(logits.detach()), counts, sigma)
    return window_mean_rows(logits, flagged, counts, window), flagged


def window_mean_rows(x: torch.Tensor, flagged: torch.Tensor, counts: list[int], window: int) -> torch.Tensor:
    """``x`` ``[N, X]`` with each ``flagged`` row replaced by the mean of the original rows in its centred
    window (clipped at its sequence's edges). The output layer is linear, so applying this to hidden
    states and then the output layer equals applying it to the logits (the chunked loss relies on it)."""
    if not bool(flagged.any()):
        return x
    seg = segment_ids(counts, x.device)
    at = flagged.nonzero().squeeze(1)
    total = torch.zeros((at.numel(), x.shape[-1]), dtype=torch.float32, device=x.device)
    size = torch.zeros((at.numel(), 1), dtype=torch.float32, device=x.device)
    for offset in range(-((window - 1) // 2), window // 2 + 1):
        other = (at + offset).clamp(0, x.shape[0] - 1)
        inside = ((at + offset == other) & (seg[other] == seg[at])).float().unsqueeze(1)
        total = total + x[other].float() * inside
        size = size + inside
    return x.index_copy(0, at, (total / size).to(x.dtype))


class DiscKD(NamedTuple):
    kd_sum: torch.Tensor  # sum_t weight_t * KD_t (smoothing applied)
    energy_sum: torch.Tensor  # 0.5 * sum_t D_t^2, differentiable
    jumps: int  # tokens whose KD weight was amplified
    smoothed: int  # tokens whose logits were smoothed


def disc_kd(
    logits: torch.Tensor,
    topk: TeacherTopK,
    counts: list[int],
    temperature: float,
    settings: DiscrepancySettings,
    kd_weights: torch.Tensor | None = None,
) -> DiscKD:
    """The DISC KD terms of one micro-batch; ``kd_weights`` (e.g. TKD's) multiply the jump weights."""
    logits, smoothed = smooth_logits(logits, counts, settings.smoothing_sigma, settings.smoothing_window)
    kd = sparse_kd_per_token(logits, topk, temperature)
    return disc_from_kd(kd, counts, settings, kd_weights, int(smoothed.sum()))


def disc_from_kd(
    kd: torch.Tensor, counts: list[int], settings: DiscrepancySettings, kd_weights: torch.Tensor | None, smoothed: int
) -> DiscKD:
    """The DISC terms from the per-token KD ``[N]`` (on smoothed logits): D, jump weights, gap energy."""
    d = discrepancy(kd, counts, settings.horizon)
    jumps = exceeds_mean_sigma(d, counts, settings.jump_sigma)  # detaches: weights carry no gradient
    weights = weight_where(jumps, settings.jump_amplifier)
    if kd_weights is not None:
        weights = weights * kd_weights
    return DiscKD((kd * weights).sum(), 0.5 * (d * d).sum(), int(jumps.sum()), smoothed)


def gap_energy(d: torch.Tensor) -> torch.Tensor:
    """E_disc = 0.5 * mean(D_t^2) over the given tokens."""
    return 0.5 * (d * d).mean()


# --- topology pass (TKD) -----------------------------------------------------------------------


def teacher_entropy(topk: TeacherTopK) -> torch.Tensor:
    """``[N]``: teacher entropy at T = 1 from the top-k log-probs plus one tail bucket (a lower bound)."""
    return bucket_entropy(topk.logprobs)


def bucket_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """``[N]``: entropy of ``[N, k]`` log-probs plus one tail bucket holding the rest of the mass.

    Differentiable everywhere (the student's drift term needs it): log-probs are floored at -1e4 and
    the tail's log at 1e-30, so an empty bucket or a zero probability adds 0, never a NaN gradient.
    """
    logp = logprobs.float().clamp(min=-1e4)
    p = logp.exp()
    tail = (1.0 - p.sum(-1)).clamp(min=0.0)
    plogp: torch.Tensor = (p * logp).sum(-1) + tail * tail.clamp(min=1e-30).log()
    return -plogp


def drift_path(g: torch.Tensor, counts: list[int], jumps: torch.Tensor) -> torch.Tensor:
    """``[N]``: C_t, the running sum of ``g``'s steps g_{u+1} - g_u (u < t) off the ``jumps``, per sequence."""
    if g.numel() == 0:
        return g
    seg = segment_ids(counts, g.device)
    steps = torch.zeros_like(g)
    if g.numel() > 1:
        keep = (seg[1:] == seg[:-1]) & ~jumps[:-1]
        steps = F.pad((g[1:] - g[:-1]) * keep.to(g.dtype), (0, 1))
    before = F.pad(steps.cumsum(0), (1, 0))[:-1]  # sum over every earlier token of the flat batch
    starts = F.pad(torch.tensor(counts, device=g.device).cumsum(0), (1, 0))[:-1].clamp(max=g.numel() - 1)
    return before - before[starts][seg]  # steps never cross a sequence end, so this restarts at 0


def drift_sum(logits: torch.Tensor, topk: TeacherTopK, counts: list[int], jumps: torch.Tensor) -> torch.Tensor:
    """TKD's drift channel of a micro-batch: 0.5 * sum_t C_t^2 (module docstring); differentiable."""
    student = bucket_entropy(F.log_softmax(logits.float(), dim=-1).gather(1, topk.ids))
    path = drift_path(student - teacher_entropy(topk), counts, jumps)
    return 0.5 * (path * path).sum()


def moving_average(x: torch.Tensor, window: int) -> torch.Tensor:
    """Centred moving average of ``x`` ``[L]`` over ``window`` positions, clipped at the edges."""
    length = x.numel()
    sums = F.pad(x.double().cumsum(0), (1, 0))
    pos = torch.arange(length)
    lo = (pos - (window - 1) // 2).clamp(min=0)
    hi = (pos + window // 2 + 1).clamp(max=length)
    return ((sums[hi] - sums[lo]) / (hi - lo)).float()


class RowTopology(NamedTuple):
    jumps: torch.Tensor  # [n supervised] bool, in cache-entry order
    density: torch.Tensor  # [L] gap-energy density per token position


def row_topology(row: Row, topk: TeacherTopK, length: int, settings: TopologySettings) -> RowTopology:
    """Jumps and gap-energy density of one row (cut to ``length`` tokens) from its cache entries."""
    n = topk.logprobs.shape[0]
    d = discrepancy(teacher_entropy(topk), [n], 1)
    jumps = exceeds_mean_sigma(d, [n], settings.jump_sigma)
    energy = torch.zeros(length)
    positions = [t for t in range(length - 1) if row.labels[t + 1] != -100]
    energy[positions] = 0.5 * d * d
    density = moving_average(energy, settings.energy_window)
    return RowTopology(jumps, density)


@dataclass
class TopologyPlan:
    """The training samples of a TKD run: windows of the training rows, in curriculum phases."""

    pieces: list[Row]  # what the trainer batches: each window as a row (overlap targets masked)
    windows: list[Window]  # where each piece comes from
    cache_skip: list[int]  # each piece's first entry within its row's cache entries
    jump_mask: list[torch.Tensor]  # each piece's teacher jumps per supervised token (bool)
    difficulty: list[float]  # each piece's mean gap-energy density over the positions it trains
    phases: list[list[int]]  # piece indices per curriculum phase, easiest first
    jumps: int  # jump tokens over all pieces

    def batch_jumps(self, pieces: list[int], counts: list[int]) -> torch.Tensor:
        """``[N]`` bool: the teacher jumps of a micro-batch's supervised tokens, in its flattened order."""
        return torch.cat([self.jump_mask[i][:c] for i, c in zip(pieces, counts, strict=True)])

    def summary(self) -> dict[str, object]:
        return {
            "pieces": len(self.pieces),
            "rows": len({w.row for w in self.windows}),
            "jump_tokens": self.jumps,
            "phase_sizes": [len(p) for p in self.phases],
            "windows": [list(w) for w in self.windows],
            "difficulty": [round(x, 6) for x in self.difficulty],
        }


def plan_topology(
    rows: list[Row], train: list[int], cache: TeacherCache, settings: TopologySettings, max_length: int
) -> TopologyPlan:
    """Run the topology pass over the training rows (cut to ``max_length``) and plan the samples.

    A window that trains no token (all of its owned targets masked) is left out.
    """
    cpu = torch.device("cpu")
    plan = TopologyPlan([], [], [], [], [], [], 0)
    for r in train:
        row, length = rows[r], min(len(rows[r].input_ids), max_length)
        topo = row_topology(row, cache.batch([r], [n_supervised(row, max_length)], cpu), length, settings)
        for w in adaptive_windows(
            r, length, topo.density.tolist(), settings.window, settings.min_overlap, settings.max_overlap
        ):
            piece = window_row(row, w)
            owned = [t for t in range(len(piece.labels) - 1) if piece.labels[t + 1] != -100]
            if not owned:
                continue
            skip = cache_start(row, w)
            jumps = topo.jumps[skip : skip + len(owned)]
            plan.pieces.append(piece)
            plan.windows.append(w)
            plan.cache_skip.append(skip)
            plan.jump_mask.append(jumps)
            plan.difficulty.append(float(topo.density[[w.start + t for t in owned]].mean()))
            plan.jumps += int(jumps.sum())
    plan.phases = curriculum_phases(plan.difficulty, settings.curriculum_phases, settings.easiest_fraction)
    return plan
