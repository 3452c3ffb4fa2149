"""The distillation loop, top to bottom: setup -> data -> model -> loop -> save.

Loss per optimizer step (one gradient-accumulation window of ``grad_accum`` micro-batches)::

    L = (alpha_ce * sum_t w_t * CE_t  +  alpha_kd * sum_t KD_t) / N_window      (KD: teacher cache given)
    L = (sum_t w_t * CE_t) / N_window                                           (sequence-level: no cache)

where t runs over the supervised tokens of the window, N_window counts them (not the weights: dividing
by the sum of weights would cancel the proof weighting), w_t is the proof weight on ``proof_mask``
tokens (linear from ``proof_weight_start`` to ``proof_weight_end`` over the steps; 1 with
``proof_weighting: false``) and 1 elsewhere.

Options on the KD term (each off by default; each needs the teacher cache)::

    L = (alpha_ce * sum_t w_t * CE_t  +  alpha_kd(step) * sum_t a_t * KD_t  +  lambda * 0.5 * sum_t D_t^2) / N_window

- ``kd_alpha_ramp``: alpha_kd(step) is 0, then ramps linearly to ``alpha_kd`` (``losses.kd_alpha``).
- ``discrepancy`` (DISC): a_t is ``jump_amplifier`` on jump tokens, KD_t is taken on smoothed logits
  at high-entropy tokens, and the gap-energy term is on (``discrepancy``; lambda = ``gap_energy_weight``).
- ``topology`` (TKD): ``jump_weight`` multiplies w_t and a_t (``jump_target: loss``) or a_t only
  (``kd``) on the teacher's jump tokens; ``drift_weight`` adds ``drift_weight * 0.5 * sum_t C_t^2``
  (the drift channel, ``discrepancy.drift_sum``); rows are trained as adaptive windows, in
  curriculum order (``discrepancy.plan_topology``).

What is trained (``method``): a LoRA adapter on the frozen student, loaded in ``model_dtype`` (the
adapter in fp32), or every weight of the student (``full``: fp32 weights whatever ``model_dtype``,
which is then the dtype the model is written in). Optimiser: AdamW on the trained weights
(``adamw_torch_fused``: torch's fused kernel; ``adamw_8bit`` / ``paged_adamw_8bit``: bitsandbytes',
CUDA only), cosine schedule with linear warmup down to ``min_learning_rate``, gradient clipping. bf16
autocast on a GPU that supports it, fp32 otherwise.

Checkpoints (``OUT/checkpoint``, the latest only) hold the adapter (full: the fp32 model), optimizer,
scheduler, RNG state and step; the data order is a pure function of (seed, epoch) (and, with
``topology``, of the dataset and the teacher cache, which the plan is recomputed from), so
``resume=True`` continues exactly where the checkpoint left off. Ctrl-C stops cleanly after writing a
checkpoint of the last finished step.

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
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tracegen.config import DistillConfig
from tracegen.distill.cache import TeacherCache
from tracegen.distill.chunked_loss import loss_terms, per_token_terms
from tracegen.distill.data import (
    Batch,
    Row,
    Split,
    collate,
    collate_packed,
    curriculum_batches,
    dataset_vocab_hash,
    load_rows,
    micro_batches,
    rows_fingerprint,
    split_indices,
)
from tracegen.distill.discrepancy import TopologyPlan, drift_sum, plan_topology, weight_where
from tracegen.distill.dtypes import resolve_dtype
from tracegen.distill.forward import SupervisedHidden, supervised_hidden
from tracegen.distill.lora import is_hybrid, wrap_lora
from tracegen.distill.losses import (
    TeacherTopK,
    kd_alpha,
    proof_weight,
    token_weights,
)
from tracegen.distill.memory import MemoryEstimate, estimate_peak, model_size
from tracegen.distill.sharding import (
    fsdp_requested,
    full_optimizer_state,
    full_trainable_state,
    load_optimizer_state,
    shard,
    total_grad_norm,
)
from tracegen.distill.tracking import Tracking
from tracegen.distill.vocab import vocab_hash
from tracegen.errors import BadInputError
from tracegen.store import staged_dir, write_json_atomic

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
TOPOLOGY = "topology.json"
OPTIONAL_METRICS = (
    "alpha_kd",
    "gap_energy",
    "drift",
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
    drift: float | None = None  # topology with drift_weight: 0.5 * sum(C^2) per supervised token
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
    drift: float = 0.0
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


def _accelerator(**trackers: Any) -> Any:
    """This process's place in an ``accelerate launch`` run (a run of one, when started plainly).

    ``trackers``: ``log_with`` and ``project_dir`` for the experiment trackers (``Tracking``), if any.

    Precision stays ``distill.precision`` (the bf16 autocast below), whatever the launcher's
    ``--mixed_precision``. Without CUDA, ``cpu=True`` is what makes accelerate join the launched
    processes into one CPU (gloo) group rather than let each train alone. DeepSpeed is refused: it
    would shard the optimizer and weights through its own engine, which the loop does not drive.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", **trackers)
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


