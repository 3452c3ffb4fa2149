"""The chunked loss equals the unchunked one (values and gradients) and its peak memory does not grow with N."""

from __future__ import annotations

import pytest
import torch

from tracegen.config import DiscrepancySettings
from tracegen.distill.chunked_loss import loss_terms, per_token_terms
from tracegen.distill.forward import SupervisedHidden
from tracegen.distill.losses import token_weights, topk_from_logits
from tracegen.testing.alloc_peak import peak_alloc

COUNTS = [10, 15, 12]  # three sequences' supervised tokens
MODES = {
    "ce": (False, None, False),
    "kd": (True, None, False),
    "kd+tkd": (True, None, True),
    # smoothing_sigma 0 smooths every row above its sequence's mean entropy, so smoothing really runs
    "disc": (True, DiscrepancySettings(smoothing_sigma=0.0, jump_sigma=0.5), False),
    "disc+tkd": (True, DiscrepancySettings(smoothing_sigma=0.0, horizon=2), True),
}


def _case(
    seed: int = 0, hidden: int = 16, vocab: int = 300
) -> tuple[torch.Tensor, torch.nn.Linear, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    n = sum(COUNTS)
    layer = torch.nn.Linear(hidden, vocab, bias=True)  # trainable, as in full fine-tuning: its gradient is compared too
    h = torch.randn(n, hidden) * 2
    extra = {
        "targets": torch.randint(0, vocab, (n,)),
        "weights": token_weights(torch.randint(0, 2, (n,)), 2.5),
        "kd_weights": torch.where(torch.rand(n) < 0.3, 1.25, 1.0),
        "teacher": torch.randn(n, vocab) * 3,
    }
    return h, layer, extra


def _loss(h: torch.Tensor, layer: torch.nn.Linear, x: dict[str, torch.Tensor], mode: str, chunk: int) -> torch.Tensor:
    with_kd, disc, tkd = MODES[mode]
    topk = topk_from_logits(x["teacher"], 8, 2.0) if with_kd else None
    kd_weights = x["kd_weights"] if tkd else None
    out = SupervisedHidden(h, x["targets"], layer)
    terms = loss_terms(out, x["weights"], topk, COUNTS, 2.0, disc, kd_weights, chunk)
    loss = 0.55 * terms.ce_sum
    if terms.kd_sum is not None:
        loss = loss + 0.45 * terms.kd_sum
    if terms.energy_sum is not None:
        loss = loss + 0.02 * terms.energy_sum
    if disc is not None:
        assert terms.smoothed > 0
    return loss


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_loss_and_gradients_equal_the_unchunked(mode: str, chunk: int) -> None:
    results = []
    for c in (0, chunk):
        h, layer, x = _case()
        h.requires_grad_(True)
        loss = _loss(h, layer, x, mode, c)
        loss.backward()
        assert h.grad is not None and layer.weight.grad is not None and layer.bias.grad is not None
        results.append((loss.detach(), h.grad, layer.weight.grad, layer.bias.grad))
    (whole, *grads), (chunked, *chunked_grads) = results
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    for got, want in zip(chunked_grads, grads, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_per_token_ce_matches_cross_entropy_without_gradients() -> None:
    h, layer, x = _case()
    with torch.no_grad():
        ce, kd = per_token_terms(SupervisedHidden(h, x["targets"], layer), None, 1.0, 4)
        want = torch.nn.functional.cross_entropy(layer(h), x["targets"], reduction="none")
    assert kd is None
    torch.testing.assert_close(ce, want)


def _loss_peak(n: int, chunk: int, vocab: int) -> int:
    """Peak bytes of CE + top-8 KD, forward and backward, on N rows through a frozen output layer."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, vocab, bias=False).requires_grad_(False)  # frozen, as under LoRA
    h = torch.randn(n, 16, requires_grad=True)
    teacher = topk_from_logits(torch.randn(n, vocab), 8, 2.0)
    out = SupervisedHidden(h, torch.randint(0, vocab, (n,)), layer)

    def step() -> None:
        terms = loss_terms(out, torch.ones(n), teacher, [n], 2.0, None, None, chunk)
        assert terms.kd_sum is not None
        (terms.ce_sum + terms.kd_sum).backward()

    return peak_alloc(step)


def test_chunked_peak_memory_does_not_grow_with_n() -> None:
    chunk, vocab = 64, 8192
    row = vocab * 4  # one fp32 logits row
    small, large = _loss_peak(256, chunk, vocab), _loss_peak(1024, chunk, vocab)
    unchunked = _loss_peak(1024, 0, vocab)
    assert unchunked > 3 * 1024 * row  # the [N, V] copies this replaces
    assert large < 12 * chunk * row  # a few [chunk, V] copies, whatever N
    assert large < small * 1.5 and large < unchunked / 4
