"""Distill ablation: what each knob does to a tiny student, all four runs in one process on 2 CPU cores.

``python bench/ablation.py`` (under a minute unloaded, up to ~2 under load; ``--quick``: ~20 s).

Setup (everything built here, offline; the tiny models and data of ``tests/distill_fixtures.py``):

- data: ``write_dataset`` rows (a masked "User: ... Assistant:" prompt, a trained answer whose middle
  third is marked proof), split 80/20 with ``split_indices`` (the trainer's own split, seed 42);
- teacher: a different tiny model of the same vocabulary (seed 1), fully fine-tuned a little on the
  training rows (not to convergence: its distribution stays soft), then cached (top-16, T = 2);
- student: the seed-0 tiny model with a LoRA adapter (r = 16), trained by ``tracegen.distill.trainer.train``
  with the same seed, steps, learning rate and data order in four configurations, each adding one
  knob to the one above:

  1. ``ce``         CE only (proof weight 1);
  2. ``+proof``     proof weighting 2.5 -> 1.5 (CE only);
  3. ``+kd``        + KD from the teacher cache, 0.55 CE / 0.45 KD;
  4. ``+disc``      + the DISC v3 terms (jump amplifier 3.0 at mean + 2 sigma, smoothing window 3 at
                    entropy mean + 1 sigma, gap energy weight 0.02).

Reported on the held-out rows, with the live models (full vocabulary), per trained token:

- ``CE``: the student's cross-entropy; ``proof CE``: the same on proof tokens only (what proof
  weighting is for);
- ``KL``: KL(teacher || student) at T = 1 (what KD is for);
- ``E_disc``: the gap energy 0.5 * mean(D_t^2) of the per-token KD term at T = 2 (what DISC's gap
  energy term penalises; DISC's definitions are in ``tracegen/distill/discrepancy.py``);

each also as a ratio to the CE-only run of the same invocation, and the teacher's own held-out CE.

What this shows: that each knob changes training, and which way its own metric moved in this run
(compare a row's metric with the row above: proof CE for +proof, KL for +kd, E_disc for +disc).
It is *not* a quality claim: one seed, a 160-token vocabulary, five sentences, a few hundred
steps of a rank-16 adapter on a 32-wide model. Differences of a few percent are within what another
seed would give. Torch runs on one thread: on a shared 2-core machine two threads of a model this
small spend most of their time waiting for each other.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F  # torch's own convention

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tiny-model fixtures live with the tests

from tests.distill_fixtures import build_model, save_model, write_dataset  # noqa: E402
from tracegen.config import DiscrepancySettings, DistillConfig, LoraSettings  # noqa: E402
from tracegen.distill.cache import build_cache  # noqa: E402
from tracegen.distill.data import Row, collate, load_rows, split_indices  # noqa: E402
from tracegen.distill.discrepancy import discrepancy, gap_energy  # noqa: E402
from tracegen.distill.forward import supervised_logits  # noqa: E402
from tracegen.distill.lora import peft_warnings_silenced  # noqa: E402
from tracegen.distill.trainer import train  # noqa: E402

EVAL_FRACTION = 0.2
CPU = torch.device("cpu")
DISC_V3 = DiscrepancySettings(
    horizon=1, jump_sigma=2.0, jump_amplifier=3.0, smoothing_window=3, smoothing_sigma=1.0, gap_energy_weight=0.02
)
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("ce", {"proof_weight_start": 1.0, "proof_weight_end": 1.0}),
    ("+proof", {}),
    ("+kd", {"kd": True}),
    ("+disc", {"kd": True, "discrepancy": DISC_V3}),
]


def train_teacher(student_dir: Path, out: Path, rows: list[Row], train_rows: list[int], steps: int) -> Path:
    """A seed-1 tiny model of the student's vocabulary, fully fine-tuned on the training rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    model = build_model(len(tokenizer), seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        pick = [train_rows[i] for i in torch.randint(len(train_rows), (8,), generator=g).tolist()]
        logits, targets = supervised_logits(model, collate(rows, pick, 512), CPU)
        torch.nn.functional.cross_entropy(logits, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


class Scores(NamedTuple):
    ce: float
    proof_ce: float
    kl: float
    e_disc: float


def kl_per_token(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T) per row, full vocabulary."""
    log_q, log_p = F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * (t * t)


@torch.inference_mode()
def held_out(student: Any, teacher: Any, rows: list[Row], indices: list[int]) -> Scores:
    """The held-out scores (see the module docstring) over ``indices``."""
    ce, proof, kl, d = [], [], [], []
    for i in range(0, len(indices), 8):
        batch = collate(rows, indices[i : i + 8], 512)
        s_logits, targets = supervised_logits(student, batch, CPU)
        t_logits = supervised_logits(teacher, batch, CPU).logits
        ce.append(F.cross_entropy(s_logits, targets, reduction="none"))
        proof.append(batch.proof_mask[:, 1:][batch.supervised()].bool())
        kl.append(kl_per_token(s_logits, t_logits, 1.0))
        counts = batch.supervised().sum(dim=1).tolist()
        d.append(discrepancy(kl_per_token(s_logits, t_logits, 2.0), counts, 1))
    all_ce, is_proof, all_d = torch.cat(ce), torch.cat(proof), torch.cat(d)
    return Scores(
        float(all_ce.mean()),
        float(all_ce[is_proof].mean()),
        float(torch.cat(kl).mean()),
        float(gap_energy(all_d)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and steps (~20 s)")
    parser.add_argument("--verbose", action="store_true", help="show the trainer's and transformers' progress")
    args = parser.parse_args()
    n_rows, steps, teacher_steps = (48, 60, 60) if args.quick else (160, 300, 150)
    torch.set_num_threads(1)
    started = time.perf_counter()
    quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(io.StringIO())
    with quiet, peft_warnings_silenced(), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        table, split, before, teacher_ce = run(root, n_rows, steps, teacher_steps)
    base = table[0][1]
    print(
        f"{len(split.train)} train / {len(split.eval)} held-out rows, {steps} steps of 4 rows. Teacher CE "
        f"{teacher_ce:.3f}; untrained student: CE {before.ce:.3f}, proof CE {before.proof_ce:.3f}, "
        f"KL {before.kl:.3f}, E_disc {before.e_disc:.3f}"
    )
    print(f"{'config':<8}" + "".join(f"{h:>11}{'vs ce':>7}" for h in ("CE", "proof CE", "KL", "E_disc")) + "  train s")
    for name, scores, seconds in table:
        cells = "".join(f"{v:>11.4f}{v / b:>7.3f}" for v, b in zip(scores, base, strict=True))
        print(f"{name:<8}{cells}{seconds:>9.1f}")
    print(f"total {time.perf_counter() - started:.0f} s")


def run(
    root: Path, n_rows: int, steps: int, teacher_steps: int
) -> tuple[list[tuple[str, Scores, float]], Any, Scores, float]:
    """Build the data, teacher and cache under ``root``; train and score the four configurations."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    student_dir = save_model(root / "student", seed=0)
    dataset = write_dataset(root / "dataset", student_dir, n=n_rows, seed=0)
    rows = load_rows(dataset)
    split = split_indices(len(rows), EVAL_FRACTION)
    teacher_dir = train_teacher(student_dir, root / "teacher", rows, split.train, teacher_steps)
    build_cache(dataset, str(teacher_dir), root / "cache", top_k=16, temperature=2.0)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    before = held_out(AutoModelForCausalLM.from_pretrained(str(student_dir)).eval(), teacher, rows, split.eval)
    teacher_ce = held_out(teacher, teacher, rows, split.eval).ce
    table: list[tuple[str, Scores, float]] = []
    for name, options in CONFIGS:
        options = dict(options)
        config = DistillConfig(
            student=str(student_dir),
            teacher_cache=str(root / "cache") if options.pop("kd", False) else None,
            lora=LoraSettings(r=16, alpha=32, dropout=0.0),
            batch_size=4,
            grad_accum=1,
            max_steps=steps,
            learning_rate=1e-2,
            min_learning_rate=1e-3,
            warmup_steps=0,
            eval_fraction=EVAL_FRACTION,
            eval_every=steps,
            log_every=steps,
            **options,
        )
        t0 = time.perf_counter()
        train(config, dataset, root / name)
        seconds = time.perf_counter() - t0
        student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(student_dir)), str(root / name))
        table.append((name, held_out(student.eval(), teacher, rows, split.eval), seconds))
    return table, split, before, teacher_ce


if __name__ == "__main__":
    main()
