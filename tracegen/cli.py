"""The ``tracegen`` command line: parse, build a config, call one library function, map errors.

Exit codes: 0 success; 1 a known failure (one ``Error:`` line and a hint on stderr; the traceback only
with ``TRACEGEN_DEBUG=1``); 2 bad usage or bad input; 130 after a clean stop on Ctrl-C.
Results go to stdout, progress and logs to stderr. Heavy libraries are imported inside commands so
``tracegen --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import click
import typer

from tracegen.distill_cli import distill_app
from tracegen.errors import TracegenError
from tracegen.sandbox_cli import sandbox_app

app = typer.Typer(
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
        int | None, typer.Option("--concurrency", "-c", help="Trajectories in flight (default 32).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N tasks.")] = None,
    max_turns: Annotated[int | None, typer.Option(help="Teacher turns per trajectory (default 8).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default 0.6).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling (default 0.95).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Completion tokens per turn (default 4096).")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed, where the server supports it.")] = None,
    tool_protocol: Annotated[
        Literal["auto", "native", "hermes", "function_tag"] | None,
        typer.Option(help="How tool calls are expressed (default auto: detected per reply)."),
    ] = None,
    fail_on_error: Annotated[
        float | None, typer.Option(help="Exit 1 when more than this fraction of trajectories errored (default 0.5).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Generate thinking-on, multi-turn tool-calling trajectories from an OpenAI-compatible teacher.

    Writes OUT/trajectories.jsonl (one trajectory per line) and OUT/manifest.json. The API key is read
    from $TRACEGEN_TEACHER_API_KEY (or $OPENAI_API_KEY) and is never written anywhere.
    """
    from tracegen.config import CollectConfig, apply_overrides, load_recipe

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

    from tracegen.collect import run_collect
    from tracegen.report import print_collect_summary

    summary = run_collect(config, out, show_progress=not quiet)
    print_collect_summary(summary)
    if summary.interrupted:
        typer.echo(f"Interrupted: {summary.completed} trajectories saved; re-run the same command to resume.", err=True)
        raise typer.Exit(130)
    if summary.completed and summary.error_rate > config.fail_on_error:
        raise TracegenError(
            f"{summary.by_stop_reason['error']} of {summary.completed} trajectories ended in error "
            f"({summary.error_rate:.0%} > --fail-on-error {config.fail_on_error:.0%})",
            hint=f"read the `errors` field of the records in {out / 'trajectories.jsonl'}",
        )


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
    except click.ClickException as exc:  # bad usage: click's own message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:  # Ctrl-C outside a command's own clean stop
        typer.echo("Interrupted.", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


app.add_typer(sandbox_app, name="sandbox")
app.add_typer(distill_app, name="distill")

if __name__ == "__main__":
    main()
