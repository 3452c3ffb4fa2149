"""The distillation loop, top to bottom: setup -> data -> model -> loop -> save.

Loss per optimizer step (one gradient-accumulation window of ``grad_accum`` micro-batches)::

    L = (alpha_ce * sum_t w_t * CE_t  +  alpha_kd * sum_t KD_t) / N_window      (KD: teacher cache given)
    L = (sum_t w_t * CE_t) / N_window                                           (sequence-level: no cache)

where t runs over the supervised tokens of the window, N_window counts them (not the weights: dividing
by the sum of weights would cancel the proof weighting), w_t is the proof weight on ``proof_mask``
tokens (linear from ``proof_weight_start`` to ``proof_weight_end`` over the steps) and 1 elsewhere.

Optimiser: AdamW on the LoRA weights only, cosine schedule with linear warmup down to
``min_learning_rate``, gradient clipping. bf16 autocast on a GPU that supports it, fp32 otherwise.

Checkpoints (``OUT/checkpoint``, the latest only) hold the adapter, optimizer, scheduler, RNG state and
step; the data order is a pure function of (seed, epoch), so ``resume=True`` continues exactly where the
checkpoint left off. Ctrl-C stops cleanly after writing a checkpoint of the last finished step.

Not done here: padding-free packing (rows are right-padded; on CPU packing did not pay when most rows
fill the length), multi-GPU (runs on one device; ``accelerate launch`` is not wired in).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tracegen.config import DistillConfig
from tracegen.distill.cache import TeacherCache
from tracegen.distill.data import (
    Batch,
    collate,
    dataset_vocab_hash,
    load_rows,
    micro_batches,
    rows_fingerprint,
    split_indices,
)
from tracegen.distill.forward import supervised_logits
from tracegen.distill.lora import wrap_lora
from tracegen.distill.losses import proof_weight, sparse_kd_sum, token_weights, weighted_ce_sum
from tracegen.distill.vocab import vocab_hash
from tracegen.errors import BadInputError
from tracegen.store import write_json_atomic

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"


@dataclass
class StepMetrics:
    step: int
    total_steps: int
    loss: float
    ce: float  # weighted CE per supervised token
    kd: float  # KD per supervised token (0 without a cache)
    proof_weight: float
    lr: float
    grad_norm: float
    supervised_tokens: int
    tokens: int  # non-padding tokens through the model this step
    tokens_per_s: float
    elapsed_s: float
    eval_loss: float | None = None


@dataclass
class TrainSummary:
    out: Path
    mode: Literal["kd", "ce"]
    steps: int
    total_steps: int
    final_loss: float
    best_eval_loss: float | None
    tokens: int
    seconds: float
    interrupted: bool


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to ``floor``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _device_and_precision(config: DistillConfig) -> tuple[torch.device, bool]:
    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if config.precision == "bf16" and not bf16_ok:
        raise BadInputError("precision bf16 needs a GPU with bf16 support", hint="use precision: auto or fp32")
    use_bf16 = bf16_ok and config.precision != "fp32"
    return torch.device("cuda" if cuda else "cpu"), use_bf16


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(
    config: DistillConfig,
    dataset_dir: Path,
    out: Path,
    *,
    resume: bool = False,
    on_step: Callable[[StepMetrics, Any], None] | None = None,
) -> TrainSummary:
    """Train a LoRA adapter on ``dataset_dir`` and save it (PEFT format) to ``out``.

    ``on_step(metrics, model)`` runs after every optimizer step (a KeyboardInterrupt raised there stops
    the run cleanly, as Ctrl-C does).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    # --- setup ---------------------------------------------------------------------------------
    if not config.student:
        raise BadInputError("no student model", hint="pass --student MODEL (a local folder or Hub id)")
    student = str(Path(config.student).resolve()) if Path(config.student).exists() else config.student
    torch.manual_seed(config.seed)
    device, use_bf16 = _device_and_precision(config)
    tokenizer = AutoTokenizer.from_pretrained(student)
    student_hash = vocab_hash(tokenizer)

    # --- data ----------------------------------------------------------------------------------
    rows = load_rows(dataset_dir)
    data_hash = dataset_vocab_hash(dataset_dir)
    if data_hash is not None and data_hash != student_hash:
        raise BadInputError(
            f"{dataset_dir} was tokenized with a different vocabulary (hash {data_hash}) than the student "
            f"{config.student} ({student_hash})",
            hint="re-run `tracegen format` with the student's tokenizer",
        )
    split = split_indices(len(rows), config.eval_fraction)
    if not split.train:
        raise BadInputError(f"{dataset_dir}: no training rows left after the {config.eval_fraction:.0%} eval split")
    # Rows are cut to max_length: when every trained token lies beyond the cut, training would run
    # on nothing at all (loss 0) and save an unchanged adapter. Say so instead.
    if not any(any(label != -100 for label in rows[i].labels[1 : config.max_length]) for i in split.train):
        raise BadInputError(
            f"{dataset_dir}: no trained token within the first {config.max_length} tokens of any training row",
            hint="raise max_length (rows are cut there), or check the dataset with `tracegen audit`",
        )
    cache: TeacherCache | None = None
    if config.teacher_cache:
        cache = TeacherCache(Path(config.teacher_cache))
        if cache.vocab_hash != student_hash:
            raise BadInputError(
                f"KD refused: teacher {cache.meta.get('teacher')} and student {config.student} have different "
                f"vocabularies (hash {cache.vocab_hash} vs {student_hash})",
                hint="use a teacher with the student's tokenizer, or drop the teacher cache to train on CE only",
            )
        if cache.meta.get("dataset_fingerprint") != rows_fingerprint(rows):
            raise BadInputError(
                f"{config.teacher_cache}: the teacher cache was built from a different dataset than {dataset_dir}"
            )
        if abs(cache.temperature - config.temperature) > 1e-9:
            raise BadInputError(
                f"temperature {config.temperature} differs from the cache's {cache.temperature}",
                hint="rebuild the cache with --temperature, or set temperature to the cache's",
            )
        _say(
            f"KD on: teacher cache {config.teacher_cache} (top-{cache.meta['top_k']}, T={cache.temperature}); "
            f"L = {config.alpha_ce} * CE_weighted + {config.alpha_kd} * KD"
        )
    else:
        _say("No teacher cache: sequence-level distillation (CE on the teacher's tokens only, no KD).")
    mode: Literal["kd", "ce"] = "kd" if cache else "ce"
    micro_per_epoch = math.ceil(len(split.train) / config.batch_size)
    total = config.max_steps or max(1, math.ceil(config.epochs * micro_per_epoch / config.grad_accum))
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total)

    # --- model ---------------------------------------------------------------------------------
    base: Any = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    if getattr(base.config, "quantization_config", None) is not None:
        raise BadInputError(f"{student} is quantized; train on a full-precision base")
    if config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    model: Any = wrap_lora(base, config.lora)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_at(s, total, warmup, config.learning_rate, config.min_learning_rate) / config.learning_rate,
    )
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    out.mkdir(parents=True, exist_ok=True)
    start_step = 0
    best_eval: float | None = None
    ckpt = out / CHECKPOINT
    if resume and (ckpt / "trainer_state.pt").is_file():
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        if state["total_steps"] != total:
            raise BadInputError(f"{ckpt}: checkpoint was for {state['total_steps']} steps, this run has {total}")
        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_step, best_eval = int(state["step"]), state["best_eval"]
        _say(f"Resuming from {ckpt} at step {start_step}/{total}")
    elif resume:
        _say(f"No checkpoint in {out}: starting from step 0")
    metrics_path = out / METRICS
    kept = [ln for ln in _read_lines(metrics_path) if json.loads(ln)["step"] <= start_step] if start_step else []
    metrics_path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
    write_json_atomic(
        out / "distill_config.json",
        {
            "config": config.model_dump(mode="json"),
            "student": student,
            "dataset": str(dataset_dir),
            "mode": mode,
            "total_steps": total,
            "warmup_steps": warmup,
            "train_rows": len(split.train),
            "eval_rows": len(split.eval),
            "vocab_hash": student_hash,
        },
    )
    _say(
        f"distill: {len(split.train)} train / {len(split.eval)} eval rows, {total} steps of "
        f"{config.grad_accum} x {config.batch_size} sequences, {'bf16' if use_bf16 else 'fp32'} on {device}"
    )

    # --- loop ----------------------------------------------------------------------------------
    def stream() -> Iterator[list[int]]:
        epoch = 0
        while True:
            yield from micro_batches(split.train, config.batch_size, config.seed, epoch)
            epoch += 1

    batches = stream()
    for _ in range(start_step * config.grad_accum):  # the data position of the checkpoint
        next(batches)

    def window_loss(window: list[Batch], weight: float) -> tuple[float, float, int]:
        n_window = max(1, sum(b.n_supervised() for b in window))
        ce_total = kd_total = 0.0
        for batch in window:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits, targets = supervised_logits(model, batch, device)
            sel = batch.supervised()
            weights = token_weights(batch.proof_mask[:, 1:][sel].to(device), weight)
            ce = weighted_ce_sum(logits, targets, weights)
            if cache is not None:
                counts = sel.sum(dim=1).tolist()
                kd = sparse_kd_sum(logits, cache.batch(batch.rows, counts, device), config.temperature)
                loss = (config.alpha_ce * ce + config.alpha_kd * kd) / n_window
                kd_total += float(kd.detach())
            else:
                loss = ce / n_window
            torch.autograd.backward(loss)
            ce_total += float(ce.detach())
        return ce_total / n_window, kd_total / n_window, n_window

    model.train()
    last_loss = float("nan")
    rng_after_step = torch.get_rng_state()
    tokens_total = 0
    completed = start_step
    interrupted = False
    try:
        for step in range(start_step, total):
            t0 = time.perf_counter()
            window = [collate(rows, next(batches), config.max_length, pad_id) for _ in range(config.grad_accum)]
            weight = proof_weight(step, total, config.proof_weight_start, config.proof_weight_end)
            lr = float(scheduler.get_last_lr()[0])
            ce, kd, n_sup = window_loss(window, weight)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            rng_after_step = torch.get_rng_state()
            completed = step + 1
            tokens = sum(int(b.attention_mask.sum()) for b in window)
            tokens_total += tokens
            dt = time.perf_counter() - t0
            last_loss = config.alpha_ce * ce + config.alpha_kd * kd if cache is not None else ce
            metrics = StepMetrics(
                step=step + 1,
                total_steps=total,
                loss=last_loss,
                ce=ce,
                kd=kd,
                proof_weight=weight,
                lr=lr,
                grad_norm=grad_norm,
                supervised_tokens=n_sup,
                tokens=tokens,
                tokens_per_s=tokens / dt if dt > 0 else 0.0,
                elapsed_s=time.perf_counter() - started,
            )
            if split.eval and ((step + 1) % config.eval_every == 0 or step + 1 == total):
                metrics.eval_loss = evaluate(model, rows, split.eval, config, device, pad_id)
                if best_eval is None or metrics.eval_loss < best_eval:
                    best_eval = metrics.eval_loss
                    model.save_pretrained(str(out / "best"))
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(metrics)) + "\n")
            if (step + 1) % config.log_every == 0 or step + 1 == total:
                _progress(metrics, cache is not None)
            if (step + 1) % config.save_every == 0 and step + 1 < total:
                _save_checkpoint(model, optimizer, scheduler, rng_after_step, step + 1, total, best_eval, ckpt)
            if on_step is not None:
                on_step(metrics, model)
    except KeyboardInterrupt:
        interrupted = True
        optimizer.zero_grad(set_to_none=True)  # a half-accumulated window is dropped and redone on resume
        _save_checkpoint(model, optimizer, scheduler, rng_after_step, completed, total, best_eval, ckpt)
        _say(f"Interrupted after step {completed}/{total}: checkpoint in {ckpt}; re-run with --resume to continue.")

    # --- save ----------------------------------------------------------------------------------
    if not interrupted:
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        shutil.rmtree(ckpt, ignore_errors=True)
    return TrainSummary(
        out=out,
        mode=mode,
        steps=completed,
        total_steps=total,
        final_loss=last_loss,
        best_eval_loss=best_eval,
        tokens=tokens_total,
        seconds=time.perf_counter() - started,
        interrupted=interrupted,
    )


