"""``tracegen distill``: train a LoRA student, cache teacher logits, merge an adapter.

Command shape (a group whose default command is ``train``)::

    tracegen distill DATASET_DIR --student MODEL --out ADAPTER_DIR [--recipe R]   (same as `distill train ...`)
    tracegen distill cache-teacher DATASET_DIR --teacher MODEL --out CACHE_DIR [--top-k 64]
    tracegen distill cache-teacher DATASET_DIR --from-logprobs TRAJECTORIES.jsonl --tokenizer TOK --out CACHE_DIR
    tracegen distill merge ADAPTER_DIR --out MODEL_DIR

Any first argument that is not a subcommand name is routed to ``train`` (a dataset folder literally
named ``merge`` needs ``distill train merge`` or ``./merge``). torch, transformers and peft are
imported inside the commands, so ``tracegen --help`` never loads them. Results go to stdout as a
table (``--json``: one JSON object), progress to stderr; failures are tracegen errors the main CLI maps to exit codes.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

if TYPE_CHECKING:
    from tracegen.distill.dtypes import DtypeName
from tracegen.cli.help import PlainFlagsGroup, default


class _DefaultTrainGroup(PlainFlagsGroup):
    """Routes ``distill DATASET ...`` to ``distill train DATASET ...``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


distill_app = typer.Typer(
    cls=_DefaultTrainGroup,
    help="Distil into a small student: `tracegen distill DATASET_DIR --student MODEL --out ADAPTER_DIR` trains a "
    "LoRA adapter (default command `train`); `cache-teacher` stores teacher top-k logits for KD; `merge` folds "
    "an adapter into its base.",
    no_args_is_help=True,
)


JsonFlag = Annotated[bool, typer.Option("--json", help="Print the summary as JSON (for scripts).")]


