"""bench/distill.py: `tracegen distill`'s training loop vs TRL's SFTTrainer, same run; top-k vs dense KD memory.

    .venv/bin/python bench/distill.py            # ~2.5 min on 2 cores
    .venv/bin/python bench/distill.py --quick    # smoke run, ~40 s (used by a test)

Data: synthetic multi-turn tool-calling trajectories (``tracegen.testing.synthetic``) formatted by
``tracegen format --template chat`` with TRL's ``qwen3_training.jinja`` and the student's tokenizer; the
formatter drops rows longer than ``max_length``, so nothing is cut at training time.

1. Throughput. Each engine (tracegen with LoRA, TRL with LoRA, and tracegen training every weight,
   ``distill.method: full``) runs in a fresh subprocess on the same student (default ``tiny:smollm2``:
   SmolLM2's real tokenizer and 49,152-id vocabulary, 2 random layers of width 64), fp32 on CPU, with
   the same LoRA (r, alpha, dropout, target modules from tracegen's preset), batch size, grad
   accumulation, max_length, optimizer (torch AdamW), lr and steps; activation checkpointing off.
   Both see *the same micro-batches in the same order*: tracegen's seeded order is computed here and
   handed to TRL as a pre-tokenized dataset (``input_ids`` + ``labels`` with -100 on masked tokens,
   which SFTTrainer uses as is) read with ``train_sampling_strategy="sequential"``; each child checks
   it saw exactly the scheduled rows and tokens. tracegen runs without a teacher cache (CE on the
   trained tokens, what SFTTrainer computes; its proof weighting costs one multiply). Timing runs from
   the end of the warm-up step(s) to the end of the timed steps (step-end callbacks on both sides).
   Engines run single-threaded by default (``--threads``): with other work on a 2-core machine, two
   OpenMP threads per engine made the same step vary 10x (barrier spinning while a thread is
   descheduled). Wall and process CPU time are both reported; each engine runs ``--repeats`` times,
   alternating, and the fastest run counts. One more step then runs under
   ``torch.profiler(profile_memory=True)``: the peak tensor bytes allocated within that step (CPU
   allocator; frees of tensors older than the step are not credited). Peak RSS is the child's
   ``ru_maxrss`` (model loading included).
2. KD memory, in this process, on one real batch with the student's vocabulary: the teacher signal per
   supervised token (tracegen's top-k cache, built by ``build_cache`` with a second tiny model as the
   teacher, on disk and as loaded for a step; vs dense [N, V] teacher logits in bf16 / fp32), and the
   peak tensor bytes of the loss forward + backward given the student logits [N, V]: CE alone, CE +
   top-k KD (``sparse_kd_sum``) and CE + dense KD (``dense_kd_sum``, teacher logits given).
3. The supervised share of the data: tracegen's output layer runs on supervised positions only, while
   TRL's fused LM head on CPU scores every padded position (its compaction is Triton-only).

NOT measured: GPU (bf16 autocast, TRL's Triton kernels and compact scoring), packing / padding-free
(off on both sides), dataloader workers, adapter quality, the time to build a teacher cache, and KD
training throughput (TRL has no top-k-cache KD to compare with). With a 2-layer, 64-wide student the
output layer is nearly all of the compute, so the ratio is the most skipping unsupervised positions
(and TRL's CPU fallback) can matter; ``--student smollm2`` measures the real 135M model (slow on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from tracegen.testing.alloc_peak import AllocPeak, peak_alloc

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR = 2e-4
SEED = 42
TOP_K = 64
TEMPERATURE = 2.0
ENGINES = ("tracegen", "trl", "tracegen-full")  # tracegen-full: the same run with distill.method full


# --- measuring -------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --- data ------------------------------------------------------------------------------------------
def make_dataset(root: Path, student_dir: str, n: int, max_length: int) -> Path:
    import importlib.util

    from tracegen.config import FormatConfig
    from tracegen.data.format import format_dataset
    from tracegen.testing.synthetic import make_trajectory

    spec = importlib.util.find_spec("trl")
    assert spec and spec.submodule_search_locations, "pip install trl"
    template = Path(next(iter(spec.submodule_search_locations))) / "chat_templates/qwen3_training.jinja"
    src = root / "trajectories.jsonl"
    src.write_text("".join(make_trajectory(i, turns=2 + i % 3, words=60).model_dump_json() + "\n" for i in range(n)))
    config = FormatConfig(tokenizer=student_dir, template="chat", chat_template=str(template), max_length=max_length)
    format_dataset(src, root / "dataset", config)
    return root / "dataset"


def schedule(n_rows: int, batch_size: int, grad_accum: int, steps: int) -> list[list[int]]:
    """tracegen's micro-batches (eval_fraction 0: every row trains) for ``steps`` optimizer steps."""
    from tracegen.distill.data import micro_batches

    order = micro_batches(list(range(n_rows)), batch_size, SEED, 0)[: steps * grad_accum]
    if len(order) < steps * grad_accum or any(len(mb) != batch_size for mb in order):
        raise SystemExit(f"{n_rows} rows are too few for {steps} steps of {grad_accum} x {batch_size}")
    return order


