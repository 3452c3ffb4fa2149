"""DISC and TKD: the discrepancy operators against hand computations, windows, curriculum, and training runs."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tracegen.config import DiscrepancySettings, DistillConfig, TopologySettings
from tracegen.distill.cache import TeacherCache, build_cache
from tracegen.distill.data import (
    Row,
    Window,
    adaptive_windows,
    cache_start,
    curriculum_batches,
    curriculum_phases,
    load_rows,
    n_supervised,
    window_row,
)
from tracegen.distill.discrepancy import (
    disc_kd,
    discrepancy,
    drift_path,
    drift_sum,
    entropy,
    gap_energy,
    jump_weights,
    moving_average,
    plan_topology,
    smooth_logits,
)
from tracegen.distill.losses import kd_alpha, sparse_kd_sum, topk_from_logits
from tracegen.distill.trainer import StepMetrics, train
from tracegen.errors import BadInputError
from tracegen.recipe import load_recipe

from .distill_fixtures import read_metrics, save_model, small_config, write_dataset

torch.set_num_threads(1)  # tiny models: a second thread only waits, and badly so on a busy machine


# --- the operators on hand-made sequences ---------------------------------------------------------


def test_discrepancy_h1_is_the_next_token_difference_and_zero_at_the_end() -> None:
    f = torch.tensor([0.0, 1.0, 3.0, 3.0])
    assert discrepancy(f, [4], 1).tolist() == [1.0, 2.0, 0.0, 0.0]


def test_discrepancy_h2_averages_the_terms_that_exist() -> None:
    f = torch.tensor([0.0, 1.0, 3.0, 3.0])
    # t=0: (|1-0|/1 + |3-0|/2) / 2; t=1: (|3-1| + |3-1|/2) / 2; t=2: only j=1 exists: |3-3|; t=3: none
    assert discrepancy(f, [4], 2).tolist() == pytest.approx([1.25, 1.5, 0.0, 0.0])


@pytest.mark.parametrize("h", [1, 2, 3])
def test_two_sequences_in_one_flat_batch_do_not_mix(h: int) -> None:
    a, b = torch.tensor([0.0, 1.0, 3.0, 3.0]), torch.tensor([100.0, 100.0, 90.0])
    both = discrepancy(torch.cat([a, b]), [4, 3], h)
    assert torch.equal(both, torch.cat([discrepancy(a, [4], h), discrepancy(b, [3], h)]))
    assert both[3] == 0  # a's last token does not see b's first
    assert discrepancy(torch.cat([a, b]), [4, 3], 2)[4:].tolist() == pytest.approx([2.5, 10.0, 0.0])


def test_jump_weights_amplify_only_the_spike() -> None:
    # One step in the signal: D = [0 x8, 10, 0]; mean 1, population std 3, threshold 1 + 2*3 = 7.
    f = torch.tensor([0.0] * 9 + [10.0])
    d = discrepancy(f, [10], 1)
    assert d.tolist() == [0.0] * 8 + [10.0, 0.0]
    assert jump_weights(d, [10], 2.0, 3.0).tolist() == [1.0] * 8 + [3.0, 1.0]
    # A calm second sequence next to it keeps weight 1 everywhere, and a flat one flags nothing.
    calm = torch.tensor([1.0, 1.2, 1.0, 1.2])
    both = jump_weights(torch.cat([d, calm]), [10, 4], 2.0, 3.0)
    assert both.tolist() == [1.0] * 8 + [3.0, 1.0] + [1.0] * 4
    assert jump_weights(torch.full((5,), 0.1), [5], 0.0, 3.0).tolist() == [1.0] * 5


def test_smoothing_replaces_only_the_high_entropy_logits_with_the_window_mean() -> None:
    peaked = [[8.0, 0.0, 0.0, 0.0], [0.0, 8.0, 0.0, 0.0], [0.0, 0.0, 8.0, 0.0], [0.0, 0.0, 0.0, 8.0]]
    flat = [0.0, 0.0, 0.0, 0.0]  # entropy ln 4, far above the peaked rows'
    a = torch.tensor([peaked[0], peaked[1], flat, peaked[2], peaked[3]])  # flat in the middle
    b = torch.tensor([flat, peaked[1], peaked[0], peaked[2]])  # flat at the sequence's start
    logits = torch.cat([a, b])
    smoothed, which = smooth_logits(logits, [5, 4], 1.0, 3)
    assert which.tolist() == [False, False, True, False, False, True, False, False, False]
    assert torch.allclose(smoothed[2], (a[1] + a[2] + a[3]) / 3)  # window t-1..t+1
    assert torch.allclose(smoothed[5], (b[0] + b[1]) / 2)  # clipped at b's start: a's last row is not used
    keep = [i for i in range(9) if i not in (2, 5)]
    assert torch.equal(smoothed[keep], logits[keep])
    # The hand check of the flag: ln 4 against mean + 1 sigma of the sequence's entropies.
    h = entropy(a)
    assert float(h[2]) == pytest.approx(math.log(4), rel=1e-6)
    assert float(h[2]) > float(h.mean() + h.std(unbiased=False))


def test_smoothing_window_one_or_zero_is_off() -> None:
    logits = torch.tensor([[8.0, 0.0], [0.0, 0.0], [0.0, 8.0]])
    for window in (0, 1):
        out, which = smooth_logits(logits, [3], 1.0, window)
        assert torch.equal(out, logits) and not which.any()


def test_gap_energy_is_half_the_mean_square_of_d() -> None:
    d = discrepancy(torch.tensor([0.0, 1.0, 3.0, 3.0, 5.0, 5.0, 9.0]), [4, 3], 1)
    assert d.tolist() == [1.0, 2.0, 0.0, 0.0, 0.0, 4.0, 0.0]
    assert float(gap_energy(d)) == pytest.approx(0.5 * (1 + 4 + 16) / 7)


def test_disc_kd_reduces_to_plain_kd_when_every_operator_is_neutral() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(9, 30, generator=g), torch.randn(9, 30, generator=g) * 2
    topk = topk_from_logits(teacher, 8, 2.0)
    neutral = DiscrepancySettings(jump_amplifier=1.0, smoothing_window=0)
    terms = disc_kd(student, topk, [5, 4], 2.0, neutral)
    assert float(terms.kd_sum) == pytest.approx(float(sparse_kd_sum(student, topk, 2.0)), rel=1e-6)
    amplified = disc_kd(student, topk, [5, 4], 2.0, DiscrepancySettings(jump_sigma=0.0, smoothing_window=0))
    assert amplified.jumps > 0 and float(amplified.kd_sum) > float(terms.kd_sum)


def test_gap_energy_gradient_reaches_the_student_logits() -> None:
    g = torch.Generator().manual_seed(1)
    student = torch.randn(7, 20, generator=g).requires_grad_(True)
    topk = topk_from_logits(torch.randn(7, 20, generator=g) * 2, 6, 2.0)
    terms = disc_kd(student, topk, [4, 3], 2.0, DiscrepancySettings())
    assert float(terms.energy_sum.detach()) > 0
    terms.energy_sum.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


# --- the KD ramp ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (3, 0.0), (6, 0.225), (9, 0.45), (20, 0.45)])
def test_kd_alpha_ramp_at_0_15_30_45_100_percent(step: int, expected: float) -> None:
    # 21 steps: step s is at s/20 of the run -> 0%, 15%, 30%, 45%, 100%.
    assert kd_alpha(step, 21, 0.45, (0.15, 0.45)) == pytest.approx(expected)
    assert kd_alpha(step, 21, 0.45, None) == 0.45


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("kd_alpha_ramp: [0.45, 0.15]", r"r.yaml:3: distill\.kd_alpha_ramp: .*start < end"),
        ("topology: {window: 64}", r"r.yaml:3: distill\.topology\.max_overlap: .*below window 64"),
        ("topology: {min_overlap: 0}", r"r.yaml:3: distill\.topology\.min_overlap: .*greater than or equal to 1"),
    ],
)
def test_bad_ramp_and_window_settings_name_the_field(tmp_path: Path, setting: str, message: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\ndistill:\n  {setting}\n")
    with pytest.raises(BadInputError, match=message):
        load_recipe(recipe)


# --- windows and curriculum ----------------------------------------------------------------------


def _targets(row: Row) -> list[int]:
    return [u for u in range(1, len(row.labels)) if row.labels[u] != -100]


def test_adaptive_windows_cut_at_the_density_minimum_within_the_overlap_bounds() -> None:
    g = torch.Generator().manual_seed(3)
    density = torch.rand(300, generator=g).tolist()
    windows = adaptive_windows(7, 300, density, window=100, min_overlap=10, max_overlap=40)
    assert windows[0] == Window(7, 0, 100, 0) and windows[-1].end == 300
    for prev, w in itertools.pairwise(windows):
        assert 10 <= prev.end - w.start <= 40
        assert w.own_from == prev.end and w.end - w.start <= 100
        allowed = range(prev.end - 40, prev.end - 10 + 1)
        assert density[w.start] == min(density[s] for s in allowed)
    assert adaptive_windows(0, 80, density, 100, 10, 40) == [Window(0, 0, 80, 0)]


def test_every_supervised_token_is_trained_exactly_once() -> None:
    # Masked runs (prompts, observations) in the middle, as formatted rows have.
    labels = [-100] * 12 + list(range(12, 150)) + [-100] * 30 + list(range(180, 260))
    row = Row(list(range(260)), labels, [0] * 260)
    density = moving_average(torch.rand(260, generator=torch.Generator().manual_seed(4)), 16).tolist()
    trained: list[int] = []
    for w in adaptive_windows(0, 260, density, window=64, min_overlap=8, max_overlap=24):
        piece = window_row(row, w)
        assert piece.input_ids == row.input_ids[w.start : w.end]
        trained += [w.start + u for u in _targets(piece)]
    assert sorted(trained) == _targets(row) and len(trained) == len(set(trained))


def test_curriculum_phases_put_the_easiest_30_percent_first() -> None:
    difficulty = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0]
    phases = curriculum_phases(difficulty, 4, 0.3)
    assert phases == [[9, 1, 5], [3, 7, 0], [8, 4], [6, 2]]  # 3 easiest, then 7 in bands of 3, 2, 2
    assert curriculum_phases(difficulty, 1, 0.3) == [sorted(range(10), key=lambda i: difficulty[i])]
    epoch0 = curriculum_batches(phases, 2, seed=42, epoch=0)
    order = [i for batch in epoch0 for i in batch]
    assert [set(order[:3]), set(order[3:6]), set(order[6:8]), set(order[8:])] == [set(p) for p in phases]
    assert curriculum_batches(phases, 2, seed=42, epoch=0) == epoch0  # a pure function: resume is exact
    other = [[i for b in curriculum_batches(phases, 2, 42, e) for i in b] for e in range(1, 6)]
    assert any(o != order for o in other)  # shuffled anew each epoch, phases kept
    assert all(set(o[:3]) == set(phases[0]) for o in other)


def test_drift_path_sums_the_steps_off_the_jumps_within_each_sequence() -> None:
    g = torch.tensor([0.0, 1.0, 3.0, 3.5, 10.0, 10.5])
    no_jumps = torch.zeros(6, dtype=torch.bool)
    assert drift_path(g, [6], no_jumps).tolist() == [0.0, 1.0, 3.0, 3.5, 10.0, 10.5]
    jump = no_jumps.clone()
    jump[3] = True  # the step 3.5 -> 10 is a jump: the jump channel's, not the drift's
    assert drift_path(g, [6], jump).tolist() == [0.0, 1.0, 3.0, 3.5, 3.5, 4.0]
    two = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 7.0])  # 2 -> 5 crosses sequences: never a step
    assert drift_path(two, [3, 3], no_jumps).tolist() == [0.0, 1.0, 2.0, 0.0, 0.0, 2.0]
    assert drift_path(two, [3, 0, 3], no_jumps).tolist() == [0.0, 1.0, 2.0, 0.0, 0.0, 2.0]


def test_drift_sum_on_a_hand_made_sequence() -> None:
    # Vocabulary 2, k = 2 (no tail): the student is uniform, uniform, then certain (entropy ln 2,
    # ln 2, ~0); the teacher is certain throughout (~0). g = f_S - f_T = [ln2, ln2, 0], so its steps
    # are 0 and -ln 2, C = [0, 0, -ln 2] and the drift is 0.5 * ln(2)^2.
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 60.0]], requires_grad=True)
    teacher = topk_from_logits(torch.tensor([[60.0, 0.0], [60.0, 0.0], [0.0, 60.0]]), 2, 2.0)
    none = torch.zeros(3, dtype=torch.bool)
    drift = drift_sum(student, teacher, [3], none)
    assert float(drift.detach()) == pytest.approx(0.5 * math.log(2) ** 2, rel=1e-5)
    drift.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0  # it trains the student
    jump = torch.tensor([False, True, False])  # that step is a teacher jump: no drift left
    assert float(drift_sum(student.detach(), teacher, [3], jump)) == pytest.approx(0.0, abs=1e-9)
    same = topk_from_logits(student.detach(), 2, 2.0)  # a student equal to its teacher does not drift
    assert float(drift_sum(student.detach(), same, [3], none)) == pytest.approx(0.0, abs=1e-9)


# --- on tiny real models -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("disc")
    student = save_model(root / "student", seed=0)
    teacher = save_model(root / "teacher", seed=1)  # same tokenizer, other weights
    dataset = write_dataset(root / "dataset", student, n=8)
    cache = root / "cache"
    build_cache(dataset, str(teacher), cache, top_k=16, temperature=2.0, batch_size=4, shard_tokens=100)
    return {"student": student, "teacher": teacher, "dataset": dataset, "cache": cache}


def small(assets: dict[str, Path], **kw: Any) -> DistillConfig:
    config: DistillConfig = small_config(assets["student"], **{"teacher_cache": str(assets["cache"]), **kw})
    return config


SMALL_WINDOWS = TopologySettings(window=16, min_overlap=2, max_overlap=6, energy_window=4)


def test_windows_read_the_cache_entries_of_their_own_positions(assets: dict[str, Path]) -> None:
    rows = load_rows(assets["dataset"])
    cache = TeacherCache(assets["cache"])
    plan = plan_topology(rows, list(range(len(rows))), cache, SMALL_WINDOWS, 512)
    assert len(plan.pieces) > len(rows)  # rows of ~30-60 tokens: several windows each
    cpu = torch.device("cpu")
    for i, (piece, w) in enumerate(zip(plan.pieces, plan.windows, strict=True)):
        row = rows[w.row]
        full = cache.batch([w.row], [n_supervised(row)], cpu)
        targets = _targets(row)
        owned = [w.start + u for u in _targets(piece)]
        at = [targets.index(u) for u in owned]  # these targets' entries in the whole row's cache
        assert at == list(range(plan.cache_skip[i], plan.cache_skip[i] + len(owned)))
        got = cache.batch([w.row], [len(owned)], cpu, [plan.cache_skip[i]])
        assert torch.equal(got.ids, full.ids[at]) and torch.equal(got.logprobs, full.logprobs[at])
        assert plan.jump_mask[i].numel() == len(owned)
    # ...and the teacher at those entries is the teacher at those positions of the whole row.
    from transformers import AutoModelForCausalLM

    from tracegen.distill.data import collate
    from tracegen.distill.forward import supervised_logits

    teacher = AutoModelForCausalLM.from_pretrained(str(assets["teacher"]))
    i = next(k for k, w in enumerate(plan.windows) if w.own_from > 0)
    w = plan.windows[i]
    with torch.inference_mode():
        live = topk_from_logits(supervised_logits(teacher, collate(rows, [w.row], 512), cpu).logits, 16, 2.0)
    count = len(_targets(plan.pieces[i]))
    got = cache.batch([w.row], [count], cpu, [plan.cache_skip[i]])
    assert torch.equal(got.ids, live.ids[plan.cache_skip[i] : plan.cache_skip[i] + count])
    assert cache_start(rows[w.row], w) == plan.cache_skip[i]


def test_disc_run_logs_gap_energy_and_changes_the_loss(assets: dict[str, Path], tmp_path: Path) -> None:
    train(small(assets), assets["dataset"], tmp_path / "off")
    disc = DiscrepancySettings(jump_sigma=1.0)  # a low threshold, so a tiny batch has jumps too
    train(small(assets, discrepancy=disc), assets["dataset"], tmp_path / "on")
    off, on = read_metrics(tmp_path / "off"), read_metrics(tmp_path / "on")
    assert all("gap_energy" not in m and "jump_fraction" not in m for m in off)  # off: the old metrics
    assert all(m["gap_energy"] > 0 for m in on)
    assert any(m["jump_fraction"] > 0 for m in on) and any(m["smoothed_fraction"] > 0 for m in on)
    for m in on:
        assert m["loss"] == pytest.approx(0.55 * m["ce"] + 0.45 * m["kd"] + 0.02 * m["gap_energy"], rel=1e-6)
    assert on[0]["ce"] == pytest.approx(off[0]["ce"], rel=1e-6)  # same start, different KD term
    assert on[0]["loss"] != pytest.approx(off[0]["loss"], rel=1e-4)
    assert on[-1]["ce"] != pytest.approx(off[-1]["ce"], rel=1e-6)  # and the training itself differs


def test_kd_ramp_is_logged_per_step(assets: dict[str, Path], tmp_path: Path) -> None:
    train(small(assets, max_steps=5, kd_alpha_ramp=(0.25, 0.75)), assets["dataset"], tmp_path / "o")
    got = read_metrics(tmp_path / "o")
    assert [m["alpha_kd"] for m in got] == pytest.approx([0.0, 0.0, 0.225, 0.45, 0.45])
    assert got[0]["loss"] == pytest.approx(0.55 * got[0]["ce"], rel=1e-6)  # no KD in the loss yet


def test_topology_run_trains_windows_in_curriculum_order_and_resumes_exactly(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    config = small(assets, topology=SMALL_WINDOWS, max_steps=6, grad_accum=1, save_every=1)
    train(config, assets["dataset"], tmp_path / "a")
    plan = json.loads((tmp_path / "a" / "topology.json").read_text())
    assert plan["pieces"] > plan["rows"] == 8 and sum(plan["phase_sizes"]) == plan["pieces"]
    a = read_metrics(tmp_path / "a")
    assert all("topology_jump_fraction" in m for m in a)
    phases = [m["curriculum_phase"] for m in a]
    assert phases == sorted(phases) and phases[0] == 1  # easiest first

    def stop(m: StepMetrics, model: Any) -> None:
        if m.step == 3:
            raise KeyboardInterrupt

    assert train(config, assets["dataset"], tmp_path / "b", on_step=stop).interrupted
    train(config, assets["dataset"], tmp_path / "b", resume=True)
    b = read_metrics(tmp_path / "b")
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-5)
    assert [m["curriculum_phase"] for m in b] == phases


def test_options_on_the_kd_term_need_a_teacher_cache(assets: dict[str, Path], tmp_path: Path) -> None:
    for option in ({"discrepancy": DiscrepancySettings()}, {"topology": TopologySettings()}):
        with pytest.raises(BadInputError, match=f"distill.{next(iter(option))} .* needs a teacher cache"):
            train(small(assets, teacher_cache=None, **option), assets["dataset"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_paged_adamw_8bit_is_refused_without_cuda(assets: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="optimizer paged_adamw_8bit needs a CUDA GPU and bitsandbytes") as err:
        train(small(assets, optimizer="paged_adamw_8bit"), assets["dataset"], tmp_path / "o")
    assert err.value.hint == "use optimizer: adamw_torch (the smoke block does)"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("target", ["loss", "kd"])
def test_jump_weight_amplifies_the_loss_while_the_ramp_holds_kd_at_zero(
    assets: dict[str, Path], tmp_path: Path, target: str
) -> None:
    # The ramp keeps alpha_kd at 0 on the first step: only the CE term is in the loss there.
    base = {"max_steps": 3, "grad_accum": 1, "kd_alpha_ramp": (0.9, 1.0)}
    runs = {}
    for weight in (1.0, 4.0):
        topo = SMALL_WINDOWS.model_copy(update={"jump_sigma": 0.5, "jump_weight": weight, "jump_target": target})
        train(small(assets, topology=topo, **base), assets["dataset"], tmp_path / f"{weight}")
        runs[weight] = read_metrics(tmp_path / f"{weight}")[0]
    assert runs[4.0]["topology_jump_fraction"] > 0 and runs[4.0]["alpha_kd"] == 0.0
    if target == "loss":  # the card: the jump tokens' loss weight is amplified, CE included
        assert runs[4.0]["ce"] > runs[1.0]["ce"] * 1.01
    else:  # KD only: nothing changes while alpha_kd is 0
        assert runs[4.0]["ce"] == pytest.approx(runs[1.0]["ce"], rel=1e-6)


def test_drift_channel_enters_the_loss_and_is_logged(assets: dict[str, Path], tmp_path: Path) -> None:
    topo = SMALL_WINDOWS.model_copy(update={"drift_weight": 0.5})
    train(small(assets, topology=topo, max_steps=2, grad_accum=1), assets["dataset"], tmp_path / "o")
    got = read_metrics(tmp_path / "o")
    assert all(m["drift"] > 0 for m in got)
    for m in got:
        assert m["loss"] == pytest.approx(0.55 * m["ce"] + 0.45 * m["kd"] + 0.5 * m["drift"], rel=1e-6)


def test_a_chunked_disc_run_trains_as_the_unchunked_one(assets: dict[str, Path], tmp_path: Path) -> None:
    disc = DiscrepancySettings(jump_sigma=1.0)
    kw: dict[str, Any] = {"discrepancy": disc, "eval_fraction": 0.25, "eval_every": 2}
    train(small(assets, loss_chunk_tokens=0, **kw), assets["dataset"], tmp_path / "whole")
    train(small(assets, loss_chunk_tokens=7, **kw), assets["dataset"], tmp_path / "chunked")  # ~40 tokens a batch
    whole, chunked = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "chunked")
    assert any(m["smoothed_fraction"] > 0 for m in whole)
    for a, b in zip(whole, chunked, strict=True):
        for key in ("loss", "ce", "kd", "gap_energy", "grad_norm", "eval_loss"):
            assert b[key] == (None if a[key] is None else pytest.approx(a[key], rel=1e-4, abs=1e-6)), key
        assert (a["eval_loss"] is None) == (a["step"] % 2 == 1)
        assert (b["jump_fraction"], b["smoothed_fraction"]) == (a["jump_fraction"], a["smoothed_fraction"])