def _silent(message: str) -> None:
    """What processes other than process 0 print: nothing."""


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
    if config.optimizer in EIGHT_BIT and (device.type != "cuda" or _bitsandbytes() is None):
        raise BadInputError(
            f"optimizer {config.optimizer} needs a CUDA GPU and bitsandbytes",
            hint="use optimizer: adamw_torch (the smoke block does)",
        )


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes  # not a dependency: only the paged 8-bit optimizer needs it
    except ImportError:
        return None
    return bitsandbytes


EIGHT_BIT = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}  # bitsandbytes' classes


def _optimizer(config: DistillConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over ``params``: torch's (fused when asked) with fp32 state, or bitsandbytes' 8-bit ones."""
    lr, wd = config.learning_rate, config.weight_decay
    if config.optimizer in EIGHT_BIT:
        optimizer: torch.optim.Optimizer = getattr(_bitsandbytes().optim, EIGHT_BIT[config.optimizer])(
            params, lr=lr, weight_decay=wd
        )
        return optimizer
    if config.optimizer == "adamw_torch_fused":
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)
        except RuntimeError as exc:  # torch names the device or dtype it has no fused kernel for
            raise BadInputError(f"optimizer adamw_torch_fused: {exc}", hint="use optimizer: adamw_torch") from exc
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


@dataclass
class TrainData:
    """What the data phase decides, before any model is loaded."""

    student: str  # a local folder (resolved) or a Hub id
    tokenizer: Any
    vocab_hash: str
    rows: list[Row]
    split: Split
    cache: TeacherCache | None
    plan: TopologyPlan | None  # topology: the windows trained instead of the rows
    pieces: list[Row]  # what the micro-batches index: the rows, or the plan's windows
    train_items: list[int]
    total: int  # optimizer steps of the run
    warmup: int
    pad_id: int
    dtype: torch.dtype  # the student's model_dtype: LoRA loads its base in it, full writes its model in it
    phase_of: dict[int, int] = field(default_factory=dict)  # topology: each piece's curriculum phase (1-based)

    @property
    def mode(self) -> Literal["kd", "ce"]:
        return "kd" if self.cache is not None else "ce"


@dataclass
class TrainState:
    """Everything the phases share: the set-up phases fill it, :func:`train_step` advances it.

    ``model`` is what is loaded and saved (the PEFT model); ``trained`` is what the loop calls (the
    supervised forward around it, DDP-wrapped or FSDP-sharded). ``rng`` is the CPU random state after
    the last completed step, which a checkpoint stores so a resumed run draws the same dropout masks.
    """

    config: DistillConfig
    out: Path
    accelerator: Any
    sharded: bool
    use_bf16: bool
    data: TrainData
    model: Any
    trained: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    started: float
    step: int = 0  # optimizer steps completed
    best_eval: float | None = None
    rng: torch.Tensor = field(default_factory=torch.get_rng_state)
    tokens: int = 0
    last_loss: float = float("nan")
    batches: Iterator[list[int]] = field(default_factory=lambda: iter(()))
    tracking: Tracking | None = None  # experiment trackers beside metrics.jsonl (``report_to``)

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def world(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def device(self) -> torch.device:
        return torch.device(self.accelerator.device)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / CHECKPOINT

    def say(self, message: str) -> None:
        if self.main:
            _say(message)


def train(
    config: DistillConfig,
    dataset_dir: Path,
    out: Path,
    *,
    resume: bool = False,
    on_step: Callable[[StepMetrics, Any], None] | None = None,
) -> TrainSummary:
    """Train a LoRA adapter (PEFT format) or, with ``method: full``, the whole student on ``dataset_dir``;
    save it to ``out``.

    ``on_step(metrics, model)`` runs after every optimizer step (a KeyboardInterrupt raised there stops
    the run cleanly, as Ctrl-C does).
    """
    started = time.perf_counter()
    if not config.student:
        raise BadInputError("no student model", hint="pass --student MODEL (a local folder or Hub id)")
    torch.manual_seed(config.seed)
    tracking = Tracking(config, out)  # a tracker whose package is missing is refused here, before any load
    accelerator = _accelerator(**tracking.accelerator_kwargs())
    tracking.attach(accelerator)
    try:
        sharded = fsdp_requested(accelerator)
        use_bf16 = _use_bf16(config, accelerator.device)
        _check_options(config, bool(config.teacher_cache), accelerator.device, accelerator.num_processes, sharded)
        say = _say if accelerator.is_main_process else _silent
        data = setup_data(config, dataset_dir, say)
        checkpoint = read_checkpoint(out / CHECKPOINT, data.total, sharded) if resume else None
        if resume and checkpoint is None:
            say(f"No checkpoint in {out}: starting from step 0")
        if accelerator.is_main_process:
            _say(expected_memory(config, data, accelerator, sharded, use_bf16).line())
        resumed_from = out / CHECKPOINT if checkpoint is not None else None
        model = setup_model(
            config, data, accelerator.device, main=accelerator.is_main_process, resumed_from=resumed_from
        )
        state = setup_optimizer(config, data, model, accelerator, sharded, use_bf16, out, started, checkpoint)
        if checkpoint is not None:
            state.say(f"Resuming from {state.checkpoint_dir} at step {state.step}/{data.total}")
        write_run_files(state, dataset_dir)
        state.batches = batch_stream(config, data, state.step)
        state.tracking = tracking
        interrupted = run_steps(state, on_step)
        if not interrupted:
            save_final(state)
    finally:
        tracking.close()  # flush and finish the tracker runs: interrupted and crashed ones too
    return TrainSummary(
        out=out,
        mode=data.mode,
        steps=state.step,
        total_steps=data.total,
        final_loss=state.last_loss,
        best_eval_loss=state.best_eval,
        tokens=state.tokens,
        seconds=time.perf_counter() - started,
        interrupted=interrupted,
    )


# --- set up: data ------------------------------------------------------------------------------------


def setup_data(config: DistillConfig, dataset_dir: Path, say: Callable[[str], None]) -> TrainData:
    """Rows, split, teacher cache and (topology) plan, checked against the student's vocabulary."""
    from transformers import AutoTokenizer

    assert config.student
    student = str(Path(config.student).resolve()) if Path(config.student).exists() else config.student
    tokenizer = AutoTokenizer.from_pretrained(student)
    student_hash = vocab_hash(tokenizer)
    rows = load_rows(dataset_dir)
    data_hash = dataset_vocab_hash(dataset_dir)
    if data_hash is not None and data_hash != student_hash:
        raise BadInputError(
            f"{dataset_dir} was tokenized with a different vocabulary (hash {data_hash}) than the student "
            f"{config.student} ({student_hash})",
            hint="re-run `tracegen format` with the student's tokenizer",
        )
    split = split_indices(len(rows), config.eval_fraction, config.split_seed, config.split_method)
    if not split.train:
        raise BadInputError(f"{dataset_dir}: no training rows left after the {config.eval_fraction:.0%} eval split")
    # Rows are cut to max_length: when every trained token lies beyond the cut, training would run
    # on nothing at all (loss 0) and save an unchanged adapter. Say so instead.
    if not any(any(label != -100 for label in rows[i].labels[1 : config.max_length]) for i in split.train):
        raise BadInputError(
            f"{dataset_dir}: no trained token within the first {config.max_length} tokens of any training row",
            hint="raise max_length (rows are cut there), or check the dataset with `tracegen audit`",
        )
    cache = _open_cache(config, dataset_dir, rows, student_hash, say) if config.teacher_cache else None
    if cache is None:
        say("No teacher cache: sequence-level distillation (CE on the teacher's tokens only, no KD).")
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
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    phase_of = {i: k + 1 for k, phase in enumerate(plan.phases) for i in phase} if plan is not None else {}
    dtype = resolve_dtype(config.model_dtype, student)
    return TrainData(
        student,
        tokenizer,
        student_hash,
        rows,
        split,
        cache,
        plan,
        pieces,
        train_items,
        total,
        warmup,
        pad_id,
        dtype,
        phase_of,
    )


def _open_cache(
    config: DistillConfig, dataset_dir: Path, rows: list[Row], student_hash: str, say: Callable[[str], None]
) -> TeacherCache:
    """The teacher cache, refused unless it matches the student's vocabulary, the dataset and T."""
    assert config.teacher_cache
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
    if config.topology is not None and config.topology.drift_weight > 0:
        energy_term += f" + {config.topology.drift_weight} * drift"
    say(
        f"KD on: teacher cache {config.teacher_cache} (top-{cache.meta['top_k']}, T={cache.temperature}); "
        f"L = {config.alpha_ce} * CE_weighted + {config.alpha_kd}{ramped} * KD{energy_term}"
    )
    return cache


# --- set up: model -----------------------------------------------------------------------------------


def expected_memory(
    config: DistillConfig, data: TrainData, accelerator: Any, sharded: bool, use_bf16: bool
) -> MemoryEstimate:
    """The estimate for this run's longest micro-batch, from the student's config (its weights are not read)."""
    from transformers import AutoConfig

    rows = [data.pieces[i] for i in data.train_items]
    longest = max(min(len(r.input_ids), config.max_length) for r in rows)
    most = max(sum(label != -100 for label in r.labels[1 : config.max_length]) for r in rows)
    seq_len = longest * config.batch_size if config.packing else longest
    return estimate_peak(
        model_size(AutoConfig.from_pretrained(data.student), config),
        config,
        weight_bytes=data.dtype.itemsize,
        seq_len=seq_len,
        batch_rows=1 if config.packing else config.batch_size,
        supervised=most * config.batch_size,
        device_type=torch.device(accelerator.device).type,
        processes=accelerator.num_processes,
        sharded=sharded,
        bf16_compute=use_bf16,
    )


def setup_model(
    config: DistillConfig, data: TrainData, device: torch.device, *, main: bool, resumed_from: Path | None
) -> Any:
    """The student on ``device``: with a fresh LoRA adapter (whose checkpointed weights are loaded later), or
    (full) the whole model in fp32, from ``resumed_from`` when resuming."""
    from transformers import AutoModelForCausalLM

    student = data.student
    full = config.method == "full"
    source = str(resumed_from) if full and resumed_from is not None else student
    base: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32 if full else data.dtype)
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
    if full:
        model: Any = base.requires_grad_(True)
        if main:
            weights = sum(p.numel() for p in model.parameters())
            _say(f"full: every weight of {base.config.model_type} trained, {weights:,} parameters in fp32")
    else:
        model = wrap_lora(base, config.lora, announce=main)
    model.to(device)
    return model