def step_stats(rows: list[Any], micro: list[list[int]], grad_accum: int) -> list[dict[str, int]]:
    """Per optimizer step: trained (supervised) tokens, non-padding tokens, padded positions."""
    from tracegen.distill.data import n_supervised

    out = []
    for s in range(0, len(micro), grad_accum):
        trained = tokens = padded = 0
        for mb in micro[s : s + grad_accum]:
            lengths = [len(rows[i].input_ids) for i in mb]
            trained += sum(n_supervised(rows[i]) for i in mb)
            tokens += sum(lengths)
            padded += len(mb) * max(lengths)
        out.append({"trained": trained, "tokens": tokens, "padded": padded})
    return out


# --- the engines, each in a fresh process ----------------------------------------------------------
class StepClock:
    """Wall and CPU time at each step end; the last step runs under the memory profiler."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.peak = AllocPeak()
        self.step_peak_alloc = 0

    def step_end(self, step: int) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if step == self.steps - 1:
            self.peak.start()
        elif step == self.steps:
            self.step_peak_alloc = self.peak.stop()

    def result(self) -> dict[str, Any]:
        return {"wall": self.wall, "cpu": self.cpu, "step_peak_alloc": self.step_peak_alloc, "rss": peak_rss_bytes()}


def child_tracegen(p: dict[str, Any], method: str = "lora") -> dict[str, Any]:
    from tracegen.config import DistillConfig, LoraSettings
    from tracegen.distill.trainer import train

    config = DistillConfig(
        student=p["student"],
        method=method,
        lora=LoraSettings(**LORA),
        batch_size=p["batch_size"],
        grad_accum=p["grad_accum"],
        max_steps=p["steps"],
        max_length=p["max_length"],
        learning_rate=LR,
        seed=SEED,
        precision="fp32",
        eval_fraction=0.0,
        save_every=10**9,
    )
    clock = StepClock(p["steps"])
    seen: list[list[int]] = []

    def on_step(m: Any, _model: Any) -> None:
        clock.step_end(m.step)
        seen.append([m.supervised_tokens, m.tokens])

    train(config, Path(p["data"]), Path(p["out"]) / f"tracegen-{method}", on_step=on_step)
    return {**clock.result(), "seen": seen}


def child_trl(p: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tracegen.config import LoraSettings
    from tracegen.distill.data import load_rows
    from tracegen.distill.lora import resolve_targets

    rows = load_rows(Path(p["data"]))
    order = [i for mb in p["micro"] for i in mb]
    dataset = Dataset.from_dict(
        {"input_ids": [rows[i].input_ids for i in order], "labels": [rows[i].labels for i in order]}
    )
    preset = resolve_targets(AutoConfig.from_pretrained(p["student"]), LoraSettings(**LORA))
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=preset.targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(Path(p["out"]) / "trl"),
        per_device_train_batch_size=p["batch_size"],
        gradient_accumulation_steps=p["grad_accum"],
        max_steps=p["steps"],
        max_length=p["max_length"],
        learning_rate=LR,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=SEED,
        use_cpu=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        packing=False,
        padding_free=False,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
    )
    clock = StepClock(p["steps"])

    class Clock(TrainerCallback):
        def on_step_end(self, _args: Any, state: Any, _control: Any, **_kw: Any) -> None:
            clock.step_end(state.global_step)

    trainer = SFTTrainer(
        model=p["student"], args=args, train_dataset=dataset, peft_config=peft_config, callbacks=[Clock()]
    )
    prepared = trainer.train_dataset
    if prepared["input_ids"] != dataset["input_ids"] or prepared["labels"] != dataset["labels"]:
        raise SystemExit("TRL's prepared dataset differs from the rows handed to it (order, cut or labels)")
    assert next(trainer.model.parameters()).dtype == torch.float32
    trainer.train()
    return {**clock.result(), "tokens_seen": int(trainer._total_train_tokens)}


def run_child(engine: str, params: dict[str, Any], root: Path) -> dict[str, Any]:
    path = root / "params.json"
    path.write_text(json.dumps(params))
    threads = str(params["threads"])
    proc = subprocess.run(
        [sys.executable, __file__, "--child", engine, "--params", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise RuntimeError(f"{engine} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return dict(json.loads(lines[-1]))


# --- KD memory (this process) ----------------------------------------------------------------------
def kd_memory(root: Path, dataset: Path, student: str, teacher: str, n_rows: int) -> dict[str, Any]:
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from tracegen.distill.cache import TeacherCache, build_cache
    from tracegen.distill.data import collate, load_rows, parquet_files
    from tracegen.distill.forward import supervised_logits
    from tracegen.distill.losses import dense_kd_sum, sparse_kd_sum, token_weights, weighted_ce_sum

    sub = root / "kd-dataset"  # the first rows only, so the teacher pass stays short
    (sub / "data").mkdir(parents=True)
    pq.write_table(pq.read_table(parquet_files(dataset)[0]).slice(0, n_rows), sub / "data" / "train.parquet")
    built = build_cache(sub, teacher, root / "cache", top_k=TOP_K, temperature=TEMPERATURE)
    disk = sum(f.stat().st_size for f in (root / "cache").iterdir())

    rows = load_rows(sub)
    batch = collate(rows, list(range(len(rows))), 10**9)
    cpu = torch.device("cpu")
    sel = batch.supervised()
    topk = TeacherCache(root / "cache").batch(batch.rows, sel.sum(dim=1).tolist(), cpu)
    with torch.no_grad():
        student_out = supervised_logits(AutoModelForCausalLM.from_pretrained(student), batch, cpu)
        teacher_logits = supervised_logits(AutoModelForCausalLM.from_pretrained(teacher), batch, cpu).logits
    n, vocab = student_out.logits.shape
    weights = token_weights(batch.proof_mask[:, 1:][sel], 2.0)

    def loss_peak(kd: Any) -> int:
        logits = student_out.logits.clone().requires_grad_(True)

        def step() -> None:
            loss = 0.55 * weighted_ce_sum(logits, student_out.targets, weights)
            if kd is not None:
                loss = loss + 0.45 * kd(logits)
            loss.backward()

        step()  # warm-up: first-call allocations
        logits.grad = None
        return peak_alloc(step)

    losses = {
        "CE only": loss_peak(None),
        f"CE + top-{TOP_K} KD (tracegen `sparse_kd_sum`)": loss_peak(lambda s: sparse_kd_sum(s, topk, TEMPERATURE)),
        "CE + dense KD (`dense_kd_sum`)": loss_peak(lambda s: dense_kd_sum(s, teacher_logits, TEMPERATURE)),
    }
    return {
        "n": int(n),
        "rows": n_rows,
        "vocab": int(vocab),
        "disk": disk / built.tokens,
        "loaded": sum(t.numel() * t.element_size() for t in topk) / n,
        "loss": {k: v / n for k, v in losses.items()},
    }


# --- chunked loss memory (this process) ------------------------------------------------------------
LOSS_NS = (1024, 4096, 16384)


def chunked_loss_memory(student: str, chunk: int, unchunked_up_to: int, ns: tuple[int, ...]) -> list[dict[str, Any]]:
    """Peak bytes and tokens/s of CE + top-k KD, forward + backward, on N supervised rows through the
    student's own output layer (frozen, as under LoRA), chunked and unchunked (``loss_chunk_tokens: 0``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tracegen.distill.forward import SupervisedHidden
    from tracegen.distill.losses import TeacherTopK, topk_from_logits

    layer = AutoModelForCausalLM.from_pretrained(student).get_output_embeddings().requires_grad_(False)
    vocab, width = layer.weight.shape
    results = []
    for n in ns:
        torch.manual_seed(SEED)
        hidden = torch.randn(n, width) * 4  # logits of a few units, like a trained model's
        with torch.no_grad():  # the teacher's top-k, built 1k rows at a time (never [N, V] at once)
            parts = [
                topk_from_logits(torch.randn(min(1024, n - s), vocab) * 3, TOP_K, TEMPERATURE)
                for s in range(0, n, 1024)
            ]
        topk = TeacherTopK(*(torch.cat(t) for t in zip(*parts, strict=True)))
        targets = torch.randint(0, vocab, (n,))
        for c in (0, chunk):
            if c == 0 and n > unchunked_up_to:
                continue
            step = partial(_loss_step, SupervisedHidden(hidden, targets, layer), topk, c)
            if not results:
                step()  # warm-up: first-call allocations
            t0 = time.perf_counter()  # one run, profiled: the profiler adds little next to [*, V] kernels
            peak = peak_alloc(step)
            results.append({"n": n, "chunk": c, "peak": peak, "tok_s": n / (time.perf_counter() - t0), "vocab": vocab})
            print(f"loss memory: N {n:,}, chunk {c}: peak {peak / 2**20:,.0f} MiB", file=sys.stderr, flush=True)
    return results


