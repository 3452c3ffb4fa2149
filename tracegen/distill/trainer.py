"""The distillation loop, top to bottom: setup -> data -> model -> loop -> save.

Loss per optimizer step (one gradient-accumulation window of ``grad_accum`` micro-batches)::

    L = (alpha_ce * sum_t w_t * CE_t  +  alpha_kd * sum_t KD_t) / N_window      (KD: teacher cache given)
    L = (sum_t w_t * CE_t) / N_window                                           (sequence-level: no cache)

where t runs over the supervised tokens of the window, N_window counts them (not the weights: dividing
by the sum of weights would cancel the proof weighting), w_t is the proof weight on ``proof_mask``
tokens (linear from ``proof_weight_start`` to ``proof_weight_end`` over the steps) and 1 elsewhere.

Options on the KD term (each off by default; each needs the teacher cache)::

    L = (alpha_ce * sum_t w_t * CE_t  +  alpha_kd(step) * sum_t a_t * KD_t  +  lambda * 0.5 * sum_t D_t^2) / N_window

- ``kd_alpha_ramp``: alpha_kd(step) is 0, then ramps linearly to ``alpha_kd`` (``losses.kd_alpha``).
- ``discrepancy`` (DISC): a_t is ``jump_amplifier`` on jump tokens, KD_t is taken on smoothed logits
  at high-entropy tokens, and the gap-energy term is on (``discrepancy``; lambda = ``gap_energy_weight``).
- ``topology`` (TKD): a_t also carries ``jump_kd_weight`` on the teacher's jump tokens; rows are
  trained as adaptive windows, in curriculum order (``discrepancy.plan_topology``).

Optimiser: AdamW on the LoRA weights only (``optimizer: paged_adamw_8bit``: bitsandbytes'
PagedAdamW8bit, CUDA only), cosine schedule with linear warmup down to ``min_learning_rate``, gradient
clipping. bf16 autocast on a GPU that supports it, fp32 otherwise.

Checkpoints (``OUT/checkpoint``, the latest only) hold the adapter, optimizer, scheduler, RNG state and
step; the data order is a pure function of (seed, epoch) (and, with ``topology``, of the dataset and the
teacher cache, which the plan is recomputed from), so ``resume=True`` continues exactly where the
checkpoint left off. Ctrl-C stops cleanly after writing a checkpoint of the last finished step.

Rows are right-padded, or with ``packing`` laid end to end in one sequence per micro-batch (same
supervised tokens, same loss; dense models only).

Several processes (``accelerate launch``, DDP): every process reads the same window of ``grad_accum``
micro-batches and trains micro-batches ``rank, rank + world, ...`` of it; N_window still counts the
whole window, and the gradients are all-reduced once per step, so a step is the one-process step (up
to float rounding) and the data order, hence resume, does not depend on the process count. Process 0
alone prints and writes files. Needs ``grad_accum >= world``. With lora dropout, a resumed
multi-process run draws other dropout masks than an uninterrupted one (every process restarts from
process 0's random state).

FSDP (``accelerate launch --use_fsdp``): the same, with the student's weights sharded over the
processes (:mod:`tracegen.distill.sharding`); needs ``grad_accum`` a multiple of the process count
(every process must run the same number of forward passes, which gather the shards), and Ctrl-C
keeps the last periodic checkpoint (writing one gathers from every process, which an interrupt
cannot coordinate). DeepSpeed is refused.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tracegen.config import DistillConfig
from tracegen.distill.cache import TeacherCache
from tracegen.distill.chunked_loss import loss_terms, per_token_terms
from tracegen.distill.data import (
    Batch,
    collate,
    collate_packed,
    curriculum_batches,
    dataset_vocab_hash,
    load_rows,
    micro_batches,
    rows_fingerprint,
    split_indices,
)
from tracegen.distill.discrepancy import TopologyPlan, plan_topology
from tracegen.distill.forward import SupervisedHidden, supervised_hidden
from tracegen.distill.lora import is_hybrid, wrap_lora
from tracegen.distill.losses import (
    TeacherTopK,
    kd_alpha,
    proof_weight,
    token_weights,
)
from tracegen.distill.sharding import (
    fsdp_requested,
    full_optimizer_state,
    full_trainable_state,
    load_optimizer_state,
    shard,
    total_grad_norm,
)
from tracegen.distill.vocab import vocab_hash
from tracegen.errors import BadInputError
from tracegen.store import staged_dir, write_json_atomic

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
TOPOLOGY = "topology.json"
OPTIONAL_METRICS = (
    "alpha_kd",
    "gap_energy",
    "jump_fraction",
    "smoothed_fraction",
    "topology_jump_fraction",
    "curriculum_phase",
)


@dataclass
class StepMetrics:
    step: int
    total_steps: int
    loss: float
    ce: float  # weighted CE per supervised token
    kd: float  # KD per supervised token, with its token weights (0 without a cache)
    proof_weight: float
    lr: float
    grad_norm: float
    supervised_tokens: int
    tokens: int  # non-padding tokens through the model this step
    tokens_per_s: float
    elapsed_s: float
    eval_loss: float | None = None
    # Only written when their option is on (OPTIONAL_METRICS):
    alpha_kd: float | None = None  # kd_alpha_ramp: this step's alpha_kd
    gap_energy: float | None = None  # discrepancy: E_disc = 0.5 * mean(D^2) per supervised token
    jump_fraction: float | None = None  # discrepancy: share of tokens with an amplified KD weight
    smoothed_fraction: float | None = None  # discrepancy: share of tokens with smoothed logits
    topology_jump_fraction: float | None = None  # topology: share of tokens on a teacher jump
    curriculum_phase: int | None = None  # topology: phase (1-based) of the step's last sample

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl line: options that are off leave no field."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in OPTIONAL_METRICS}


@dataclass
class WindowTotals:
    """Sums over one gradient-accumulation window, per supervised token once divided by ``n``."""

    n: int
    ce: float = 0.0
    kd: float = 0.0
    energy: float = 0.0
    jumps: int = 0
    smoothed: int = 0
    topology_jumps: int = 0


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


def _accelerator() -> Any:
    """This process's place in an ``accelerate launch`` run (a run of one, when started plainly).

    Precision stays ``distill.precision`` (the bf16 autocast below), whatever the launcher's
    ``--mixed_precision``. Without CUDA, ``cpu=True`` is what makes accelerate join the launched
    processes into one CPU (gloo) group rather than let each train alone. DeepSpeed is refused: it
    would shard the optimizer and weights through its own engine, which the loop does not drive.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise BadInputError(
            "distill runs under DDP or FSDP, not DeepSpeed",
            hint="launch with --use_fsdp to shard the model, or without it for DDP",
        )
    return accelerator