def _print(title: str, result: dict[str, Any], as_json: bool) -> None:
    """The command's summary on stdout: a table like the other commands', or JSON with ``--json``."""
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in result.items()}
    if as_json:
        typer.echo(json.dumps(plain, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right", overflow="fold")
    for key, value in plain.items():
        table.add_row(key.replace("_", " "), f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


@distill_app.command("train")
def train_command(
    dataset_dir: Annotated[Path, typer.Argument(help="A formatted dataset folder (`tracegen format` output).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder (PEFT format, metrics, config).")],
    student: Annotated[
        str | None, typer.Option(help="Student model: local folder, Hub id, smollm2 or tiny:FAMILY[:SEED].")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", "-r", help="Recipe YAML; flags override `distill:`.")
    ] = None,
    teacher_cache: Annotated[
        Path | None, typer.Option(help="Teacher cache folder for KD (without one: CE only, sequence-level).")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides epochs).")] = None,
    epochs: Annotated[
        float | None,
        typer.Option(help="Passes over the training split.", show_default=default("DistillConfig", "epochs")),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Sequences per micro-batch.", show_default=default("DistillConfig", "batch_size"))
    ] = None,
    grad_accum: Annotated[
        int | None,
        typer.Option(help="Micro-batches per optimizer step.", show_default=default("DistillConfig", "grad_accum")),
    ] = None,
    learning_rate: Annotated[
        float | None,
        typer.Option("--lr", help="Peak learning rate.", show_default=default("DistillConfig", "learning_rate")),
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(help="Cut sequences to this many tokens.", show_default=default("DistillConfig", "max_length")),
    ] = None,
    lora_r: Annotated[
        int | None, typer.Option(help="LoRA rank.", show_default=default("DistillConfig", "lora.r"))
    ] = None,
    lora_alpha: Annotated[
        int | None, typer.Option(help="LoRA alpha.", show_default=default("DistillConfig", "lora.alpha"))
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.", show_default=default("DistillConfig", "seed"))] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Trade compute for memory."),
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="lora (default: an adapter on the frozen student) or full (every weight).")
    ] = None,
    model_dtype: Annotated[
        str | None, typer.Option(help="Student dtype: auto (the checkpoint's, default), bf16, fp16 or fp32.")
    ] = None,
    report_to: Annotated[
        list[str] | None,
        typer.Option(
            "--report-to",
            metavar="TRACKER",
            help="Experiment tracker, repeatable: tensorboard, wandb, trackio, mlflow, or none (default: metrics.jsonl "
            "only).",
        ),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint if there is one.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Train a LoRA adapter (or, with --method full, the whole student) on the trained tokens of DATASET_DIR
    (proof-weighted CE, plus KD with a teacher cache)."""
    from tracegen.config import DistillConfig
    from tracegen.recipe import apply_overrides, load_recipe

    base = load_recipe(recipe).distill if recipe else DistillConfig()
    lora = {"r": lora_r, "alpha": lora_alpha}
    overrides: dict[str, Any] = {
        "student": student,
        "teacher_cache": str(teacher_cache) if teacher_cache else None,
        "max_steps": max_steps,
        "epochs": epochs,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "learning_rate": learning_rate,
        "max_length": max_length,
        "seed": seed,
        "gradient_checkpointing": gradient_checkpointing,
        "method": method,
        "model_dtype": model_dtype,
        "report_to": list(report_to) if report_to else None,
    }
    if any(v is not None for v in lora.values()):
        overrides["lora"] = lora
    config = apply_overrides(base, overrides)
    from tracegen.distill.data import parquet_files  # torch: imported only when a command runs
    from tracegen.model_aliases import resolve_model

    parquet_files(dataset_dir)  # a wrong dataset path fails before any model is loaded
    if config.student:
        config.student = resolve_model(config.student)

    from tracegen.distill.trainer import train

    summary = train(config, dataset_dir, out, resume=resume)
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, one summary, not one per process
        _print(f"distill: {out}", asdict(summary), as_json)
    if summary.interrupted:
        raise typer.Exit(130)


@distill_app.command("cache-teacher")
def cache_teacher_command(
    dataset_dir: Annotated[Path, typer.Argument(help="The formatted dataset the student will train on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Cache folder (memory-mappable .npy shards).")],
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Local teacher model (folder, Hub id, smollm2 or tiny:FAMILY[:SEED]), the student's tokenizer."
        ),
    ] = None,
    from_logprobs: Annotated[
        Path | None,
        typer.Option(
            help="Instead of a local teacher: the trajectories (.jsonl) whose API teacher returned top log-probs "
            "(collect with teacher.top_logprobs)."
        ),
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="With --from-logprobs: the dataset's tokenizer (qwen3, smollm2 or a folder).")
    ] = None,
    top_k: Annotated[int, typer.Option(help="Log-probs kept per supervised token (local teacher).")] = 64,
    temperature: Annotated[float, typer.Option(help="KD temperature the logsumexp is stored for.")] = 2.0,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 4,
    max_length: Annotated[int, typer.Option(help="Cut sequences to this many tokens (>= training's).")] = 4096,
    dtype: Annotated[
        str, typer.Option(help="Teacher dtype: auto (its checkpoint's), bf16, fp16 or fp32 (distill.model_dtype).")
    ] = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Per supervised token, top-k ids + fp16 log-probs + logsumexp: from one forward pass of a local
    teacher, or from the top log-probs an API teacher returned during collect."""
    from tracegen.distill.data import parquet_files
    from tracegen.errors import BadInputError
    from tracegen.model_aliases import local_tokenizer, resolve_model

    if (teacher is None) == (from_logprobs is None):
        raise BadInputError("pass exactly one of --teacher MODEL and --from-logprobs TRAJECTORIES.jsonl")
    if from_logprobs is not None:
        from tracegen.distill.api_cache import build_cache_from_logprobs

        if tokenizer is None:
            raise BadInputError("--from-logprobs needs --tokenizer (the dataset's tokenizer, shared by the teacher)")
        parquet_files(dataset_dir)
        api = build_cache_from_logprobs(
            dataset_dir,
            from_logprobs,
            out,
            tokenizer=local_tokenizer(tokenizer),
            temperature=temperature,
            max_length=max_length,
        )
        _print(f"cache-teacher: {out}", asdict(api), as_json)
        return
    from tracegen.distill.cache import build_cache

    assert teacher is not None
    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise BadInputError(f"--dtype {dtype}: not a model dtype", hint="use auto, bf16, fp16 or fp32")
    parquet_files(dataset_dir)
    summary = build_cache(
        dataset_dir,
        resolve_model(teacher),
        out,
        top_k=top_k,
        temperature=temperature,
        batch_size=batch_size,
        max_length=max_length,
        dtype=cast("DtypeName", dtype),
    )
    _print(f"cache-teacher: {out}", asdict(summary), as_json)


@distill_app.command("merge")
def merge_command(
    adapter_dir: Annotated[Path, typer.Argument(help="A `tracegen distill` output folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Merged model folder (plain transformers, base's dtype).")],
    base: Annotated[
        str | None, typer.Option(help="Base model (default: the adapter's base_model_name_or_path).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Fold the adapter into its full-precision base (written in the base's dtype); the merged logits equal
    base+adapter. A full-training output is already the model: its files are linked into OUT."""
    from tracegen.distill.merge import merge_adapter
    from tracegen.model_aliases import resolve_model

    summary = merge_adapter(adapter_dir, out, resolve_model(base) if base else None)
    _print(f"merge: {out}", asdict(summary), as_json)
