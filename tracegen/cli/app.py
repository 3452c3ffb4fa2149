"""The ``tracegen`` command line: parse, build a config, call one library function, map errors.

Exit codes: 0 success; 1 a known failure (one ``Error:`` line and a hint on stderr; the traceback only
with ``TRACEGEN_DEBUG=1``); 2 bad usage or bad input; 130 after a clean stop on Ctrl-C.
Results go to stdout, progress and logs to stderr. Heavy libraries are imported inside commands so
``tracegen --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from tracegen.cli.distill import distill_app
from tracegen.cli.export import export_app
from tracegen.cli.help import PlainFlagsGroup, default
from tracegen.cli.sandbox import sandbox_app
from tracegen.errors import BadInputError, TracegenError

# Typer's own copy of click (newer Typer vendors it) raises these, not the click package's classes.
_USAGE_ERRORS: tuple[type[Exception], ...] = tuple(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)


class _Interrupted(Exception):  # a signal, not an error
    """Ctrl-C that reached the top of a command which has no clean stop of its own."""


class _InterruptibleGroup(PlainFlagsGroup):
    """Carries a Ctrl-C out of Typer, which would turn it into a silent exit code 130."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Interrupted from exc


app = typer.Typer(
    cls=_InterruptibleGroup,
    name="tracegen",
    help="Turn a strong teacher model into training data, and then into a small student.\n\n"
    "tasks --collect--> trajectories.jsonl --filter--> kept.jsonl --format--> dataset/ --distill--> adapter/",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from tracegen import __version__

        typer.echo(f"tracegen {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Turn a strong teacher model into training data, and then into a small student."""


@app.command()
def collect(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (re-running the same command resumes).")],
    tasks: Annotated[
        Path | None, typer.Option(help="Tasks: a JSONL file or a local Hugging Face dataset directory.")
    ] = None,
    recipe: Annotated[Path | None, typer.Option(help="Recipe YAML; flags override its `collect:` section.")] = None,
    teacher_base_url: Annotated[
        str | None, typer.Option(envvar="TRACEGEN_TEACHER_BASE_URL", help="Teacher endpoint, e.g. http://host:8000/v1.")
    ] = None,
    teacher_model: Annotated[
        str | None, typer.Option(envvar="TRACEGEN_TEACHER_MODEL", help="Teacher model name.")
    ] = None,
    simulator_base_url: Annotated[
        str | None,
        typer.Option(envvar="TRACEGEN_SIMULATOR_BASE_URL", help="Tool-simulator endpoint (default: the teacher's)."),
    ] = None,
    simulator_model: Annotated[
        str | None, typer.Option(envvar="TRACEGEN_SIMULATOR_MODEL", help="Tool-simulator model (default: the teacher).")
    ] = None,
    runtime: Annotated[
        Literal["docker", "simulated"] | None,
        typer.Option(help="Where tool calls run: a Docker sandbox or a simulator."),
    ] = None,
    samples_per_task: Annotated[
        int | None, typer.Option("--samples-per-task", "-k", help="Trajectories per task (K).")
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", "-c", help="Trajectories in flight.", show_default=default("CollectConfig", "concurrency")
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N tasks.")] = None,
    max_turns: Annotated[
        int | None,
        typer.Option(help="Teacher turns per trajectory.", show_default=default("CollectConfig", "max_turns")),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help="Sampling temperature.", show_default=default("CollectConfig", "teacher.temperature")),
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Nucleus sampling.", show_default=default("CollectConfig", "teacher.top_p"))
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(help="Completion tokens per turn.", show_default=default("CollectConfig", "teacher.max_tokens")),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed, where the server supports it.")] = None,
    tool_protocol: Annotated[
        Literal["auto", "native", "hermes", "function_tag"] | None,
        typer.Option(
            help="How tool calls are expressed (auto: detected per reply).",
            show_default=default("CollectConfig", "teacher.tool_protocol"),
        ),
    ] = None,
    fail_on_error: Annotated[
        float | None,
        typer.Option(
            help="Exit 1 when more than this fraction of trajectories errored.",
            show_default=default("CollectConfig", "fail_on_error"),
        ),
    ] = None,
    retry_errors: Annotated[
        bool,
        typer.Option(
            "--retry-errors",
            help="Sample again every (task, sample) whose record is an error (unreachable-teacher and "
            "refused-key errors always are).",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (for scripts).")] = False,
) -> None:
    """Generate thinking-on, multi-turn tool-calling trajectories from an OpenAI-compatible teacher.

    Writes OUT/trajectories.jsonl (one trajectory per line) and OUT/manifest.json. The API key is read
    from $TRACEGEN_TEACHER_API_KEY (or $OPENAI_API_KEY) and is never written anywhere. Re-running
    resumes; a retried record supersedes its error record when the file is read.
    """
    from tracegen.config import CollectConfig
    from tracegen.recipe import apply_overrides, load_recipe

    base = load_recipe(recipe).collect if recipe else CollectConfig()
    teacher = {
        "base_url": teacher_base_url,
        "model": teacher_model,
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "seed": seed,
        "tool_protocol": tool_protocol,
    }
    simulator = {"base_url": simulator_base_url, "model": simulator_model}
    overrides: dict[str, Any] = {
        "tasks": str(tasks) if tasks else None,
        "teacher": teacher,
        "runtime": runtime,
        "samples_per_task": samples_per_task,
        "concurrency": concurrency,
        "limit": limit,
        "max_turns": max_turns,
        "fail_on_error": fail_on_error,
    }
    if any(v is not None for v in simulator.values()):
        overrides["simulator"] = simulator  # unset simulator fields fall back to the teacher's
    config = apply_overrides(base, overrides)

    from tracegen.collect.driver import run_collect
    from tracegen.collect.report import print_collect_summary

    summary = run_collect(config, out, show_progress=not quiet, retry_errors=retry_errors)
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        print_collect_summary(summary)
    if summary.interrupted:
        typer.echo(f"Interrupted: {summary.completed} trajectories saved; re-run the same command to resume.", err=True)
        raise typer.Exit(130)
    summary.check_errors(config.fail_on_error, "--fail-on-error")


@app.command("filter")
def filter_(
    input_path: Annotated[
        Path, typer.Argument(metavar="RUN_DIR|FILE.jsonl", help="A collect run directory or a trajectories JSONL.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Filter directory (re-running the same command resumes).")],
    recipe: Annotated[Path | None, typer.Option(help="Recipe YAML; flags override its `filter:` section.")] = None,
    verifier: Annotated[
        list[str] | None,
        typer.Option(
            "--verifier",
            "-v",
            metavar="CHECK",
            help="Check after structural + duplicate, repeatable: reference, tests, replay, judge.",
        ),
    ] = None,
    all_checks: Annotated[
        bool | None,
        typer.Option("--all-checks", help="Run every check on every sample (default: stop at the first failure)."),
    ] = None,
    selection: Annotated[
        Literal["all", "best", "k"] | None, typer.Option(help="Per task keep: all passing (default), best, or k best.")
    ] = None,
    k: Annotated[int | None, typer.Option("--k", help="Samples kept per task with --selection k.")] = None,
    judge_base_url: Annotated[
        str | None, typer.Option(envvar="TRACEGEN_JUDGE_BASE_URL", help="Judge endpoint, e.g. http://host:8000/v1.")
    ] = None,
    judge_model: Annotated[str | None, typer.Option(envvar="TRACEGEN_JUDGE_MODEL", help="Judge model name.")] = None,
    judge_samples: Annotated[
        int | None, typer.Option(help="Judge replies per sample; the verdict is their majority vote.")
    ] = None,
    judge_concurrency: Annotated[
        int | None,
        typer.Option(help="Samples being judged at once.", show_default=default("FilterConfig", "judge.concurrency")),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            "-c",
            help="Samples in the sandbox checks at once.",
            show_default=default("FilterConfig", "concurrency"),
        ),
    ] = None,
    near_duplicates: Annotated[
        float | None, typer.Option(help="Also drop near duplicates at this MinHash Jaccard similarity (0-1).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (for scripts).")] = False,
) -> None:
    """Keep the sampled trajectories that genuinely solved their task, and say why each other one was dropped.

    Checks, cheapest first: structural, duplicate, then the --verifier ones (reference, tests, replay, judge).
    Writes OUT/kept.jsonl, OUT/rejected.jsonl (records with verdicts added) and OUT/report.json. The judge's
    API key is read from $TRACEGEN_JUDGE_API_KEY (or $OPENAI_API_KEY) and is never written anywhere.
    """
    from tracegen.filter import filter_config, print_summary, run_filter

    overrides: dict[str, Any] = {
        "verifiers": verifier,
        "all_checks": all_checks,
        "selection": selection,
        "k": k,
        "concurrency": concurrency,
        "duplicate": {"near_threshold": near_duplicates},
        "judge": {
            "base_url": judge_base_url,
            "model": judge_model,
            "samples": judge_samples,
            "concurrency": judge_concurrency,
        },
    }
    summary = run_filter(input_path, out, filter_config(recipe, overrides), show_progress=not quiet)
    if summary.interrupted:
        typer.echo(
            f"Interrupted: finished verdicts are in {out}/verdicts.jsonl; re-run the same command to resume.", err=True
        )
        raise typer.Exit(130)
    if as_json:
        typer.echo(json.dumps(summary.report, indent=2, default=str))
    else:
        print_summary(summary)
    errors = summary.report["check_errors"]
    if errors:
        typer.echo(
            f"{errors} sample(s) could not be checked (judge/sandbox errors): in rejected.jsonl, counted in "
            "report.json; re-run the same command to retry them.",
            err=True,
        )


@app.command("format")
def format_(
    input_path: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="Trajectories JSONL, a run/filter folder, or (with --import cot) CoT rows."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to write (replaced atomically).")],
    template: Annotated[
        Literal["proof", "dualmind", "chat", "instruct"] | None,
        typer.Option(help="Training layout.", show_default=default("FormatConfig", "template")),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Student tokenizer: qwen3, smollm2, tiny:FAMILY, a model folder or a Hub model's tokenizer."),
    ] = None,
    recipe: Annotated[Path | None, typer.Option(help="Recipe YAML; flags override its `format:` section.")] = None,
    chat_template: Annotated[
        Path | None, typer.Option(help="Jinja chat template for --template chat (default: the tokenizer's own).")
    ] = None,
    train_observations: Annotated[
        Literal["none", "executed", "all"] | None,
        typer.Option(help="Train tool outputs: none (default) or executed; simulated ones never."),
    ] = None,
    max_length: Annotated[int | None, typer.Option(help="Longest sample in tokens (cut outside tool calls).")] = None,
    overflow: Annotated[
        Literal["drop", "truncate"] | None,
        typer.Option(help="Past --max-length: drop a sample whose answer would be cut, or truncate it."),
    ] = None,
    allow_dropped: Annotated[
        str | None,
        typer.Option(help="Content the chat template may leave out: reasoning,tool_calls (refused otherwise)."),
    ] = None,
    examine: Annotated[
        Literal["none", "teacher", "judge"] | None,
        typer.Option(help="dualmind critique: teacher (ask it now) or judge (filter's rationale)."),
    ] = None,
    teacher_base_url: Annotated[
        str | None, typer.Option(envvar="TRACEGEN_TEACHER_BASE_URL", help="Teacher endpoint for --examine teacher.")
    ] = None,
    teacher_model: Annotated[
        str | None, typer.Option(envvar="TRACEGEN_TEACHER_MODEL", help="Teacher model for --examine teacher.")
    ] = None,
    export: Annotated[
        list[str] | None, typer.Option(metavar="FORMAT", help="Extra row format: sharegpt (LLaMA-Factory / axolotl).")
    ] = None,
    import_format: Annotated[
        Literal["trajectories", "cot"] | None,
        typer.Option("--import", help="Input kind: trajectories (default) or cot (question / CoT / response rows)."),
    ] = None,
    import_columns: Annotated[
        str | None,
        typer.Option(help="Column mapping for --import cot, e.g. question=problem,reasoning=cot,answer=answer."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Processes that render and tokenize (0: one per two CPU cores).",
            show_default=default("FormatConfig", "workers"),
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (for scripts).")] = False,
) -> None:
    """Render trajectories with a training template, tokenize them with masks, and write a Hub-ready dataset.

    Writes OUT/data/*.parquet (text, spans, input_ids, labels, proof_mask, messages, provenance),
    OUT/tracegen.json and the dataset card OUT/README.md. `datasets.load_dataset(OUT)` loads it.
    """
    from tracegen.data.format import format_config, format_dataset, parse_columns, summary_lines

    overrides: dict[str, Any] = {
        "template": template,
        "tokenizer": tokenizer,
        "chat_template": str(chat_template) if chat_template else None,
        "train_observations": train_observations,
        "max_length": max_length,
        "overflow": overflow,
        "allow_dropped": [k.strip() for k in allow_dropped.split(",") if k.strip()] if allow_dropped else None,
        "examine": examine,
        "teacher": {"base_url": teacher_base_url, "model": teacher_model},
        "export": export,
        "import_format": import_format,
        "import_columns": parse_columns(import_columns),
        "workers": workers,
    }
    config = format_config(recipe, overrides)
    if config.tokenizer:
        from tracegen.model_aliases import local_tokenizer

        config.tokenizer = local_tokenizer(config.tokenizer)
    try:
        result = format_dataset(input_path, out, config, show_progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        typer.echo(f"Interrupted: nothing written ({out} is as it was).", err=True)
        raise typer.Exit(130) from None
    if as_json:
        typer.echo(json.dumps({"out": str(result.out), **result.stats.as_dict()}, indent=2))
        return
    for line in summary_lines(result):
        typer.echo(line)


@app.command()
def audit(
    dataset_dir: Annotated[Path, typer.Argument(metavar="DATASET_DIR", help="A folder written by `tracegen format`.")],
    index: Annotated[int, typer.Option("--index", "-i", help="Sample to show token by token.")] = 0,
    html: Annotated[
        Path | None, typer.Option(help="Also write a self-contained HTML page (sample picker, hover).")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer to decode with (default: the one recorded in the dataset).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens of the sample shown in the terminal.")] = 2000,
) -> None:
    """Show which tokens are trained and why, and check the masking invariants over the whole dataset.

    Exit 1 when an invariant is broken (no prompt or observation token trained, every sample has
    trained tokens, labels equal input_ids where trained, spans cover the text, decode round-trips).
    """
    from tracegen.data.audit import run_audit

    report = run_audit(dataset_dir, index=index, html=html, tokenizer=tokenizer, max_tokens=max_tokens)
    if html is not None:
        typer.echo(f"HTML page: {html.resolve()}")
    if report.violations:
        raise TracegenError(
            f"{len(report.violations)} masking invariant violation(s); first: {report.violations[0]}",
            hint="the list is above; re-run `tracegen format` after fixing the template or the input",
        )


@app.command()
def push(
    repo_id: Annotated[str, typer.Option(help="Hub repo, ORG/NAME (a dataset repo, or a model repo with --model).")],
    dataset_dir: Annotated[
        Path | None, typer.Argument(metavar="DATASET_DIR", help="A folder written by `tracegen format`.")
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR", help="Push a model instead: a `tracegen distill` adapter or a merged model folder."
        ),
    ] = None,
    dataset_id: Annotated[
        str | None,
        typer.Option(help="With --model: the Hub dataset it was trained on (default: where that dataset was pushed)."),
    ] = None,
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
) -> None:
    """Upload a dataset folder (or, with --model, a distilled model) and its card to the Hugging Face Hub.

    The token is huggingface_hub's: $HF_TOKEN, else the one `hf auth login` saved.
    Nothing local changes unless the upload succeeds.
    """
    if (dataset_dir is None) == (model is None):
        raise BadInputError("push takes a DATASET_DIR or --model DIR (one of them)", hint="see `tracegen push --help`")
    if model is not None:
        from tracegen.distill.model_card import push_model

        typer.echo(push_model(model, repo_id, private, dataset_id))
        return
    if dataset_id is not None:
        raise BadInputError("--dataset-id goes with --model", hint="drop it when pushing a dataset")
    from tracegen.data.hub import push_dataset

    assert dataset_dir is not None
    typer.echo(push_dataset(dataset_dir, repo_id, private))


@app.command("eval")
def eval_(
    out: Annotated[Path, typer.Option("--out", "-o", help="Eval directory (re-running the same command resumes).")],
    tasks: Annotated[
        Path | None, typer.Option(help="Tasks with references: a JSONL file or a local Hugging Face dataset directory.")
    ] = None,
    recipe: Annotated[Path | None, typer.Option(help="Recipe YAML; flags override its `eval:` section.")] = None,
    base_url: Annotated[
        str | None, typer.Option(envvar="TRACEGEN_EVAL_BASE_URL", help="Endpoint of the model under test.")
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            envvar="TRACEGEN_EVAL_MODEL",
            metavar="MODEL",
            help="Model under test; repeat it (--model base --model merged) to compare models served the same way.",
        ),
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option("--samples", "-k", help="Answers per task.", show_default=default("EvalConfig", "samples")),
    ] = None,
    prompt_template: Annotated[
        Literal["none", "proof", "dualmind", "instruct"] | None,
        typer.Option(
            help="Wrap prompts in a training template's prompt part (none: as is).",
            show_default=default("EvalConfig", "prompt_template"),
        ),
    ] = None,
    runtime: Annotated[
        Literal["docker", "simulated"] | None, typer.Option(help="Where the model's tool calls run.")
    ] = None,
    tests: Annotated[
        bool | None, typer.Option("--tests/--no-tests", help="Also run the tasks' tests in the Docker sandbox.")
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", "-c", help="Questions in flight.", show_default=default("EvalConfig", "concurrency")
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N tasks.")] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help="Sampling temperature.", show_default=default("EvalConfig", "endpoint.temperature")),
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Nucleus sampling.", show_default=default("EvalConfig", "endpoint.top_p"))
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(help="Completion tokens per turn.", show_default=default("EvalConfig", "endpoint.max_tokens")),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed, where the server supports it.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (for scripts).")] = False,
) -> None:
    """Measure a served model on a task set: accuracy by reference (and tests), and finish_reason per question.

    The model answers through the same agent loop as collect (thinking on, tools offered); each answer
    is scored by filter's reference check. Reports the share that converged (finish_reason=stop) and
    the share that ran into the token wall (length). Writes OUT/eval.json and OUT/trajectories.jsonl;
    with several --model, OUT/<model>/ each and OUT/compare.json, and prints them side by side.
    The API key is read from $TRACEGEN_EVAL_API_KEY (or $OPENAI_API_KEY), never written anywhere.
    """
    from tracegen.config import EvalConfig
    from tracegen.recipe import apply_overrides, load_recipe

    base = (load_recipe(recipe).eval or EvalConfig()) if recipe else EvalConfig()
    models = model or []
    endpoint = {
        "base_url": base_url,
        "model": models[0] if models else None,
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "seed": seed,
    }
    overrides: dict[str, Any] = {
        "tasks": str(tasks) if tasks else None,
        "endpoint": endpoint,
        "samples": samples,
        "prompt_template": prompt_template,
        "runtime": runtime,
        "tests": tests,
        "concurrency": concurrency,
        "limit": limit,
    }
    config = apply_overrides(base, overrides)

    from tracegen.evaluate import print_comparison, print_eval, run_comparison, run_eval

    if len(models) > 1:
        summaries = run_comparison(config, models, out, show_progress=not quiet)
    else:
        summaries = [run_eval(config, out, show_progress=not quiet)]
    if summaries[-1].interrupted:
        typer.echo("Interrupted: answers so far are saved; re-run the same command to resume.", err=True)
        raise typer.Exit(130)
    if as_json:
        payload = [
            {"model": s.model, "totals": s.totals(), "rows": [dataclasses.asdict(r) for r in s.rows]} for s in summaries
        ]
        typer.echo(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
    else:
        for summary in summaries:
            print_eval(summary)
        if len(summaries) > 1:
            print_comparison(summaries)


@app.command("run")
def run_(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML; its run.stages say which stages run.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Work directory (re-running the same command resumes).")],
    scale: Annotated[
        Literal["full", "smoke"],
        typer.Option(help="full: the recipe as written; smoke: its smoke: block (tiny offline models and data)."),
    ] = "full",
    teacher_base_url: Annotated[
        str | None, typer.Option(envvar="TRACEGEN_TEACHER_BASE_URL", help="Teacher endpoint (overrides the recipe).")
    ] = None,
    teacher_model: Annotated[
        str | None, typer.Option(envvar="TRACEGEN_TEACHER_MODEL", help="Teacher model name (overrides the recipe).")
    ] = None,
    runtime: Annotated[
        Literal["docker", "simulated"] | None,
        typer.Option(help="Where collect's tool calls run (overrides the recipe)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the stages, their settings and what would be skipped; run none.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary (or the plan) as JSON.")] = False,
) -> None:
    """Run every stage the recipe declares (collect, filter, format, cache-teacher, distill, merge, stage 2, eval).

    Stages run in pipeline order; a finished stage is skipped on re-run and a crashed one resumes where
    it stopped. Ends with a table of what each stage produced and where. WORK_DIR/run.json keeps it.
    """
    from rich.console import Console
    from rich.table import Table

    from tracegen.pipeline import Pipeline, summary_rows, write_summary
    from tracegen.recipe import load_recipe

    config = load_recipe(recipe, scale)
    if teacher_base_url:
        config.collect.teacher.base_url = teacher_base_url
    if teacher_model:
        config.collect.teacher.model = teacher_model
    if runtime:
        config.collect.runtime = runtime
    console = Console(stderr=True)

    def show(stage: str, summary: Any) -> None:  # a stage's own table, as its command prints it
        if as_json:
            return
        if stage == "collect":
            from tracegen.collect.report import print_collect_summary

            print_collect_summary(summary)
        elif stage == "eval":
            from tracegen.evaluate import print_eval

            print_eval(summary)

    pipeline = Pipeline(
        config, out, scale, show_progress=not quiet, say=lambda m: console.print(m, markup=False), on_summary=show
    )
    if dry_run:
        _print_plan(pipeline, as_json)
        return
    outcomes = pipeline.run()
    path = write_summary(out, outcomes)
    if as_json:
        typer.echo(path.read_text(encoding="utf-8"))
        return
    table = Table(title=f"tracegen run {config.name or recipe.stem} ({scale})")
    for column in ("stage", "status", "seconds", "output and facts"):
        table.add_column(column, overflow="fold")
    for row in summary_rows(outcomes):
        table.add_row(*row)
    Console().print(table)
    typer.echo(f"Summary: {path}")


def _print_plan(pipeline: Any, as_json: bool) -> None:
    """``run --dry-run``: one line per stage (what it would do, where), then each stage's settings."""
    plan = pipeline.plan()
    if as_json:
        rows = [{"stage": p.stage, "out": str(p.out), "action": p.action, "settings": p.settings} for p in plan]
        typer.echo(json.dumps({"stages": rows}, indent=2))
        return
    width = max(len(p.stage) for p in plan)
    for p in plan:
        typer.echo(f"{p.stage:<{width}}  {p.action:<20}  {p.out}")
    for p in plan:
        typer.echo(f"\n{p.stage} settings:")
        for line in _flatten(p.settings):
            typer.echo(f"  {line}")


def _flatten(value: Any, path: str = "") -> list[str]:
    if isinstance(value, dict) and value:
        return [line for k, v in value.items() for line in _flatten(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return [line for i, v in enumerate(value) for line in _flatten(v, f"{path}[{i}]")]
    return [f"{path or '(value)'}: {json.dumps(value)}"]


@app.command("serve")
def serve_(
    model: Annotated[
        str,
        typer.Argument(metavar="MODEL", help="A local model folder, a Hub id, smollm2 or tiny:FAMILY[:SEED]."),
    ],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 8000,
    threads: Annotated[int, typer.Option(help="torch threads in the server.")] = 1,
) -> None:
    """Serve a model with `transformers serve` on 127.0.0.1 as an OpenAI-compatible teacher, until Ctrl-C.

    The same set-up `tracegen run` uses for `run.serve` (aliases included). Prints the base URL and the
    flags to pass to collect, including the tool protocol the model's chat template needs.
    """
    import signal

    from tracegen.model_aliases import resolve_model
    from tracegen.serve import serve, tool_protocol_for

    model_dir = Path(resolve_model(model))
    if not model_dir.is_dir():
        raise TracegenError(f"{model}: serve needs a local model folder", hint="download it first, or use an alias")

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):  # the server is in its own session: stop it on these too
        signal.signal(sig, stop)
    typer.echo(f"serve: starting transformers serve on {model_dir} ...", err=True)
    with serve(model_dir, port, threads=threads) as teacher:
        protocol = tool_protocol_for(model_dir)
        typer.echo(f"base_url: {teacher.base_url}\nmodel:    {teacher.model}\ntool protocol: {protocol}")
        typer.echo(
            f"collect with:\n  tracegen collect --tasks TASKS --out RUN_DIR --teacher-base-url {teacher.base_url} "
            f"--teacher-model {teacher.model} --tool-protocol {protocol}\n(Ctrl-C to stop)"
        )
        sys.stdout.flush()
        try:
            teacher.process.wait()
        except KeyboardInterrupt:
            typer.echo("serve: stopped.", err=True)
            raise typer.Exit(130) from None
    raise TracegenError(f"transformers serve exited with code {teacher.process.returncode}", hint=teacher.log_tail())


def main() -> None:
    """Run the app; map tracegen's error tree to exit codes and one readable line, never a secret."""
    try:
        code = app(standalone_mode=False)
    except TracegenError as exc:
        if os.environ.get("TRACEGEN_DEBUG") == "1":
            raise
        typer.echo(f"Error: {exc.message}", err=True)
        if exc.hint:
            typer.echo(f"hint: {exc.hint}", err=True)
        sys.exit(exc.exit_code)
    except _USAGE_ERRORS as exc:  # bad usage: click's own message, exit 2
        usage: Any = exc
        usage.show()
        sys.exit(usage.exit_code)
    except (_Interrupted, typer.Abort):  # Ctrl-C outside a command's own clean stop
        typer.echo("Interrupted.", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


app.add_typer(sandbox_app, name="sandbox")
app.add_typer(distill_app, name="distill")
app.add_typer(export_app, name="export")

if __name__ == "__main__":
    main()