def evaluate(
    model: Any, rows: list[Any], indices: list[int], config: DistillConfig, device: torch.device, pad_id: int
) -> float:
    """Mean (unweighted) cross-entropy per supervised token over ``indices``."""
    model.eval()
    total = 0.0
    count = 0
    with torch.inference_mode():
        for i in range(0, len(indices), config.batch_size):
            batch = collate(rows, indices[i : i + config.batch_size], config.max_length, pad_id)
            logits, targets = supervised_logits(model, batch, device)
            total += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
            count += int(targets.numel())
    model.train()
    return total / max(count, 1)


def _save_checkpoint(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: torch.Tensor,
    step: int,
    total: int,
    best_eval: float | None,
    path: Path,
) -> None:
    """Write to a temporary folder, then swap it in: a crash leaves the old checkpoint or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    state = {
        "step": step,
        "total_steps": total,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "best_eval": best_eval,
    }
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _progress(m: StepMetrics, kd: bool) -> None:
    eta = (m.total_steps - m.step) * (m.elapsed_s / max(m.step, 1))
    parts = [
        f"step {m.step}/{m.total_steps}",
        f"loss {m.loss:.4f}",
        f"ce {m.ce:.4f}",
        *([f"kd {m.kd:.4f}"] if kd else []),
        f"pw {m.proof_weight:.2f}",
        f"lr {m.lr:.2e}",
        f"{m.tokens_per_s:.0f} tok/s",
        f"eta {eta:.0f}s",
        *([f"eval {m.eval_loss:.4f}"] if m.eval_loss is not None else []),
    ]
    _say(" | ".join(parts))
