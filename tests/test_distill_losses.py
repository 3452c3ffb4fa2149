"""Loss math against hand computations and dense references."""

from __future__ import annotations

import math

import pytest
import torch

from tracegen.distill.losses import (
    dense_kd_sum,
    proof_weight,
    sparse_kd_sum,
    teacher_logprobs_at,
    token_weights,
    topk_from_logits,
    weighted_ce_sum,
)

torch.set_num_threads(1)


@pytest.mark.parametrize(("step", "expected"), [(0, 2.5), (5, 2.0), (10, 1.5)])
def test_proof_weight_decays_linearly(step: int, expected: float) -> None:
    assert proof_weight(step, 11, 2.5, 1.5) == pytest.approx(expected)


@pytest.mark.parametrize(("step", "w"), [(0, 2.5), (5, 2.0), (10, 1.5)])
def test_weighted_ce_matches_hand_computation_on_two_tokens(step: int, w: float) -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    targets = torch.tensor([0, 1])
    proof = torch.tensor([1, 0])  # token 0 is proof, token 1 is not
    weight = proof_weight(step, 11, 2.5, 1.5)
    assert weight == pytest.approx(w)

    def ce(row: list[float], t: int) -> float:
        return -(row[t] - math.log(sum(math.exp(x) for x in row)))

    hand = w * ce([2.0, 0.0, -1.0], 0) + 1.0 * ce([0.5, 0.5, 3.0], 1)
    got = weighted_ce_sum(logits, targets, token_weights(proof, weight)) / 2  # 2 supervised tokens
    assert float(got) == pytest.approx(hand / 2, rel=1e-6)


def test_proof_weight_means_that_many_times_the_gradient() -> None:
    """Normalising by the token count (not the weight sum) keeps the 2.5x: the weighting isn't cancelled."""
    logits = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0]], requires_grad=True)
    targets = torch.tensor([2, 2])
    loss = weighted_ce_sum(logits, targets, token_weights(torch.tensor([1, 0]), 2.5)) / 2
    loss.backward()
    assert logits.grad is not None
    ratio = logits.grad[0] / logits.grad[1]
    assert torch.allclose(ratio, torch.full((3,), 2.5))
    # And versus an unweighted batch of the same tokens, the proof token's gradient is 2.5x as large.
    plain = logits.detach().clone().requires_grad_(True)
    (weighted_ce_sum(plain, targets, torch.ones(2)) / 2).backward()
    assert plain.grad is not None
    assert torch.allclose(logits.grad[0], 2.5 * plain.grad[0])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kd_with_full_k_equals_dense_kl(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(7, 50, generator=g) * 3
    teacher = torch.randn(7, 50, generator=g) * 3
    dense = dense_kd_sum(student, teacher, temperature)
    sparse = sparse_kd_sum(student, topk_from_logits(teacher, 50, temperature), temperature)
    assert float(sparse) == pytest.approx(float(dense), rel=1e-5)
    assert float(dense) > 0


def test_dense_kd_matches_a_hand_kl_and_scales_by_t_squared() -> None:
    student = torch.tensor([[0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0]])
    t = 2.0
    p = torch.softmax(teacher / t, -1)[0].tolist()
    q = torch.softmax(student / t, -1)[0].tolist()
    hand = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)) * t * t
    assert float(dense_kd_sum(student, teacher, t)) == pytest.approx(hand, rel=1e-6)


def test_sparse_kd_tail_bucket_is_a_close_lower_bound_and_zero_at_the_teacher() -> None:
    g = torch.Generator().manual_seed(1)
    student = torch.randn(5, 100, generator=g)
    teacher = torch.randn(5, 100, generator=g) * 2
    dense = float(dense_kd_sum(student, teacher, 2.0))
    sparse = float(sparse_kd_sum(student, topk_from_logits(teacher, 8, 2.0), 2.0))
    assert 0 < sparse <= dense + 1e-6
    # Without the tail bucket (top-k renormalised) the loss would ignore most of the mass at k=8.
    topk = topk_from_logits(teacher, 8, 2.0)
    assert float(teacher_logprobs_at(topk, 2.0).exp().sum(-1).mean()) < 0.5
    # A student equal to the teacher has zero KD.
    assert float(sparse_kd_sum(teacher, topk, 2.0)) == pytest.approx(0.0, abs=1e-4)


def test_sparse_kd_gradient_matches_dense_at_full_k() -> None:
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(3, 20, generator=g)
    a = torch.randn(3, 20, generator=g).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    dense_kd_sum(a, teacher, 2.0).backward()
    sparse_kd_sum(b, topk_from_logits(teacher, 20, 2.0), 2.0).backward()
    assert a.grad is not None and b.grad is not None
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_sparse_kd_tail_from_the_head_mass_equals_the_masked_logsumexp_with_gradients() -> None:
    """The student's tail is 1 - head mass (no extra [N, V] copies); it must equal the exact masked sum."""
    from tracegen.distill.losses import TIGHT_TAIL, sparse_kd_per_token

    torch.manual_seed(0)
    student = torch.randn(6, 500) * 3
    teacher = torch.randn(6, 500) * 3
    topk = topk_from_logits(teacher, 16, 2.0)
    student[0, topk.ids[0, :4]] += 40.0  # peaked on the teacher's ids: a tail far below TIGHT_TAIL
    q = torch.softmax(student / 2.0, -1)
    assert 1 - q[0].gather(-1, topk.ids[0]).sum() < TIGHT_TAIL  # so the exact path runs for row 0
    assert (1 - q[1:].gather(-1, topk.ids[1:]).sum(-1) > TIGHT_TAIL).all()  # and the cheap one for the rest

    def reference(logits: torch.Tensor) -> torch.Tensor:
        log_q_all = torch.log_softmax(logits / 2.0, -1)
        log_q = log_q_all.gather(-1, topk.ids)
        log_p = teacher_logprobs_at(topk, 2.0)
        p = log_p.exp()
        p_tail = (1 - p.sum(-1)).clamp(min=0)
        log_q_tail = torch.logsumexp(log_q_all.scatter(-1, topk.ids, float("-inf")), -1)
        return ((p * (log_p - log_q)).sum(-1) + p_tail * (torch.log(p_tail) - log_q_tail)) * 4.0

    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    got, want = sparse_kd_per_token(a, topk, 2.0), reference(b)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    want.sum().backward()
    assert a.grad is not None and b.grad is not None and torch.isfinite(a.grad).all()
    assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)