def _use_bf16(config: DistillConfig, device: torch.device) -> bool:
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if config.precision == "bf16" and not bf16_ok:
        raise BadInputError("precision bf16 needs a GPU with bf16 support", hint="use precision: auto or fp32")
    return bf16_ok and config.precision != "fp32"


class _SupervisedForward(torch.nn.Module):
    """The PEFT model behind a forward that is ``supervised_hidden``: the module DDP wraps.

    DDP all-reduces gradients only for forward calls through its wrapper, and ``supervised_hidden``
    calls the decoder directly (the loss runs the output layer on supervised positions only, in
    chunks). Wrapping this module rather than the PEFT model keeps both; on one process it is a plain call.
    Under FSDP the output layer runs inside the forward (its weights are gathered there), unchunked.
    """

    def __init__(self, lm: Any, device: torch.device, logits_in_forward: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self._device = device
        self._logits_in_forward = logits_in_forward

    def forward(self, batch: Batch) -> SupervisedHidden:
        out = supervised_hidden(self.lm, batch, self._device)
        if self._logits_in_forward:  # logits as the "hidden states" of an identity output layer
            return SupervisedHidden(out.output_layer(out.hidden), out.targets, torch.nn.Identity())
        return out


def _sum_over_processes(accelerator: Any, *values: float) -> list[float]:
    """Each value added up over the processes (as is, on one process)."""
    if accelerator.num_processes == 1:
        return list(values)
    local = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return [float(v) for v in accelerator.reduce(local, "sum").tolist()]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_options(config: DistillConfig, has_cache: bool, device: torch.device, processes: int, sharded: bool) -> None:
    """Refuse option combinations that cannot run, before any model is loaded."""
    if config.grad_accum < processes:
        raise BadInputError(
            f"grad_accum {config.grad_accum} is less than the {processes} processes: each process trains whole "
            "micro-batches of a step",
            hint=f"set grad_accum to a multiple of {processes} (a step stays grad_accum x batch_size sequences)",
        )
    if sharded and config.grad_accum % processes:
        raise BadInputError(
            f"under FSDP, grad_accum {config.grad_accum} must be a multiple of the {processes} processes: every "
            "process runs the same number of forward passes",
            hint=f"set grad_accum to a multiple of {processes}",
        )
    on = [name for name in ("discrepancy", "topology", "kd_alpha_ramp") if getattr(config, name) is not None]
    if on and not has_cache:
        raise BadInputError(
            f"distill.{on[0]} works on the KD term and needs a teacher cache",
            hint=f"set teacher_cache (or run the cache_teacher stage), or remove distill.{on[0]}",
        )
    if config.optimizer == "paged_adamw_8bit" and (device.type != "cuda" or _bitsandbytes() is None):
        raise BadInputError(
            "optimizer paged_adamw_8bit needs a CUDA GPU and bitsandbytes",
            hint="use optimizer: adamw_torch (the smoke block does)",
        )


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes  # not a dependency: only the paged 8-bit optimizer needs it
    except ImportError:
        return None
    return bitsandbytes


def _optimizer(config: DistillConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "paged_adamw_8bit":
        bnb = _bitsandbytes()
        optimizer: torch.optim.Optimizer = bnb.optim.PagedAdamW8bit(
            params, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        return optimizer
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


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
    accelerator = _accelerator()
    device, world, main = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    sharded = fsdp_requested(accelerator)
    use_bf16 = _use_bf16(config, device)
    _check_options(config, bool(config.teacher_cache), device, world, sharded)

    def say(message: str) -> None:
        if main:
            _say(message)

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
        ramped = f" (ramped over {list(config.kd_alpha_ramp)} of the steps)" if config.kd_alpha_ramp else ""
        energy_term = f" + {config.discrepancy.gap_energy_weight} * E_disc" if config.discrepancy else ""
        say(
            f"KD on: teacher cache {config.teacher_cache} (top-{cache.meta['top_k']}, T={cache.temperature}); "
            f"L = {config.alpha_ce} * CE_weighted + {config.alpha_kd}{ramped} * KD{energy_term}"
        )
    else:
        say("No teacher cache: sequence-level distillation (CE on the teacher's tokens only, no KD).")
    mode: Literal["kd", "ce"] = "kd" if cache else "ce"
    # What is trained: the training rows, or (topology) their windows in curriculum phases.
    plan: TopologyPlan | None = None
    pieces, train_items = rows, split.train
    if cache is not None and config.topology is not None:
        plan = plan_topology(rows, split.train, cache, config.topology, config.max_length)
        pieces, train_items = plan.pieces, list(range(len(plan.pieces)))
        say(
            f"topology: {len(split.train)} rows -> {len(pieces)} windows of <= {config.topology.window} tokens, "
            f"{plan.jumps} teacher jump tokens, curriculum phases of {[len(p) for p in plan.phases]} samples"
        )
    micro_per_epoch = math.ceil(len(train_items) / config.batch_size)
    total = config.max_steps or max(1, math.ceil(config.epochs * micro_per_epoch / config.grad_accum))
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total)

    # --- model ---------------------------------------------------------------------------------
    base: Any = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    if getattr(base.config, "quantization_config", None) is not None:
        raise BadInputError(f"{student} is quantized; train on a full-precision base")
    if config.packing and is_hybrid(base.config):
        raise BadInputError(
            f"packing refused: {student} has linear-attention or recurrent layers, whose state would leak "
            "from one packed row into the next",
            hint="set distill.packing: false for this model",
        )
    if config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    model: Any = wrap_lora(base, config.lora, announce=main)
    model.to(device)

    start_step = 0
    best_eval: float | None = None
    ckpt = out / CHECKPOINT
    state: dict[str, Any] | None = None
    if resume and (ckpt / "trainer_state.pt").is_file():
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        if state["total_steps"] != total:
            raise BadInputError(f"{ckpt}: checkpoint was for {state['total_steps']} steps, this run has {total}")
        if bool(state.get("sharded")) != sharded:
            raise BadInputError(
                f"{ckpt}: checkpoint was written by a{'n FSDP' if state.get('sharded') else ' non-FSDP'} run",
                hint="resume with the same kind of launch (with or without --use_fsdp)",
            )
        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))  # before sharding
    if sharded:
        trained, units = shard(_SupervisedForward(model, device, logits_in_forward=True), model)
        local = sum(p.to_local().numel() for p in trained.parameters())
        say(f"FSDP: {units} decoder layers and the root sharded over {world} processes ({local:,} weights here)")
        params = [p for p in trained.parameters() if p.requires_grad]
        optimizer = _optimizer(config, params)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        # DDP wraps in place: ``model`` stays the trained PEFT model (to load and save).
        trained, optimizer = accelerator.prepare(_SupervisedForward(model, device), _optimizer(config, params))
        if isinstance(trained, torch.nn.parallel.DistributedDataParallel):
            # The buffers (rotary tables) are constants. Syncing them would put a collective in forward
            # calls, which evaluation runs a different number of times on each process.
            trained.broadcast_buffers = False
    # Not prepared: accelerate would step it once per process, as if each process ran its own steps.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_at(s, total, warmup, config.learning_rate, config.min_learning_rate) / config.learning_rate,
    )
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    if state is not None:
        if sharded:
            load_optimizer_state(trained, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_step, best_eval = int(state["step"]), state["best_eval"]
        say(f"Resuming from {ckpt} at step {start_step}/{total}")
    elif resume:
        say(f"No checkpoint in {out}: starting from step 0")

    def save_adapter(folder: Path) -> None:
        """The adapter as PEFT saves it, from process 0 (every process takes part under FSDP)."""
        whole = full_trainable_state(trained) if sharded else None
        if not main:
            return
        kwargs = {"state_dict": whole} if whole is not None else {}
        if folder == out:  # beside the metrics and config; the checkpoint is removed only after this
            model.save_pretrained(str(out), **kwargs)
        else:
            with staged_dir(folder) as tmp:  # replaced whole: an interrupted save keeps the previous best
                model.save_pretrained(str(tmp), **kwargs)

    def checkpoint(step: int, rng: torch.Tensor) -> None:
        optimizer_state = full_optimizer_state(trained, optimizer) if sharded else optimizer.state_dict()
        adapter = full_trainable_state(trained) if sharded else None
        if main:
            _save_checkpoint(model, adapter, optimizer_state, scheduler, rng, step, total, best_eval, sharded, ckpt)

    metrics_path = out / METRICS
    if main:
        out.mkdir(parents=True, exist_ok=True)
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
                **({"train_windows": len(plan.pieces)} if plan is not None else {}),
            },
        )
        if plan is not None:
            write_json_atomic(out / TOPOLOGY, plan.summary())
    processes = f", {world} processes{' (FSDP)' if sharded else ''}" if world > 1 else ""
    say(
        f"distill: {len(split.train)} train / {len(split.eval)} eval rows, {total} steps of "
        f"{config.grad_accum} x {config.batch_size} sequences, {'bf16' if use_bf16 else 'fp32'} on {device}"
        f"{processes}"
    )

    # --- loop ----------------------------------------------------------------------------------
    def stream() -> Iterator[list[int]]:
        epoch = 0
        while True:
            if plan is not None:
                yield from curriculum_batches(plan.phases, config.batch_size, config.seed, epoch)
            else:
                yield from micro_batches(train_items, config.batch_size, config.seed, epoch)
            epoch += 1

    batches = stream()
    for _ in range(start_step * config.grad_accum):  # the data position of the checkpoint
        next(batches)

    phase_of = {i: k + 1 for k, phase in enumerate(plan.phases) for i in phase} if plan is not None else {}

    def teacher(batch: Batch, counts: list[int]) -> TeacherTopK:
        assert cache is not None
        if plan is None:
            return cache.batch(batch.rows, counts, device)
        rows_of = [plan.windows[i].row for i in batch.rows]
        return cache.batch(rows_of, counts, device, [plan.cache_skip[i] for i in batch.rows])

    def window_loss(window: list[Batch], weight: float, alpha_kd: float) -> WindowTotals:
        """This process's share of the window's sums; ``n`` counts the whole window (every process reads it all)."""
        totals = WindowTotals(n=max(1, sum(b.n_supervised() for b in window)))
        disc = config.discrepancy
        chunk = 0 if sharded else config.loss_chunk_tokens  # FSDP: logits come whole from the forward
        mine = window[accelerator.process_index :: world]
        for k, batch in enumerate(mine):
            # DDP all-reduces once per step, in the backward of this process's last micro-batch; FSDP
            # reduce-scatters every backward into the sharded gradients.
            with nullcontext() if sharded or k == len(mine) - 1 else accelerator.no_sync(trained):
                sel = batch.supervised()
                weights = token_weights(batch.proof_mask[:, 1:][sel].to(device), weight)
                counts = batch.counts()
                topk = teacher(batch, counts) if cache is not None else None
                kd_weights = None
                if plan is not None:
                    kd_weights = torch.cat([plan.kd_weight[i][:c] for i, c in zip(batch.rows, counts, strict=True)]).to(
                        device
                    )
                    totals.topology_jumps += int((kd_weights != 1.0).sum())
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    terms = loss_terms(
                        trained(batch), weights, topk, counts, config.temperature, disc, kd_weights, chunk
                    )
                ce = terms.ce_sum
                loss = ce if cache is None else config.alpha_ce * ce
                if terms.kd_sum is not None:
                    kd = terms.kd_sum
                    if terms.energy_sum is not None and disc is not None:
                        loss = loss + disc.gap_energy_weight * terms.energy_sum
                        totals.energy += float(terms.energy_sum.detach())
                        totals.jumps += terms.jumps
                        totals.smoothed += terms.smoothed
                    loss = loss + alpha_kd * kd
                    totals.kd += float(kd.detach())
                # DDP averages the processes' gradients, and each process's loss is its share of the
                # window's sum: scaling by the process count turns that average back into the sum.
                accelerator.backward(loss / (totals.n / world))
            totals.ce += float(ce.detach())
        return totals

    def all_processes(part: WindowTotals) -> WindowTotals:
        """Every process's share of the window added up (for the metrics)."""
        ce, kd, energy, jumps, smoothed, topology_jumps = _sum_over_processes(
            accelerator, part.ce, part.kd, part.energy, part.jumps, part.smoothed, part.topology_jumps
        )
        return WindowTotals(part.n, ce, kd, energy, round(jumps), round(smoothed), round(topology_jumps))

    def make_batch(indices: list[int]) -> Batch:
        if config.packing:
            return collate_packed(pieces, indices, config.max_length)
        return collate(pieces, indices, config.max_length, pad_id)

    trained.train()
    last_loss = float("nan")
    rng_after_step = torch.get_rng_state()
    tokens_total = 0
    completed = start_step
    interrupted = False
    try:
        for step in range(start_step, total):
            t0 = time.perf_counter()
            window = [make_batch(next(batches)) for _ in range(config.grad_accum)]
            weight = proof_weight(step, total, config.proof_weight_start, config.proof_weight_end)
            alpha_kd = kd_alpha(step, total, config.alpha_kd, config.kd_alpha_ramp)
            lr = float(scheduler.get_last_lr()[0])
            sums = all_processes(window_loss(window, weight, alpha_kd))
            n_sup = sums.n
            ce, kd, energy = sums.ce / n_sup, sums.kd / n_sup, sums.energy / n_sup
            if sharded:
                grad_norm = total_grad_norm(params, config.max_grad_norm)
            else:
                grad_norm = float(accelerator.clip_grad_norm_(params, config.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            rng_after_step = torch.get_rng_state()
            completed = step + 1
            tokens = sum(int(b.attention_mask.sum()) for b in window)
            tokens_total += tokens
            dt = time.perf_counter() - t0
            last_loss = ce
            if cache is not None:
                gap = config.discrepancy.gap_energy_weight * energy if config.discrepancy is not None else 0.0
                last_loss = config.alpha_ce * ce + alpha_kd * kd + gap
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
            if config.kd_alpha_ramp is not None:
                metrics.alpha_kd = alpha_kd
            if config.discrepancy is not None:
                metrics.gap_energy = energy
                metrics.jump_fraction = sums.jumps / n_sup
                metrics.smoothed_fraction = sums.smoothed / n_sup
            if plan is not None:
                metrics.topology_jump_fraction = sums.topology_jumps / n_sup
                metrics.curriculum_phase = phase_of[window[-1].rows[-1]]
            if split.eval and ((step + 1) % config.eval_every == 0 or step + 1 == total):
                metrics.eval_loss = evaluate(trained, rows, split.eval, config, pad_id, accelerator)
                if best_eval is None or metrics.eval_loss < best_eval:
                    best_eval = metrics.eval_loss
                    save_adapter(out / "best")
            if main:
                with metrics_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics.record()) + "\n")
                if (step + 1) % config.log_every == 0 or step + 1 == total:
                    _progress(metrics, cache is not None)
            if (step + 1) % config.save_every == 0 and step + 1 < total:
                checkpoint(step + 1, rng_after_step)
            if on_step is not None:
                on_step(metrics, model)
    except KeyboardInterrupt:
        interrupted = True
        optimizer.zero_grad(set_to_none=True)  # a half-accumulated window is dropped and redone on resume
        if sharded:  # writing one gathers from every process, which may have stopped at other points
            say(f"Interrupted after step {completed}/{total}: the last periodic checkpoint in {ckpt} is kept.")
        else:  # no collective in checkpoint() here: the processes may have been interrupted at different points
            checkpoint(completed, rng_after_step)
            say(f"Interrupted after step {completed}/{total}: checkpoint in {ckpt}; re-run with --resume to continue.")

    # --- save ----------------------------------------------------------------------------------
    if not interrupted:
        save_adapter(out)
        if main:
            tokenizer.save_pretrained(str(out))
            shutil.rmtree(ckpt, ignore_errors=True)
        accelerator.wait_for_everyone()  # every process returns once the adapter is written
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
    trained: Any, rows: list[Any], indices: list[int], config: DistillConfig, pad_id: int, accelerator: Any
) -> float:
    """Mean (unweighted) cross-entropy per supervised token over ``indices``, the batches shared by the processes.

    ``trained`` is the (prepared or sharded) ``_SupervisedForward``. Every process runs the same number
    of forward passes (an FSDP forward gathers shards from all of them): one short of batches repeats
    its first and does not count it.
    """
    trained.eval()
    total = 0.0
    count = 0
    starts = list(range(0, len(indices), config.batch_size))
    world = accelerator.num_processes
    mine = starts[accelerator.process_index :: world]
    rounds = -(-len(starts) // world)
    with torch.no_grad():  # not inference_mode: FSDP keeps the gathered root weights for training
        for k in range(rounds):
            i = mine[k] if k < len(mine) else starts[0]
            batch = collate(rows, indices[i : i + config.batch_size], config.max_length, pad_id)
            out = trained(batch)
            if k < len(mine):
                total += float(per_token_terms(out, None, 1.0, config.loss_chunk_tokens)[0].sum())
                count += int(out.targets.numel())
    trained.train()
    total, all_count = _sum_over_processes(accelerator, total, count)
    return total / max(all_count, 1)


def _save_checkpoint(
    model: Any,
    adapter: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: torch.Tensor,
    step: int,
    total: int,
    best_eval: float | None,
    sharded: bool,
    path: Path,
) -> None:
    """Write to a temporary folder, then swap it in: a crash leaves the old checkpoint or the new one.

    ``adapter`` is the gathered LoRA state under FSDP (None: the model's own), ``optimizer_state`` the
    optimizer's (gathered and keyed by names under FSDP).
    """
    with staged_dir(path) as tmp:
        model.save_pretrained(str(tmp), **({"state_dict": adapter} if adapter is not None else {}))
        state = {
            "step": step,
            "total_steps": total,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            "best_eval": best_eval,
            "sharded": sharded,
        }
        torch.save(state, tmp / "trainer_state.pt")


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
        *([f"a_kd {m.alpha_kd:.3f}"] if m.alpha_kd is not None else []),
        *([f"gap {m.gap_energy:.4f}"] if m.gap_energy is not None else []),
        *([f"phase {m.curriculum_phase}"] if m.curriculum_phase is not None else []),
        f"pw {m.proof_weight:.2f}",
        f"lr {m.lr:.2e}",
        f"{m.tokens_per_s:.0f} tok/s",
        f"eta {eta:.0f}s",
        *([f"eval {m.eval_loss:.4f}"] if m.eval_loss is not None else []),
    ]
    _say(" | ".join(parts))