# --- set up: optimizer (and a checkpoint's state) -----------------------------------------------------


def read_checkpoint(ckpt: Path, total: int, sharded: bool) -> dict[str, Any] | None:
    """The trainer state of the checkpoint in ``ckpt`` (None: there is none), refused if it does not fit."""
    if not (ckpt / "trainer_state.pt").is_file():
        return None
    state: dict[str, Any] = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    if state["total_steps"] != total:
        raise BadInputError(f"{ckpt}: checkpoint was for {state['total_steps']} steps, this run has {total}")
    if bool(state.get("sharded")) != sharded:
        raise BadInputError(
            f"{ckpt}: checkpoint was written by a{'n FSDP' if state.get('sharded') else ' non-FSDP'} run",
            hint="resume with the same kind of launch (with or without --use_fsdp)",
        )
    return state


def setup_optimizer(
    config: DistillConfig,
    data: TrainData,
    model: Any,
    accelerator: Any,
    sharded: bool,
    use_bf16: bool,
    out: Path,
    started: float,
    checkpoint: dict[str, Any] | None,
) -> TrainState:
    """Wrap the model for the processes (DDP or FSDP), build optimizer and schedule, restore a checkpoint."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device, world = accelerator.device, accelerator.num_processes
    if checkpoint is not None and config.method == "lora":  # before sharding: the saved tensors are whole
        set_peft_model_state_dict(model, load_file(str(out / CHECKPOINT / "adapter_model.safetensors")))
    if sharded:
        trained, units = shard(_SupervisedForward(model, device, logits_in_forward=True), model)
        if accelerator.is_main_process:
            local = sum(p.to_local().numel() for p in trained.parameters())
            _say(f"FSDP: {units} decoder layers and the root sharded over {world} processes ({local:,} weights here)")
        params = [p for p in trained.parameters() if p.requires_grad]
        optimizer = _optimizer(config, params)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        # DDP wraps in place: ``model`` stays the trained (PEFT) model (to load and save).
        trained, optimizer = accelerator.prepare(_SupervisedForward(model, device), _optimizer(config, params))
        if isinstance(trained, torch.nn.parallel.DistributedDataParallel):
            # The buffers (rotary tables) are constants. Syncing them would put a collective in forward
            # calls, which evaluation runs a different number of times on each process.
            trained.broadcast_buffers = False
    # Not prepared: accelerate would step it once per process, as if each process ran its own steps.
    total, warmup, peak = data.total, data.warmup, config.learning_rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, total, warmup, peak, config.min_learning_rate) / peak
    )
    state = TrainState(
        config, out, accelerator, sharded, use_bf16, data, model, trained, params, optimizer, scheduler, started
    )
    if checkpoint is not None:
        if sharded:
            load_optimizer_state(trained, optimizer, checkpoint["optimizer"])
        else:
            optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["rng"])
        state.step, state.best_eval = int(checkpoint["step"]), checkpoint["best_eval"]
    state.rng = torch.get_rng_state()
    return state


def write_run_files(state: TrainState, dataset_dir: Path) -> None:
    """metrics.jsonl cut back to the resumed step, distill_config.json, topology.json; the run's line."""
    config, data, out = state.config, state.data, state.out
    if state.main:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path = out / METRICS
        kept = [ln for ln in _read_lines(metrics_path) if json.loads(ln)["step"] <= state.step] if state.step else []
        metrics_path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        write_json_atomic(
            out / "distill_config.json",
            {
                "config": config.model_dump(mode="json"),
                "student": data.student,
                "dataset": str(dataset_dir),
                "mode": data.mode,
                "total_steps": data.total,
                "warmup_steps": data.warmup,
                "train_rows": len(data.split.train),
                "eval_rows": len(data.split.eval),
                "vocab_hash": data.vocab_hash,
                **({"train_windows": len(data.plan.pieces)} if data.plan is not None else {}),
            },
        )
        if data.plan is not None:
            write_json_atomic(out / TOPOLOGY, data.plan.summary())
    processes = f", {state.world} processes{' (FSDP)' if state.sharded else ''}" if state.world > 1 else ""
    state.say(
        f"distill: {len(data.split.train)} train / {len(data.split.eval)} eval rows, {data.total} steps of "
        f"{config.grad_accum} x {config.batch_size} sequences, {'LoRA' if config.method == 'lora' else 'full'}, "
        f"{'bf16' if state.use_bf16 else 'fp32'} on {state.device}{processes}"
    )