def _loss_step(out: Any, topk: Any, chunk: int) -> None:
    """One forward + backward of the distill loss (0.55 CE + 0.45 KD) from the hidden states ``out``."""
    import torch

    from tracegen.distill.chunked_loss import loss_terms

    n = out.hidden.shape[0]
    out = out._replace(hidden=out.hidden.clone().requires_grad_(True))
    terms = loss_terms(out, torch.ones(n), topk, [n], TEMPERATURE, None, None, chunk)
    assert terms.kd_sum is not None
    (0.55 * terms.ce_sum + 0.45 * terms.kd_sum).backward()


def print_chunked(results: list[dict[str, Any]], chunk: int, unchunked_up_to: int) -> None:
    vocab = results[0]["vocab"]
    row = vocab * 4
    print(
        f"Loss memory (CE + top-{TOP_K} KD, forward + backward, the student's {vocab:,}-row output layer, frozen), "
        f"chunked (`loss_chunk_tokens: {chunk}`) vs unchunked (`0`):"
    )
    print()
    print(
        "| supervised tokens N | unchunked peak | in [N, V] fp32 | unchunked tok/s "
        "| chunked peak | in [chunk, V] fp32 | chunked tok/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    by = {(r["n"], r["chunk"]): r for r in results}
    per_token = next(r["peak"] / r["n"] for r in results if r["chunk"] == 0)
    for n in sorted({r["n"] for r in results}):
        whole, part = by.get((n, 0)), by[(n, chunk)]
        if whole is not None:
            w = f"{whole['peak'] / 2**20:,.0f} MiB | {whole['peak'] / (n * row):.1f} | {whole['tok_s']:,.0f}"
        else:
            w = f"~{per_token * n / 2**20:,.0f} MiB (not run: linear in N, N > {unchunked_up_to}) | | "
        p = f"{part['peak'] / 2**20:,.0f} MiB | {part['peak'] / (min(n, chunk) * row):.1f} | {part['tok_s']:,.0f}"
        print(f"| {n:,} | {w} | {p} |")


def output_layer_share(student: str) -> float:
    """Output-layer weights / all the matmul weights one position goes through (embedding lookups are free)."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(student)
    head = model.get_output_embeddings().weight.numel()
    emb = model.get_input_embeddings().weight
    return head / (head + sum(p.numel() for p in model.get_decoder().parameters() if p is not emb))


# --- report ----------------------------------------------------------------------------------------
def fastest(runs: list[dict[str, Any]], warmup: int, timed: int) -> dict[str, Any]:
    """The run with the shortest timed window; its wall and CPU seconds over the timed steps."""
    best = min(runs, key=lambda r: r["wall"][warmup + timed - 1] - r["wall"][warmup - 1])
    end, start = warmup + timed - 1, warmup - 1
    return {**best, "wall_s": best["wall"][end] - best["wall"][start], "cpu_s": best["cpu"][end] - best["cpu"][start]}


def print_throughput(
    runs: dict[str, list[dict[str, Any]]], stats: list[dict[str, int]], warmup: int, timed: int
) -> None:
    import trl

    window = stats[warmup : warmup + timed]
    trained, tokens = sum(s["trained"] for s in window), sum(s["tokens"] for s in window)
    best = {engine: fastest(r, warmup, timed) for engine, r in runs.items()}
    names = {
        "tracegen": "tracegen distill (CE, no cache)",
        "trl": f"TRL {trl.__version__} SFTTrainer",
        "tracegen-full": "tracegen distill, method full (every weight)",
    }
    print("| engine | trained tok/s | non-padding tok/s | s/step | CPU s/step | peak RSS | peak alloc, 1 step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for engine, b in best.items():
        print(
            f"| {names[engine]} | {trained / b['wall_s']:,.0f} | {tokens / b['wall_s']:,.0f} "
            f"| {b['wall_s'] / timed:.2f} | {b['cpu_s'] / timed:.2f} | {b['rss'] / 2**20:,.0f} MiB "
            f"| {b['step_peak_alloc'] / 2**20:,.0f} MiB |"
        )
    ours, theirs = best["tracegen"], best["trl"]
    ratio = theirs["wall_s"] / ours["wall_s"]
    print(
        f"tracegen/TRL: {ratio:.2f}x tokens/s ({'faster' if ratio >= 1 else 'SLOWER'}), "
        f"{theirs['cpu_s'] / ours['cpu_s']:.2f}x tokens per CPU-second; peak RSS {ours['rss'] / theirs['rss']:.2f}x, "
        f"peak step alloc {ours['step_peak_alloc'] / theirs['step_peak_alloc']:.2f}x"
    )
    full = best["tracegen-full"]
    print(
        f"tracegen full/LoRA: {ours['wall_s'] / full['wall_s']:.2f}x tokens/s, "
        f"peak RSS {full['rss'] / ours['rss']:.2f}x"
    )


def print_kd(kd: dict[str, Any]) -> None:
    n, v, disk = kd["n"], kd["vocab"], kd["disk"]
    print(f"KD memory: one batch of {kd['rows']} row(s), N = {n} supervised tokens, V = {v:,}, top-{TOP_K}")
    print()
    print("| teacher signal | bytes / supervised token | vs top-k cache |")
    print("|---|---:|---:|")
    for label, b in [
        (f"tracegen top-{TOP_K} cache on disk (int32 ids, fp16 log-probs, 2 fp32 lse, offsets)", disk),
        (f"top-{TOP_K} as loaded for a step (int64 ids, fp32)", kd["loaded"]),
        ("dense teacher logits [N, V] bf16", v * 2),
        ("dense teacher logits [N, V] fp32", v * 4),
    ]:
        print(f"| {label} | {b:,.0f} | {b / disk:,.1f}x |")
    print()
    losses = list(kd["loss"].items())
    topk = losses[1][1]
    print("| loss fwd + bwd, student logits [N, V] fp32 given | peak alloc bytes / token | in [N, V] fp32 | vs top-k |")
    print("|---|---:|---:|---:|")
    for label, b in losses:
        print(f"| {label} | {b:,.0f} | {b / (v * 4):.1f} | {b / topk:.2f}x |")
    dense_step = losses[2][1] + v * 4
    print(
        f"per supervised token in a training step (loss peak + teacher signal in memory): dense KD "
        f"{dense_step / (topk + kd['loaded']):.2f}x top-k KD; on disk the top-k cache is {v * 2 / disk:,.0f}x smaller "
        f"than bf16 logits"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run, ~40 s")
    parser.add_argument("--student", default="tiny:smollm2", help="tiny:smollm2 (default), tiny:qwen3, smollm2, PATH")
    parser.add_argument("--teacher", help="KD teacher sharing the student's vocabulary (default: tiny:FAMILY:1)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps before timing starts")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine (1: robust to other load)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine (alternating); the fastest counts")
    parser.add_argument("--loss-chunk", type=int, default=2048, help="loss_chunk_tokens for the loss memory table")
    parser.add_argument(
        "--loss-unchunked-up-to",
        type=int,
        default=1024,
        help="largest N the unchunked loss runs at (RAM: ~3 [N, V] copies)",
    )
    parser.add_argument("--loss-only", action="store_true", help="only the chunked-loss memory table")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--params", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from tracegen.model_aliases import resolve_model

    if args.child:
        import torch

        params = json.loads(args.params.read_text())
        torch.set_num_threads(params["threads"])
        result = (
            child_trl(params) if args.child == "trl" else child_tracegen(params, args.child.partition("-")[2] or "lora")
        )
        print(json.dumps(result), flush=True)
        return

    if args.quick:
        args.batch_size, args.grad_accum, args.warmup, args.steps, args.repeats = 1, 1, 1, 1, 1
    loss_student = resolve_model("tiny:qwen3")  # Qwen3's vocabulary
    loss_ns = (256, 1024) if args.quick else LOSS_NS
    loss_chunk = 128 if args.quick else args.loss_chunk
    chunked = chunked_loss_memory(loss_student, loss_chunk, args.loss_unchunked_up_to, loss_ns)
    if args.loss_only:
        print_chunked(chunked, loss_chunk, args.loss_unchunked_up_to)
        return

    import trl

    from tracegen.distill.data import load_rows, n_supervised

    warmup, timed = args.warmup, args.steps
    steps = warmup + timed + 1  # + the profiled step
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    student = resolve_model(args.student)
    family = args.student.split(":")[1] if args.student.startswith("tiny:") else "smollm2"
    teacher = resolve_model(args.teacher or f"tiny:{family}:1")
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        root = Path(tmp)
        needed = steps * args.grad_accum * args.batch_size
        dataset = make_dataset(root, student, int(needed * 1.4) + 8, args.max_length)
        rows = load_rows(dataset)
        micro = schedule(len(rows), args.batch_size, args.grad_accum, steps)
        stats = step_stats(rows, micro, args.grad_accum)
        params = {
            "student": student,
            "data": str(dataset),
            "out": str(root / "out"),
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "max_length": args.max_length,
            "steps": steps,
            "micro": micro,
            "threads": args.threads,
        }
        runs: dict[str, list[dict[str, Any]]] = {engine: [] for engine in ENGINES}
        for _ in range(args.repeats):
            for engine in ENGINES:
                runs[engine].append(run_child(engine, params, root))
        kd = kd_memory(root, dataset, student, teacher, 1 if args.quick else 2)
    for r in runs["tracegen"] + runs["tracegen-full"]:  # every engine trained on exactly the scheduled batches
        assert r["seen"] == [[s["trained"], s["tokens"]] for s in stats], "tracegen trained on other batches"
    for r in runs["trl"]:
        assert r["tokens_seen"] == sum(s["tokens"] for s in stats), "TRL saw other batches"

    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(student)
    window = stats[warmup : warmup + timed]
    print(
        f"# distill benchmark{' (quick)' if args.quick else ''}: student {args.student} (V {kd['vocab']:,}, hidden "
        f"{cfg.hidden_size}, {cfg.num_hidden_layers} layers), LoRA r={LORA['r']} alpha={LORA['alpha']}, fp32, "
        f"{args.threads} torch thread(s) per engine, {os.cpu_count()} CPUs; python {platform.python_version()}, "
        f"torch {torch.__version__}, trl {trl.__version__}"
    )
    print(
        f"{len(rows)} rows, batch {args.batch_size} x grad_accum {args.grad_accum}, max_length {args.max_length}: "
        f"{warmup} warm-up + {timed} timed steps ({sum(s['trained'] for s in window):,} trained / "
        f"{sum(s['tokens'] for s in window):,} non-padding tokens) + 1 profiled; best of {args.repeats} per engine"
    )
    print()
    print_throughput(runs, stats, warmup, timed)
    print()
    print_kd(kd)
    print()
    print_chunked(chunked, loss_chunk, args.loss_unchunked_up_to)
    print()
    trained = sum(s["trained"] for s in stats)
    row_share = sum(n_supervised(r) / len(r.input_ids) for r in rows) / len(rows)
    scored = trained / sum(s["padded"] for s in stats)
    head = output_layer_share(student)
    print(
        f"supervised positions: {row_share:.0%} of a row on average, "
        f"{trained / sum(s['tokens'] for s in stats):.0%} of the trained batches' tokens, "
        f"{scored:.0%} of their padded positions (what TRL's CPU LM head scores); "
        f"the output layer holds {head:.0%} of this student's matmul weights"
    )
    # Both sides run the decoder on every padded position; only the output layer's positions differ.
    # Counting matmul weights alone (attention scores, LoRA and the optimizer add equal work to both
    # sides, which only lowers it), that caps what skipping unsupervised positions can buy.
    print(
        f"exact-work bound: a step that differs from TRL's only by scoring supervised positions is at most "
        f"{1 / ((1 - head) + head * scored):.2f}x as fast (1 / ((1 - {head:.2f}) + {head:.2f} x {scored:.2f})); "
        "a measured ratio above it comes from TRL's other per-step work"
    )
    print(
        "method: fresh process per engine run, same rows/order/LoRA/optimizer, tok/s over the timed steps; memory "
        f"via torch.profiler(profile_memory=True) and ru_maxrss; load average {load_before:.1f} -> "
        f"{os.getloadavg()[0]:.1f}; {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