def batch_stream(config: DistillConfig, data: TrainData, start_step: int) -> Iterator[list[int]]:
    """Micro-batches (indices into ``data.pieces``) from optimizer step ``start_step`` on, epoch after epoch."""

    def stream() -> Iterator[list[int]]:
        epoch = 0
        while True:
            if data.plan is not None:
                yield from curriculum_batches(data.plan.phases, config.batch_size, config.seed, epoch)
            else:
                yield from micro_batches(data.train_items, config.batch_size, config.seed, epoch)
            epoch += 1

    batches = stream()
    for _ in range(start_step * config.grad_accum):  # the data position of the checkpoint
        next(batches)
    return batches


# --- the loop -----------------------------------------------------------------------------------------


def run_steps(state: TrainState, on_step: Callable[[StepMetrics, Any], None] | None) -> bool:
    """Train from ``state.step`` to the last step; True when interrupted (Ctrl-C, or ``on_step`` raising it)."""
    config, total = state.config, state.data.total
    state.trained.train()
    try:
        while state.step < total:
            metrics = train_step(state)
            step = state.step
            if state.data.split.eval and (step % config.eval_every == 0 or step == total):
                metrics.eval_loss = evaluate(
                    state.trained, state.data.rows, state.data.split.eval, config, state.data.pad_id, state.accelerator
                )
                if state.best_eval is None or metrics.eval_loss < state.best_eval:
                    state.best_eval = metrics.eval_loss
                    save_model(state, state.out / "best")
            if state.main:
                with (state.out / METRICS).open("a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics.record()) + "\n")
                if state.tracking is not None:
                    state.tracking.log(metrics.step, metrics.record())  # the same numbers as the line
                if step % config.log_every == 0 or step == total:
                    _progress(metrics, state.data.cache is not None)
            if step % config.save_every == 0 and step < total:
                save_checkpoint(state)
            if on_step is not None:
                on_step(metrics, state.model)
    except KeyboardInterrupt:
        state.optimizer.zero_grad(set_to_none=True)  # a half-accumulated window is dropped and redone on resume
        where = f"Interrupted after step {state.step}/{total}"
        if state.sharded:  # writing one gathers from every process, which may have stopped at other points
            state.say(f"{where}: the last periodic checkpoint in {state.checkpoint_dir} is kept.")
        else:  # no collective in save_checkpoint() here: the processes may have been interrupted at different points
            save_checkpoint(state)
            state.say(f"{where}: checkpoint in {state.checkpoint_dir}; re-run with --resume to continue.")
        return True
    return False


def train_step(state: TrainState) -> StepMetrics:
    """One optimizer step over the next window of ``grad_accum`` micro-batches; ``state.step`` moves on by one."""
    config, data, step, total = state.config, state.data, state.step, state.data.total
    t0 = time.perf_counter()
    window = [_make_batch(config, data, next(state.batches)) for _ in range(config.grad_accum)]
    weight = proof_weight(step, total, config.proof_weight_start, config.proof_weight_end)
    weight = weight if config.proof_weighting else 1.0  # plain SFT: every trained token weighs 1
    alpha_kd = kd_alpha(step, total, config.alpha_kd, config.kd_alpha_ramp)
    lr = float(state.scheduler.get_last_lr()[0])
    sums = _all_processes(state.accelerator, window_loss(state, window, weight, alpha_kd))
    n_sup = sums.n
    ce, kd, energy = sums.ce / n_sup, sums.kd / n_sup, sums.energy / n_sup
    if state.sharded:
        grad_norm = total_grad_norm(state.params, config.max_grad_norm)
    else:
        grad_norm = float(state.accelerator.clip_grad_norm_(state.params, config.max_grad_norm))
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.rng = torch.get_rng_state()
    state.step = step + 1
    tokens = sum(int(b.attention_mask.sum()) for b in window)
    state.tokens += tokens
    dt = time.perf_counter() - t0
    state.last_loss = ce
    if data.cache is not None:
        gap = config.discrepancy.gap_energy_weight * energy if config.discrepancy is not None else 0.0
        drift = config.topology.drift_weight * sums.drift / n_sup if config.topology is not None else 0.0
        state.last_loss = config.alpha_ce * ce + alpha_kd * kd + gap + drift
    metrics = StepMetrics(
        step=step + 1,
        total_steps=total,
        loss=state.last_loss,
        ce=ce,
        kd=kd,
        proof_weight=weight,
        lr=lr,
        grad_norm=grad_norm,
        supervised_tokens=n_sup,
        tokens=tokens,
        tokens_per_s=tokens / dt if dt > 0 else 0.0,
        elapsed_s=time.perf_counter() - state.started,
    )
    if config.kd_alpha_ramp is not None:
        metrics.alpha_kd = alpha_kd
    if config.discrepancy is not None:
        metrics.gap_energy = energy
        metrics.jump_fraction = sums.jumps / n_sup
        metrics.smoothed_fraction = sums.smoothed / n_sup
    if data.plan is not None:
        metrics.topology_jump_fraction = sums.topology_jumps / n_sup
        if config.topology is not None and config.topology.drift_weight > 0:
            metrics.drift = sums.drift / n_sup
        metrics.curriculum_phase = data.phase_of[window[-1].rows[-1]]
    return metrics


def _make_batch(config: DistillConfig, data: TrainData, indices: list[int]) -> Batch:
    if config.packing:
        return collate_packed(data.pieces, indices, config.max_length)
    return collate(data.pieces, indices, config.max_length, data.pad_id)


def window_loss(state: TrainState, window: list[Batch], weight: float, alpha_kd: float) -> WindowTotals:
    """Forward and backward of this process's share of the window; its sums, ``n`` counting the whole window.

    Every process reads the whole window and trains micro-batches ``rank, rank + world, ...`` of it.
    """
    config, data, accelerator, device, world = state.config, state.data, state.accelerator, state.device, state.world
    totals = WindowTotals(n=max(1, sum(b.n_supervised() for b in window)))
    chunk = 0 if state.sharded else config.loss_chunk_tokens  # FSDP: logits come whole from the forward
    mine = window[accelerator.process_index :: world]
    for k, batch in enumerate(mine):
        # DDP all-reduces once per step, in the backward of this process's last micro-batch; FSDP
        # reduce-scatters every backward into the sharded gradients.
        with nullcontext() if state.sharded or k == len(mine) - 1 else accelerator.no_sync(state.trained):
            sel = batch.supervised()
            weights = token_weights(batch.proof_mask[:, 1:][sel].to(device), weight)
            counts = batch.counts()
            jumps = kd_weights = None
            topo = config.topology
            if data.plan is not None and topo is not None:
                jumps = data.plan.batch_jumps(batch.rows, counts).to(device)
                kd_weights = weight_where(jumps, topo.jump_weight)
                if topo.jump_target == "loss":  # the card: the jump token's loss weight, CE included
                    weights = weights * kd_weights
                totals.topology_jumps += int(jumps.sum())
            topk = _teacher(data, batch, counts, device) if data.cache is not None else None
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=state.use_bf16):
                out = state.trained(batch)
                disc = config.discrepancy
                terms = loss_terms(out, weights, topk, counts, config.temperature, disc, kd_weights, chunk)
                ce = terms.ce_sum
                loss = ce if topk is None else config.alpha_ce * ce
                if topk is not None and jumps is not None and topo is not None and topo.drift_weight > 0:
                    # TKD's drift channel reads the micro-batch's logits whole (it is not chunked).
                    drift = drift_sum(out.output_layer(out.hidden), topk, counts, jumps)
                    loss = loss + topo.drift_weight * drift
                    totals.drift += float(drift.detach())
            if terms.kd_sum is not None:
                if terms.energy_sum is not None:
                    assert config.discrepancy is not None
                    loss = loss + config.discrepancy.gap_energy_weight * terms.energy_sum
                    totals.energy += float(terms.energy_sum.detach())
                    totals.jumps += terms.jumps
                    totals.smoothed += terms.smoothed
                loss = loss + alpha_kd * terms.kd_sum
                totals.kd += float(terms.kd_sum.detach())
            # DDP averages the processes' gradients, and each process's loss is its share of the
            # window's sum: scaling by the process count turns that average back into the sum.
            accelerator.backward(loss / (totals.n / world))
        totals.ce += float(ce.detach())
    return totals


def _teacher(data: TrainData, batch: Batch, counts: list[int], device: torch.device) -> TeacherTopK:
    """The cached teacher top-k of the batch's supervised tokens (topology: of their windows' rows)."""
    assert data.cache is not None
    plan = data.plan
    if plan is None:
        return data.cache.batch(batch.rows, counts, device)
    rows_of = [plan.windows[i].row for i in batch.rows]
    return data.cache.batch(rows_of, counts, device, [plan.cache_skip[i] for i in batch.rows])


def _all_processes(accelerator: Any, part: WindowTotals) -> WindowTotals:
    """Every process's share of the window added up (for the metrics)."""
    ce, kd, energy, drift, jumps, smoothed, topology_jumps = _sum_over_processes(
        accelerator, part.ce, part.kd, part.energy, part.drift, part.jumps, part.smoothed, part.topology_jumps
    )
    return WindowTotals(part.n, ce, kd, energy, drift, round(jumps), round(smoothed), round(topology_jumps))


# --- checkpoint and save ------------------------------------------------------------------------------


def save_model(state: TrainState, folder: Path) -> None:
    """The adapter as PEFT saves it, or (full) the model in ``model_dtype``, from process 0 (every process
    takes part under FSDP)."""
    whole = full_trainable_state(state.trained) if state.sharded else None
    if not state.main:
        return
    if folder == state.out:  # beside the metrics and config; the checkpoint is removed only after this
        _write_model(state, folder, whole)
    else:
        with staged_dir(folder) as tmp:  # replaced whole: an interrupted save keeps the previous best
            _write_model(state, tmp, whole)


def _write_model(state: TrainState, folder: Path, whole: dict[str, torch.Tensor] | None) -> None:
    if state.config.method == "lora":
        state.model.save_pretrained(str(folder), **({"state_dict": whole} if whole is not None else {}))
        return
    # Written beside and then renamed over: a merged folder may hold hard links to these files.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".model-") as tmp:
        save_full_model(state.model, Path(tmp), state.data.dtype, whole)
        state.data.tokenizer.save_pretrained(tmp)  # best/ too is a whole model: merge links it as it is
        for path in Path(tmp).iterdir():
            os.replace(path, folder / path.name)


def save_full_model(
    model: Any, folder: Path, dtype: torch.dtype, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """``model`` (or ``state_dict`` for it) saved as a transformers folder whose weights and config are in ``dtype``.

    Tied weights stay one tensor (cast once), so the folder holds them once as ``save_pretrained`` would.
    """
    weights = state_dict if state_dict is not None else model.state_dict()
    cast: dict[tuple[int, int], torch.Tensor] = {}  # by storage: tied weights are one tensor
    converted = {
        name: cast.setdefault((int(t.untyped_storage().data_ptr()), int(t.storage_offset())), t.detach().to(dtype))
        if t.is_floating_point()
        else t
        for name, t in weights.items()
    }
    model.save_pretrained(str(folder), state_dict=converted)
    # save_pretrained names the dtype of the model in memory (fp32); the files hold ``dtype``.
    config_path = folder / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    saved["dtype"] = str(dtype).removeprefix("torch.")
    write_json_atomic(config_path, saved)


def save_checkpoint(state: TrainState) -> None:
    """``OUT/checkpoint`` at ``state.step`` (a collective under FSDP; written by process 0)."""
    if state.sharded:
        optimizer_state = full_optimizer_state(state.trained, state.optimizer)
        adapter: dict[str, torch.Tensor] | None = full_trainable_state(state.trained)
    else:
        optimizer_state, adapter = state.optimizer.state_dict(), None
    if state.main:
        _save_checkpoint(
            state.model,
            adapter,
            optimizer_state,
            state.scheduler,
            state.rng,
            state.step,
            state.data.total,
            state.best_eval,
            state.sharded,
            state.checkpoint_dir,
        )


def save_final(state: TrainState) -> None:
    """The trained adapter (full: model) and the tokenizer in ``OUT``; then the checkpoint is removed."""
    save_model(state, state.out)
    if state.main:
        state.data.tokenizer.save_pretrained(str(state.out))
        shutil.rmtree(state.checkpoint_dir, ignore_errors=True)
    state.accelerator.wait_for_everyone()  # every process returns once the adapter is written


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

    ``adapter`` is the gathered trained state under FSDP (None: the model's own), ``optimizer_state``
    the optimizer's (gathered and keyed by names under FSDP). Full training saves the whole model, in fp32.
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
